"""Raw face ingest: source listing -> decoded, de-duplicated, face-cropped samples in WebDataset shards.

Per image: read bytes -> decode to upright RGB -> pixel hash (duplicates are counted and kept once) -> find the face
(known box, detector, or centre crop for aligned sources) -> crop, level and resize -> JPEG -> shard. Bad input becomes
a reject row with its reason; the rest goes on. Shards close every `shard_size` samples together with a progress file,
so a killed run resumes at the next unfinished shard. Worker processes decode and crop; the main process keeps the
order, de-duplicates and writes, so the result is the same for any number of workers.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from synfer_pipeline.curation import faces
from synfer_pipeline.curation.readers import Reject, SourceListing, SourceRecord
from synfer_pipeline.io.images import BadImage, decode_image, encode_jpeg, pixel_hash
from synfer_pipeline.io.preview import preview_grid
from synfer_pipeline.io.shards import ShardWriter, iter_shard, read_index
from synfer_pipeline.io.storage import ArtifactRef, ArtifactWriter, data_version_of, read_uri, stage_key
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSION_INDEX

SHARD_NAME = "faces"
# A duplicate image is kept once; both labels are recorded, and whether they disagree.
DUPLICATE_COLUMNS = ["sample_id", "duplicate_of", "uri", "label", "label_of_kept", "conflicting_labels"]
NOT_BAD_INPUT = {"excluded_label"}
MIN_BOX_INSIDE = 0.5  # a known face box with less than half of its area inside the image is a bad row  # filtered by design (AffectNet none/uncertain/no-face), not bad input


@settings
class IngestSettings:
    """How a source becomes face crops (per dataset; defaults come from the profile)."""

    face_size: int = 128          # side of the square crop, pixels
    margin: float = 0.3           # box widening around a detected face, fraction of its side
    min_side: int = 32            # images with a shorter side are rejected as too small for a face
    aligned: bool = False         # already face-aligned crops: centre square, no detection
    # For aligned sources whose crops leave a wide margin: the square to keep, as (centre x, centre y, side), the
    # centre in fractions of the image's width and height, the side in fractions of its shorter side (None: the
    # whole centred square).
    aligned_crop: tuple[float, float, float] | None = None
    detector: str = "blazeface"   # or opencv-haar, skimage-lbp
    detector_options: dict = field(default_factory=dict)
    shard_size: int = 1000
    jpeg_quality: int = 95
    workers: int = 1
    batch: int = 16               # images decoded and detected together (one detector forward per batch)
    preview: int = 32             # crops in the preview grid

    def __post_init__(self):
        if self.aligned_crop is not None:
            fx, fy, side = self.aligned_crop
            if not (0 <= fx <= 1 and 0 <= fy <= 1 and 0 < side <= 1):
                raise ValueError(f"aligned_crop {list(self.aligned_crop)}: centre x and y must lie in [0, 1] and "
                                 "the side in (0, 1]")


@dataclass
class IngestResult:
    ref: ArtifactRef
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    duplicates: pd.DataFrame
    ignored_files: int
    preview_png: bytes


def reject_rate(n_accepted: int, n_duplicates: int, rejects: pd.DataFrame) -> float:
    """Share of candidate images rejected as bad input (design filters such as AffectNet's 'no-face' excluded)."""
    bad = int((~rejects["reason"].isin(NOT_BAD_INPUT)).sum()) if len(rejects) else 0
    total = n_accepted + n_duplicates + bad
    return bad / total if total else 0.0


# -- per image (runs in worker processes) ----------------------------------------------------------------------
_detector: faces.FaceDetector | None = None


def _init_worker(settings: IngestSettings) -> None:
    global _detector
    _detector = None if settings.aligned else faces.make_detector(settings.detector, **settings.detector_options)


def process_records(records: list[SourceRecord], settings: IngestSettings) -> list[tuple[dict, bytes] | Reject]:
    """Decode, hash, locate and crop a batch of images: per record (index row, JPEG bytes) or a Reject with the
    reason. The faces of the batch are detected in one call (one network forward for a CNN detector)."""
    decoded: list[tuple[Image.Image, np.ndarray] | Reject] = [_decoded(r, settings, full=False) for r in records]
    todo = [i for i, d in enumerate(decoded) if not isinstance(d, Reject) and records[i].box is None and not settings.aligned]
    found = dict(zip(todo, faces.detect_batch(_detector, [decoded[i][1] for i in todo]))) if todo else {}
    return [d if isinstance(d, Reject) else _crop(r, d, found.get(i), settings)
            for i, (r, d) in enumerate(zip(records, decoded))]


def _decoded(record: SourceRecord, settings: IngestSettings, full: bool) -> tuple[Image.Image, np.ndarray] | Reject:
    try:
        return _decode(record, settings, full)
    except BadImage as e:
        return Reject(record.uri, e.reason, e.detail, record.sample_id, "decode")
    except OSError as e:
        return Reject(record.uri, "unreadable", f"{type(e).__name__}: {e}", record.sample_id, "read")


def _crop(record: SourceRecord, decoded: tuple[Image.Image, np.ndarray], detected: list[faces.Box] | None,
          settings: IngestSettings) -> tuple[dict, bytes] | Reject:
    img, pixels = decoded
    box, n_faces = _locate_face(img, record, settings, detected)
    if n_faces == 0:
        return Reject(record.uri, "no_face", f"detector {settings.detector} found no face", record.sample_id, "detect")
    scale = img.info["scale"]
    margin = 0.0 if settings.aligned and record.box is None else settings.margin  # an aligned crop is the square
    if box is not None and scale < 1 and max(box.w, box.h) * (1 + margin) < settings.face_size:
        full = _decoded(record, settings, full=True)  # a small face: crop it from full resolution, same box
        if isinstance(full, Reject):
            return full
        (img, pixels), box, scale = full, box.scaled(1 / scale), 1.0
    if record.box is not None and (inside := faces.inside_fraction(box, img.size)) < MIN_BOX_INSIDE:
        x, y, w, h = record.box
        size = f"{round(img.size[0] / scale)}x{round(img.size[1] / scale)}"
        return Reject(record.uri, "bad_box", f"face box ({x:g}, {y:g}, {w:g}, {h:g}) lies mostly outside the {size} "
                      f"image ({inside:.0%} inside)", record.sample_id, "detect")
    crop = faces.crop_face(pixels, box, settings.face_size, margin)
    native = (max(box.w, box.h) * (1 + margin) if box else min(img.size)) / scale
    row = {
        "sample_id": record.sample_id, "source": record.source, "split": record.split, "label": record.label,
        "label_index": EXPRESSION_INDEX[record.label] if record.label else -1,
        "width": int(round(img.size[0] / scale)), "height": int(round(img.size[1] / scale)),
        "content_hash": pixel_hash(pixels), "uri": record.uri, "face_native_px": int(round(native)),
        "face_box": json.dumps([round(v / scale, 1) for v in (box.x, box.y, box.w, box.h)] if box else None),
        "roll_deg": round(box.roll, 1) if box else 0.0, "faces_found": n_faces,
    }
    return row, encode_jpeg(crop, settings.jpeg_quality)


def _decode(record: SourceRecord, settings: IngestSettings, full: bool) -> tuple[Image.Image, np.ndarray]:
    if record.pixels is not None:
        img = Image.fromarray(record.pixels).convert("RGB")
        img.info["scale"] = 1.0
        return img, np.asarray(img)
    # Aligned crops and detection both need only a fraction of a large photo's pixels: let the JPEG decoder skip
    # the rest (detection at up to 4x the crop side, so that a face of a quarter of the photo needs no second
    # decode to be cropped sharp). A known box (AffectNet) is cropped from full resolution.
    aligned = round(settings.face_size / (settings.aligned_crop[2] if settings.aligned_crop else 1.0))
    draft = None if full or record.box else (aligned if settings.aligned else 4 * settings.face_size)
    img = decode_image(read_uri(record.uri), settings.min_side, draft_side=draft)
    return img, np.asarray(img)


def _locate_face(img: Image.Image, record: SourceRecord, settings: IngestSettings,
                 detected: list[faces.Box] | None) -> tuple[faces.Box | None, int]:
    if record.box is not None:
        return faces.Box(*record.box).scaled(img.info["scale"]), 1
    if settings.aligned:
        if settings.aligned_crop is None:
            return None, 1
        return faces.aligned_box(*img.size, settings.aligned_crop), 1  # the square itself: no margin added
    return (detected[0] if detected else None), len(detected or ())


def _process(records: list[SourceRecord]) -> list[tuple[dict, bytes] | Reject]:
    return process_records(records, _SETTINGS)


_SETTINGS: IngestSettings | None = None


def _init_pool(settings: IngestSettings) -> None:
    global _SETTINGS
    _SETTINGS = settings
    _init_worker(settings)


def map_records(records: list[SourceRecord], settings: IngestSettings) -> Iterator[tuple[dict, bytes] | Reject]:
    """`process_records` over records in order, `settings.batch` at a time, in `settings.workers` processes (in
    this one if 1)."""
    batches = [records[i:i + settings.batch] for i in range(0, len(records), settings.batch)]
    if settings.workers <= 1:
        _init_pool(settings)
        for batch in batches:
            yield from _process(batch)
        return
    ctx = multiprocessing.get_context("spawn")  # torch/dagster in the parent make fork unsafe
    pool = ctx.Pool(settings.workers, initializer=_init_pool, initargs=(settings,))
    try:
        for results in pool.imap(_process, batches):
            yield from results
        # Workers leave on their own once the task queue is closed. Not `terminate`: it relies on SIGTERM, which a
        # process started from some shells' background jobs inherits as ignored, and the join then never returns.
        pool.close()
    except BaseException:
        for worker in list(getattr(pool, "_pool", [])):
            worker.kill()  # SIGKILL: cannot be ignored
        pool.terminate()
        raise
    finally:
        pool.join()


# -- the whole source -------------------------------------------------------------------------------------------
def ingest(listing: SourceListing, settings: IngestSettings, writer: ArtifactWriter, run_id: str = "") -> IngestResult:
    """Ingest a listed source into `writer`'s staging folder, publish it, and return what was made."""
    progress = _Progress.load(writer)
    sink = ShardWriter(writer.storage, writer.staging, SHARD_NAME, settings.shard_size, start_index=progress.shards,
                       on_shard_closed=progress.save_shard)
    for position, result in enumerate(map_records(listing.records[progress.next_record:], settings), progress.next_record):
        progress.next_record = position + 1
        if isinstance(result, Reject):
            progress.rejects.append(asdict(result))
            continue
        row, jpeg = result
        first, first_label = progress.seen.setdefault(row["content_hash"], (row["sample_id"], row["label"]))
        if first != row["sample_id"]:
            progress.duplicates.append({"sample_id": row["sample_id"], "duplicate_of": first, "uri": row["uri"],
                                        "label": row["label"], "label_of_kept": first_label,
                                        "conflicting_labels": bool(row["label"] != first_label)})
            continue
        members = {"jpg": jpeg, "json": row}
        if row["label_index"] >= 0:
            members["cls"] = row["label_index"]
        sink.write(row["sample_id"], members, row)
    sink.close()
    progress.save_tail()
    return _finish(writer, listing, settings, progress, run_id)


def _finish(writer: ArtifactWriter, listing: SourceListing, settings: IngestSettings, progress: _Progress,
            run_id: str) -> IngestResult:
    manifest = read_index(writer.storage, writer.staging, SHARD_NAME)
    rejects = pd.DataFrame([asdict(r) for r in listing.rejects] + progress.all_rejects(),
                           columns=["uri", "reason", "detail", "sample_id", "stage"])
    duplicates = pd.DataFrame(progress.all_duplicates(), columns=DUPLICATE_COLUMNS)
    for name, df in (("manifest", manifest), ("rejects", rejects), ("duplicates", duplicates)):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        writer.write_bytes(f"{name}.parquet", buf.getvalue())
    png = _preview(writer, manifest, settings.preview)
    writer.write_bytes("preview.png", png)
    for path in writer.list("_progress-*.json"):
        writer.storage.fs.rm(path)
    lines = [f"{k}:{h}" for k, h in sorted(zip(manifest.get("key", []), manifest.get("sample_hash", [])))]
    lines += sorted(f"reject:{r.uri}:{r.reason}" for r in rejects.itertuples())
    counts = {"samples": len(manifest), "rejects": len(rejects), "duplicates": len(duplicates),
              "shards": int(manifest["shard"].nunique()) if len(manifest) else 0}
    ref = ArtifactRef(writer.asset, writer.partition, writer.staging, data_version_of(lines), counts, run_id)
    ref = writer.publish(ref)
    return IngestResult(ref, manifest, rejects, duplicates, listing.ignored, png)


def _preview(writer: ArtifactWriter, manifest: pd.DataFrame, n: int) -> bytes:
    """A grid of up to `n` crops, spread over the classes when the source is labelled."""
    if not len(manifest):
        return preview_grid([])
    per_class = max(1, n // max(1, manifest["label"].nunique(dropna=False)))
    chosen = manifest.groupby(manifest["label"].fillna("unlabelled"), sort=True).head(per_class).head(n)
    chosen = chosen.sort_values("label", kind="stable")
    wanted = dict(zip(chosen["key"], chosen["label"].fillna("")))
    images = {}
    for shard in chosen["shard"].unique():
        for key, members in iter_shard(writer.storage, posixpath.join(writer.staging, shard)):
            if key in wanted:
                images[key] = Image.open(io.BytesIO(members["jpg"]))
    keys = [k for k in chosen["key"] if k in images]
    return preview_grid([images[k] for k in keys], [wanted[k] for k in keys])


@dataclass
class _Progress:
    """Resume state: shards done, the next record to process, and what was rejected or duplicated so far."""

    writer: ArtifactWriter
    shards: int = 0
    next_record: int = 0
    seen: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # content hash -> (sample_id, label)
    rejects: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    _saved: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, writer: ArtifactWriter) -> _Progress:
        progress = cls(writer)
        for path in writer.list("_progress-[0-9]*.json"):  # in shard order
            state = json.loads(writer.storage.read_bytes(path))
            if not writer.exists(f"{SHARD_NAME}-{state['shard']:06d}.parquet"):
                break
            progress.shards, progress.next_record = state["shard"] + 1, state["next_record"]
            progress._saved.append(state)
        if progress.shards:
            index = read_index(writer.storage, writer.staging, SHARD_NAME)
            index = index[index["shard"] < f"{SHARD_NAME}-{progress.shards:06d}"]
            progress.seen = {h: (s, label) for h, s, label in zip(index["content_hash"], index["sample_id"], index["label"])}
        return progress

    def save_shard(self, shard: int, rows: list[dict]) -> None:
        self._write(f"_progress-{shard:06d}.json", {"shard": shard})
        self.shards = shard + 1

    def save_tail(self) -> None:
        self._write("_progress-tail.json", {"shard": -1})

    def _write(self, name: str, extra: dict[str, Any]) -> None:
        state = {**extra, "next_record": self.next_record, "rejects": self.rejects, "duplicates": self.duplicates}
        self.writer.write_bytes(name, json.dumps(state).encode())
        self._saved.append(state)
        self.rejects, self.duplicates = [], []

    def all_rejects(self) -> list[dict]:
        return [r for s in self._saved for r in s["rejects"]]

    def all_duplicates(self) -> list[dict]:
        return [d for s in self._saved for d in s["duplicates"]]


def listing_fingerprint(listing: SourceListing) -> str:
    """What the source held when listed: ids, uris and sizes (a changed file changes the staging key)."""
    return stage_key([(r.sample_id, r.uri, r.stamp) for r in listing.records], [asdict(r) for r in listing.rejects])

