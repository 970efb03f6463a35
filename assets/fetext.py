"""fetext: validated image / caption / AU / label quadruples from every source dataset, the training set of the generator."""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from assets.metadata import preview, ref_metadata, rejects_table
from resources import SettingsResource, StorageResource
from synfer_pipeline.curation.fetext import SHARD_NAME, alignment, check_joinable, counts_by, fetext_samples
from synfer_pipeline.io.datasets import input_shards, open_image, publish_dataset, read_table
from synfer_pipeline.io.preview import preview_grid
from synfer_pipeline.io.shards import iter_shard, read_index, write_shard
from synfer_pipeline.io.storage import stage_key


@asset(io_manager_key="artifact_io", code_version="fetext-1", group_name="curation", kinds={"webdataset", "parquet"},
       ins={"superres_faces": AssetIn(), "au_labels": AssetIn(), "mllm_captions": AssetIn()},
       check_specs=[AssetCheckSpec("caption_rejection_rate", asset="fetext",
                                   description="Share of captions rejected by validation stays under checks.max_caption_reject_rate")])
def fetext(context: AssetExecutionContext, superres_faces: dict, au_labels: dict, mllm_captions: dict,
           storage: StorageResource, settings: SettingsResource):
    """FEText: every dataset's faces joined with AU vectors and validated captions; rejected captions kept with reasons."""
    profile, store = settings.get(), storage.get()
    cfg = profile.fetext
    rules = cfg.validation
    inputs = {f"{asset}/{pk}": ref.summary() for asset, refs in
              (("superres_faces", superres_faces), ("au_labels", au_labels), ("mllm_captions", mllm_captions))
              for pk, ref in sorted(refs.items())}
    writer = store.artifact("fetext", "all", stage_key({k: v["data_version"] for k, v in inputs.items()}, cfg), owner=context.run_id, log=context.log.info)
    for pk in sorted(superres_faces):
        check_joinable(pk, superres_faces[pk], au_labels[pk], mllm_captions[pk])
    reports, shard_index = [], 0
    for pk in sorted(superres_faces):
        annotations = read_table(store, au_labels[pk], "au_labels.parquet").set_index("key")
        captions = read_table(store, mllm_captions[pk], "captions.parquet").set_index("key")
        for shard in input_shards(store, superres_faces[pk], "faces"):
            samples = list(iter_shard(store, shard))
            accepted, report = fetext_samples(samples, annotations, captions, profile.au_names, rules, cfg.validate)
            reports += report
            part = f"_report-{shard_index:06d}.done"
            if not writer.exists(part):  # resumable: a finished shard is not written again
                if accepted:
                    write_shard(store, writer.staging, SHARD_NAME, shard_index, accepted)
                writer.write_bytes(part, b"")
            shard_index += 1
    index = read_index(store, writer.staging, SHARD_NAME)
    report = pd.DataFrame(reports)
    rejects = report[~report["ok"]].drop(columns=["ok"]) if len(report) else report
    for path in writer.list("_report-*.done"):
        store.fs.rm(path)
    ref = publish_dataset(writer, {"index": index, "rejects": rejects}, context.run_id,
                          {"samples": len(index), "rejects": len(rejects), "shards": int(index["shard"].nunique()) if len(index) else 0},
                          inputs, preview_png=_preview(store, writer.staging, index, cfg.preview))
    align = alignment(report) if len(report) else {}
    rate = len(rejects) / len(report) if len(report) else 0.0
    yield Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref),
        "index": MetadataValue.path(ref.file("index.parquet")),
        "counts_by_source_and_class": MetadataValue.json(counts_by(index, "source", "expression")),
        "native_hr_samples": int(index["native_hr"].sum()) if len(index) else 0,
        "rejection_reasons": MetadataValue.json(rejects["reason"].value_counts().to_dict() if len(rejects) else {}),
        "rejects": rejects_table(rejects, {"sample": "key", "reason": "reason", "caption": "caption"}),
        "rejects_parquet": MetadataValue.path(ref.file("rejects.parquet")),
        "caption_rejection_rate": rate,
        "alignment_on_labelled_sources": MetadataValue.json(align),
        "preview": preview(store.read_bytes(ref.file("preview.png")), "FEText pairs"),
    })
    threshold = profile.checks.max_caption_reject_rate
    yield AssetCheckResult(check_name="caption_rejection_rate", passed=rate <= threshold, severity=AssetCheckSeverity.WARN,
                           metadata={"rate": rate, "max_caption_reject_rate": threshold})


def _preview(store, folder: str, index: pd.DataFrame, n: int) -> bytes:
    """Image / caption pairs, the caption's start under each image."""
    images, texts = [], []
    for shard in sorted(index["shard"].unique())[:2] if len(index) else []:
        for _, members in iter_shard(store, f"{folder}/{shard}"):
            images.append(open_image(members["jpg"]))
            texts.append(members["txt"].decode())
            if len(images) >= n:
                return preview_grid(images, texts, thumb=128, columns=4, caption_lines=4)
    return preview_grid(images, texts, thumb=128, columns=4, caption_lines=4)
