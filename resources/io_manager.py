"""The IO manager for artifact references.

Assets publish their files themselves (storage is versioned and atomic) and return an `ArtifactRef`. This IO manager
persists the reference in the materialization's metadata and, for a downstream step, reads back the reference of the
exact upstream materialization that Dagster records as its input: the latest one of each upstream partition. A step
downstream of several partitions (e.g. `fetext` of every dataset) receives `{partition: ArtifactRef}`.
"""

from __future__ import annotations

import json

from dagster import AssetRecordsFilter, ConfigurableIOManager, InputContext, MetadataValue, OutputContext

from synfer_pipeline.io.storage import ArtifactRef

REF_KEY = "artifact_ref"


class ArtifactIOManager(ConfigurableIOManager):
    def handle_output(self, context: OutputContext, obj: ArtifactRef) -> None:
        if not isinstance(obj, ArtifactRef):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not an ArtifactRef")
        context.add_output_metadata({REF_KEY: MetadataValue.json(json.loads(obj.to_json()))})

    def load_input(self, context: InputContext) -> ArtifactRef | dict[str, ArtifactRef]:
        key = context.asset_key
        if not context.has_asset_partitions:
            return _latest_ref(context, key, None)
        partitions = context.asset_partition_keys
        if context.has_partition_key and len(partitions) == 1:
            return _latest_ref(context, key, partitions[0])
        return {pk: _latest_ref(context, key, pk) for pk in partitions}


def _latest_ref(context: InputContext, key, partition: str | None) -> ArtifactRef:
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    where = f"{key.to_user_string()}" + (f" partition {partition}" if partition else "")
    if not records:
        raise FileNotFoundError(f"{where} has not been materialized yet: materialize it first")
    meta = records[0].asset_materialization.metadata
    if REF_KEY not in meta:
        raise ValueError(f"the latest materialization of {where} carries no {REF_KEY} metadata")
    return ArtifactRef(**meta[REF_KEY].value)
