"""Versioned artifact storage on a local folder or `s3://` (through fsspec / s3fs).

Layout: `{root}/{asset}/{partition}/{data_version}/` holds one published materialization and is never written
again. Work in progress lives in `{root}/{asset}/{partition}/_staging/{stage_key}/`, where `stage_key` is derived
from the inputs and settings, so a killed run that is started again finds its finished shards and goes on. The
staging folder is owned by one run at a time (a `Lease` under `{root}/_leases/`, see `synfer_pipeline.io.leases`): a
second run of the same work waits for the first, then reuses its result. `publish` moves the staging folder to its data-version folder;
`ref.json` is written last, so a folder without it is not published. Publishing is atomic against a concurrent
publisher of the same version: locally one rename wins and the loser's copy is discarded; on S3 the publishers take
a lease on the version and the second finds the folder published and discards its copy, never writing into it.
Every single file is written atomically (temporary name + rename locally; one PUT on S3); `atomic_folder` does the
same for a local folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

from synfer_pipeline.settings import plain

REF_FILE = "ref.json"
STAGING = "_staging"
LEASES = "_leases"  # {root}/_leases/{asset}/{partition}/{stage_key}.lease-N: who owns which work in progress


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file under a temporary name and rename it into place: it appears whole or not at all."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, if_exists: str = "replace") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; when the block ends without error it becomes `target`.

    if_exists: "replace" (an existing target is swapped out only once the new folder is complete), "keep" (an
    existing target wins and the new copy is dropped: another writer finished the same thing first) or "error".
    """
    target = Path(target)
    if if_exists == "error" and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; it is only written when new")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder holds nothing to keep or replace
        if target.exists() and if_exists == "error":
            raise FileExistsError(f"{target} exists; it is only written when new")
        if target.exists() and if_exists == "replace":
            old = target.parent / f".trash-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif not rename_folder_if_absent(tmp, target):
            pass  # "keep": the existing folder stays, the copy is dropped below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rename_folder_if_absent(src: Path | str, dst: Path | str) -> bool:
    """Rename folder `src` to `dst` unless `dst` exists (atomic); False when `dst` was there (src untouched)."""
    try:
        os.rename(src, dst)  # a folder onto an existing non-empty folder fails on POSIX, never merges
        return True
    except OSError:
        if os.path.isdir(dst) and any(os.scandir(dst)):
            return False
        raise


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
            buf = io.BytesIO()
            yield buf
            atomic_write_bytes(uri, buf.getvalue())
        else:
            # Spool locally, then one upload: S3 objects appear whole or not at all.
            with tempfile.NamedTemporaryFile(prefix="synfer-", suffix=".part") as tmp:
                yield tmp
                tmp.flush()
                self.fs.put_file(tmp.name, uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_atomic(uri) as f:
            f.write(data)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create the file only if nothing is at `uri` (atomic on both stores); False when it already exists."""
        if self.is_local:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, uri)  # fails if uri exists: the content is complete the moment it appears
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        try:
            self.fs.pipe_file(uri, data, mode="create")  # If-None-Match: *
            return True
        except FileExistsError:
            return False

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
            with atomic_folder(target, if_exists="keep") as partial:  # a copy another process completed wins
                self.fs.get(uri.rstrip("/") + "/", str(partial), recursive=True)
                (partial / ".complete").write_text(uri)
        return target

    def _with_protocol(self, path: str) -> str:
        return path if self.is_local or "://" in path else f"{self.protocol}://{path}"

    # -- materializations ---------------------------------------------------------------------------------------
    def artifact(self, asset: str, partition: str, stage_key: str, owner: str = "",
                 log: Callable[[str], None] = lambda s: None) -> ArtifactWriter:
        """The writer of one materialization's work in progress, owned by this run (waits while another run owns
        it). Use it as a context manager, or let `publish` give the ownership back."""
        return ArtifactWriter(self, asset, partition, stage_key, owner, log).acquire()

    def published(self, asset: str, partition: str) -> list[ArtifactRef]:
        """Every published materialization of an asset partition, oldest first (by folder listing)."""
        refs = []
        for ref_file in self.list(self.join(asset, partition), f"*/{REF_FILE}"):
            refs.append(ArtifactRef.from_json(self.read_bytes(ref_file).decode()))
        return refs


class ArtifactWriter:
    """Collects the files of one materialization in a resumable staging folder, then publishes them."""

    def __init__(self, storage: Storage, asset: str, partition: str, stage_key: str, owner: str = "",
                 log: Callable[[str], None] = lambda s: None):
        from synfer_pipeline.io.leases import Lease

        self.storage = storage
        self.asset, self.partition = asset, partition
        self.base = storage.join(asset, partition)
        self.staging = posixpath.join(self.base, STAGING, stage_key)
        self.lease = Lease(storage, storage.join(LEASES, asset, partition, stage_key), owner, log=log)
        self.log = log

    def acquire(self) -> ArtifactWriter:
        self.lease.acquire()
        return self

    def release(self) -> None:
        self.lease.release()

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def path(self, name: str) -> str:
        return posixpath.join(self.staging, name)

    def exists(self, name: str) -> bool:
        return self.storage.exists(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.lease.check()
        self.storage.write_bytes(self.path(name), data)

    def list(self, pattern: str = "*") -> list[str]:
        return self.storage.list(self.staging, pattern)

    def publish(self, ref: ArtifactRef) -> ArtifactRef:
        """Move the staging folder to `{asset}/{partition}/{data_version}/` with its ref.json, and give the work back.

        If that data version is already published (same content, e.g. by a concurrent run), the published folder is
        left untouched and this copy is discarded; the returned ref then points at the existing folder.
        """
        final = posixpath.join(self.base, ref.data_version)
        ref = ArtifactRef(**{**asdict(ref), "uri": final})
        try:
            self.lease.check()
            if self.storage.is_local:
                self._publish_local(final, ref)
            else:
                self._publish_remote(final, ref)
            return ref
        finally:
            self.release()

    def _publish_local(self, final: str, ref: ArtifactRef) -> None:
        if not os.path.exists(posixpath.join(final, REF_FILE)):
            self.storage.write_bytes(self.path(REF_FILE), ref.to_json().encode())
            if rename_folder_if_absent(self.staging, final):  # atomic: ref.json is already inside
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.staging))  # `_staging`, once nothing else is in progress
                return
        self.log(f"{final} is already published (the same content): this copy is discarded")
        shutil.rmtree(self.staging, ignore_errors=True)

    def _publish_remote(self, final: str, ref: ArtifactRef) -> None:
        # Object stores have no folder rename: one publisher of a version at a time copies, ref.json last.
        from synfer_pipeline.io.leases import Lease

        fs = self.storage.fs
        with Lease(self.storage, self.storage.join(LEASES, self.asset, self.partition, f"publish-{ref.data_version}"),
                   self.lease.owner["run"]):
            if not self.storage.exists(posixpath.join(final, REF_FILE)):
                bare = fs._strip_protocol(self.staging)
                for name in sorted(posixpath.relpath(p, bare) for p in fs.find(bare)):
                    fs.copy(posixpath.join(self.staging, name), posixpath.join(final, name))
                self.storage.write_bytes(posixpath.join(final, REF_FILE), ref.to_json().encode())
            else:
                self.log(f"{final} is already published (the same content): this copy is discarded")
        fs.rm(self.staging, recursive=True)


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
