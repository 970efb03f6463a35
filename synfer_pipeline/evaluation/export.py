"""Export for other trainers: the voted synthetic set as an ImageFolder tree and as WebDataset shards.

ImageFolder (what solo-learn, POSTER++ and APViT training code read):

    {out}/imagefolder/train/{class}/{key}.png    an image, filed under its voted label
    {out}/imagefolder/train/{class}/{key}.json   its provenance: the generation record, intended and voted
                                                 labels, each voter's call, the artifacts it came from
    {out}/imagefolder/test/{class}/...           with real faces: the real test split (provenance `real`)

With real faces, `train/` holds the real training faces beside the synthetic ones (one tree). WebDataset:
`{out}/webdataset/export-{i:06d}.tar` (+ Parquet index), each sample a `.png`, a `.cls` (the class index in
`classes.txt`, the canonical order) and the same `.json`. Dropped samples (voting's `kept` False) are not exported.
The whole export is written in a temporary folder and renamed to `out` when complete; an existing non-empty `out`
is refused, never overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from synfer_pipeline.io.datasets import image_member
from synfer_pipeline.io.images import encode_png
from synfer_pipeline.io.shards import write_shard
from synfer_pipeline.io.storage import Storage, atomic_folder
from synfer_pipeline.vocab import EXPRESSIONS

FORMATS = ("imagefolder", "webdataset")
CLASSES_FILE = "classes.txt"
MANIFEST = "export.json"


def _provenance(meta: dict, row: Mapping, source: Mapping) -> dict:
    calls = {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith("call:")}
    return {"source": "synthetic", **source, "key": row["key"], "label": row["voted"], "intended": row["intended"],
            "voted": row["voted"], "relabelled": bool(row["relabelled"]), "confidence": float(row["confidence"]),
            "voter_calls": calls, "generation": meta}


def export_voted(samples: Iterable[tuple[str, dict[str, bytes], Mapping]], voted: pd.DataFrame, out: str | Path,
                 formats: Sequence[str] = FORMATS, real: Mapping[str, tuple[Sequence, Sequence, Sequence]] | None = None,
                 shard_size: int = 1000) -> dict:
    """Write the export; returns its manifest (counts per format, split and class).

    samples: (key, members, source) of the synthetic shards, source naming where it came from (artifact uri,
    round, shard); voted: a `labels.voting.vote` table for those keys; real: optionally {"train": (images, labels,
    keys), "test": (...)} of real faces (PIL images) to write beside them.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"export formats {unknown or '(none)'}: choose from {FORMATS}")
    rows = {r["key"]: r for r in voted.to_dict("records")}
    counts: dict = {f: {} for f in formats}
    seen: set[str] = set()
    out = Path(out)
    with atomic_folder(out, if_exists="error") as tmp:
        store = Storage(str(tmp))
        wds_samples: list = []
        shard_index = 0

        def emit(split: str, key: str, label: str, png: bytes, provenance: dict) -> None:
            nonlocal shard_index, wds_samples
            for fmt in formats:
                if fmt == "webdataset" and split != "train":
                    continue  # the shards hold the training set; the test split is in the ImageFolder tree
                by_split = counts[fmt].setdefault(split, {})
                by_split[label] = by_split.get(label, 0) + 1
            if "imagefolder" in formats:
                folder = tmp / "imagefolder" / split / label
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key}.png").write_bytes(png)
                (folder / f"{key}.json").write_text(json.dumps(provenance, sort_keys=True))
            if "webdataset" in formats and split == "train":
                wds_samples.append((key, {"png": png, "cls": EXPRESSIONS.index(label), "json": provenance},
                                    {"label": label, "source": provenance["source"]}))
                if len(wds_samples) >= shard_size:
                    write_shard(store, str(tmp / "webdataset"), "export", shard_index, wds_samples)
                    shard_index, wds_samples = shard_index + 1, []

        for key, members, source in samples:
            row = rows.get(key)
            if row is None or not row["kept"]:
                continue
            seen.add(key)
            emit("train", key, row["voted"], image_member(members), _provenance(json.loads(members["json"]), row, source))
        missing = sorted({k for k, r in rows.items() if r["kept"]} - seen)
        if missing:
            raise KeyError(f"{len(missing)} voted samples were not found in the synthetic shards (first: {missing[0]})")
        for split, (images, labels, keys) in (real or {}).items():
            for image, label, key in zip(images, labels, keys):
                name = "real_" + key.replace("/", "_").replace(".", "_")
                emit(split, name, label, encode_png(image), {"source": "real", "key": key, "label": label,
                                                             "split": split})
        if wds_samples:
            write_shard(store, str(tmp / "webdataset"), "export", shard_index, wds_samples)
        if "webdataset" in formats:
            (tmp / "webdataset" / CLASSES_FILE).write_text("\n".join(EXPRESSIONS) + "\n")
        manifest = {"formats": list(formats), "counts": counts, "synthetic": len(seen),
                    "real": {s: len(v[0]) for s, v in (real or {}).items()}, "classes": list(EXPRESSIONS)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
