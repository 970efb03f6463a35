"""The README's main command end to end: `synfer demo` materializes the whole graph into a SQLite instance.

It runs the demo profile with small budgets (data sizes, training steps, evaluation batch): the same graph, the
same code paths, in a fraction of the demo's minutes; `make demo` runs the real budgets.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from assets.definitions import build_definitions
from synfer_pipeline.config import PROFILES_DIR, load_profile

REPO = Path(__file__).resolve().parent.parent


ROUND_ASSETS = ("synthetic_shards", "synthetic_quality", "feranno_labels", "voted_labels", "fer_evaluation")


def _latest(instance, key, partition=None):
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    return records[0].asset_materialization if records else None


def small_demo_profile(path: Path) -> Path:
    """demo.yaml with small budgets: every section kept, only sizes and steps cut."""
    raw = yaml.safe_load((PROFILES_DIR / "demo.yaml").read_text())
    raw["demo_data"].update(rafdb_train=35, rafdb_test=14, ffhq=21, base_model={
        "faces": 28, "text_pretrain_steps": 10, "tiny_decoder_steps": 5, "autoencoder": {"steps": 20, "batch_size": 4}},
        reference={"faces": 14, "train": {"epochs": 1}})
    raw["generation"].update(images=8, steps=3)
    raw["generation"]["guidance"]["last_steps"] = 2
    raw["au_detector"]["train"]["epochs"] = 2
    for spec in raw["fer_classifiers"]["classifiers"].values():
        spec["train"]["epochs"] = 2
    for stage in ("stage1", "stage2", "au_adapter"):
        raw["generator"][stage].update(train_batch_size=4, max_train_steps=4, checkpointing_steps=2, lr_warmup_steps=1)
    raw["generator"]["evaluation"].update(per_class=2, steps=3)
    raw["labels"]["feranno"].update(epochs=2)
    raw["fer_evaluation"]["train"]["epochs"] = 2
    path.write_text(yaml.safe_dump(raw))
    return path


def test_synfer_demo_materializes_every_asset_and_partition(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SYNFER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    monkeypatch.setenv("SYNFER_PROFILE", str(small_demo_profile(tmp_path / "demo-small.yaml")))
    proc = subprocess.run([sys.executable, "-m", "assets.cli", "demo"], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "materialized" in proc.stdout and "make ui" in proc.stdout
    # The ablation rows close the run: base, stage 1, stage 2, adapter, each with FER acc and AU acc.
    table = proc.stdout.split("generation quality on the fixed evaluation batch")[1].splitlines()[1:6]
    assert table[0].split() == ["model", "FER", "acc", "AU", "acc"]
    assert [row.split()[0] for row in table[1:]] == ["base", "stage", "stage", "adapter"]
    assert all(row.rstrip().endswith("%") for row in table[1:])
    # ... and the round's guidance line: FER acc without and with guidance on the same seeds.
    assert re.search(r"FER acc \d+\.\d% without guidance, \d+\.\d% with: guidance (raises|lowers|leaves) the judge's",
                     proc.stdout), proc.stdout[-2000:]
    # ... and the downstream evaluation table: one row per training set, tested on the real test split.
    evaluation = proc.stdout.split("downstream evaluation of round")[1].splitlines()[1:7]
    assert evaluation[0].split() == ["training", "set", "images", "real", "test", "acc"]
    assert [row[:24].strip() for row in evaluation[1:]] == [
        "real", "synthetic", "real+synthetic", "synthetic (no FERAnno)", "synthetic (intended)"]
    assert all(re.fullmatch(r"\s+\d+\s+(\d+\.\d%|- \(.*\))", row[24:]) for row in evaluation[1:]), evaluation
    assert (home / "dagster_home" / "dagster.yaml").exists()
    # `synfer export` writes the voted set of the newest round for other trainers.
    export = subprocess.run([sys.executable, "-m", "assets.cli", "export", str(tmp_path / "export"), "--with-real"],
                            cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    exported = json.loads((tmp_path / "export" / "export.json").read_text())
    assert exported["synthetic"] == load_profile(os.environ["SYNFER_PROFILE"]).generation.images
    assert sum(exported["counts"]["imagefolder"]["test"].values()) == exported["real"]["test"]

    profile = load_profile(os.environ["SYNFER_PROFILE"])
    graph = build_definitions(profile).resolve_asset_graph()
    with DagsterInstance.get() as instance:
        for key in graph.get_all_asset_keys():
            partitions = graph.get(key).partitions_def
            keys = partitions.get_partition_keys() if partitions else [None]
            if key.path[0] in ROUND_ASSETS:  # rounds: the demo makes the newest one
                newest = max(str(k).split("|")[0] for k in keys)
                keys = [k for k in keys if str(k).split("|")[0] == newest]
                assert len(keys) == (profile.generation.shards if "|" in str(keys[0]) else 1)
            for pk in keys:
                assert _latest(instance, key, pk), f"{key.to_user_string()}[{pk}] was not materialized"
        manifest = pd.read_parquet(_latest(instance, AssetKey("raw_faces"), "rafdb").metadata["manifest"].value)
    spec = profile.demo_data
    assert len(manifest) == spec.rafdb_train + spec.rafdb_test
    assert manifest["label"].nunique() == 7
