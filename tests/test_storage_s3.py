"""The same pipeline on S3: a real S3-API server (moto) holds both the source dataset and the artifacts."""

import io

import pandas as pd
import pytest
import webdataset as wds
from conftest import write_profile
from dagster import DagsterInstance, materialize
from dataset_fixtures import write_rafdb
from PIL import Image
from s3_server import s3_environment

from assets.definitions import build_resources
from assets.ingest import raw_faces
from synfer_pipeline.config import load_profile
from synfer_pipeline.io.storage import ArtifactRef, Storage

LABELS = ["happy", "sad", "anger", "neutral", "surprise", "fear", "disgust"]


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as mp, s3_environment(mp) as client:
        yield client


def _upload(client, folder, prefix):
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "synfer", f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_ingest_from_s3_to_s3_and_read_back(s3, tmp_path):
    _upload(s3, write_rafdb(tmp_path / "rafdb", LABELS * 3, corrupt=1), "raw/rafdb")
    path = write_profile(tmp_path / "s3.yaml", "s3://synfer/artifacts", {
        "rafdb": {"format": "rafdb", "uri": "s3://synfer/raw/rafdb", "ingest": {"aligned": True, "face_size": 48, "shard_size": 8}}})
    profile = load_profile(str(path))
    result = materialize([raw_faces], partition_key="rafdb", resources=build_resources(profile),
                         instance=DagsterInstance.ephemeral())
    assert result.success
    (mat,) = result.asset_materializations_for_node("raw_faces")
    uri = mat.metadata["uri"].value
    version = mat.tags["dagster/data_version"]
    assert uri == f"s3://synfer/artifacts/raw_faces/rafdb/{version}"

    store = Storage("s3://synfer/artifacts")
    manifest = pd.read_parquet(io.BytesIO(store.read_bytes(f"{uri}/manifest.parquet")))
    rejects = pd.read_parquet(io.BytesIO(store.read_bytes(f"{uri}/rejects.parquet")))
    assert len(manifest) == 21 and list(rejects["reason"]) == ["corrupt"]
    assert rejects["uri"][0].startswith("s3://synfer/raw/rafdb/Image/aligned/train_00900")

    # webdataset reads the s3:// shards through the fsspec opener registered by Storage.
    urls = store.list(uri, "faces-*.tar")
    assert len(urls) == 3 and all(u.startswith("s3://") for u in urls)
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == list(manifest["key"])
    assert all(isinstance(s["jpg"], Image.Image) and s["jpg"].size == (48, 48) for s in samples)
    assert sorted({int(s["cls"]) for s in samples}) == [0, 1, 2, 3, 4, 5, 6]

    # No staging leftovers or temporary objects among the published files (`_leases/` is the ownership log).
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="synfer", Prefix="artifacts/")["Contents"]
            if not o["Key"].startswith("artifacts/_leases/")]
    assert all(k.startswith(f"artifacts/raw_faces/rafdb/{version}/") for k in keys)
    assert f"artifacts/raw_faces/rafdb/{version}/ref.json" in keys


def test_on_s3_ref_json_is_the_last_object_written_into_a_published_folder(s3, tmp_path, monkeypatch):
    """The write order itself, observed at the S3 client: a reader that sees ref.json sees a complete folder."""
    import s3fs

    writes: list[str] = []
    real_call = s3fs.S3FileSystem._call_s3

    async def recorded(self, method, *args, **kwargs):  # every request s3fs sends goes through here
        if method in ("put_object", "copy_object", "complete_multipart_upload"):
            writes.append(f"{kwargs['Bucket']}/{kwargs['Key']}")
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recorded)
    store = Storage("s3://synfer/order")
    writer = store.artifact("x", "p", "key")
    for name in ("a.bin", "b/c.bin", "d.parquet"):
        writer.write_bytes(name, name.encode())
    ref = writer.publish(ArtifactRef("x", "p", writer.staging, "v9"))
    final = ref.uri.removeprefix("s3://")
    into_final = [w.removeprefix("s3://") for w in writes if w.removeprefix("s3://").startswith(final + "/")]
    assert sorted(into_final[:-1]) == [f"{final}/{n}" for n in ("a.bin", "b/c.bin", "d.parquet")]
    assert into_final[-1] == f"{final}/ref.json" and into_final.count(f"{final}/ref.json") == 1
