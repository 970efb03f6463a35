"""The IO manager loads the upstream materialization Dagster records as the step's input, even when another run
materializes the upstream while the step runs; lineage and Dagster's staleness view then agree."""


import pytest
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    Config,
    DagsterInstance,
    DataVersion,
    Output,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.execution.context.data_version_cache import DataVersionCache

from assets.lineage import lineage
from resources import ArtifactIOManager
from resources.io_manager import InputMismatchError
from synfer_pipeline.io.storage import ArtifactRef

parts = StaticPartitionsDefinition(["a", "b"])


class Version(Config):
    version: str


def _ref(name: str, partition: str, version: str, run_id: str, inputs: dict | None = None) -> ArtifactRef:
    return ArtifactRef(name, partition, f"/artifacts/{name}/{partition}/{version}", version, {}, run_id, inputs or {})


@asset(io_manager_key="artifact_io")
def upstream(context: AssetExecutionContext, config: Version):
    ref = _ref("upstream", "all", config.version, context.run_id)
    return Output(ref, data_version=DataVersion(ref.data_version))


@asset(io_manager_key="artifact_io")
def downstream(context: AssetExecutionContext, upstream: ArtifactRef):
    ref = _ref("downstream", "all", f"d-{upstream.data_version}", context.run_id, {"upstream": upstream.summary()})
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={"read": upstream.data_version})


@asset(io_manager_key="artifact_io", partitions_def=parts)
def per_dataset(context: AssetExecutionContext, config: Version):
    ref = _ref("per_dataset", context.partition_key, config.version, context.run_id)
    return Output(ref, data_version=DataVersion(ref.data_version))


@asset(io_manager_key="artifact_io", ins={"per_dataset": AssetIn()})
def joined(context: AssetExecutionContext, per_dataset: dict):
    read = {pk: r.data_version for pk, r in sorted(per_dataset.items())}
    ref = _ref("joined", "all", "j-" + "-".join(read.values()), context.run_id,
               {f"per_dataset/{pk}": r.summary() for pk, r in per_dataset.items()})
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={"read": read})


ALL = [upstream, downstream, per_dataset, joined]
RESOURCES = {"artifact_io": ArtifactIOManager()}


def _run(instance, selection, version=None, partition=None):
    config = {"ops": {selection: {"config": {"version": version}}}} if version else None
    return materialize(ALL, selection=[selection], instance=instance, resources=RESOURCES, run_config=config,
                       partition_key=partition)


def _latest(instance, key: str):
    from dagster import AssetRecordsFilter

    return instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(key)), limit=1).records[0]


@pytest.fixture
def upstream_changes_mid_run(monkeypatch):
    """After Dagster has fixed a step's inputs, another run materializes the upstream (once)."""
    original = DataVersionCache.fetch_external_input_asset_version_info
    actions = []

    def patched(self):
        original(self)
        while actions:
            actions.pop()()

    monkeypatch.setattr(DataVersionCache, "fetch_external_input_asset_version_info", patched)
    return actions


def _stale(instance, key: str) -> StaleStatus:
    """What the UI's staleness view says of an asset (Dagster's own resolver, as its test utilities build it)."""
    from dagster._utils.test.data_versions import get_stale_status_resolver

    return get_stale_status_resolver(instance, ALL).get_status(AssetKey(key))


def test_the_input_dagster_records_is_the_one_loaded_when_upstream_changes_mid_run(upstream_changes_mid_run):
    instance = DagsterInstance.ephemeral()
    _run(instance, "upstream", "v1")
    upstream_changes_mid_run.append(lambda: _run(instance, "upstream", "v2"))
    _run(instance, "downstream")
    record = _latest(instance, "downstream")
    mat = record.asset_materialization
    assert _latest(instance, "upstream").asset_materialization.tags["dagster/data_version"] == "v2"  # it did change
    assert mat.metadata["read"].value == "v1"
    assert mat.tags["dagster/input_data_version/upstream"] == "v1"  # what Dagster records agrees with what was read
    assert lineage(instance, "downstream").inputs[0].data_version == "v1"
    assert _stale(instance, "downstream") == StaleStatus.STALE  # and the UI shows it stale against v2


def test_a_partitioned_input_read_mid_run_is_the_recorded_one(upstream_changes_mid_run):
    instance = DagsterInstance.ephemeral()
    _run(instance, "per_dataset", "a1", "a")
    _run(instance, "per_dataset", "b1", "b")
    upstream_changes_mid_run.append(lambda: _run(instance, "per_dataset", "a2", "a"))
    _run(instance, "joined")
    mat = _latest(instance, "joined").asset_materialization
    assert mat.metadata["read"].value == {"a": "a1", "b": "b1"}
    assert {n.data_version for n in lineage(instance, "joined").inputs} == {"a1", "b1"}
    assert _stale(instance, "joined") == StaleStatus.STALE


def test_a_loaded_version_that_disagrees_with_the_record_fails_the_step(monkeypatch):
    """If the recorded version and the materializations loaded ever disagree, the step fails instead of lying."""
    from dagster._core.execution.context.data_version_cache import InputAssetVersionInfo

    instance = DagsterInstance.ephemeral()
    _run(instance, "upstream", "v1")
    original = DataVersionCache.maybe_fetch_and_get_input_asset_version_info

    def forged(self, key):
        info = original(self, key)
        return InputAssetVersionInfo(info.storage_id, info.event_type, DataVersion("forged"), info.run_id,
                                     info.timestamp) if info else info

    monkeypatch.setattr(DataVersionCache, "maybe_fetch_and_get_input_asset_version_info", forged)
    with pytest.raises(InputMismatchError, match="Dagster records input data version forged"):
        _run(instance, "downstream")
