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

import numpy as np
import pytest
import torch
from dagster import DagsterInstance
from diffusers import StableDiffusionPipeline
from generator_helpers import EVALUATION, REPO, curate, gen_profile, latest, make_sources, run_assets
from PIL import Image

from synfer_pipeline.curation.au_detector import AUDetector
from synfer_pipeline.demo.tiny_sd import tiny_clip_tokenizer
from synfer_pipeline.evaluation.generation_quality import EvaluationBatchSettings, evaluation_conditions, generate, score
from synfer_pipeline.fer.classifiers import load_fer_classifier
from synfer_pipeline.generation.conditions import TemplatePrompts
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.io.preview import stack_rows
from synfer_pipeline.generation.au_adapter import load_au_adapter
from synfer_pipeline.generation.data import BatchFeed, StreamSpec
from synfer_pipeline.io.shards import iter_shard, shard_urls
from synfer_pipeline.io.storage import Storage
from synfer_pipeline.vocab import EXPRESSIONS_7


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("gen_sources"))


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
    v1, v2 = gen_profile(tmp_path, sources, "Describe the face."), gen_profile(tmp_path, sources, "Describe the facial expression.")
    with DagsterInstance.get() as instance:
        curate(v1, instance)
        run_assets(v1, instance, ["fetext", "diffusion_stage1"])
        captions_v1 = {pk: latest(instance, "mllm_captions", pk).asset_materialization.tags["dagster/data_version"]
                       for pk in ("rafdb", "ffhq")}
        first_stage1 = latest(instance, "diffusion_stage1")
        # New captions and a new FEText, no retraining.
        run_assets(v2, instance, ["mllm_captions"], ("rafdb", "ffhq"))
        run_assets(v2, instance, ["fetext"])
        captions_v2 = {pk: latest(instance, "mllm_captions", pk).asset_materialization.tags["dagster/data_version"]
                       for pk in ("rafdb", "ffhq")}
    assert set(captions_v1.values()).isdisjoint(captions_v2.values())

    tree = json.loads(_lineage_cli(home, "diffusion_stage1", "--json"))
    assert _captions_in(tree) == set(captions_v1.values())
    text = _lineage_cli(home, "diffusion_stage1")
    assert all(v in text for v in captions_v1.values()) and not any(v in text for v in captions_v2.values())
    assert "Describe the face." in text and "Describe the facial expression." not in text

    with DagsterInstance.get() as instance:
        run_assets(v2, instance, ["diffusion_stage1"])
    assert _captions_in(json.loads(_lineage_cli(home, "diffusion_stage1", "--json"))) == set(captions_v2.values())
    # The first checkpoint is still there and still answers for itself, by run id and in its own lineage.json.
    old = json.loads(_lineage_cli(home, "diffusion_stage1", "--run-id", first_stage1.run_id, "--json"))
    assert _captions_in(old) == set(captions_v1.values())
    old_file = json.loads(Path(old["uri"], "lineage.json").read_text())
    assert {c["data_version"] for c in old_file["captions"].values()} == set(captions_v1.values())
    assert {c["prompt"] for c in old_file["captions"].values()} == {"Describe the face."}
    (fetext_node,) = [n for n in old["inputs"] if n["asset"] == "fetext"]
    assert old_file["fetext"]["data_version"] == fetext_node["data_version"]
    # ... beside the judge's classifiers and the AU detector its evaluation rows were computed with
    assert {n["asset"] for n in old["inputs"]} == {"fetext", "fer_classifiers", "au_detector"}


CUSTOM_AUS = ["AU26", "AU12", "AU4", "AU1", "AU6"]  # reordered and shorter than OpenGraphAU's 41


def test_stage1_stage2_and_adapter_load_generate_and_follow_a_custom_au_list(tmp_path, sources, monkeypatch):
    profile = gen_profile(tmp_path, sources, "Describe the face.", action_units=CUSTOM_AUS)
    instance = DagsterInstance.ephemeral()
    curate(profile, instance)
    run_assets(profile, instance, ["fetext", "diffusion_stage1", "diffusion_stage2", "au_adapter"])
    s1, s2, adapter = (latest(instance, a).asset_materialization.metadata
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
    assert projection.mlp[0].in_features == len(CUSTOM_AUS)
    # Every checkpoint reports generation quality on the fixed evaluation batch; stage 1 also the base model's row.
    assert list(s1["quality_rows"].value) == ["base", "stage 1"]
    assert list(s2["quality_rows"].value) == ["stage 2"] and list(adapter["quality_rows"].value) == ["adapter"]
    for meta in (s1, s2, adapter):
        assert 0.0 <= meta["fer_acc"].value <= 1.0 and 0.0 <= meta["au_acc"].value <= 1.0
        assert meta["generation_quality"].value.startswith("| model | FER acc | AU acc |")
        assert {f"grid_{c}" for c in EXPRESSIONS_7} <= set(meta)
    # Loaded from their folders, the adapter, the judge and the detector give exactly the published figures and
    # grid again: the batch's seeds and prompts are fixed.
    fer_meta = latest(instance, "fer_classifiers").asset_materialization.metadata
    fer_folder = Path(fer_meta["uri"].value)
    report = json.loads((fer_folder / "classifiers.json").read_text())
    assert (report["guide"], report["judge"]) == ("guide", "judge")
    for name in ("guide", "judge"):  # each scored on the real test split, with its confusion matrix
        assert report["classifiers"][name]["roles"] == [name, "voter"]
        assert np.array(report["classifiers"][name]["confusion"]).sum() == 7  # rafdb's 7 test faces
        assert fer_meta[f"confusion_{name}"].value.startswith("![")
        assert (fer_folder / f"confusion_{name}.png").exists()
    judge = load_fer_classifier(profile.fer_classifiers.classifiers["judge"], "judge", trained_folder=fer_folder / "judge")
    detector = AUDetector.load(latest(instance, "au_detector").asset_materialization.metadata["uri"].value)
    cfg = EvaluationBatchSettings(**EVALUATION)
    conditions = evaluation_conditions(cfg, CUSTOM_AUS, TemplatePrompts(cfg.seed))
    sampler = SynferSampler.from_pretrained(s2["uri"].value, adapter_dir=adapter["uri"].value)
    again = score(generate(sampler, conditions, cfg), conditions, judge, detector)
    assert again.fer_acc == adapter["fer_acc"].value and again.au_acc == adapter["au_acc"].value
    published = Image.open(Path(adapter["uri"].value, "samples.png")).convert("RGB")
    assert np.array_equal(np.asarray(stack_rows(list(again.grids.values()))), np.asarray(published))
    without = score(generate(SynferSampler.from_pretrained(s2["uri"].value), conditions, cfg), conditions, judge)
    assert not np.array_equal(np.asarray(stack_rows(list(without.grids.values()))), np.asarray(published))
    assert json.loads(Path(adapter["uri"].value, "au_adapter.json").read_text())["config"]["au_names"] == CUSTOM_AUS
    detector = latest(instance, "au_detector").asset_materialization.metadata
    assert "AU25" in detector["truth_aus_outside_the_au_list"].value  # drawn but not in the list: counted
    # FEText writes the vector in the profile's order and names it; the adapter's stream reads it by name.
    fetext_uri = latest(instance, "fetext").asset_materialization.metadata["uri"].value
    urls = shard_urls(Storage(profile.storage_root), fetext_uri, "fetext")
    metas = {k: json.loads(m["json"]) for u in urls for k, m in iter_shard(Storage(profile.storage_root), u)}
    for meta in metas.values():
        assert meta["au_names"] == CUSTOM_AUS
        assert meta["au_vector"] == [1.0 if a in meta["aus"] else 0.0 for a in CUSTOM_AUS]
    spec = StreamSpec(tuple(urls), resolution=64, batch_size=4, au_names=tuple(CUSTOM_AUS))
    batch = next(iter(BatchFeed(spec, tiny_clip_tokenizer())))
    assert [row.tolist() for row in batch["au"]] == [metas[k]["au_vector"] for k in batch["keys"]]
    lineage = json.loads(Path(adapter["uri"].value, "lineage.json").read_text())
    assert lineage["inputs"]["diffusion_stage2"]["lineage"]["inputs"]["diffusion_stage1"]["data_version"] == s1["data_version"].value
    assert not (Path(profile.storage_root) / "diffusion_stage1" / "all" / "_work").exists()  # step checkpoints dropped
