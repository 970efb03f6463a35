"""The IO manager for artifact references.

Assets publish their files themselves (storage is versioned and atomic) and return an `ArtifactRef`. This IO manager
persists the reference in the materialization's metadata and, for a downstream step, reads back the reference of the
exact upstream materialization that Dagster records as the step's input. Dagster fixes that record when the step
starts (the `dagster/input_event_pointer/...` and `dagster/input_data_version/...` tags of the step's own
materialization, and so its staleness view, come from it): for each upstream partition this loads the latest
materialization at or before that pointer, so one that another run makes while this step runs is not picked up, and
it checks that the data versions it loaded combine to the one Dagster recorded, failing when they do not. A step
downstream of several partitions (e.g. `fetext` of every dataset) receives `{partition: ArtifactRef}`.
"""

from __future__ import annotations

import hashlib
import json

from dagster import AssetRecordsFilter, ConfigurableIOManager, InputContext, MetadataValue, OutputContext

from synfer_pipeline.io.storage import ArtifactRef

REF_KEY = "artifact_ref"


class InputMismatchError(RuntimeError):
    """The upstream materialization loaded is not the one Dagster records as this step's input."""


class ArtifactIOManager(ConfigurableIOManager):
    def handle_output(self, context: OutputContext, obj: ArtifactRef) -> None:
        if not isinstance(obj, ArtifactRef):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not an ArtifactRef")
        context.add_output_metadata({REF_KEY: MetadataValue.json(json.loads(obj.to_json()))})

    def load_input(self, context: InputContext) -> ArtifactRef | dict[str, ArtifactRef]:
        key = context.asset_key
        recorded = _recorded_input(context)
        pointer = recorded.storage_id if recorded is not None else None
        if not context.has_asset_partitions:
            ref = _ref(context, key, None, pointer, exact=True)
            _check(key, recorded, ref.data_version, None)
            return ref
        partitions = list(context.asset_partition_keys)
        refs = {pk: _ref(context, key, pk, pointer) for pk in partitions}
        # Dagster's version of a partitioned input: sha256 over the partitions' data versions in key order.
        combined = hashlib.sha256("".join(refs[pk].data_version for pk in sorted(refs)).encode()).hexdigest()
        _check(key, recorded, combined, partitions)
        if context.has_partition_key and partitions == [context.partition_key]:
            return refs[partitions[0]]  # the same partition upstream: its ref; otherwise {partition: ref}
        return refs


def _recorded_input(context: InputContext):
    """The upstream record Dagster fixed for this step (None outside a step, e.g. `build_input_context`)."""
    try:
        step = context.step_context
    except Exception:  # noqa: BLE001 - no step (unit tests of the IO manager itself)
        return None
    return step.maybe_fetch_and_get_input_asset_version_info(context.asset_key)


def _ref(context: InputContext, key, partition: str | None, pointer: int | None, exact: bool = False) -> ArtifactRef:
    where = f"{key.to_user_string()}" + (f" partition {partition}" if partition else "")
    records_filter = AssetRecordsFilter(
        asset_key=key, asset_partitions=[partition] if partition else None,
        storage_ids=[pointer] if exact and pointer is not None else None,
        before_storage_id=pointer + 1 if pointer is not None and not exact else None)
    records = context.instance.fetch_materializations(records_filter, limit=1).records
    if not records:
        raise FileNotFoundError(f"{where} has not been materialized yet: materialize it first")
    meta = records[0].asset_materialization.metadata
    if REF_KEY not in meta:
        raise ValueError(f"the materialization of {where} (event {records[0].storage_id}) carries no {REF_KEY} metadata")
    return ArtifactRef(**meta[REF_KEY].value)


def _check(key, recorded, loaded_version: str, partitions) -> None:
    if recorded is None or recorded.data_version is None:
        return
    if recorded.data_version.value != loaded_version:
        what = key.to_user_string() + (f" (partitions {', '.join(partitions)})" if partitions else "")
        raise InputMismatchError(
            f"{what} changed while this step was starting: Dagster records input data version "
            f"{recorded.data_version.value} (event {recorded.storage_id}) but the materializations loaded give "
            f"{loaded_version}; run the step again so that what it reads and what lineage records agree")
