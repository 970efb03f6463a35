"""Synthesis: rounds of synthetic images with AU injection and semantic guidance, one WebDataset shard per partition.

`synthetic_shards` is partitioned by (round, shard): the round is a time window of the profile's cron (a schedule
starts each new round), the shard a static index. A backfill of N shards is N independent steps on any executor.
`synthetic_quality` (partitioned by round) judges a round once all its shards exist: FER acc and AU acc of the
round's images, and of a fixed evaluation batch without and with guidance on the same seeds.
"""

import dataclasses
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    DataVersion,
    MetadataValue,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    Output,
    StaticPartitionsDefinition,
    TimeWindowPartitionsDefinition,
    asset,
)
from PIL import Image

from assets.execution import GPU_TAGS
from assets.fer import REPORT as FER_REPORT
from assets.fer import load_roles
from assets.metadata import preview, ref_metadata
from assets.progress import Progress
from resources import ComputeResource, SettingsResource, StorageResource
from synfer_pipeline.config import load_profile
from synfer_pipeline.evaluation.generation_quality import check_judge, evaluation_conditions, generate, score
from synfer_pipeline.generation.rounds import (
    SHARD_NAME,
    generate_images,
    make_prompter,
    models_record,
    round_size,
    sample_json,
    sample_key,
    shard_conditions,
    shard_range,
    to_uint8,
)
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.io.images import encode_png
from synfer_pipeline.io.preview import grid_image, stack_rows
from synfer_pipeline.io.shards import iter_shard, shard_urls, write_shard
from synfer_pipeline.io.storage import ArtifactRef, data_version_of, stage_key
from synfer_pipeline.vocab import EXPRESSIONS_7

GROUP = "synthesis"
SHARDS_VERSION, QUALITY_VERSION = "synthetic_shards-1", "synthetic_quality-1"


def _round_partitions(profile) -> tuple[TimeWindowPartitionsDefinition, MultiPartitionsDefinition]:
    cfg = profile.generation
    rounds = TimeWindowPartitionsDefinition(cron_schedule=cfg.cron, start=cfg.start, fmt="%Y-%m-%d",
                                            timezone=cfg.timezone)
    shards = StaticPartitionsDefinition([f"{k:05d}" for k in range(cfg.shards)])
    return rounds, MultiPartitionsDefinition({"round": rounds, "shard": shards})


round_partitions, round_shard_partitions = _round_partitions(load_profile())

# Regeneration when the generator changes: shards of the latest round whose stage-2 checkpoint or adapter (or this
# code) changed since they were made, and shards of the latest round not made yet once a round has started. Off
# until a user turns on the automation sensor (Dagster's default). `in_latest_time_window` keeps it to the latest
# round: one new checkpoint never re-requests every shard of every old round.
REGENERATE = AutomationCondition.in_latest_time_window() & (
    AutomationCondition.any_deps_updated().since_last_handled() | AutomationCondition.code_version_changed()
) & ~AutomationCondition.any_deps_missing() & ~AutomationCondition.in_progress()


def _labelled_train(store, fer_classifiers: ArtifactRef) -> int:
    report = json.loads(store.read_bytes(fer_classifiers.file(FER_REPORT)))
    return int(report.get("n_train", 0))


def _guide_id(guide) -> str:
    return f"{guide.name}@{guide.info.get('fingerprint', '')}" if guide is not None else ""


def _layout_source(store, fetext: ArtifactRef, resolution: int):
    """seed -> (FEText key, (3, R, R) image in [-1, 1]): a random FEText image per seed (layout initialisation)."""
    urls = shard_urls(store, fetext.uri, "fetext")
    samples = [(k, m) for url in urls for k, m in iter_shard(store, url)]

    def pick(seed: int):
        key, members = samples[np.random.default_rng(seed).integers(len(samples))]
        image = next(v for ext, v in members.items() if ext in ("jpg", "png", "jpeg"))
        arr = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((resolution, resolution), Image.BICUBIC))
        return key, torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1)
    return pick


def _sampler(store, profile, stage2: ArtifactRef, adapter: ArtifactRef, device: str) -> SynferSampler:
    tiny = profile.models.tiny_decoder.id if profile.models.tiny_decoder else None
    return SynferSampler.from_pretrained(store.local_folder(stage2.uri), adapter_dir=store.local_folder(adapter.uri),
                                         tiny_decoder_dir=tiny, device=device)


@asset(partitions_def=round_shard_partitions, io_manager_key="artifact_io", code_version=SHARDS_VERSION,
       group_name=GROUP, kinds={"pytorch", "webdataset"}, op_tags=GPU_TAGS, pool="gpu",
       automation_condition=REGENERATE)
def synthetic_shards(context: AssetExecutionContext, diffusion_stage2: ArtifactRef, au_adapter: ArtifactRef,
                     fetext: ArtifactRef, fer_classifiers: ArtifactRef, storage: StorageResource,
                     settings: SettingsResource, compute: ComputeResource):
    """One WebDataset shard of a generation round: images drawn with AU injection and semantic guidance by the guide
    role, each with its full conditions (label, AUs, prompt, seed, guidance, the model versions it came from)."""
    profile, store = settings.get(), storage.get()
    cfg = profile.generation
    keys = context.partition_key.keys_by_dimension
    round_key, shard = keys["round"], int(keys["shard"])
    roles = load_roles(profile, store, fer_classifiers, compute.device)
    guide = roles["guide"]
    check_judge(roles["judge"], guide)
    guided = guide is not None and cfg.guidance.scale > 0 and cfg.guidance.last_steps > 0
    total = round_size(cfg, _labelled_train(store, fer_classifiers))
    indices = list(shard_range(total, cfg.shards, shard))
    models = models_record(diffusion_stage2, au_adapter, fetext, _captions_of(fetext))
    writer = store.artifact("synthetic_shards", f"round={round_key}/shard={shard:05d}", stage_key(
        SHARDS_VERSION, round_key, shard, total, models, _guide_id(guide) if guided else "", profile.au_names,
        cfg), owner=context.run_id, log=context.log.info)
    sampler = _sampler(store, profile, diffusion_stage2, au_adapter, compute.device)
    conditions = shard_conditions(round_key, shard, indices, profile.au_names, make_prompter(cfg.prompts, compute.device))
    bar = Progress(context, f"round {round_key} shard {shard}", len(conditions), unit="image")
    layout = _layout_source(store, fetext, sampler.resolution) if cfg.layout_init else None
    out = generate_images(sampler, conditions, cfg, guide if guided else None, layout,
                          progress=lambda done, total: bar.update(done))
    bar.close()
    pixels = to_uint8(out.images)
    samples = []
    for i, (condition, index, arr) in enumerate(zip(conditions, indices, pixels)):
        meta = sample_json(condition, profile.au_names, cfg, round_key, shard, index, models, _guide_id(guide),
                           guided, float(out.text_shift[i]), out.layout_sources[i])
        samples.append((sample_key(round_key, shard, index), {"png": encode_png(Image.fromarray(arr)), "json": meta},
                        {"label": condition.label, "seed": str(condition.seed)}))
    rows = write_shard(store, writer.staging, SHARD_NAME, shard, samples)
    ref = writer.publish(ArtifactRef(
        "synthetic_shards", context.partition_key, writer.staging,
        data_version_of(sorted(r["sample_hash"] for r in rows)), {"samples": len(rows), "round_images": total},
        context.run_id, {"diffusion_stage2": diffusion_stage2.summary(), "au_adapter": au_adapter.summary(),
                         "fetext": fetext.summary(), "fer_classifiers": fer_classifiers.summary()}))
    images = [Image.fromarray(a) for a in pixels]
    labels = [c.label for c in conditions]
    grids = {c: grid_image([im for im, lab in zip(images, labels) if lab == c][:10], thumb=64, columns=10)
             for c in EXPRESSIONS_7 if c in labels}
    per_s = len(images) / max(out.seconds, 1e-9)
    context.log.info(f"round {round_key} shard {shard}: {len(images)} images at {per_s:.2f} images/s "
                     f"({'guided by ' + guide.name if guided else 'unguided'})")
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "round": round_key, "shard": shard, "images": len(images),
        "images_per_s": round(per_s, 3), "guided": guided, "guide": _guide_id(guide) if guided else "-",
        "label_counts": MetadataValue.json({c: labels.count(c) for c in EXPRESSIONS_7}),
        "samples": preview(encode_png(stack_rows(list(grids.values()))), "a row per class") if grids else "-",
    })


def _captions_of(fetext: ArtifactRef) -> dict:
    """The captions versions FEText was built from (its recorded inputs)."""
    return {name: info.get("data_version", "") for name, info in sorted(fetext.inputs.items())
            if name.startswith("mllm_captions")}


@asset(partitions_def=round_partitions, io_manager_key="artifact_io", code_version=QUALITY_VERSION, group_name=GROUP,
       kinds={"pytorch"}, op_tags=GPU_TAGS, pool="gpu",
       ins={"synthetic_shards": AssetIn(partition_mapping=MultiToSingleDimensionPartitionMapping("round"))})
def synthetic_quality(context: AssetExecutionContext, synthetic_shards: dict, diffusion_stage2: ArtifactRef,
                      au_adapter: ArtifactRef, fer_classifiers: ArtifactRef, au_detector: ArtifactRef,
                      storage: StorageResource, settings: SettingsResource, compute: ComputeResource):
    """A round judged: FER acc (the judge, never the guide) and AU acc (the AU detector) of the round's images, and of
    a fixed evaluation batch of the round without and with semantic guidance on the same seeds."""
    from synfer_pipeline.curation.au_detector import AUDetector

    profile, store = settings.get(), storage.get()
    cfg, round_key = profile.generation, context.partition_key
    roles = load_roles(profile, store, fer_classifiers, compute.device)
    judge, guide = roles["judge"], roles["guide"]
    if judge is None:
        raise ValueError("synthetic_quality needs a judge: set fer_classifiers.judge in the profile")
    check_judge(judge, guide)
    detector = AUDetector.load(str(store.local_folder(au_detector.uri)))
    # The round's own images against their targets.
    images, conditions = [], []
    for ref in synthetic_shards.values():
        for url in shard_urls(store, ref.uri, SHARD_NAME):
            for _, members in iter_shard(store, url):
                meta = json.loads(members["json"])
                images.append(Image.open(io.BytesIO(members["png"])).convert("RGB"))
                conditions.append(meta)
    predicted = judge.predict(images)
    round_acc = float(np.mean([p == m["label"] for p, m in zip(predicted, conditions)])) if images else 0.0
    # The fixed evaluation batch, unguided and guided, on the same seeds.
    eval_cfg = profile.generator.evaluation
    batch = evaluation_conditions(eval_cfg, profile.au_names, make_prompter(cfg.prompts, compute.device),
                                  seed_parts=("round", round_key))
    sampler = _sampler(store, profile, diffusion_stage2, au_adapter, compute.device)
    with_steps = dataclasses.replace(eval_cfg, steps=cfg.steps, cfg_scale=cfg.cfg_scale)
    bar = Progress(context, f"round {round_key} evaluation", 2 * len(batch), unit="image")
    unguided = generate(sampler, batch, with_steps, progress=lambda d, t: bar.update(d))
    guided = generate(sampler, batch, with_steps, guide=guide, guidance=cfg.guidance,
                      progress=lambda d, t: bar.update(len(batch) + d)) if guide is not None else unguided
    bar.close()
    rows = {"unguided": score(unguided, batch, judge, detector), "guided": score(guided, batch, judge, detector)}
    gain = rows["guided"].fer_acc - rows["unguided"].fer_acc
    context.log.info(f"round {round_key}: FER acc {rows['unguided'].fer_acc:.1%} without guidance, "
                     f"{rows['guided'].fer_acc:.1%} with ({gain:+.1%}); round images {round_acc:.1%}")
    writer = store.artifact("synthetic_quality", f"round={round_key}", stage_key(
        QUALITY_VERSION, sorted(r.data_version for r in synthetic_shards.values()), fer_classifiers.data_version,
        au_detector.data_version, eval_cfg, cfg), owner=context.run_id)
    report = {"round": round_key, "round_images": len(images), "round_fer_acc": round_acc,
              **{name: r.row() for name, r in rows.items()}, "guidance_gain": gain, "judge": judge.name,
              "guide": guide.name if guide is not None else ""}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "quality.json").write_text(json.dumps(report, indent=2))
        for name, r in rows.items():
            (Path(tmp) / f"grid_{name}.png").write_bytes(encode_png(stack_rows(list(r.grids.values()))))
        store.put_folder(tmp, writer.staging)
    ref = writer.publish(ArtifactRef("synthetic_quality", round_key, writer.staging,
                                     data_version_of([json.dumps(report, sort_keys=True)]), {"images": len(images)},
                                     context.run_id, {k: r.summary() for k, r in synthetic_shards.items()}))
    table = "| batch | FER acc | AU acc |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {r.fer_acc:.1%} | {'-' if r.au_acc is None else f'{r.au_acc:.1%}'} |" for n, r in rows.items())
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "fer_acc_unguided": rows["unguided"].fer_acc, "fer_acc_guided": rows["guided"].fer_acc,
        "guidance_gain": gain, "au_acc_unguided": rows["unguided"].au_acc or 0.0,
        "au_acc_guided": rows["guided"].au_acc or 0.0, "round_fer_acc": round_acc, "round_images": len(images),
        "quality": MetadataValue.md(table),
        **{f"grid_{c}": preview(encode_png(g), f"{c}, guided: the judge's reading under each image")
           for c, g in rows["guided"].grids.items()},
    })
