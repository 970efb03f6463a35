"""Old versions go only through the explicit retention command: it keeps the newest and protected versions, all
that kept versions were built from, and live work in progress; it removes old leftovers; --dry-run deletes nothing."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synfer_pipeline.io.leases import Lease
from synfer_pipeline.io.retention import apply, retention_plan
from synfer_pipeline.io.storage import ArtifactRef, Storage

REPO = Path(__file__).resolve().parent.parent


def _publish(store, asset, partition, version, inputs=None):
    writer = store.artifact(asset, partition, f"stage-{version}")
    writer.write_bytes("data.bin", version.encode())
    return writer.publish(ArtifactRef(asset, partition, writer.staging, version, inputs=inputs or {})).uri


def test_retention_keeps_the_newest_and_protected_versions_per_partition(tmp_path):
    store = Storage(str(tmp_path))
    a1, a2, a3 = (_publish(store, "raw_faces", "rafdb", v) for v in ("v1", "v2", "v3"))
    b1 = _publish(store, "raw_faces", "ffhq", "w1")
    order = {a1: 1, a2: 2, a3: 3, b1: 4}  # the instance's event order: no reliance on file times
    assert retention_plan(store, keep=1, order=order).versions == [a1, a2]
    assert retention_plan(store, keep=1, protect={a1}, order=order).versions == [a2]
    assert retention_plan(store, keep=3, order=order).versions == []
    assert retention_plan(store, keep=1, order={a1: 9, a2: 2, a3: 3}).versions == [a2, a3]  # order decides, not time
    assert os.path.exists(a1) and os.path.exists(b1)  # planning deletes nothing
    with pytest.raises(ValueError, match="at least one"):
        retention_plan(store, keep=0)


def test_what_a_kept_checkpoint_was_built_from_is_kept(tmp_path):
    store = Storage(str(tmp_path))
    old_fetext, new_fetext = _publish(store, "fetext", "all", "f1"), _publish(store, "fetext", "all", "f2")
    old_ckpt = _publish(store, "diffusion_stage1", "all", "c1",
                        {"fetext": {"asset": "fetext", "uri": old_fetext, "data_version": "f1"}})
    stage2 = _publish(store, "diffusion_stage2", "all", "s1",
                      {"diffusion_stage1": {"asset": "diffusion_stage1", "uri": old_ckpt, "data_version": "c1"}})
    order = {old_fetext: 1, new_fetext: 2, old_ckpt: 3, stage2: 4}
    plan = retention_plan(store, keep=1, order=order)
    # stage 2 is kept; it was trained from the stage-1 c1 checkpoint, which was trained on the old FEText f1.
    assert plan.versions == []
    assert plan.kept_for_lineage == [old_fetext]
    new_ckpt = _publish(store, "diffusion_stage1", "all", "c2",
                        {"fetext": {"asset": "fetext", "uri": new_fetext, "data_version": "f2"}})
    plan = retention_plan(store, keep=1, order={**order, new_ckpt: 5})
    assert plan.versions == [] and set(plan.kept_for_lineage) == {old_fetext, old_ckpt}  # still needed by s1
    apply(store, retention_plan(store, keep=1, protect=set(), order={**order, new_ckpt: 5}))
    lineage_target = json.loads((Path(stage2) / "ref.json").read_text())["inputs"]["diffusion_stage1"]["uri"]
    assert os.path.isdir(lineage_target)  # no kept artifact points at a deleted folder


def test_old_leftovers_go_and_live_work_stays(tmp_path):
    store = Storage(str(tmp_path))
    stale = tmp_path / "raw_faces" / "rafdb" / "_staging" / "abandoned"
    fresh = tmp_path / "raw_faces" / "rafdb" / "_staging" / "recent"
    old_work = tmp_path / "diffusion_stage1" / "all" / "_work" / "old"
    old_cache = tmp_path / "mllm_captions" / "rafdb" / "_cache" / "oldkey"
    for folder in (stale, fresh, old_work, old_cache):
        folder.mkdir(parents=True)
        (folder / "part.bin").write_bytes(b"x")
    long_ago = time.time() - 10 * 86400
    for folder in (stale, old_work, old_cache):
        os.utime(folder / "part.bin", (long_ago, long_ago))
    live = tmp_path / "raw_faces" / "rafdb" / "_staging" / "running"
    live.mkdir()
    (live / "part.bin").write_bytes(b"x")
    os.utime(live / "part.bin", (long_ago, long_ago))  # old files, but a run holds the work and heartbeats
    lease = Lease(store, store.join("_leases", "raw_faces", "rafdb", "running"), owner="live").acquire()
    plan = retention_plan(store, keep=1, leftover_age_s=7 * 86400)
    assert plan.leftovers == sorted(str(p) for p in (stale, old_work, old_cache))
    lease.release()


def test_the_command_dry_run_lists_and_deletes_nothing(tmp_path):
    home, storage_root = tmp_path / "home", tmp_path / "storage"
    store = Storage(str(storage_root))
    v1, v2 = _publish(store, "raw_faces", "rafdb", "v1"), _publish(store, "raw_faces", "rafdb", "v2")
    os.utime(Path(v1) / "ref.json", (1, 1))  # outside the instance, the ref.json time orders them
    leftover = storage_root / "raw_faces" / "rafdb" / "_staging" / "old"
    leftover.mkdir(parents=True)
    (leftover / "x").write_bytes(b"x")
    os.utime(leftover / "x", (1, 1))
    profile = tmp_path / "p.yaml"
    profile.write_text(f"storage: {{root: {storage_root}}}\ndatasets: {{}}\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "SYNFER_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "assets.cli", "retention", "--keep", "1", "--profile", str(profile)]
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert f"would delete version {v1}" in dry.stdout and f"would delete leftover {leftover}" in dry.stdout
    assert os.path.isdir(v1) and leftover.is_dir()
    real = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert real.returncode == 0, real.stderr[-2000:]
    assert not os.path.exists(v1) and os.path.isdir(v2) and not leftover.exists()
