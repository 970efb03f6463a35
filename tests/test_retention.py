"""Old versions go only through the explicit retention command, which keeps the newest and the protected ones."""

import os
import time

import pytest

from synfer_pipeline.io.storage import ArtifactRef, Storage, retention_plan


def _publish(store, asset, partition, version):
    writer = store.artifact(asset, partition, f"stage-{version}")
    writer.write_bytes("data.bin", version.encode())
    ref = writer.publish(ArtifactRef(asset, partition, writer.staging, version))
    time.sleep(0.02)  # distinct ref.json times
    return ref.uri


def test_retention_keeps_the_newest_and_protected_versions_per_partition(tmp_path):
    store = Storage(str(tmp_path))
    a1, a2, a3 = (_publish(store, "raw_faces", "rafdb", v) for v in ("v1", "v2", "v3"))
    b1 = _publish(store, "raw_faces", "ffhq", "w1")
    assert retention_plan(store, keep=1) == [a2, a1]
    assert retention_plan(store, keep=1, protect={a1}) == [a2]
    assert retention_plan(store, keep=3) == []
    assert os.path.exists(a1) and os.path.exists(b1)  # planning deletes nothing
    with pytest.raises(ValueError, match="at least one"):
        retention_plan(store, keep=0)
