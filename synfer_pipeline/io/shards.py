"""WebDataset shards: the one writer and reader every image-producing stage uses.

A shard is `{name}-{000000}.tar` holding samples keyed by stable ids (`{key}.jpg`, `{key}.json`, `{key}.txt`,
`{key}.cls`...), beside a Parquet index `{name}-{000000}.parquet` with one row per sample. The index is written
after the tar, so an index on disk means its shard is complete. The writer knows nothing of where samples come
from; it writes through `Storage` (local or S3) and produces byte-identical tars for identical samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import fsspec
import pandas as pd
import webdataset as wds

SHARD_PATTERN = "{name}-{index:06d}"

_FILESYSTEMS: dict[str, fsspec.AbstractFileSystem] = {}


def register_filesystem(fs: fsspec.AbstractFileSystem, protocol: str) -> None:
    """Let webdataset open `protocol://` urls through this fsspec filesystem (webdataset has no s3 handler)."""
    if protocol == "file":
        return
    _FILESYSTEMS[protocol] = fs
    wds.gopen_schemes[protocol] = _fsspec_gopen


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    protocol = url.split("://", 1)[0]
    fs = _FILESYSTEMS.get(protocol) or fsspec.filesystem(protocol)
    return fs.open(url, mode)


def encode_member(ext: str, value: Any) -> bytes:
    """Bytes for one sample member by its extension: bytes pass through, .json/.txt/.cls are encoded."""
    if isinstance(value, bytes):
        return value
    if ext.endswith("json"):
        return json.dumps(value, sort_keys=True).encode()
    if ext.endswith(("txt", "cls")):
        return str(value).encode()
    raise TypeError(f"cannot encode a {type(value).__name__} as .{ext}")


def sample_hash(members: Mapping[str, bytes]) -> str:
    """Content hash of one sample: its members' bytes in extension order."""
    h = hashlib.sha256()
    for ext in sorted(members):
        h.update(ext.encode() + b"\0" + members[ext] + b"\0")
    return h.hexdigest()[:32]


class ShardWriter:
    """Streams samples into numbered shards of at most `max_samples`, each with its Parquet index.

    `write_shard` writes one complete shard; `ShardWriter` batches samples into shards for callers that stream.
    `on_shard_closed(index, rows)` lets the caller record progress (e.g. a resume position) after each shard.
    """

    def __init__(self, storage, folder: str, name: str, max_samples: int, start_index: int = 0, on_shard_closed=None):
        self.storage, self.folder, self.name = storage, folder, name
        self.max_samples = max_samples
        self.index = start_index
        self.on_shard_closed = on_shard_closed
        self._samples: list[tuple[str, dict[str, bytes], dict[str, Any]]] = []

    def write(self, key: str, members: Mapping[str, Any], row: Mapping[str, Any] | None = None) -> None:
        encoded = {ext: encode_member(ext, v) for ext, v in members.items()}
        self._samples.append((key, encoded, dict(row or {})))
        if len(self._samples) >= self.max_samples:
            self.flush()

    def flush(self) -> None:
        """Close the current shard (if it holds samples)."""
        if not self._samples:
            return
        rows = write_shard(self.storage, self.folder, self.name, self.index, self._samples)
        if self.on_shard_closed is not None:
            self.on_shard_closed(self.index, rows)
        self.index += 1
        self._samples = []

    def close(self) -> None:
        self.flush()


def write_shard(storage, folder: str, name: str, index: int, samples: Iterable[tuple[str, Mapping[str, bytes], Mapping]]):
    """Write one tar shard and then its index; returns the index rows (key, shard, sample_hash + row fields)."""
    stem = SHARD_PATTERN.format(name=name, index=index)
    rows = []
    with storage.open_atomic(posixpath.join(folder, f"{stem}.tar")) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members, row in samples:
                members = {ext: encode_member(ext, v) for ext, v in members.items()}
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} may not contain '.' or '/' (webdataset splits on them)")
                for ext in sorted(members):
                    _add_member(tar, f"{key}.{ext}", members[ext])
                rows.append({"key": key, "shard": f"{stem}.tar", "sample_hash": sample_hash(members), **row})
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    storage.write_bytes(posixpath.join(folder, f"{stem}.parquet"), buf.getvalue())
    return rows


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same samples give the same shard
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_index(storage, folder: str, name: str | None = None) -> pd.DataFrame:
    """All shard index rows under `folder` (optionally only shards called `name`), in shard order."""
    pattern = f"{name}-*.parquet" if name else "*-[0-9][0-9][0-9][0-9][0-9][0-9].parquet"
    frames = [pd.read_parquet(io.BytesIO(storage.read_bytes(p))) for p in storage.list(folder, pattern)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def iter_shard(storage, shard_uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard in order, as (key, {extension: bytes})."""
    with storage.open(shard_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, members = None, {}
        for info in tar:
            if not info.isfile():
                continue
            base = posixpath.basename(info.name)
            k, ext = base.split(".", 1)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
        if key is not None:
            yield key, members


def iter_samples(storage, folder: str, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of every shard called `name` under `folder`, in shard order."""
    for shard in storage.list(folder, f"{name}-*.tar"):
        yield from iter_shard(storage, shard)


def shard_urls(storage, folder: str, name: str) -> list[str]:
    """Shard urls as webdataset expects them (`s3://...` works through the registered fsspec opener)."""
    return storage.list(folder, f"{name}-*.tar")
