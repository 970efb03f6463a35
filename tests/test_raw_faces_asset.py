"""The raw_faces asset in Dagster: metadata a user looks at, the reject-rate check, data versions, the IO manager."""

import json

import pandas as pd
import pytest
from conftest import write_profile
from dagster import AssetKey, DagsterInstance, materialize
from dataset_fixtures import write_rafdb, write_unlabelled

from assets.definitions import build_resources
from assets.ingest import raw_faces
from resources.io_manager import REF_KEY
from synfer_pipeline.config import load_profile

LABELS = ["happy", "sad", "anger", "neutral", "surprise", "fear", "disgust"] * 2


@pytest.fixture
def profile(tmp_path):
    write_rafdb(tmp_path / "rafdb", LABELS, test_labels=["happy", "sad"])
    write_unlabelled(tmp_path / "ffhq", 5)
    path = write_profile(tmp_path / "profile.yaml", str(tmp_path / "storage"), {
        "rafdb": {"format": "rafdb", "uri": str(tmp_path / "rafdb"), "ingest": {"aligned": True, "face_size": 64}},
        "ffhq": {"format": "unlabelled", "uri": str(tmp_path / "ffhq"), "native_hr": True, "ingest": {"aligned": True, "face_size": 96}},
    })
    return load_profile(str(path))


def _materialization(result, partition):
    (mat,) = [m for m in result.asset_materializations_for_node("raw_faces") if m.partition == partition]
    return mat


def test_raw_faces_reports_counts_preview_and_a_passing_check(profile):
    instance = DagsterInstance.ephemeral()
    result = materialize([raw_faces], partition_key="rafdb", resources=build_resources(profile), instance=instance)
    assert result.success
    meta = _materialization(result, "rafdb").metadata
    assert meta["n_samples"].value == 16 and meta["reject_rate"].value == 0.0
    table = meta["counts_by_class_and_split"].value
    assert "| happy " in table and "| All " in table
    assert meta["preview"].value.startswith("![rafdb crops](data:image/png;base64,")
    manifest = pd.read_parquet(meta["manifest"].value)
    assert manifest.groupby("split").size().to_dict() == {"test": 2, "train": 14}
    assert manifest["label"].value_counts()["happy"] == 3
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "reject_rate" and check.passed


def test_reject_rate_check_fails_above_the_threshold_and_the_rest_is_kept(profile, tmp_path):
    write_rafdb(tmp_path / "bad_rafdb", ["happy", "sad"] * 4, corrupt=2)  # 2 of 10 unreadable: 20% > 5%
    path = write_profile(tmp_path / "bad.yaml", str(tmp_path / "storage"), {
        "rafdb": {"format": "rafdb", "uri": str(tmp_path / "bad_rafdb"), "ingest": {"aligned": True, "face_size": 64}}})
    result = materialize([raw_faces], partition_key="rafdb", resources=build_resources(load_profile(str(path))),
                         instance=DagsterInstance.ephemeral(), raise_on_error=False)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["reject_rate"].value == pytest.approx(0.2)
    assert check.metadata["reject_reasons"].value == {"corrupt": 2}
    assert _materialization(result, "rafdb").metadata["n_samples"].value == 8


def test_data_version_is_content_derived_and_the_ref_is_recorded(profile):
    instance = DagsterInstance.ephemeral()
    resources = build_resources(profile)
    first = materialize([raw_faces], partition_key="ffhq", resources=resources, instance=instance)
    second = materialize([raw_faces], partition_key="ffhq", resources=resources, instance=instance)
    v1 = _materialization(first, "ffhq").tags["dagster/data_version"]
    assert v1 == _materialization(second, "ffhq").tags["dagster/data_version"]
    ref = _materialization(second, "ffhq").metadata[REF_KEY].value
    assert ref["data_version"] == v1 and ref["asset"] == "raw_faces" and ref["counts"]["samples"] == 5
    assert json.loads(open(ref["uri"] + "/ref.json").read())["data_version"] == v1
    events = instance.fetch_materializations(AssetKey("raw_faces"), limit=10).records
    assert len(events) == 2


def test_a_failed_reject_rate_blocks_downstream_assets_in_the_same_run(tmp_path):
    from assets.curation import superres_faces

    write_rafdb(tmp_path / "bad_rafdb", ["happy", "sad"] * 4, corrupt=2)  # 20% unreadable > 5%
    path = write_profile(tmp_path / "bad.yaml", str(tmp_path / "storage"), {
        "rafdb": {"format": "rafdb", "uri": str(tmp_path / "bad_rafdb"), "ingest": {"aligned": True, "face_size": 64}}},
        superres={"resolution": 64})
    result = materialize([raw_faces, superres_faces], partition_key="rafdb", raise_on_error=False,
                         resources=build_resources(load_profile(str(path))), instance=DagsterInstance.ephemeral())
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity.value == "ERROR"
    assert [m.asset_key.to_user_string() for m in result.get_asset_materialization_events()] == ["raw_faces"]
    assert "superres_faces" not in {e.step_key for e in result.get_step_success_events()}
    # The rejects are there to read: the first rows as a table (file, reason, detail) and the Parquet path.
    meta = _materialization(result, "rafdb").metadata
    records = meta["rejects"].value.records
    assert [c.name for c in meta["rejects"].value.schema.columns] == ["file", "reason", "detail"]
    assert len(records) == 2 and {r.data["reason"] for r in records} == {"corrupt"}
    assert records[0].data["file"].endswith("_aligned.jpg")
    assert pd.read_parquet(meta["rejects_parquet"].value)["reason"].tolist() == ["corrupt", "corrupt"]
    assert check.metadata["rejects_parquet"].value == meta["rejects_parquet"].value
