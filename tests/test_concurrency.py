"""Two runs of one stage at once never corrupt each other: work in progress has one owner, publishing a version is
atomic against a second publisher, cached downloads are never deleted under a reader, the gpu pool is limited."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import face_like, jpeg_bytes
from s3_server import s3_environment

from synfer_pipeline.curation.ingest import IngestSettings, ingest, listing_fingerprint
from synfer_pipeline.curation.readers import read_source
from synfer_pipeline.io.leases import Lease, LeaseBusy, LeaseLost
from synfer_pipeline.io.shards import iter_samples
from synfer_pipeline.io.storage import ArtifactRef, Storage, stage_key

REPO = Path(__file__).resolve().parent.parent


def _source(root: Path, n: int = 12) -> Path:
    for i in range(n):
        folder = root / ("happy" if i % 2 else "sad")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(face_like(64, i)))
    return root


def _ingest_in_a_process(source: str, store: str, start, results) -> None:
    """One 'run': list the source and ingest it into the shared storage, in its own process."""
    start.wait()
    listing = read_source("folder", source, "src")
    settings = IngestSettings(face_size=32, aligned=True, shard_size=3)
    messages: list[str] = []
    writer = Storage(store).artifact("raw_faces", "src", stage_key(listing_fingerprint(listing), settings),
                                     owner=f"run-{os.getpid()}", log=messages.append)
    time.sleep(1.0)  # hold the work a moment, as a real ingest would: the other run must find it owned
    result = ingest(listing, settings, writer, f"run-{os.getpid()}")
    results.put((result.ref.data_version, result.ref.uri, messages))


def test_two_processes_ingesting_one_source_at_once_publish_one_intact_version(tmp_path):
    source, store = _source(tmp_path / "src"), tmp_path / "store"
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()  # both runs begin together, once their imports are done
    procs = [ctx.Process(target=_ingest_in_a_process, args=(str(source), str(store), start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (version_a, uri_a, log_a), (version_b, uri_b, log_b) = outcomes
    assert version_a == version_b and uri_a == uri_b
    assert any("in use by run" in m for m in log_a + log_b)  # the second run waited for the first's lease
    published = [p for p in (store / "raw_faces" / "src").iterdir() if not p.name.startswith("_")]
    assert [p.name for p in published] == [version_a]
    keys = [k for k, _ in iter_samples(Storage(str(store)), uri_a, "faces")]
    assert len(keys) == len(set(keys)) == 12
    assert len(pd.read_parquet(Path(uri_a) / "manifest.parquet")) == 12
    assert not (store / "raw_faces" / "src" / "_staging").exists() or not any((store / "raw_faces" / "src" / "_staging").iterdir())


def _publish_twice(storage: Storage) -> tuple[ArtifactRef, ArtifactRef, str]:
    """Two writers (other staging keys) of the same content version: the first publishes, then the second."""
    first, second = storage.artifact("a", "p", "key1", owner="run1"), storage.artifact("a", "p", "key2", owner="run2")
    for writer, who in ((first, "run1"), (second, "run2")):
        writer.write_bytes("data.bin", b"same content")
        writer.write_bytes("written_by.txt", who.encode())
    ref1 = first.publish(ArtifactRef("a", "p", first.staging, "v1"))
    ref2 = second.publish(ArtifactRef("a", "p", second.staging, "v1"))
    return ref1, ref2, second.staging


def test_the_second_publisher_of_a_version_discards_its_copy_locally(tmp_path):
    storage = Storage(str(tmp_path))
    ref1, ref2, staging = _publish_twice(storage)
    assert ref1.uri == ref2.uri
    assert (Path(ref1.uri) / "written_by.txt").read_text() == "run1"  # never written into by the loser
    assert json.loads((Path(ref1.uri) / "ref.json").read_text())["run_id"] == ""  # the winner's ref
    assert not Path(staging).exists()


def test_the_second_publisher_of_a_version_discards_its_copy_on_s3(monkeypatch):
    with s3_environment(monkeypatch):
        storage = Storage("s3://synfer/store")
        ref1, ref2, staging = _publish_twice(storage)
        assert ref1.uri == ref2.uri
        assert storage.read_bytes(f"{ref1.uri}/written_by.txt") == b"run1"
        assert not storage.exists(staging)


def test_local_folder_never_deletes_a_complete_cached_copy(monkeypatch, tmp_path):
    """B starts downloading before A finishes; when B is done it must not replace (delete) A's complete copy."""
    with s3_environment(monkeypatch):
        storage = Storage("s3://synfer/store")
        storage.write_bytes("s3://synfer/store/model/weights.bin", b"w" * 1000)
        real_get, done = storage.fs.get, {}

        def slow_get(remote, local, **kw):
            real_get(remote, local, **kw)
            if not done:  # while B is downloading, A completes its copy
                done["started"] = True
                done["a"] = storage.local_folder("s3://synfer/store/model", cache_dir=tmp_path)
                done["inode"] = (done["a"] / ".complete").stat().st_ino

        monkeypatch.setattr(storage.fs, "get", slow_get)
        b = storage.local_folder("s3://synfer/store/model", cache_dir=tmp_path)
        assert b == done["a"] and (b / ".complete").stat().st_ino == done["inode"]  # A's copy, untouched
        assert (b / "weights.bin").read_bytes() == b"w" * 1000
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # B's copy cleaned up


def _hold_until_told(path: str, held, release) -> None:
    lease = Lease(Storage(str(Path(path).parent)), path, owner="run1", ttl=30).acquire()
    held.set()
    release.wait(60)
    lease.release()


def test_a_lease_has_one_owner_and_a_second_run_waits_for_it(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    owner = ctx.Process(target=_hold_until_told, args=(str(tmp_path / "work"), held, release))
    owner.start()
    assert held.wait(60)
    storage = Storage(str(tmp_path))
    with pytest.raises(LeaseBusy, match="in use by run run1"):
        Lease(storage, storage.join("work"), owner="run2", ttl=30, wait=0.5, poll=0.1).acquire()
    release.set()
    second = Lease(storage, storage.join("work"), owner="run2", ttl=30, wait=30, poll=0.1).acquire()
    assert second.number == 2  # numbering goes on: a freed lease is never reused by two waiters
    second.release()
    owner.join(30)


def _hold_and_die(path: str, ready) -> None:
    Lease(Storage(str(Path(path).parent)), path, owner="doomed", ttl=60).acquire()
    ready.set()
    os._exit(0)  # killed: no release


def test_a_killed_owner_on_this_host_is_taken_over_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_and_die, args=(str(tmp_path / "work"), ready))
    proc.start()
    ready.wait(60)
    proc.join(60)
    started = time.monotonic()
    lease = Lease(Storage(str(tmp_path)), str(tmp_path / "work"), owner="resume", ttl=60, wait=5).acquire()
    assert time.monotonic() - started < 5 and lease.number == 2  # no waiting out the 60 s ttl
    lease.release()


def test_a_silent_owner_elsewhere_is_taken_over_after_the_ttl_and_learns_it(tmp_path):
    storage = Storage(str(tmp_path))
    owner = Lease(storage, storage.join("work"), owner="remote", ttl=0.8).acquire()
    owner._stop.set()  # its heartbeat stops, as on a frozen machine
    owner._thread.join()
    owner.owner["host"] = "another-host"
    owner._write(owner.number, {**owner.owner, "beat": 99})
    started = time.monotonic()
    waiter = Lease(storage, storage.join("work"), owner="new", ttl=0.8, wait=10, poll=0.1).acquire()
    assert waiter.number == 2 and time.monotonic() - started >= 0.8  # only once the heartbeat stood still a ttl
    assert owner.beat() is False  # the old owner wakes up and learns it lost the work...
    with pytest.raises(LeaseLost, match="lost .* to another run"):
        owner.check()  # ...and may not write into it any more
    waiter.release()


def test_the_gpu_pool_is_limited_to_one_by_the_instance_config(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
