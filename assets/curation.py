"""FEText curation per dataset: super-resolution, the AU detector, AU labels, MLLM captions."""

import dataclasses
import json
import tempfile
from collections import Counter

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, AssetIn, DataVersion, MetadataValue, Output, asset

from assets.execution import GPU_TAGS
from assets.metadata import preview, ref_metadata
from assets.partitions import dataset_partitions
from resources import ComputeResource, SettingsResource, StorageResource
from synfer_pipeline.curation.annotate import annotate_samples, au_training_set, read_au_csv
from synfer_pipeline.curation.captions.run import CAPTION_COLUMNS, CaptionCache, caption_samples, load_captioner
from synfer_pipeline.curation.superres import load_upscaler, superresolve_samples
from synfer_pipeline.io.datasets import (
    image_member,
    input_shards,
    map_shards,
    map_shards_to_table,
    open_image,
    publish_dataset,
)
from synfer_pipeline.io.preview import preview_grid
from synfer_pipeline.io.shards import iter_shard
from synfer_pipeline.io.storage import ArtifactRef, stage_key
from synfer_pipeline.io.versions import model_fingerprint

GROUP = "curation"
# Code versions: in Dagster's staleness view and in the staging keys (new code never resumes old work).
SUPERRES_VERSION, AU_DETECTOR_VERSION, AU_LABELS_VERSION = "superres_faces-1", "au_detector-2", "au_labels-1"
CAPTIONS_VERSION = "mllm_captions-2"


def _output(ref: ArtifactRef, metadata: dict) -> Output:
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={**ref_metadata(ref), **metadata})


def _grid(storage, ref: ArtifactRef, name: str, n: int, label=lambda meta: meta.get("label") or "") -> bytes:
    images, labels = [], []
    for shard in input_shards(storage, ref, name):
        for _, members in iter_shard(storage, shard):
            images.append(open_image(image_member(members)))
            labels.append(label(json.loads(members["json"])))
            if len(images) >= n:
                return preview_grid(images, labels)
    return preview_grid(images, labels)


@asset(partitions_def=dataset_partitions, io_manager_key="artifact_io", code_version=SUPERRES_VERSION, group_name=GROUP,
       kinds={"pytorch", "webdataset"}, op_tags={"synfer/gpu": "optional"})
def superres_faces(context: AssetExecutionContext, raw_faces: ArtifactRef, storage: StorageResource,
                   settings: SettingsResource, compute: ComputeResource):
    """Faces at the training resolution: low-resolution sources super-resolved, native high-resolution ones untouched."""
    profile, store = settings.get(), storage.get()
    dataset = profile.dataset(context.partition_key)
    cfg, spec = profile.superres, profile.models.superres
    upscaler = load_upscaler(spec, compute.device, compute.dtype)
    writer = store.artifact("superres_faces", dataset.name, stage_key(SUPERRES_VERSION, raw_faces.data_version, cfg,
                                                                      upscaler.describe(), dataset.native_hr), owner=context.run_id, log=context.log.info)
    index = map_shards(store, raw_faces, "faces", writer, "faces",
                       lambda samples: superresolve_samples(samples, upscaler, cfg, dataset.native_hr), context.log.info)
    ref = publish_dataset(writer, {"manifest": index}, context.run_id,
                          {"samples": len(index), "shards": int(index["shard"].nunique()) if len(index) else 0},
                          {"raw_faces": raw_faces.summary()})
    return _output(ref, {
        "native_hr": dataset.native_hr, "resolution": cfg.resolution,
        "upscaler": MetadataValue.json(upscaler.describe()),
        "methods": MetadataValue.json(index["superres"].value_counts().to_dict() if len(index) else {}),
        "preview": preview(_grid(store, ref, "faces", 16), f"{dataset.name} at {cfg.resolution} px"),
    })


@asset(io_manager_key="artifact_io", code_version=AU_DETECTOR_VERSION, group_name=GROUP, kinds={"pytorch"},
       ins={"superres_faces": AssetIn()}, op_tags={"synfer/gpu": "optional"})
def au_detector(context: AssetExecutionContext, superres_faces: dict, storage: StorageResource, settings: SettingsResource,
                compute: ComputeResource):
    """The AU detector: trained here on AU-labelled sources (the profile's `au_detector.train_on`), or a checkpoint.
    Its data version is its content (weights and what turns them into AU calls), wherever it came from."""
    from synfer_pipeline.curation.au_detector import AUDetector, AUDetectorCheckpointSpec, train_au_detector

    profile, store = settings.get(), storage.get()
    spec, stage = profile.models.au_detector, profile.au_detector
    outside: Counter = Counter()
    if isinstance(spec, AUDetectorCheckpointSpec):
        detector = AUDetector.load(spec.id, compute.device)
        metrics = {"per_au_f1": {}, "note": f"loaded from {spec.id}; not evaluated here"}
        source = model_fingerprint(spec.id)  # new weights at the same path are new work, not a resume
    else:
        images, targets, keys = [], [], []
        for name, csv in stage.train_on.items():
            ds = profile.dataset(name)
            truth = read_au_csv(csv if "://" in csv or csv.startswith("/") else f"{ds.uri}/{csv}", ds.format, ds.name)
            samples = [s for shard in input_shards(store, superres_faces[name], "faces") for s in iter_shard(store, shard)]
            i, t, k, dropped = au_training_set(samples, truth, profile.au_names)
            images, keys, outside = images + i, keys + k, outside + Counter(dropped)
            targets.append(t)
        if not images:
            raise ValueError("au_detector: no AU-labelled images (profile au_detector.train_on names none that match)")
        cfg = dataclasses.replace(stage.train, device=compute.device)
        detector, metrics = train_au_detector(images, np.concatenate(targets), keys, profile.au_names, cfg)
        source = {k: r.data_version for k, r in superres_faces.items()}
    writer = store.artifact("au_detector", "all", stage_key(AU_DETECTOR_VERSION, spec, stage, profile.au_names, source), owner=context.run_id, log=context.log.info)
    with tempfile.TemporaryDirectory() as tmp:
        detector.save(tmp)
        version = AUDetector.version(tmp)
        store.put_folder(tmp, writer.staging)
    ref = writer.publish(ArtifactRef("au_detector", "all", writer.staging, version,
                                     {"train_images": int(metrics.get("n_train", 0))}, context.run_id,
                                     {f"superres_faces/{k}": r.summary() for k, r in superres_faces.items()}))
    return _output(ref, {**_f1_metadata(metrics), "source": spec.id if isinstance(spec, AUDetectorCheckpointSpec)
                         else "trained", "truth_aus_outside_the_au_list": MetadataValue.json(dict(outside))})


def _f1_metadata(metrics: dict) -> dict:
    per_au = metrics.get("per_au", {})
    rows = [{"AU": au, **{k: (None if v is None else round(v, 3) if isinstance(v, float) else v) for k, v in m.items()}}
            for au, m in per_au.items() if m.get("support")]
    return {
        "macro_f1_heldout": metrics.get("macro_f1"),
        "per_au_f1_heldout": MetadataValue.md(pd.DataFrame(rows).to_markdown(index=False) if rows else "(not evaluated)"),
        "n_train": metrics.get("n_train"), "n_holdout": metrics.get("n_holdout"),
    }


@asset(partitions_def=dataset_partitions, io_manager_key="artifact_io", code_version=AU_LABELS_VERSION, group_name=GROUP,
       kinds={"pytorch", "parquet"}, op_tags={"synfer/gpu": "optional"})
def au_labels(context: AssetExecutionContext, superres_faces: ArtifactRef, au_detector: ArtifactRef,
              storage: StorageResource, settings: SettingsResource, compute: ComputeResource):
    """An AU vector per image (and each image's reference expression: its label, or the FER classifier's call)."""
    from synfer_pipeline.curation.au_detector import AUDetector
    from synfer_pipeline.fer import load_fer_classifier

    profile, store = settings.get(), storage.get()
    detector = AUDetector.load(str(store.local_folder(au_detector.uri)), compute.device)
    fer_spec = profile.models.fer_reference
    fer = load_fer_classifier(fer_spec, device=compute.device) if fer_spec else None
    writer = store.artifact("au_labels", context.partition_key, stage_key(
        AU_LABELS_VERSION, superres_faces.data_version, au_detector.data_version, fer.describe() if fer else None), owner=context.run_id, log=context.log.info)
    table = map_shards_to_table(store, superres_faces, "faces", writer, "au_labels",
                                lambda samples: annotate_samples(samples, detector, fer), context.log.info)
    ref = publish_dataset(writer, {"au_labels": table}, context.run_id, {"samples": len(table)},
                          {"superres_faces": superres_faces.summary(), "au_detector": au_detector.summary()})
    freq = pd.Series([a for aus in table["aus"] for a in aus]).value_counts() if len(table) else pd.Series(dtype=int)
    detector_meta = json.loads((store.local_folder(au_detector.uri) / "synfer_au_detector.json").read_text())
    return _output(ref, {
        "au_frequency": MetadataValue.json({k: int(v) for k, v in freq.items()}),
        "mean_aus_per_image": float(table["aus"].map(len).mean()) if len(table) else 0.0,
        "expression_source": MetadataValue.json(table["expression_source"].value_counts().to_dict() if len(table) else {}),
        **_f1_metadata(detector_meta.get("metrics", {})),
    })


@asset(partitions_def=dataset_partitions, io_manager_key="artifact_io", code_version=CAPTIONS_VERSION, group_name=GROUP,
       kinds={"pytorch", "parquet"}, op_tags=GPU_TAGS)
def mllm_captions(context: AssetExecutionContext, superres_faces: ArtifactRef, au_labels: ArtifactRef,
                  storage: StorageResource, settings: SettingsResource, compute: ComputeResource):
    """FEText-style captions from the configured multimodal LLM (or the named template captioner), cached per
    model + prompt so that a rerun captions only what is missing."""
    from synfer_pipeline.io.datasets import read_table

    profile, store = settings.get(), storage.get()
    captioner = load_captioner(profile.models.captioner, compute.device, compute.dtype)
    contexts = read_table(store, au_labels, "au_labels.parquet").set_index("key")
    cache = CaptionCache(store, store.join("mllm_captions", context.partition_key, "_cache"), captioner.cache_key)
    tables, new = [], 0
    for shard in input_shards(store, superres_faces, "faces"):  # one shard's images in memory at a time
        part, added = caption_samples(list(iter_shard(store, shard)), contexts, captioner, cache,
                                      profile.captions.chunk, context.log.info)
        tables.append(part)
        new += added
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=CAPTION_COLUMNS)
    writer = store.artifact("mllm_captions", context.partition_key,
                            stage_key(CAPTIONS_VERSION, superres_faces.data_version, au_labels.data_version,
                                      captioner.cache_key), owner=context.run_id, log=context.log.info)
    ref = publish_dataset(writer, {"captions": table}, context.run_id, {"samples": len(table), "newly_captioned": new},
                          {"superres_faces": superres_faces.summary(), "au_labels": au_labels.summary(),
                           "captioner": captioner.describe()})
    words = table["caption"].str.split().map(len) if len(table) else pd.Series(dtype=int)
    examples = "\n\n".join(f"**{k}**: {c}" for k, c in zip(table["key"][:4], table["caption"][:4]))
    return _output(ref, {
        "captioner": MetadataValue.json(captioner.describe()), "cache_key": captioner.cache_key,
        "reused_from_cache": len(table) - new, "newly_captioned": new,
        "words_mean": float(words.mean()) if len(words) else 0.0, "examples": MetadataValue.md(examples or "(none)"),
    })
