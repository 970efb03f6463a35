"""Jobs: one per partitioning of the graph (a Dagster run covers assets of one partitions definition).

The UI's "Materialize all" launches a backfill that orders these across runs by itself; `synfer demo` runs them
in the order of `assets.orchestration.PLAN`.
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from assets.partitions import dataset_partitions

faces_job = define_asset_job(
    "faces_job", selection=AssetSelection.assets("raw_faces", "superres_faces"), partitions_def=dataset_partitions,
    description="Ingest one source dataset and bring its faces to the training resolution.")

au_detector_job = define_asset_job(
    "au_detector_job", selection=AssetSelection.assets("au_detector"),
    description="Train (or load) the AU detector on the AU-labelled sources.")

fer_job = define_asset_job(
    "fer_job", selection=AssetSelection.assets("fer_classifiers"),
    description="Train (or load) the FER classifiers that guide, judge and vote, and score them on real test faces.")

annotations_job = define_asset_job(
    "annotations_job", selection=AssetSelection.assets("au_labels", "mllm_captions"), partitions_def=dataset_partitions,
    description="AU labels and MLLM captions for one source dataset.")

fetext_job = define_asset_job(
    "fetext_job", selection=AssetSelection.assets("fetext"),
    description="Validate captions and assemble FEText from every dataset.")

generator_job = define_asset_job(
    "generator_job", selection=AssetSelection.assets("diffusion_stage1", "diffusion_stage2", "au_adapter"),
    description="Two-stage diffusion fine-tuning on FEText, then the AU adapter (GPU steps).")

synthetic_job = define_asset_job(
    "synthetic_job", selection=AssetSelection.assets("synthetic_shards"),
    description="Generate one shard of a round (a partition: round x shard); a backfill runs one step per shard.")

quality_job = define_asset_job(
    "quality_job", selection=AssetSelection.assets("synthetic_quality"),
    description="Judge a generation round once all its shards exist (FER acc and AU acc, with and without guidance).")

feranno_job = define_asset_job(
    "feranno_job", selection=AssetSelection.assets("feranno"),
    description="Train FERAnno's head on the frozen stage-2 UNet's features of the real labelled faces.")

labels_job = define_asset_job(
    "labels_job", selection=AssetSelection.assets("feranno_labels", "voted_labels"),
    description="Every voter's probabilities for one synthetic shard (round x shard), then the voted labels.")

evaluation_job = define_asset_job(
    "evaluation_job", selection=AssetSelection.assets("fer_evaluation"),
    description="Train the downstream FER recipe on real, synthetic and both, tested on the real test split.")

JOBS = [faces_job, au_detector_job, fer_job, annotations_job, fetext_job, generator_job, synthetic_job, quality_job,
        feranno_job, labels_job, evaluation_job]
