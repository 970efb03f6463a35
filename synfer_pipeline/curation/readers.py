"""Readers for face datasets in their real layouts, local or on S3 (through fsspec).

Each reader turns a source into `SourceRecord`s (one per image, labels mapped to `vocab.EXPRESSIONS` names) and
`Reject`s for what cannot be used (unknown labels, label rows without a file, files without a label row). A
missing or empty source raises `SourceError` naming the path. Images are not decoded here.

Formats: `rafdb`, `affectnet`, `fer2013` (optionally with FERPlus votes), `folder` (one folder per class, e.g.
SFEW; split folders allowed) and `unlabelled` (FFHQ, CelebA-HQ, any image folder).
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from synfer_pipeline.io.storage import filesystem_for
from synfer_pipeline.vocab import EXPRESSIONS, UnknownLabelError, canonical_expression

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
SIDECAR_EXTENSIONS = {".txt", ".csv", ".json", ".md", ".xml", ".yaml", ".yml", ".parquet", ".py", ".zip", ".tar"}

RAFDB_CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "anger", 7: "neutral"}
AFFECTNET_CODES = dict(enumerate(EXPRESSIONS))  # 0..7 = neutral ... contempt; 8..10 are none/uncertain/no-face
AFFECTNET_EXCLUDED = {8: "none", 9: "uncertain", 10: "no-face"}
FER2013_CODES = {0: "anger", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}
FER2013_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing, empty, malformed as a whole)."""


@dataclass
class SourceRecord:
    """One image of a source, before decoding. `pixels` carries in-memory images (FER2013 CSV rows)."""

    sample_id: str
    source: str
    split: str
    label: str | None
    uri: str
    stamp: str = ""  # size and modification time when listed: a changed file gets a new stamp
    pixels: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None  # known face box (x, y, w, h), e.g. AffectNet's


@dataclass
class Reject:
    uri: str
    reason: str
    detail: str
    sample_id: str = ""
    stage: str = "read"


@dataclass
class SourceListing:
    records: list[SourceRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    ignored: int = 0  # sidecar files (csv, txt...) that are not images and not expected to be


def sample_id(source: str, relpath: str) -> str:
    """Stable, webdataset-safe id from the source name and the file's path inside the source."""
    return f"{source}-" + re.sub(r"[^A-Za-z0-9_-]+", "_", relpath).strip("_")


def sample_id_for(fmt: str, source: str, name: str) -> str:
    """The id a reader gives the image called `name` in its own label files (for joining side tables such as AU
    labels): RAF-DB names images by stem (`train_00001.jpg`), the folder formats by relative path."""
    if fmt == "rafdb":
        return sample_id(source, posixpath.splitext(posixpath.basename(name))[0])
    if fmt == "fer2013":
        return sample_id(source, f"{int(name):06d}")
    return sample_id(source, name)


def read_source(fmt: str, uri: str, source: str, options: dict | None = None) -> SourceListing:
    """Read a source of format `fmt` at `uri` (local path or `s3://`); see the module docstring for formats."""
    if fmt not in READERS:
        raise SourceError(f"unknown dataset format {fmt!r} for {uri}; choose one of {sorted(READERS)}")
    fs, root = filesystem_for(uri)
    if not fs.exists(root):
        raise SourceError(f"dataset source {uri} does not exist")
    listing = READERS[fmt](fs, root, source, options or {})
    if not listing.records and not listing.rejects:
        raise SourceError(f"dataset source {uri} holds no images (format {fmt})")
    for r in listing.records:
        r.uri = _unstrip(fs, r.uri)
    for r in listing.rejects:
        r.uri = _unstrip(fs, r.uri)
    return listing


def _unstrip(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") or "://" in path else f"{protocol}://{path}"


def _find_files(fs, root: str) -> tuple[dict[str, str], int]:
    """Files under root as {relative path: stamp}, images only; second value counts ignored sidecar files."""
    found, ignored = {}, 0
    for path, info in fs.find(root, detail=True).items():
        rel = posixpath.relpath(path, root)
        name = posixpath.basename(rel)
        ext = posixpath.splitext(name)[1].lower()
        if name.startswith(".") or ext in SIDECAR_EXTENSIONS:
            ignored += 1
            continue
        modified = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        found[rel] = f"{info.get('size', -1)}:{modified}"
    return found, ignored


def read_rafdb(fs, root: str, source: str, options: dict) -> SourceListing:
    """RAF-DB basic: `Image/aligned/train_00001_aligned.jpg` + `EmoLabel/list_patition_label.txt`."""
    variant = options.get("variant", "aligned")
    label_file = posixpath.join(root, "EmoLabel", "list_patition_label.txt")
    if not fs.exists(label_file):
        raise SourceError(f"RAF-DB label file {label_file} is missing")
    image_dir = posixpath.join(root, "Image", variant)
    files, ignored = _find_files(fs, image_dir) if fs.exists(image_dir) else ({}, 0)
    listing = SourceListing(ignored=ignored)
    labelled = set()
    for n, line in enumerate(fs.cat_file(label_file).decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        name_in_list = parts[0]
        stem, ext = posixpath.splitext(name_in_list)
        rel = f"{stem}_aligned{ext}" if variant == "aligned" else name_in_list
        uri = posixpath.join(image_dir, rel)
        labelled.add(rel)
        if len(parts) != 2 or not parts[1].isdigit():
            listing.rejects.append(Reject(uri, "bad_label_row", f"{label_file} line {n}: {line.strip()!r}"))
        elif int(parts[1]) not in RAFDB_CODES:
            listing.rejects.append(Reject(uri, "unknown_label", f"{label_file} line {n}: code {parts[1]} not in 1..7"))
        elif rel not in files:
            listing.rejects.append(Reject(uri, "missing_file", f"{label_file} line {n} names a file that is not there"))
        else:
            split = "train" if stem.startswith("train") else "test"
            listing.records.append(SourceRecord(sample_id(source, stem), source, split, RAFDB_CODES[int(parts[1])],
                                                uri, files[rel]))
    for rel in sorted(set(files) - labelled):
        listing.rejects.append(Reject(posixpath.join(image_dir, rel), "unlabelled_file", f"no row in {label_file}"))
    return listing


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...], path: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SourceError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})")


def read_affectnet(fs, root: str, source: str, options: dict) -> SourceListing:
    """AffectNet: `Manually_Annotated_Images/` + `training.csv`/`validation.csv` with face boxes and 0..10 codes."""
    image_dir = posixpath.join(root, options.get("image_dir", "Manually_Annotated_Images"))
    files, ignored = _find_files(fs, image_dir) if fs.exists(image_dir) else ({}, 0)
    listing = SourceListing(ignored=ignored)
    seen = set()
    for csv_name, split in (("training.csv", "train"), ("validation.csv", "val")):
        path = posixpath.join(root, csv_name)
        if not fs.exists(path):
            continue
        df = pd.read_csv(io.BytesIO(fs.cat_file(path)))
        _require_columns(df, ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression"), path)
        for row in df.itertuples(index=False):
            rel = str(row.subDirectory_filePath)
            uri = posixpath.join(image_dir, rel)
            seen.add(rel)
            code = pd.to_numeric(row.expression, errors="coerce")
            if pd.isna(code):
                listing.rejects.append(Reject(uri, "bad_label_row", f"{path}: expression {row.expression!r}"))
            elif int(code) in AFFECTNET_EXCLUDED:
                listing.rejects.append(Reject(uri, "excluded_label", f"{path}: {AFFECTNET_EXCLUDED[int(code)]} ({int(code)})"))
            elif int(code) not in AFFECTNET_CODES:
                listing.rejects.append(Reject(uri, "unknown_label", f"{path}: expression code {int(code)} not in 0..10"))
            elif rel not in files:
                listing.rejects.append(Reject(uri, "missing_file", f"{path} names a file that is not there"))
            else:
                box = tuple(float(v) for v in (row.face_x, row.face_y, row.face_width, row.face_height))
                listing.records.append(SourceRecord(sample_id(source, rel), source, split, AFFECTNET_CODES[int(code)],
                                                    uri, files[rel], box=box if all(np.isfinite(box)) else None))
    if not seen and files:
        raise SourceError(f"AffectNet source {root} has images but neither training.csv nor validation.csv")
    for rel in sorted(set(files) - seen):
        listing.rejects.append(Reject(posixpath.join(image_dir, rel), "unlabelled_file", "no row in the AffectNet csv files"))
    return listing


def read_fer2013(fs, root: str, source: str, options: dict) -> SourceListing:
    """FER2013: one CSV (emotion 0..6, 48x48 grey `pixels`, Usage); optional FERPlus majority-vote labels."""
    path = root if root.endswith(".csv") else posixpath.join(root, options.get("csv", "fer2013.csv"))
    if not fs.exists(path):
        raise SourceError(f"FER2013 csv {path} does not exist")
    df = pd.read_csv(io.BytesIO(fs.cat_file(path)), dtype={"pixels": str})
    _require_columns(df, ("emotion", "pixels", "Usage"), path)
    votes = _ferplus_labels(fs, options["ferplus_csv"], len(df)) if options.get("ferplus_csv") else None
    info = fs.info(path)
    stamp = f"{info.get('size', -1)}:{info.get('mtime') or info.get('LastModified') or info.get('ETag') or ''}"
    listing = SourceListing()
    for i, row in enumerate(df.itertuples(index=False)):
        uri = f"{path}#row={i}"
        sid = sample_id(source, f"{i:06d}")
        label = votes[i] if votes is not None else FER2013_CODES.get(pd.to_numeric(row.emotion, errors="coerce"))
        values = np.array(str(row.pixels).split(), dtype=np.int64) if isinstance(row.pixels, str) else np.array([])
        if label is None:
            listing.rejects.append(Reject(uri, "unknown_label", f"emotion {row.emotion!r} not in 0..6", sid))
        elif values.size != 48 * 48 or values.min(initial=0) < 0 or values.max(initial=0) > 255:
            listing.rejects.append(Reject(uri, "corrupt", f"pixels has {values.size} values, expected 2304 in 0..255", sid))
        else:
            split = FER2013_USAGE.get(str(row.Usage), "train")
            listing.records.append(SourceRecord(sid, source, split, label, uri, stamp,
                                                pixels=values.astype(np.uint8).reshape(48, 48)))
    return listing


def _ferplus_labels(fs, path: str, n: int) -> list[str | None]:
    """FERPlus majority vote per row (None when the winner is unknown/not-a-face or there is a tie)."""
    df = pd.read_csv(io.BytesIO(fs.cat_file(path)))
    _require_columns(df, FERPLUS_COLUMNS, path)
    if len(df) != n:
        raise SourceError(f"{path} has {len(df)} rows but the FER2013 csv has {n}")
    counts = df[list(FERPLUS_COLUMNS)].to_numpy()
    rest = df[[c for c in ("unknown", "NF") if c in df.columns]].to_numpy().max(axis=1, initial=0)
    out = []
    for row, other in zip(counts, rest):
        top = row.max()
        winners = np.flatnonzero(row == top)
        out.append(canonical_expression(FERPLUS_COLUMNS[winners[0]]) if top > other and len(winners) == 1 else None)
    return out


def read_class_folders(fs, root: str, source: str, options: dict) -> SourceListing:
    """One folder per class (`angry/`, `Happy/`...), optionally under split folders (`Train/`, `val/`...)."""
    files, ignored = _find_files(fs, root)
    listing = SourceListing(ignored=ignored)
    for rel in sorted(files):
        parts = rel.split("/")
        split = SPLIT_NAMES.get(parts[0].lower()) if len(parts) > 2 else None
        class_dir = parts[1] if split else parts[0]
        uri = posixpath.join(root, rel)
        if len(parts) < 2:
            listing.rejects.append(Reject(uri, "unlabelled_file", "file outside any class folder"))
            continue
        try:
            label = canonical_expression(class_dir)
        except UnknownLabelError as e:
            listing.rejects.append(Reject(uri, "unknown_label", str(e)))
            continue
        listing.records.append(SourceRecord(sample_id(source, rel), source,
                                            split or options.get("split", "train"), label, uri, files[rel]))
    return listing


def read_unlabelled(fs, root: str, source: str, options: dict) -> SourceListing:
    """Every image under the folder (recursively), without labels (FFHQ, CelebA-HQ, a generic folder)."""
    files, ignored = _find_files(fs, root)
    records = [SourceRecord(sample_id(source, rel), source, options.get("split", "train"), None,
                            posixpath.join(root, rel), stamp) for rel, stamp in sorted(files.items())]
    return SourceListing(records=records, ignored=ignored)


READERS: dict[str, Callable[..., SourceListing]] = {
    "rafdb": read_rafdb,
    "affectnet": read_affectnet,
    "fer2013": read_fer2013,
    "folder": read_class_folders,
    "unlabelled": read_unlabelled,
}
