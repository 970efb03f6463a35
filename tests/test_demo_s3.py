"""The whole graph on an `s3://` storage root: `synfer demo` (small budgets) against a real S3-API server (moto_server
on 127.0.0.1, started and stopped here), every artifact written to the bucket and read back through s3fs, pandas
and webdataset, as a user on another machine would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import webdataset as wds
import yaml
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance
from PIL import Image
from s3_server import s3_environment
from test_demo_end_to_end import ROUND_ASSETS, small_demo_profile

from assets.definitions import build_definitions
from synfer_pipeline.config import load_profile
from synfer_pipeline.io.storage import Storage

REPO = Path(__file__).resolve().parent.parent
ROOT = "s3://synfer/demo"


def _latest(instance, key: AssetKey, partition=None):
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    return records[0].asset_materialization if records else None


def test_the_whole_graph_on_an_s3_storage_root(tmp_path, monkeypatch):
    home = tmp_path / "home"
    profile_path = small_demo_profile(tmp_path / "demo-s3.yaml")
    raw = yaml.safe_load(profile_path.read_text())
    raw["storage"]["root"] = ROOT
    profile_path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SYNFER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    monkeypatch.setenv("SYNFER_PROFILE", str(profile_path))
    with s3_environment(monkeypatch) as client:
        proc = subprocess.run([sys.executable, "-m", "assets.cli", "demo"], cwd=REPO, env=dict(os.environ),
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "downstream evaluation of round" in proc.stdout

        profile = load_profile(str(profile_path))
        store = Storage(ROOT)
        graph = build_definitions(profile).resolve_asset_graph()
        refs = {}
        with DagsterInstance.get() as instance:
            for key in graph.get_all_asset_keys():
                partitions = graph.get(key).partitions_def
                keys = partitions.get_partition_keys() if partitions else [None]
                if key.path[0] in ROUND_ASSETS:  # the demo makes the newest round
                    newest = max(str(k).split("|")[0] for k in keys)
                    keys = [k for k in keys if str(k).split("|")[0] == newest]
                for pk in keys:
                    mat = _latest(instance, key, pk)
                    assert mat, f"{key.to_user_string()}[{pk}] was not materialized"
                    uri = mat.metadata["uri"].value
                    # every artifact is in the bucket, published (ref.json last), nowhere else
                    assert uri.startswith(f"{ROOT}/{key.path[0]}/"), uri
                    ref = json.loads(store.read_bytes(f"{uri}/ref.json"))
                    assert ref["data_version"] == mat.tags["dagster/data_version"][:len(ref["data_version"])]
                    refs[(key.path[0], pk)] = uri
        assert not (home / "storage").exists()  # nothing was written to a local storage root

        # The synthetic shards: WebDataset over s3:// (the pipeline's fsspec opener), one image and its record each.
        shard_uris = [uri for (asset, _), uri in refs.items() if asset == "synthetic_shards"]
        assert len(shard_uris) == profile.generation.shards
        samples = [s for uri in shard_uris
                   for s in wds.WebDataset(store.list(uri, "*.tar"), shardshuffle=False).decode("pil")]
        assert len(samples) == profile.generation.images
        images = [v for s in samples for k, v in s.items() if k in ("png", "jpg")]
        assert len(images) == len(samples) and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in images)

        # The voted labels: Parquet read with pandas through s3fs (storage_options from the environment's endpoint).
        options = {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
        voted = pd.concat([pd.read_parquet(f"{uri}/labels.parquet", storage_options=options)
                           for (asset, _), uri in refs.items() if asset == "voted_labels"])
        assert len(voted) == profile.generation.images
        assert set(voted["key"]) == {s["__key__"] for s in samples}

        # A checkpoint's lineage names the FEText version it was trained on, in the bucket.
        lineage = json.loads(store.read_bytes(f"{refs[('au_adapter', None)]}/lineage.json"))
        assert refs[("fetext", None)].endswith(lineage["fetext"]["data_version"])
        objects = client.list_objects_v2(Bucket="synfer", Prefix="demo/au_adapter/")["Contents"]
        assert any(o["Key"].endswith("au_adapter.safetensors") for o in objects)
