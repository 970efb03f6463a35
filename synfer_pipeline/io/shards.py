"""WebDataset shards: the one writer and reader every image-producing stage uses.

A shard is `{name}-{000000}.tar` holding samples keyed by stable ids (`{key}.jpg`, `{key}.json`, `{key}.txt`,
`{key}.cls`...), beside a Parquet index `{name}-{000000}.parquet` with one row per sample. The index is written
after the tar, so an index on disk means its shard is complete. Each index row records the sample's byte range in
the tar (`offset`, `length`), which makes a shard random-access: `read_sample` fetches one sample with one ranged
read (one GET on S3), which is how training streams draw a global shuffle without downloading whole shards.
The writer knows nothing of where samples come from; it writes through `Storage` (local or S3) and produces
byte-identical tars for identical samples.

webdataset itself can read `s3://` shards: an fsspec opener is registered for the object-store schemes once, at
import, and finds each url's filesystem through the storage roots registered with `register_storage`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import fsspec
import pandas as pd
import webdataset as wds

SHARD_PATTERN = "{name}-{index:06d}"
REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")

_ROOTS: dict[str, tuple[str, dict]] = {}  # storage root url -> (protocol, storage options)


def register_storage(root: str, protocol: str, options: Mapping[str, Any]) -> None:
    """Remember how to reach urls under `root` (the options, not a filesystem instance: instances are not
    fork-safe, and each process builds its own from the options through fsspec's per-process cache)."""
    if protocol != "file":
        _ROOTS[root.rstrip("/")] = (protocol, dict(options))


def filesystem_of(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and bare path of a shard url: the longest registered storage root that holds it, else the
    settings the environment gives (as `synfer_pipeline.io.storage.filesystem_for`)."""
    for root in sorted(_ROOTS, key=len, reverse=True):
        if url == root or url.startswith(root + "/"):
            protocol, options = _ROOTS[root]
            fs = fsspec.filesystem(protocol, **options)
            return fs, fs._strip_protocol(url)
    from synfer_pipeline.io.storage import filesystem_for

    return filesystem_for(url)


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    fs, path = filesystem_of(url)
    return fs.open(path, mode)


for _scheme in REMOTE_SCHEMES:  # once per process: webdataset has no handler for object stores
    wds.gopen_schemes.setdefault(_scheme, _fsspec_gopen)


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
    """Write one tar shard and then its index; returns the index rows (key, shard, sample_hash, offset, length + the
    row fields given). `offset`/`length` are the sample's byte range in the tar (its members' headers and data)."""
    stem = SHARD_PATTERN.format(name=name, index=index)
    rows = []
    with storage.open_atomic(posixpath.join(folder, f"{stem}.tar")) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members, row in samples:
                members = {ext: encode_member(ext, v) for ext, v in members.items()}
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} may not contain '.' or '/' (webdataset splits on them)")
                start = tar.offset
                for ext in sorted(members):
                    _add_member(tar, f"{key}.{ext}", members[ext])
                rows.append({"key": key, "shard": f"{stem}.tar", "sample_hash": sample_hash(members),
                             "offset": start, "length": tar.offset - start, **row})
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


def _samples(f: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members of a tar stream (a whole shard or one sample's range)."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        key, members = None, {}
        for info in tar:
            if not info.isfile():
                continue
            k, ext = posixpath.basename(info.name).split(".", 1)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
        if key is not None:
            yield key, members


def iter_shard(storage, shard_uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard in order, as (key, {extension: bytes})."""
    with storage.open(shard_uri, "rb") as f:
        yield from _samples(f)


def read_sample(url: str, offset: int, length: int) -> tuple[str, dict[str, bytes]]:
    """One sample by its byte range (from the shard's index): one ranged read, local or remote."""
    fs, path = filesystem_of(url)
    data = fs.cat_file(path, start=int(offset), end=int(offset) + int(length))
    found = list(_samples(io.BytesIO(data)))
    if len(found) != 1:
        raise ValueError(f"{url} bytes {offset}..{offset + length} hold {len(found)} samples, not 1: the index is stale")
    return found[0]


def sample_ranges(url: str) -> pd.DataFrame:
    """(key, offset, length) per sample, read from the tar's headers: for shards whose index has no byte ranges."""
    fs, path = filesystem_of(url)
    rows: dict[str, list[int]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if info.isfile():
                key = posixpath.basename(info.name).split(".", 1)[0]
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                rows.setdefault(key, [info.offset, end])[1] = end
    return pd.DataFrame([{"key": k, "offset": a, "length": b - a} for k, (a, b) in rows.items()])


def index_of(url: str) -> pd.DataFrame:
    """The Parquet index beside a shard url (`x.tar` -> `x.parquet`), with byte ranges filled in if it lacks them."""
    fs, path = filesystem_of(url)
    index = pd.read_parquet(io.BytesIO(fs.cat_file(os.path.splitext(path)[0] + ".parquet")))
    if "offset" not in index.columns:
        index = index.merge(sample_ranges(url), on="key", how="left", validate="one_to_one")
    return index


def iter_samples(storage, folder: str, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of every shard called `name` under `folder`, in shard order."""
    for shard in storage.list(folder, f"{name}-*.tar"):
        yield from iter_shard(storage, shard)


def shard_urls(storage, folder: str, name: str) -> list[str]:
    """Shard urls as webdataset expects them (`s3://...` works through the opener registered at import)."""
    return storage.list(folder, f"{name}-*.tar")
