"""raw_faces: each source dataset in its own layout -> face crops in WebDataset shards + a Parquet manifest."""


from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from assets.metadata import counts_table, preview, ref_metadata, rejects_table
from assets.partitions import dataset_partitions
from resources import SettingsResource, StorageResource
from synfer_pipeline.curation.ingest import ingest, listing_fingerprint, reject_rate
from synfer_pipeline.curation.readers import read_source
from synfer_pipeline.io.storage import stage_key

CODE_VERSION = "raw_faces-1"


@asset(
    partitions_def=dataset_partitions,
    io_manager_key="artifact_io",
    code_version=CODE_VERSION,
    group_name="curation",
    kinds={"python", "webdataset", "parquet"},
    check_specs=[AssetCheckSpec("reject_rate", asset="raw_faces", blocking=True,
                                description="Share of source images rejected as bad input stays under the profile's "
                                            "max_reject_rate; blocking: downstream steps of the run do not build on "
                                            "a failed source")],
)
def raw_faces(context: AssetExecutionContext, storage: StorageResource, settings: SettingsResource):
    """Face crops of one source dataset, decoded, de-duplicated, aligned and resized, with rejects and reasons."""
    profile = settings.get()
    dataset = profile.dataset(context.partition_key)
    store = storage.get()
    listing = read_source(dataset.format, dataset.uri, dataset.name, dataset.options)
    key = stage_key(CODE_VERSION, dataset.format, dataset.uri, dataset.options, dataset.ingest, listing_fingerprint(listing))
    result = ingest(listing, dataset.ingest, store.artifact("raw_faces", dataset.name, key, owner=context.run_id, log=context.log.info), context.run_id)
    rate = reject_rate(len(result.manifest), len(result.duplicates), result.rejects)
    reasons = result.rejects["reason"].value_counts().to_dict() if len(result.rejects) else {}
    yield Output(result.ref, data_version=DataVersion(result.ref.data_version), metadata={
        **ref_metadata(result.ref),
        "manifest": MetadataValue.path(result.ref.file("manifest.parquet")),
        "counts_by_class_and_split": counts_table(result.manifest, "label", "split"),
        "reject_reasons": MetadataValue.json(reasons),
        "rejects": rejects_table(result.rejects, {"file": "uri", "reason": "reason", "detail": "detail"}),
        "rejects_parquet": MetadataValue.path(result.ref.file("rejects.parquet")),
        "reject_rate": rate,
        "duplicates_kept_once": len(result.duplicates),
        "ignored_sidecar_files": result.ignored_files,
        "preview": preview(result.preview_png, f"{dataset.name} crops"),
        "native_hr": dataset.native_hr,
    })
    threshold = profile.checks.max_reject_rate
    yield AssetCheckResult(
        check_name="reject_rate", passed=rate <= threshold, severity=AssetCheckSeverity.ERROR,
        metadata={"reject_rate": rate, "max_reject_rate": threshold, "reject_reasons": MetadataValue.json(reasons),
                  "rejects": rejects_table(result.rejects, {"file": "uri", "reason": "reason", "detail": "detail"}),
                  "rejects_parquet": MetadataValue.path(result.ref.file("rejects.parquet"))},
    )
