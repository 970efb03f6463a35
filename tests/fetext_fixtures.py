"""A small FEText for tests and benchmarks: toy faces + template captions written as WebDataset shards.

Every sample follows the FEText format that training reads: `jpg` (RGB at `size` px), `txt` (caption), `json`
({sample_id, source, label, native_hr, aus, au_vector}), `cls` (canonical label index). Samples alternate between
a native high-resolution source ("ffhq") and a super-resolved one ("affectnet") unless told otherwise.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from synfer_pipeline.curation.captions.template import TemplateCaptioner
from synfer_pipeline.demo.toyfaces import draw_toy_face
from synfer_pipeline.io.shards import encode_member, shard_urls, write_shard
from synfer_pipeline.io.storage import Storage
from synfer_pipeline.vocab import EXPRESSION_INDEX, EXPRESSIONS_7, OPENGRAPHAU_41, au_vector

NATIVE_SOURCE, SUPERRES_SOURCE = "ffhq", "affectnet"


def toy_fetext_samples(n: int, size: int = 64, seed: int = 0, native_every: int = 2):
    """n FEText samples as (key, members, index row); sample i is native_hr when i % native_every == 0."""
    rng = np.random.default_rng(seed)
    captioner = TemplateCaptioner(seed)
    for i in range(n):
        expression = EXPRESSIONS_7[i % len(EXPRESSIONS_7)]
        face = draw_toy_face(expression, rng, size=size)
        key = f"toy{seed:02d}{i:05d}"
        native = i % native_every == 0
        source = NATIVE_SOURCE if native else SUPERRES_SOURCE
        buf = io.BytesIO()
        face.image.save(buf, format="JPEG", quality=92)
        meta = {"sample_id": key, "source": source, "label": expression, "native_hr": native,
                "aus": list(face.aus), "au_names": list(OPENGRAPHAU_41),
                "au_vector": [float(v) for v in au_vector(face.aus)]}
        members = {"jpg": buf.getvalue(), "txt": captioner.caption(expression, face.aus, key=key), "json": meta,
                   "cls": EXPRESSION_INDEX[expression]}
        yield key, {ext: encode_member(ext, v) for ext, v in members.items()}, {"source": source, "native_hr": native}


def write_toy_fetext(folder: str | Path, n: int = 24, per_shard: int = 8, size: int = 64, seed: int = 0,
                     native_every: int = 2) -> list[str]:
    """Write `n` toy FEText samples as `fetext-000000.tar`, ... (at most `per_shard` each) under `folder`
    (a local path or s3:// url); returns the shard urls in order."""
    storage = Storage(str(folder))
    samples = list(toy_fetext_samples(n, size, seed, native_every))
    for index, start in enumerate(range(0, n, per_shard)):
        write_shard(storage, storage.root, "fetext", index, samples[start:start + per_shard])
    return shard_urls(storage, storage.root, "fetext")
