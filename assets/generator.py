"""The generator: two-stage diffusion fine-tuning on FEText (paper supplementary §1) and the AU adapter."""

import json
from pathlib import Path

from dagster import AssetExecutionContext, DataVersion, MetadataValue, Output, asset

from assets.execution import GPU_TAGS
from assets.fer import load_roles
from assets.metadata import preview, ref_metadata
from assets.progress import Progress
from resources import SettingsResource, StorageResource
from synfer_pipeline.evaluation.generation_quality import evaluation_conditions, generate, score
from synfer_pipeline.generation.conditions import TemplatePrompts
from synfer_pipeline.generation.launch import LaunchJob
from synfer_pipeline.generation.launch import train as launch_training
from synfer_pipeline.generation.report import loss_curve_png
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.generation.workspace import TrainingWorkspace, lineage_record
from synfer_pipeline.io.images import encode_png
from synfer_pipeline.io.preview import stack_rows
from synfer_pipeline.io.shards import shard_urls
from synfer_pipeline.io.storage import ArtifactRef, stage_key
from synfer_pipeline.io.versions import model_fingerprint
from synfer_pipeline.settings import settings_hash

GROUP = "generator"
# Code versions: in Dagster's staleness view and in the work keys (new code never resumes old work).
STAGE1_VERSION, STAGE2_VERSION, ADAPTER_VERSION = "diffusion_stage1-3", "diffusion_stage2-3", "au_adapter-3"
EVALUATION_JSON = "evaluation.json"



def _finish(context, workspace: TrainingWorkspace, report, inputs: dict, base: str, settings: TrainSettings,
            rows: dict, extra_lineage: dict | None = None) -> Output:
    """Write lineage.json, the loss curve, the evaluation rows and a sample grid (the last row's evaluation batch,
    a row per class) beside the weights, publish, and report what a user checks."""
    store = workspace.storage
    lineage = lineage_record(store, workspace.writer.asset, context.run_id, inputs, base, settings.to_dict(),
                             settings_hash(settings), {"steps": report.steps, "samples_seen": report.samples_seen,
                                                       **(extra_lineage or {})})
    grids = list(rows.values())[-1].grids
    loss_png, samples_png = loss_curve_png(report.losses), encode_png(stack_rows(list(grids.values())))
    _write_quality(workspace.output_dir, rows)
    for name, data in (("lineage.json", json.dumps(lineage, indent=2, sort_keys=True).encode()),
                       ("loss_curve.png", loss_png), ("samples.png", samples_png)):
        (workspace.output_dir / name).write_bytes(data)
    summaries = {name: ref.summary() for name, ref in inputs.items()}
    ref = ArtifactRef(workspace.writer.asset, workspace.writer.partition, workspace.writer.staging, report.data_version[:16],
                      {"steps": report.steps, "samples_seen": report.samples_seen}, context.run_id,
                      {**summaries, "base_model": base})
    ref = workspace.publish(ref)
    captions = {pk: {k: c[k] for k in ("data_version", "captioner", "model", "prompt_hash")}
                for pk, c in (lineage.get("captions") or {}).items()}
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref),
        "base_model": base, "steps": report.steps, "samples_seen": report.samples_seen,
        "samples_per_s": round(report.samples_per_s, 2), "train_seconds": round(report.seconds, 1),
        "resumed_from_step": report.resumed_from if report.resumed_from is not None else -1,
        "final_loss": round(report.losses[-1], 5) if report.losses else float("nan"),
        "samples_by_source": MetadataValue.json(report.samples_by_source),
        "loss_curve": preview(loss_png, "loss curve"), "samples": preview(samples_png, "samples per class"),
        "captions_used": MetadataValue.json(captions), "training_config_hash": settings_hash(settings),
        "lineage_json": MetadataValue.path(ref.file("lineage.json")),
        **_quality_metadata(rows, grids),
    })


def _judged_by(fer_classifiers: ArtifactRef, au_detector: ArtifactRef) -> dict:
    """The inputs of a checkpoint's evaluation rows (the judge's classifiers, the AU detector): not of its weights,
    but of its published figures, so ref.json and lineage.json name them as Dagster's records do."""
    return {"fer_classifiers": fer_classifiers, "au_detector": au_detector}


def _workspace(context, store, cfg: TrainSettings, code_version: str, *inputs) -> TrainingWorkspace:
    """This run's training workspace, keyed by code version, inputs and the settings that change the numbers (not the
    checkpoint cadence or limit, which may change on resume)."""
    writer = store.artifact(context.asset_key.to_user_string(), "all", stage_key(code_version, *inputs, cfg.numerics()),
                            owner=context.run_id, log=context.log.info)
    return TrainingWorkspace(writer, keep=cfg.checkpoints_total_limit)


def _log(context, total: int, desc: str):
    """Training progress: a bar with loss and throughput on the terminal, the same in the run log."""
    bar = Progress(context, desc, total)

    def log(record: dict) -> None:
        bar.update(record["step"], loss=record.get("loss", float("nan")), lr=record.get("lr", 0.0))
        if record["step"] >= total:
            bar.close()
    return log


def _train(context, profile, workspace: TrainingWorkspace, kind: str, cfg: TrainSettings, urls: list[str], base: str,
           desc: str, adapter: dict | None = None):
    """One training run on `compute.num_processes` processes (one per GPU; 1: in this step's process)."""
    job = LaunchJob(kind, cfg.to_dict(), urls, base, str(workspace.output_dir), str(workspace.state_dir), adapter)
    n = profile.compute.num_processes
    if n > 1:
        context.log.info(f"{desc}: one training loop on {n} processes (torch.distributed.run), global batch "
                         f"{cfg.train_batch_size * cfg.gradient_accumulation_steps * n}")
    return launch_training(job, n, workspace.on_checkpoint, _log(context, cfg.max_train_steps, desc),
                           output=context.log.debug, device=profile.compute.device)


def _evaluate(context, profile, store, sampler, fer: ArtifactRef, detector: ArtifactRef, row: str):
    """The fixed evaluation batch through `sampler`, judged by the judge role and the AU detector."""
    from synfer_pipeline.curation.au_detector import AUDetector

    cfg = profile.generator.evaluation
    judge = load_roles(profile, store, fer)["judge"]
    if judge is None:
        raise ValueError("generation quality needs a judge: set fer_classifiers.judge in the profile")
    conditions = evaluation_conditions(cfg, profile.au_names, TemplatePrompts(cfg.seed))
    bar = Progress(context, f"evaluate {row}", len(conditions), unit="image")
    images = generate(sampler, conditions, cfg, progress=lambda done, total: bar.update(done))
    bar.close()
    report = score(images, conditions, judge, AUDetector.load(str(store.local_folder(detector.uri))))
    context.log.info(f"{row}: FER acc {report.fer_acc:.1%} (judge {judge.name}), AU acc "
                     f"{'-' if report.au_acc is None else f'{report.au_acc:.1%}'}")
    return report


def _quality_metadata(rows: dict, grids: dict) -> dict:
    """The ablation rows and one grid per class, as the UI shows them."""
    table = "| model | FER acc | AU acc |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {r.fer_acc:.1%} | {'-' if r.au_acc is None else f'{r.au_acc:.1%}'} |" for name, r in rows.items())
    last = list(rows.values())[-1]
    return {"generation_quality": MetadataValue.md(table), "fer_acc": last.fer_acc,
            "au_acc": -1.0 if last.au_acc is None else last.au_acc,
            "quality_rows": MetadataValue.json({name: r.row() for name, r in rows.items()}),
            **{f"grid_{c}": preview(encode_png(g), f"{c}: judge's reading under each image") for c, g in grids.items()}}


def _write_quality(folder: Path, rows: dict) -> None:
    (folder / EVALUATION_JSON).write_text(json.dumps({name: r.row() for name, r in rows.items()}, indent=2))


@asset(io_manager_key="artifact_io", code_version=STAGE1_VERSION, group_name=GROUP, kinds={"pytorch", "diffusers"},
       op_tags=GPU_TAGS, pool="gpu")
def diffusion_stage1(context: AssetExecutionContext, fetext: ArtifactRef, fer_classifiers: ArtifactRef,
                     au_detector: ArtifactRef, storage: StorageResource, settings: SettingsResource):
    """Stage 1: the base diffusion model fine-tuned on all of FEText (learns expression semantics); generation
    quality of the base model (the reference row) and of stage 1 on the fixed evaluation batch."""
    profile, store = settings.get(), storage.get()
    base, cfg = profile.base_model_id(), profile.generator.stage1
    workspace = _workspace(context, store, cfg, STAGE1_VERSION, fetext.data_version, base, model_fingerprint(base))
    report = _train(context, profile, workspace, "unet", cfg, shard_urls(store, fetext.uri, "fetext"), base, "stage 1")
    rows = {"base": _evaluate(context, profile, store, SynferSampler.from_pretrained(base), fer_classifiers,
                              au_detector, "base")}
    rows["stage 1"] = _evaluate(context, profile, store, SynferSampler.from_pretrained(workspace.output_dir),
                                fer_classifiers, au_detector, "stage 1")
    return _finish(context, workspace, report, {"fetext": fetext, **_judged_by(fer_classifiers, au_detector)}, base, cfg,
                   rows)


@asset(io_manager_key="artifact_io", code_version=STAGE2_VERSION, group_name=GROUP, kinds={"pytorch", "diffusers"},
       op_tags=GPU_TAGS, pool="gpu")
def diffusion_stage2(context: AssetExecutionContext, diffusion_stage1: ArtifactRef, fetext: ArtifactRef,
                     fer_classifiers: ArtifactRef, au_detector: ArtifactRef, storage: StorageResource,
                     settings: SettingsResource):
    """Stage 2: stage 1 continued on the native high-resolution subsets only (the paper's cure for over-smoothing)."""
    profile, store = settings.get(), storage.get()
    cfg = profile.generator.stage2
    if not cfg.native_hr_only:
        raise ValueError("generator.stage2 must set native_hr_only: true (stage 2 trains on CelebA-HQ/FFHQ only)")
    base = str(store.local_folder(diffusion_stage1.uri))
    workspace = _workspace(context, store, cfg, STAGE2_VERSION, diffusion_stage1.data_version, fetext.data_version)
    report = _train(context, profile, workspace, "unet", cfg, shard_urls(store, fetext.uri, "fetext"), base, "stage 2")
    rows = {"stage 2": _evaluate(context, profile, store, SynferSampler.from_pretrained(workspace.output_dir),
                                 fer_classifiers, au_detector, "stage 2")}
    return _finish(context, workspace, report, {"diffusion_stage1": diffusion_stage1, "fetext": fetext,
                                                **_judged_by(fer_classifiers, au_detector)},
                   diffusion_stage1.uri, cfg, rows, {"native_hr_samples": report.native_hr_samples})


@asset(io_manager_key="artifact_io", code_version=ADAPTER_VERSION, group_name=GROUP, kinds={"pytorch", "safetensors"},
       op_tags=GPU_TAGS, pool="gpu")
def au_adapter(context: AssetExecutionContext, diffusion_stage2: ArtifactRef, fetext: ArtifactRef,
               fer_classifiers: ArtifactRef, au_detector: ArtifactRef, storage: StorageResource,
               settings: SettingsResource):
    """AU injection: an MLP maps the AU vector to context tokens entering every cross-attention through their own
    key/value projections; trained with the stage-2 model frozen and AU dropout (a learned "no AU" condition)."""
    profile, store = settings.get(), storage.get()
    cfg, adapter = profile.generator.au_adapter, profile.adapter_config()
    base = str(store.local_folder(diffusion_stage2.uri))
    workspace = _workspace(context, store, cfg, ADAPTER_VERSION, diffusion_stage2.data_version, fetext.data_version,
                           adapter)
    report = _train(context, profile, workspace, "au_adapter", cfg, shard_urls(store, fetext.uri, "fetext"), base,
                    "AU adapter", adapter.to_dict())
    sampler = SynferSampler.from_pretrained(base, adapter_dir=workspace.output_dir)
    rows = {"adapter": _evaluate(context, profile, store, sampler, fer_classifiers, au_detector, "adapter")}
    return _finish(context, workspace, report, {"diffusion_stage2": diffusion_stage2, "fetext": fetext,
                                                **_judged_by(fer_classifiers, au_detector)},
                   diffusion_stage2.uri, cfg, rows, {"adapter": adapter.to_dict()})
