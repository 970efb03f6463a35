"""The generator: two-stage diffusion fine-tuning on FEText (paper supplementary §1) and the AU adapter."""

import json

from dagster import AssetExecutionContext, DataVersion, MetadataValue, Output, asset

from assets.metadata import preview, ref_metadata
from resources import SettingsResource, StorageResource
from synfer_pipeline.generation.au_adapter import train_au_adapter
from synfer_pipeline.generation.report import loss_curve_png, sample_grid
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.generation.train import train_unet
from synfer_pipeline.generation.workspace import TrainingWorkspace, lineage_record
from synfer_pipeline.io.images import encode_png
from synfer_pipeline.io.shards import shard_urls
from synfer_pipeline.io.storage import ArtifactRef, stage_key
from synfer_pipeline.io.versions import model_fingerprint
from synfer_pipeline.settings import settings_hash
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7, au_vector

GROUP = "generator"
# Code versions: in Dagster's staleness view and in the work keys (new code never resumes old work).
STAGE1_VERSION, STAGE2_VERSION, ADAPTER_VERSION = "diffusion_stage1-2", "diffusion_stage2-2", "au_adapter-2"
GPU_TAGS = {"synfer/gpu": "required"}
PROMPT = "A close-up photo of a face. The person in the image is displaying {article} {expression} facial expression."


def class_prompts() -> list[str]:
    """The fixed prompts of the end-of-training sample grid: one per expression."""
    return [PROMPT.format(article="an" if e[0] in "aeiou" else "a", expression="angry" if e == "anger" else e)
            for e in EXPRESSIONS_7]




def _finish(context, workspace: TrainingWorkspace, report, inputs: dict, base: str, settings: TrainSettings,
            grid, extra_lineage: dict | None = None) -> Output:
    """Write lineage.json, loss curve and samples beside the weights, publish, and report what a user checks."""
    store = workspace.storage
    lineage = lineage_record(store, workspace.writer.asset, context.run_id, inputs, base, settings.to_dict(),
                             settings_hash(settings), {"steps": report.steps, "samples_seen": report.samples_seen,
                                                       **(extra_lineage or {})})
    loss_png, samples_png = loss_curve_png(report.losses), encode_png(grid)
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
    })


def _workspace(context, store, cfg: TrainSettings, code_version: str, *inputs) -> TrainingWorkspace:
    """This run's training workspace, keyed by code version, inputs and the settings that change the numbers (not the
    checkpoint cadence or limit, which may change on resume)."""
    writer = store.artifact(context.asset_key.to_user_string(), "all", stage_key(code_version, *inputs, cfg.numerics()),
                            owner=context.run_id, log=context.log.info)
    return TrainingWorkspace(writer, keep=cfg.checkpoints_total_limit)


def _log(context):
    def log(record: dict) -> None:
        if record.get("step", 0) % 50 == 0:
            context.log.info(f"step {record.get('step')}: loss {record.get('loss', float('nan')):.4f}")
    return log


@asset(io_manager_key="artifact_io", code_version=STAGE1_VERSION, group_name=GROUP, kinds={"pytorch", "diffusers"},
       op_tags=GPU_TAGS, pool="gpu")
def diffusion_stage1(context: AssetExecutionContext, fetext: ArtifactRef, storage: StorageResource,
                     settings: SettingsResource):
    """Stage 1: the base diffusion model fine-tuned on all of FEText (learns expression semantics)."""
    profile, store = settings.get(), storage.get()
    base, cfg = profile.base_model_id(), profile.generator.stage1
    workspace = _workspace(context, store, cfg, STAGE1_VERSION, fetext.data_version, base, model_fingerprint(base))
    report = train_unet(cfg, shard_urls(store, fetext.uri, "fetext"), base, workspace.output_dir, workspace.state_dir,
                        workspace.on_checkpoint, _log(context))
    grid = sample_grid(workspace.output_dir, class_prompts(), seed=cfg.seed, steps=20, resolution=cfg.resolution)
    return _finish(context, workspace, report, {"fetext": fetext}, base, cfg, grid)


@asset(io_manager_key="artifact_io", code_version=STAGE2_VERSION, group_name=GROUP, kinds={"pytorch", "diffusers"},
       op_tags=GPU_TAGS, pool="gpu")
def diffusion_stage2(context: AssetExecutionContext, diffusion_stage1: ArtifactRef, fetext: ArtifactRef,
                     storage: StorageResource, settings: SettingsResource):
    """Stage 2: stage 1 continued on the native high-resolution subsets only (the paper's cure for over-smoothing)."""
    profile, store = settings.get(), storage.get()
    cfg = profile.generator.stage2
    if not cfg.native_hr_only:
        raise ValueError("generator.stage2 must set native_hr_only: true (stage 2 trains on CelebA-HQ/FFHQ only)")
    base = str(store.local_folder(diffusion_stage1.uri))
    workspace = _workspace(context, store, cfg, STAGE2_VERSION, diffusion_stage1.data_version, fetext.data_version)
    report = train_unet(cfg, shard_urls(store, fetext.uri, "fetext"), base, workspace.output_dir, workspace.state_dir,
                        workspace.on_checkpoint, _log(context))
    grid = sample_grid(workspace.output_dir, class_prompts(), seed=cfg.seed, steps=20, resolution=cfg.resolution)
    return _finish(context, workspace, report, {"diffusion_stage1": diffusion_stage1, "fetext": fetext},
                   diffusion_stage1.uri, cfg, grid, {"native_hr_samples": report.native_hr_samples})


@asset(io_manager_key="artifact_io", code_version=ADAPTER_VERSION, group_name=GROUP, kinds={"pytorch", "safetensors"},
       op_tags=GPU_TAGS, pool="gpu")
def au_adapter(context: AssetExecutionContext, diffusion_stage2: ArtifactRef, fetext: ArtifactRef,
               storage: StorageResource, settings: SettingsResource):
    """AU injection: an MLP maps the AU vector to context tokens entering every cross-attention through their own
    key/value projections; trained with the stage-2 model frozen and AU dropout (a learned "no AU" condition)."""
    profile, store = settings.get(), storage.get()
    cfg, adapter = profile.generator.au_adapter, profile.adapter_config()
    base = str(store.local_folder(diffusion_stage2.uri))
    workspace = _workspace(context, store, cfg, ADAPTER_VERSION, diffusion_stage2.data_version, fetext.data_version,
                           adapter)
    report = train_au_adapter(cfg, adapter, shard_urls(store, fetext.uri, "fetext"), base, workspace.output_dir,
                              workspace.state_dir, workspace.on_checkpoint, _log(context))
    vectors = [au_vector(EXPRESSION_AUS[e], profile.au_names, outside="drop").tolist() for e in EXPRESSIONS_7]
    grid = sample_grid(base, class_prompts(), seed=cfg.seed, steps=20, au_adapter_dir=workspace.output_dir,
                       au_vectors=vectors, resolution=cfg.resolution)
    return _finish(context, workspace, report, {"diffusion_stage2": diffusion_stage2, "fetext": fetext},
                   diffusion_stage2.uri, cfg, grid, {"adapter": adapter.to_dict()})
