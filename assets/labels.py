"""Labels: FERAnno, every voter's probabilities per synthetic sample, and the voted labels.

`feranno` trains the FERAnno head on the frozen stage-2 UNet with the real labelled faces. `feranno_labels` and
`voted_labels` follow `synthetic_shards`' partitions (round x shard): the first records each voter's class
probabilities for every sample of the shard (the voters of step 5 and FERAnno), the second turns them into
labels. The images are never rewritten: labels refer to the shard's sample keys.
"""

import dataclasses
import json
import math
import tempfile
from pathlib import Path

from dagster import AssetExecutionContext, AutomationCondition, DataVersion, MetadataValue, Output, asset

from assets.execution import GPU_TAGS
from assets.fer import labelled_faces, load_roles
from assets.metadata import preview, ref_metadata
from assets.progress import Progress
from assets.synthesis import round_shard_partitions
from resources import ComputeResource, SettingsResource, StorageResource
from synfer_pipeline.config import FERANNO
from synfer_pipeline.fer.role import confusion_matrix
from synfer_pipeline.generation.rounds import SHARD_NAME
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.io.datasets import image_member, open_image, read_table, write_parquet
from synfer_pipeline.io.preview import confusion_png
from synfer_pipeline.io.shards import iter_shard, shard_urls
from synfer_pipeline.io.storage import ArtifactRef, data_version_of, stage_key
from synfer_pipeline.io.versions import weights_version
from synfer_pipeline.labels.feranno import FERAnno, train_feranno
from synfer_pipeline.labels.voting import probability_table, vote, vote_summary, voters_of
from synfer_pipeline.settings import plain
from synfer_pipeline.vocab import EXPRESSION_INDEX, EXPRESSIONS_7

GROUP = "labels"
FERANNO_VERSION, PROBS_VERSION, VOTED_VERSION = "feranno-1", "feranno_labels-1", "voted_labels-1"
FERANNO_DIR, FERANNO_REPORT = "feranno", "report.json"
PROBABILITIES, LABELS, VOTE_REPORT = "probabilities.parquet", "labels.parquet", "vote.json"


def stage2_sampler(store, stage2: ArtifactRef, device: str) -> SynferSampler:
    """The stage-2 checkpoint without the AU adapter: the UNet FERAnno reads."""
    return SynferSampler.from_pretrained(store.local_folder(stage2.uri), device=device)


def load_feranno(store, feranno_ref: ArtifactRef, stage2: ArtifactRef, device: str) -> FERAnno:
    return FERAnno.load(store.local_folder(feranno_ref.uri) / FERANNO_DIR, stage2_sampler(store, stage2, device), device)


def _fetext_captions(store, fetext: ArtifactRef) -> dict[str, str]:
    """{source}/{key} -> caption of every FEText sample."""
    captions = {}
    for url in shard_urls(store, fetext.uri, "fetext"):
        for key, members in iter_shard(store, url):
            captions[f"{json.loads(members['json'])['source']}/{key}"] = members["txt"].decode()
    return captions


def _prompts(cfg, keys, captions) -> tuple[list[str] | None, int]:
    """Per-image captions for `caption` conditioning (the fixed prompt where a face has none) and how many lacked one."""
    if cfg.conditioning != "caption":
        return None, 0
    prompts = [captions.get(k) for k in keys]
    return [p if p is not None else cfg.prompt for p in prompts], sum(p is None for p in prompts)


@asset(io_manager_key="artifact_io", code_version=FERANNO_VERSION, group_name=GROUP, kinds={"pytorch"},
       op_tags=GPU_TAGS, pool="gpu")
def feranno(context: AssetExecutionContext, diffusion_stage2: ArtifactRef, superres_faces: dict, fetext: ArtifactRef,
            storage: StorageResource, settings: SettingsResource, compute: ComputeResource):
    """FERAnno: a classifier on the frozen stage-2 UNet's multi-scale feature maps and cross-attention maps of a face
    noised to a small timestep, two branches fused by bidirectional cross-attention; its head trained on the real
    labelled faces and scored on their real test split."""
    profile, store = settings.get(), storage.get()
    cfg = dataclasses.replace(profile.labels.feranno, device=compute.device)
    faces = labelled_faces(store, superres_faces, profile.fer_classifiers.train_on)
    train, test = faces["train"], faces["test"]
    if not train.images:
        raise ValueError(f"feranno: no labelled training faces in {list(profile.fer_classifiers.train_on)}")
    captions = _fetext_captions(store, fetext) if cfg.conditioning == "caption" else {}
    train_prompts, uncaptioned = _prompts(cfg, train.keys, captions)
    test_prompts, uncaptioned_test = _prompts(cfg, test.keys, captions)
    writer = store.artifact("feranno", "all", stage_key(
        FERANNO_VERSION, diffusion_stage2.data_version, {d: superres_faces[d].data_version for d in sorted(superres_faces)},
        fetext.data_version if cfg.conditioning == "caption" else "", plain(dataclasses.replace(cfg, device="-")),
        profile.fer_classifiers.train_on), owner=context.run_id, log=context.log.info)
    sampler = stage2_sampler(store, diffusion_stage2, compute.device)
    bars: dict[str, Progress] = {}

    def progress(stage, done, total, loss):
        if stage not in bars:
            bars[stage] = Progress(context, f"feranno {stage}", total, unit="image" if stage == "probe" else "epoch")
        bars[stage].update(done, **({} if math.isnan(loss) else {"loss": loss}))

    model, metrics = train_feranno(sampler, train.images, train.labels, cfg, train_prompts, progress)
    for bar in bars.values():
        bar.close()
    predicted = model.predict(test.images, test_prompts)
    accuracy = sum(p == t for p, t in zip(predicted, test.labels)) / max(1, len(test.labels))
    matrix = confusion_matrix(test.labels, predicted, EXPRESSIONS_7)
    report = {"test_accuracy": accuracy, "n_test": len(test.labels), "confusion": matrix.tolist(),
              "uncaptioned_faces": uncaptioned + uncaptioned_test, **metrics}
    png = confusion_png(matrix, EXPRESSIONS_7, f"FERAnno: {accuracy:.1%} on {len(test.labels)} real test faces")
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / FERANNO_DIR, report)
        (Path(tmp) / FERANNO_REPORT).write_text(json.dumps(report, indent=2))
        (Path(tmp) / "confusion.png").write_bytes(png)
        version = weights_version(Path(tmp) / FERANNO_DIR)
        store.put_folder(tmp, writer.staging)
    ref = writer.publish(ArtifactRef("feranno", "all", writer.staging, version[:16],
                                     {"train_faces": len(train.labels), "test_faces": len(test.labels)}, context.run_id,
                                     {"diffusion_stage2": diffusion_stage2.summary(),
                                      **{f"superres_faces/{d}": r.summary() for d, r in sorted(superres_faces.items())}}))
    context.log.info(f"FERAnno: {accuracy:.1%} on the real test split ({len(test.labels)} faces), "
                     f"{metrics['attention_layers']} cross-attention layers, {metrics['seconds']} s")
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "test_accuracy": accuracy, "n_train": len(train.labels), "n_test": len(test.labels),
        "conditioning": cfg.conditioning, "timestep": cfg.timestep,
        "attention_layers": metrics["attention_layers"], "feature_channels": metrics["feature_channels"],
        "train_seconds": metrics["seconds"], "final_loss": round(metrics["loss_curve"][-1], 4),
        "confusion": preview(png, "FERAnno confusion matrix"),
    })


def read_synthetic(store, shards: ArtifactRef):
    """[(key, members, meta)] of one synthetic shard artifact."""
    return [(key, members, json.loads(members["json"])) for url in shard_urls(store, shards.uri, SHARD_NAME)
            for key, members in iter_shard(store, url)]


@asset(partitions_def=round_shard_partitions, io_manager_key="artifact_io", code_version=PROBS_VERSION,
       group_name=GROUP, kinds={"pytorch", "parquet"}, op_tags=GPU_TAGS, pool="gpu",
       automation_condition=AutomationCondition.eager())
def feranno_labels(context: AssetExecutionContext, synthetic_shards: ArtifactRef, fer_classifiers: ArtifactRef,
                   feranno: ArtifactRef, diffusion_stage2: ArtifactRef, storage: StorageResource,
                   settings: SettingsResource, compute: ComputeResource):
    """Every voter's class probabilities for each sample of a synthetic shard: the voter roles of step 5 and FERAnno
    (`feranno` among `fer_classifiers.voters`), one `{voter}:{class}` column per voter and class."""
    profile, store = settings.get(), storage.get()
    voters = profile.fer_classifiers.voters
    if not voters:
        raise ValueError("feranno_labels needs voters: set fer_classifiers.voters (`feranno` names FERAnno)")
    roles = load_roles(profile, store, fer_classifiers, compute.device)["voters"]
    samples = read_synthetic(store, synthetic_shards)
    guide = profile.fer_classifiers.guide
    if guide in voters and any(meta["guide"] for _, _, meta in samples):
        context.log.warning(f"the guide {guide!r} votes on images it steered: its calls are what guidance optimised, "
                            "so it agrees with the intended label more than the images warrant")
    images = [open_image(image_member(m)) for _, m, _ in samples]
    probabilities = {}
    for name in voters:
        if name == FERANNO:
            model = load_feranno(store, feranno, diffusion_stage2, compute.device)
            probabilities[name] = model.predict_proba(images, [meta["prompt"] for _, _, meta in samples])
        else:
            probabilities[name] = roles[name].predict_proba(images)
    table = probability_table([k for k, _, _ in samples], [meta["label"] for _, _, meta in samples], probabilities)
    table.insert(2, "round", [meta["round"] for _, _, meta in samples])
    table.insert(3, "shard", [int(meta["shard"]) for _, _, meta in samples])
    writer = store.artifact("feranno_labels", _partition_path(context), stage_key(
        PROBS_VERSION, synthetic_shards.data_version, fer_classifiers.data_version,
        feranno.data_version if FERANNO in voters else "", list(voters)), owner=context.run_id, log=context.log.info)
    write_parquet(writer, PROBABILITIES, table)
    ref = writer.publish(ArtifactRef(
        "feranno_labels", context.partition_key, writer.staging,
        data_version_of([table.to_csv(index=False, float_format="%.6f")]), {"samples": len(table)}, context.run_id,
        {"synthetic_shards": synthetic_shards.summary(), "fer_classifiers": fer_classifiers.summary(),
         **({"feranno": feranno.summary()} if FERANNO in voters else {})}))
    agreement = {v: float((probabilities[v].argmax(1) == table["intended"].map(EXPRESSION_INDEX).to_numpy()).mean())
                 if len(table) else 0.0 for v in voters}
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "samples": len(table), "voters": MetadataValue.json(list(voters)),
        "voter_agreement_with_intended": MetadataValue.json({v: round(a, 4) for v, a in agreement.items()}),
        "probabilities": MetadataValue.path(ref.file(PROBABILITIES)),
    })


def _partition_path(context) -> str:
    keys = context.partition_key.keys_by_dimension
    return f"round={keys['round']}/shard={int(keys['shard']):05d}"


@asset(partitions_def=round_shard_partitions, io_manager_key="artifact_io", code_version=VOTED_VERSION,
       group_name=GROUP, kinds={"parquet"}, automation_condition=AutomationCondition.eager())
def voted_labels(context: AssetExecutionContext, feranno_labels: ArtifactRef, storage: StorageResource,
                 settings: SettingsResource):
    """The vote: the voters' probabilities averaged with the configured weights; the voted label replaces the intended
    one where they disagree (both kept, `relabelled` flags it); below `min_confidence` a sample is dropped, i.e.
    recorded with `kept` False and its reason."""
    profile, store = settings.get(), storage.get()
    cfg = profile.labels.voting
    table = read_table(store, feranno_labels, PROBABILITIES)
    labels = vote(table, cfg)
    labels.insert(2, "round", table["round"].to_numpy())
    labels.insert(3, "shard", table["shard"].to_numpy())
    summary = vote_summary(labels)
    summary["voters"], summary["weights"] = voters_of(table), {v: cfg.weights.get(v, 1.0) for v in voters_of(table)}
    writer = store.artifact("voted_labels", _partition_path(context), stage_key(
        VOTED_VERSION, feranno_labels.data_version, plain(cfg)), owner=context.run_id, log=context.log.info)
    write_parquet(writer, LABELS, labels)
    png = confusion_png(summary["confusion"], EXPRESSIONS_7,
                        f"intended (rows) vs voted: {summary['agreement_rate']:.0%} agree")
    writer.write_bytes(VOTE_REPORT, json.dumps(summary, indent=2).encode())
    writer.write_bytes("confusion.png", png)
    ref = writer.publish(ArtifactRef(
        "voted_labels", context.partition_key, writer.staging,
        data_version_of([labels.to_csv(index=False, float_format="%.6f")]),
        {"samples": len(labels), "kept": summary["kept"]}, context.run_id, {"feranno_labels": feranno_labels.summary()}))
    context.log.info(f"voted labels: {summary['agreement_rate']:.1%} agree with the intended label, "
                     f"{summary['relabel_rate']:.1%} relabelled, {summary['drop_rate']:.1%} dropped")
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "samples": len(labels), "agreement_rate": summary["agreement_rate"],
        "relabel_rate": summary["relabel_rate"], "drop_rate": summary["drop_rate"], "kept": summary["kept"],
        "counts_intended": MetadataValue.json(summary["counts_intended"]),
        "counts_voted": MetadataValue.json(summary["counts_voted"]),
        "voter_agreement_with_intended": MetadataValue.json(summary["voter_agreement_with_intended"]),
        "weights": MetadataValue.json(summary["weights"]),
        "labels": MetadataValue.path(ref.file(LABELS)),
        "intended_vs_voted": preview(png, "intended vs voted labels"),
    })
