"""Jobs: one per partitioning of the graph (a Dagster run covers assets of one partitions definition)."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from assets.partitions import dataset_partitions

PER_DATASET_ASSETS = ["raw_faces"]

per_dataset_job = define_asset_job(
    "per_dataset_job",
    selection=AssetSelection.assets(*PER_DATASET_ASSETS),
    partitions_def=dataset_partitions,
    description="Per-dataset curation for one source dataset (partition): ingest and what follows it per dataset.",
)

JOBS = [per_dataset_job]
