"""The README's main command end to end: `synfer demo` materializes the whole graph into a SQLite instance."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from assets.definitions import build_definitions
from synfer_pipeline.config import load_profile

REPO = Path(__file__).resolve().parent.parent


def _latest(instance, key, partition=None):
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    return records[0].asset_materialization if records else None


def test_synfer_demo_materializes_every_asset_and_partition(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SYNFER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    monkeypatch.setenv("SYNFER_PROFILE", "demo")
    proc = subprocess.run([sys.executable, "-m", "assets.cli", "demo"], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "materialized" in proc.stdout and "make ui" in proc.stdout
    assert (home / "dagster_home" / "dagster.yaml").exists()

    profile = load_profile("demo")
    graph = build_definitions(profile).resolve_asset_graph()
    with DagsterInstance.get() as instance:
        for key in graph.get_all_asset_keys():
            partitions = graph.get(key).partitions_def
            for pk in partitions.get_partition_keys() if partitions else [None]:
                assert _latest(instance, key, pk), f"{key.to_user_string()}[{pk}] was not materialized"
        manifest = pd.read_parquet(_latest(instance, AssetKey("raw_faces"), "rafdb").metadata["manifest"].value)
    spec = profile.demo_data
    assert len(manifest) == spec.rafdb_train + spec.rafdb_test
    assert manifest["label"].nunique() == 7
