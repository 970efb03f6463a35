"""Versioned artifact storage on a local folder or `s3://` (through fsspec / s3fs).

Layout: `{root}/{asset}/{partition}/{data_version}/` holds one published materialization and is never written
again. Work in progress lives in `{root}/{asset}/{partition}/_staging/{stage_key}/`, where `stage_key` is derived
from the inputs and settings, so a killed run that is started again finds its finished shards and goes on.
`publish` moves the staging folder to its data-version folder; `ref.json` is written last, so a folder without it
is not published. Every single file is written atomically (temporary name + rename locally; one PUT on S3).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

from synfer_pipeline.settings import plain

REF_FILE = "ref.json"
STAGING = "_staging"


def s3_storage_options(endpoint_url: str | None = None) -> dict[str, Any]:
    """s3fs options: the endpoint from the argument or `AWS_ENDPOINT_URL`; keys only from the environment."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and bare path for any uri (S3 settings from the environment, as for storage)."""
    options = s3_storage_options(endpoint_url) if uri.startswith("s3://") else {}
    return fsspec.core.url_to_fs(uri, **options)


def read_uri(uri: str) -> bytes:
    """All bytes of one file at a local path or `s3://` url."""
    fs, path = filesystem_for(uri)
    return fs.cat_file(path)


@dataclass(frozen=True)
class ArtifactRef:
    """The small reference an asset returns: where a materialization lives and what it holds."""

    asset: str
    partition: str
    uri: str
    data_version: str
    counts: Mapping[str, int] = field(default_factory=dict)
    run_id: str = ""
    inputs: Mapping[str, Any] = field(default_factory=dict)  # upstream refs summarised: name -> {uri, data_version}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactRef:
        return cls(**json.loads(text))

    def file(self, name: str) -> str:
        return posixpath.join(self.uri, name)

    def summary(self) -> dict[str, str]:
        """What a downstream artifact records of this one as its input (enough to find it again)."""
        return {"asset": self.asset, "partition": self.partition, "uri": self.uri, "data_version": self.data_version,
                "run_id": self.run_id}


class Storage:
    """One storage root (`/local/path` or `s3://bucket/prefix`) and the operations every stage uses on it."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        protocol = root.split("://", 1)[0] if "://" in root else "file"
        if protocol == "s3" and storage_options is None:
            storage_options = s3_storage_options()
        self.fs: fsspec.AbstractFileSystem = fsspec.filesystem(protocol, **dict(storage_options or {}))
        self.protocol = protocol
        self.root = root.rstrip("/") if protocol != "file" else os.path.abspath(root)
        if protocol == "file":
            os.makedirs(self.root, exist_ok=True)
        from synfer_pipeline.io import shards  # shard urls under this root are read with these options

        shards.register_storage(self.root, protocol, dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- single files -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at `uri` only when the block ends without error."""
        if self.is_local:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                os.replace(tmp, uri)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            # Spool locally, then one upload: S3 objects appear whole or not at all.
            with tempfile.NamedTemporaryFile(prefix="synfer-", suffix=".part") as tmp:
                yield tmp
                tmp.flush()
                self.fs.put_file(tmp.name, uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_atomic(uri) as f:
            f.write(data)

    def read_bytes(self, uri: str) -> bytes:
        return self.fs.cat_file(uri)

    def exists(self, uri: str) -> bool:
        return self.fs.exists(uri)

    def open(self, uri: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(uri, mode)

    def list(self, uri: str, pattern: str = "*") -> list[str]:
        """Paths under `uri` matching a glob pattern, sorted; [] when the folder does not exist."""
        if not self.fs.exists(uri):
            return []
        found = self.fs.glob(posixpath.join(uri, pattern))
        return sorted(self._with_protocol(p) for p in found)

    def put_folder(self, local: str | os.PathLike, uri: str) -> list[str]:
        """Copy a local folder's files to `uri/` (each file atomically); returns the relative names copied."""
        names = []
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                name = path.relative_to(local).as_posix()
                with open(path, "rb") as src, self.open_atomic(posixpath.join(uri, name)) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                names.append(name)
        return names

    def local_folder(self, uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
        """A local path holding the folder at `uri`: the folder itself on local storage, else a cached download
        (keyed by uri; published folders never change, so a complete copy is reused)."""
        if self.is_local:
            return Path(uri)
        cache = Path(cache_dir or os.environ.get("SYNFER_CACHE", Path.home() / ".cache" / "synfer"))
        target = cache / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if not (target / ".complete").exists():
            partial = target.with_name(target.name + f".part-{uuid.uuid4().hex[:8]}")
            self.fs.get(uri.rstrip("/") + "/", str(partial), recursive=True)
            (partial / ".complete").write_text(uri)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        return target

    def _with_protocol(self, path: str) -> str:
        return path if self.is_local or "://" in path else f"{self.protocol}://{path}"

    # -- materializations ---------------------------------------------------------------------------------------
    def artifact(self, asset: str, partition: str, stage_key: str) -> ArtifactWriter:
        return ArtifactWriter(self, asset, partition, stage_key)

    def published(self, asset: str, partition: str) -> list[ArtifactRef]:
        """Every published materialization of an asset partition, oldest first (by folder listing)."""
        refs = []
        for ref_file in self.list(self.join(asset, partition), f"*/{REF_FILE}"):
            refs.append(ArtifactRef.from_json(self.read_bytes(ref_file).decode()))
        return refs


def retention_plan(storage: Storage, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Published folders to delete so that each asset partition keeps its `keep` newest versions (by the time
    their ref.json was written); folders in `protect` (e.g. the latest materialization Dagster knows) are kept."""
    if keep < 1:
        raise ValueError("retention must keep at least one version per asset partition")
    doomed = []
    partitions = sorted({posixpath.dirname(posixpath.dirname(p)) for p in storage.list(storage.root, f"*/*/*/{REF_FILE}")})
    for folder in partitions:
        versions = []
        for ref_file in storage.list(folder, f"*/{REF_FILE}"):
            info = storage.fs.info(ref_file)
            stamp = info.get("mtime") or info.get("LastModified") or 0
            versions.append((float(stamp.timestamp() if hasattr(stamp, "timestamp") else stamp), posixpath.dirname(ref_file)))
        versions.sort(reverse=True)
        doomed += [uri for _, uri in versions[keep:] if uri not in protect]
    return doomed


class ArtifactWriter:
    """Collects the files of one materialization in a resumable staging folder, then publishes them."""

    def __init__(self, storage: Storage, asset: str, partition: str, stage_key: str):
        self.storage = storage
        self.asset, self.partition = asset, partition
        self.base = storage.join(asset, partition)
        self.staging = posixpath.join(self.base, STAGING, stage_key)

    def path(self, name: str) -> str:
        return posixpath.join(self.staging, name)

    def exists(self, name: str) -> bool:
        return self.storage.exists(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.storage.write_bytes(self.path(name), data)

    def list(self, pattern: str = "*") -> list[str]:
        return self.storage.list(self.staging, pattern)

    def publish(self, ref: ArtifactRef) -> ArtifactRef:
        """Move the staging folder to `{asset}/{partition}/{data_version}/` and write its ref.json.

        If that data version is already published (same content), the existing folder is kept untouched and the
        staging folder removed; the returned ref then points at the existing folder.
        """
        final = posixpath.join(self.base, ref.data_version)
        ref = ArtifactRef(**{**asdict(ref), "uri": final})
        fs = self.storage.fs
        if self.storage.exists(posixpath.join(final, REF_FILE)):
            fs.rm(self.staging, recursive=True)
            return ref
        self.write_bytes(REF_FILE, ref.to_json().encode())
        if self.storage.is_local and not os.path.exists(final):
            os.rename(self.staging, final)  # atomic: ref.json is already inside
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.staging))  # the _staging folder, once nothing else is in progress
        else:
            # Object stores have no folder rename: copy everything, ref.json last, then drop the staging copy.
            bare = fs._strip_protocol(self.staging)
            names = sorted(posixpath.relpath(p, bare) for p in fs.find(bare))
            names.sort(key=lambda n: n == REF_FILE)
            for name in names:
                fs.copy(posixpath.join(self.staging, name), posixpath.join(final, name))
            fs.rm(self.staging, recursive=True)
        return ref


def stage_key(*parts: Any) -> str:
    """A short stable key for work in progress, from its parts (inputs, settings objects, code version)."""
    return hashlib.sha256(json.dumps(plain(list(parts)), sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_version_of(lines: Iterator[str] | list[str]) -> str:
    """Content-derived data version: a hash over per-sample lines such as `key:content_hash`."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
