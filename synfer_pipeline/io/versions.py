"""Content fingerprints: the data version of a model folder, and what identifies a model a role loads.

A model loaded from a path is identified by the bytes of its weight files, never by the path: new weights at the
same path are a new model (a new data version, a new staging key, a new cache key). A hub id is identified by the
commit of the snapshot it resolves to.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".hdf5", ".h5", ".tflite", ".onnx", ".msgpack")
_FINGERPRINTS: dict[tuple, str] = {}  # (path, size, mtime...) -> fingerprint: hashing gigabytes once per process


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_version(folder: str | os.PathLike, suffixes: tuple[str, ...] = (".safetensors",)) -> str:
    """sha256 (hex) over the files under `folder` with these suffixes: relative path and content, in path order."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes),
                   key=lambda p: p.relative_to(folder).as_posix())
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(path).encode() + b"\0")
    return h.hexdigest()


def model_fingerprint(id_or_path: str | os.PathLike) -> str:
    """What identifies the model a role loads: `sha256:<hex>` over the weight files of a local file or folder,
    `hub:<id>@<commit>` for a hub id (the commit of the cached or downloaded snapshot; `@unresolved` when the
    hub cannot be reached and nothing is cached)."""
    path = Path(id_or_path)
    if path.exists():
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in
                 ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
        key = tuple(stats)
        if key not in _FINGERPRINTS:
            digest = file_sha256(path) if path.is_file() else weights_version(path, WEIGHT_SUFFIXES)
            _FINGERPRINTS[key] = f"sha256:{digest}"
        return _FINGERPRINTS[key]
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(str(id_or_path), allow_patterns=["*.json"])
        return f"hub:{id_or_path}@{Path(snapshot).name}"  # snapshot folders are named by their commit
    except Exception:  # noqa: BLE001 - offline and not cached: the id is all there is
        return f"hub:{id_or_path}@unresolved"
