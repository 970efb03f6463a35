"""Readers for face datasets in their real layouts, local or on S3 (through fsspec).

Each reader turns a source into `SourceRecord`s (one per image, labels mapped to `vocab.EXPRESSIONS` names) and
`Reject`s for what cannot be used. Every field of every label row is checked; a bad row is rejected with its reason
and the rest goes on: `missing_field` (an empty cell, named), `bad_field` (a value of the wrong kind, named),
`bad_pixels` (FER2013: a non-numeric token, the wrong count or a value outside 0..255, each said exactly),
`bad_box` (a face box of no size), `unknown_label`, `duplicate_row` (the same image named twice: kept once, never two
samples under one key), `missing_file`, `unlabelled_file`. A missing source, a label file without its image folder
and an empty label file raise `SourceError` naming the path. Images are not decoded here.

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
_INTEGER = re.compile(r"[+-]?\d+")
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
    if not fs.exists(image_dir):
        raise SourceError(f"RAF-DB label file {label_file} has no image folder: {image_dir} does not exist")
    lines = fs.cat_file(label_file).decode("utf-8", "replace").splitlines()
    if not any(line.strip() for line in lines):
        raise SourceError(f"RAF-DB label file {label_file} is empty")
    files, ignored = _find_files(fs, image_dir)
    listing = SourceListing(ignored=ignored)
    labelled = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        name_in_list = parts[0]
        stem, ext = posixpath.splitext(name_in_list)
        rel = f"{stem}_aligned{ext}" if variant == "aligned" else name_in_list
        uri = posixpath.join(image_dir, rel)
        if rel in labelled:
            listing.rejects.append(Reject(uri, "duplicate_row", f"{label_file} line {n} names {name_in_list} again"))
            continue
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


AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")


def read_affectnet(fs, root: str, source: str, options: dict) -> SourceListing:
    """AffectNet: `Manually_Annotated_Images/` + `training.csv`/`validation.csv` with face boxes and 0..10 codes."""
    image_dir = posixpath.join(root, options.get("image_dir", "Manually_Annotated_Images"))
    csvs = [(posixpath.join(root, name), split) for name, split in (("training.csv", "train"), ("validation.csv", "val"))
            if fs.exists(posixpath.join(root, name))]
    if csvs and not fs.exists(image_dir):
        raise SourceError(f"AffectNet label file {csvs[0][0]} has no image folder: {image_dir} does not exist")
    files, ignored = _find_files(fs, image_dir) if fs.exists(image_dir) else ({}, 0)
    listing = SourceListing(ignored=ignored)
    seen: set[str] = set()
    for path, split in csvs:
        df = _read_label_csv(fs, path, AFFECTNET_COLUMNS)
        for line, row in enumerate(df.itertuples(index=False), 2):
            record_or_reject = _affectnet_row(row, f"{path} line {line}", image_dir, files, seen, source, split)
            (listing.records if isinstance(record_or_reject, SourceRecord) else listing.rejects).append(record_or_reject)
    if not seen and files:
        raise SourceError(f"AffectNet source {root} has images but neither training.csv nor validation.csv")
    for rel in sorted(set(files) - seen):
        listing.rejects.append(Reject(posixpath.join(image_dir, rel), "unlabelled_file", "no row in the AffectNet csv files"))
    return listing


def _affectnet_row(row, where: str, image_dir: str, files: dict, seen: set, source: str, split: str):
    """One AffectNet csv row -> a SourceRecord, or a Reject saying which field is wrong."""
    rel = str(row.subDirectory_filePath) if _present(row.subDirectory_filePath) else ""
    uri = posixpath.join(image_dir, rel)
    if rel and rel in seen:
        return Reject(uri, "duplicate_row", f"{where} names {rel} again")
    seen.add(rel)  # a row naming the file, even a bad one, means the file is not unlabelled
    empty = [c for c in AFFECTNET_COLUMNS if not _present(getattr(row, c))]
    if empty:
        return Reject(uri, "missing_field", f"{where}: {', '.join(empty)} empty")
    values = {c: pd.to_numeric(getattr(row, c), errors="coerce") for c in AFFECTNET_COLUMNS[1:]}
    bad = [f"{c} {getattr(row, c)!r}" for c, v in values.items() if pd.isna(v)]
    if bad:
        return Reject(uri, "bad_field", f"{where}: {', '.join(bad)} is not a number")
    code = int(values["expression"])
    if code in AFFECTNET_EXCLUDED:
        return Reject(uri, "excluded_label", f"{where}: {AFFECTNET_EXCLUDED[code]} ({code})")
    if code not in AFFECTNET_CODES:
        return Reject(uri, "unknown_label", f"{where}: expression code {code} not in 0..10")
    box = tuple(float(values[c]) for c in AFFECTNET_COLUMNS[1:5])
    if box[2] <= 0 or box[3] <= 0:
        return Reject(uri, "bad_box", f"{where}: face box {box} has no area")
    if rel not in files:
        return Reject(uri, "missing_file", f"{where} names a file that is not there")
    return SourceRecord(sample_id(source, rel), source, split, AFFECTNET_CODES[code], uri, files[rel], box=box)


def _present(value) -> bool:
    return not (value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "")


def _read_label_csv(fs, path: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """A label csv read as text (every cell checked by the reader, nothing coerced silently); errors name the file."""
    data = fs.cat_file(path)
    if not data.strip():
        raise SourceError(f"label file {path} is empty")
    try:
        df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SourceError(f"label file {path} is not a readable csv: {e}") from None
    _require_columns(df, columns, path)
    return df


def read_fer2013(fs, root: str, source: str, options: dict) -> SourceListing:
    """FER2013: one CSV (emotion 0..6, 48x48 grey `pixels`, Usage); optional FERPlus majority-vote labels."""
    path = root if root.endswith(".csv") else posixpath.join(root, options.get("csv", "fer2013.csv"))
    if not fs.exists(path):
        raise SourceError(f"FER2013 csv {path} does not exist")
    df = _read_label_csv(fs, path, ("emotion", "pixels", "Usage"))
    votes = _ferplus_labels(fs, options["ferplus_csv"], len(df)) if options.get("ferplus_csv") else None
    info = fs.info(path)
    stamp = f"{info.get('size', -1)}:{info.get('mtime') or info.get('LastModified') or info.get('ETag') or ''}"
    listing = SourceListing()
    for i, row in enumerate(df.itertuples(index=False)):
        uri, sid, where = f"{path}#row={i}", sample_id(source, f"{i:06d}"), f"{path} row {i} (line {i + 2})"
        empty = [c for c in ("emotion", "pixels", "Usage") if not _present(getattr(row, c))]
        if empty:
            listing.rejects.append(Reject(uri, "missing_field", f"{where}: {', '.join(empty)} empty", sid))
            continue
        code = pd.to_numeric(row.emotion, errors="coerce")
        label = votes[i] if votes is not None else FER2013_CODES.get(int(code)) if pd.notna(code) and code == int(code) else None
        pixels, problem = parse_pixels(row.pixels, 48 * 48)
        if label is None:
            detail = (f"FERPlus {options['ferplus_csv']} row {i} gives no majority expression (a tie, unknown or "
                      "not-a-face, or unreadable votes)" if votes is not None else f"emotion {row.emotion!r} not in 0..6")
            listing.rejects.append(Reject(uri, "unknown_label", f"{where}: {detail}", sid))
        elif problem:
            listing.rejects.append(Reject(uri, "bad_pixels", f"{where}: {problem}", sid))
        elif str(row.Usage) not in FER2013_USAGE:
            listing.rejects.append(Reject(uri, "bad_field", f"{where}: Usage {row.Usage!r} is not one of "
                                          f"{', '.join(FER2013_USAGE)}", sid))
        else:
            listing.records.append(SourceRecord(sid, source, FER2013_USAGE[str(row.Usage)], label, uri, stamp,
                                                pixels=pixels.reshape(48, 48)))
    return listing


def parse_pixels(text: str, expected: int) -> tuple[np.ndarray | None, str]:
    """A space-separated pixel string -> (uint8 array, "") or (None, what is wrong with it, exactly)."""
    tokens = str(text).split()
    for position, token in enumerate(tokens):
        if not _INTEGER.fullmatch(token):
            return None, f"pixel {position} is {token!r}, not a number"
    if len(tokens) != expected:
        return None, f"{len(tokens)} pixel values, expected {expected}"
    values = np.array(tokens, dtype=np.int64)
    outside = np.flatnonzero((values < 0) | (values > 255))
    if len(outside):
        more = f" ({len(outside)} such)" if len(outside) > 1 else ""
        return None, f"pixel {outside[0]} is {values[outside[0]]}, outside 0..255{more}"
    return values.astype(np.uint8), ""


def _ferplus_labels(fs, path: str, n: int) -> list[str | None]:
    """FERPlus majority vote per row (None when the winner is unknown/not-a-face or there is a tie)."""
    df = pd.read_csv(io.BytesIO(fs.cat_file(path)))
    _require_columns(df, FERPLUS_COLUMNS, path)
    if len(df) != n:
        raise SourceError(f"{path} has {len(df)} rows but the FER2013 csv has {n}")
    votes = df[list(FERPLUS_COLUMNS) + [c for c in ("unknown", "NF") if c in df.columns]].apply(pd.to_numeric, errors="coerce")
    counts = votes[list(FERPLUS_COLUMNS)].to_numpy()
    rest = votes.drop(columns=list(FERPLUS_COLUMNS)).to_numpy().max(axis=1, initial=0)
    out = []
    for row, other in zip(counts, rest):
        if np.isnan(row).any() or np.isnan(other):
            out.append(None)  # unreadable votes: no label
            continue
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
