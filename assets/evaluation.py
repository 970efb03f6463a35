"""fer_evaluation: what a round's synthetic data does for a FER model trained on it (paper Sec. 5, supplementary
Table 1), beside the generation ablation rows of steps 5 and 6."""

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pandas as pd
from dagster import (
    AllPartitionMapping,
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    DataVersion,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    Output,
    asset,
)

from assets.fer import labelled_faces
from assets.generator import EVALUATION_JSON
from assets.labels import LABELS, PROBABILITIES, read_synthetic
from assets.metadata import preview, ref_metadata
from assets.progress import Progress
from assets.synthesis import round_partitions
from resources import ComputeResource, SettingsResource, StorageResource
from synfer_pipeline.config import FERANNO
from synfer_pipeline.evaluation.downstream import evaluate_sets, format_table, training_sets
from synfer_pipeline.io.datasets import image_member, open_image, read_table
from synfer_pipeline.io.preview import bar_chart_png
from synfer_pipeline.io.storage import ArtifactRef, data_version_of, stage_key
from synfer_pipeline.labels.voting import vote, voters_of
from synfer_pipeline.settings import plain

EVALUATION_VERSION = "fer_evaluation-1"
REPORT = "fer_evaluation.json"
BY_ROUND = MultiToSingleDimensionPartitionMapping("round")


def generation_rows(store, stage1: ArtifactRef, stage2: ArtifactRef, adapter: ArtifactRef, quality: ArtifactRef) -> dict:
    """The generation ablation (base, stage 1, stage 2, adapter from the checkpoints' fixed evaluation batch; adapter
    + guidance from the round's synthetic_quality, on its own seeds)."""
    rows = {}
    for ref in (stage1, stage2, adapter):
        rows.update(json.loads(store.read_bytes(ref.file(EVALUATION_JSON))))
    report = json.loads(store.read_bytes(quality.file("quality.json")))
    rows["adapter (round batch)"] = report["unguided"]
    rows["adapter + guidance"] = report["guided"]
    return {name: {"fer_acc": row.get("fer_acc"), "au_acc": row.get("au_acc")} for name, row in rows.items()}


@asset(partitions_def=round_partitions, io_manager_key="artifact_io", code_version=EVALUATION_VERSION,
       group_name="evaluation", kinds={"pytorch"}, op_tags={"synfer/gpu": "optional"},
       automation_condition=AutomationCondition.eager(),
       ins={"synthetic_shards": AssetIn(partition_mapping=BY_ROUND),
            "feranno_labels": AssetIn(partition_mapping=BY_ROUND),
            "voted_labels": AssetIn(partition_mapping=BY_ROUND),
            "superres_faces": AssetIn(partition_mapping=AllPartitionMapping())})
def fer_evaluation(context: AssetExecutionContext, synthetic_shards: dict, feranno_labels: dict, voted_labels: dict,
                   superres_faces: dict, diffusion_stage1: ArtifactRef, diffusion_stage2: ArtifactRef,
                   au_adapter: ArtifactRef, synthetic_quality: ArtifactRef, storage: StorageResource,
                   settings: SettingsResource, compute: ComputeResource):
    """One FER recipe trained on real data, on the round's synthetic data with voted labels, and on both, each tested
    on the real test split; with voting without FERAnno (supplementary Table 1), the intended labels, and the
    generation ablation rows (base, stage 1, stage 2, adapter, adapter + guidance)."""
    profile, store = settings.get(), storage.get()
    cfg = dataclasses.replace(profile.fer_evaluation, train=dataclasses.replace(profile.fer_evaluation.train,
                                                                                device=compute.device))
    faces = labelled_faces(store, superres_faces, profile.fer_classifiers.train_on)
    train, test = faces["train"], faces["test"]
    if not test.labels:
        raise ValueError(f"fer_evaluation: no real test faces in {list(profile.fer_classifiers.train_on)}")
    images = {key: open_image(image_member(members)) for ref in synthetic_shards.values()
              for key, members, _ in read_synthetic(store, ref)}
    voted = pd.concat([read_table(store, voted_labels[k], LABELS) for k in sorted(voted_labels)], ignore_index=True)
    probabilities = pd.concat([read_table(store, feranno_labels[k], PROBABILITIES) for k in sorted(feranno_labels)],
                              ignore_index=True)
    without = None
    if FERANNO in voters_of(probabilities) and len(voters_of(probabilities)) > 1:
        others = [v for v in voters_of(probabilities) if v != FERANNO]
        weights = {v: w for v, w in profile.labels.voting.weights.items() if v in others}
        without = vote(probabilities, dataclasses.replace(profile.labels.voting, weights=weights), voters=others)
    sets = training_sets(train.keys, train.images, train.labels, images, voted, without, cfg)
    writer = store.artifact("fer_evaluation", f"round={context.partition_key}", stage_key(
        EVALUATION_VERSION, sorted(r.data_version for r in voted_labels.values()),
        sorted(r.data_version for r in synthetic_shards.values()),
        {d: superres_faces[d].data_version for d in sorted(superres_faces)}, plain(profile.fer_evaluation),
        synthetic_quality.data_version, au_adapter.data_version), owner=context.run_id, log=context.log.info)
    bar = Progress(context, "fer_evaluation", len(sets) * len(cfg.seeds) * cfg.train.epochs, unit="epoch")
    done = {"n": 0}

    def progress(name, epoch, epochs, loss):
        done["n"] += 1
        bar.update(done["n"], set=name, loss=loss)

    rows = evaluate_sets(sets, test.images, test.labels, cfg, progress)
    bar.close()
    generation = generation_rows(store, diffusion_stage1, diffusion_stage2, au_adapter, synthetic_quality)
    report = {"round": context.partition_key, "n_test": len(test.labels), "training": rows, "generation": generation,
              "recipe": plain(profile.fer_evaluation), "voters": voters_of(probabilities),
              "synthetic_images": len(images), "real_train": len(train.labels)}
    table = format_table(rows, len(test.labels))
    context.log.info("downstream evaluation:\n" + table)
    chart = bar_chart_png([
        ("real test accuracy by training set", [(n, r.get("test_accuracy")) for n, r in rows.items()]),
        ("FER acc of generated images (the judge)", [(n, r["fer_acc"]) for n, r in generation.items()]),
    ], f"round {context.partition_key}: {len(images)} synthetic, {len(train.labels)} real train, "
       f"{len(test.labels)} real test")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / REPORT).write_text(json.dumps(report, indent=2))
        (Path(tmp) / "evaluation.png").write_bytes(chart)
        store.put_folder(tmp, writer.staging)
    ref = writer.publish(ArtifactRef(
        "fer_evaluation", context.partition_key, writer.staging,
        data_version_of([json.dumps({k: v for k, v in report.items()}, sort_keys=True, default=str)]),
        {"trainings": len(rows), "synthetic_images": len(images)}, context.run_id,
        {**{f"voted_labels/{k}": r.summary() for k, r in sorted(voted_labels.items())},
         "synthetic_quality": synthetic_quality.summary()}))
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    md = "| training set | images | real test acc |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {r['n_train']} | {pct(r.get('test_accuracy'))} |" for n, r in rows.items())
    md += "\n\n| generator | FER acc | AU acc |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {pct(r['fer_acc'])} | {pct(r['au_acc'])} |" for n, r in generation.items())
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "evaluation": MetadataValue.md(md), "n_test": len(test.labels),
        "synthetic_images": len(images), "real_train": len(train.labels),
        "training_rows": MetadataValue.json(rows), "generation_rows": MetadataValue.json(generation),
        **{"acc_" + re.sub(r"\W+", "_", n).strip("_"): r["test_accuracy"] for n, r in rows.items()
           if r.get("test_accuracy") is not None},
        "chart": preview(chart, "evaluation"),
    })
