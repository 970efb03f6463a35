"""Synthetic shards as Dagster assets on tiny models: one shard per (round, shard) partition, reproducible bit for bit,
atomic under a killed backfill, readable by webdataset and by `datasets`, and a schedule, a sensor and an automation
condition that request the right partitions."""

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dagster import (AssetKey, AssetRecordsFilter, build_schedule_context, build_sensor_context,
                     evaluate_automation_conditions, instance_for_test, materialize)
from generator_helpers import ALL, curate, gen_profile, make_sources, run_assets
from PIL import Image

import assets.synthesis as synthesis_module
from assets.definitions import build_definitions, build_resources
from assets.synthesis import synthetic_quality, synthetic_shards
from synfer_pipeline.io.storage import Storage

ROUND = "2026-11-23"  # the latest complete weekly window of the demo profile's cron on the test date
GENERATION = {"images": 8, "shards": 4, "cron": "0 3 * * 1", "start": "2026-11-02", "steps": 3, "batch_size": 4,
              "guidance": {"scale": 0.5, "last_steps": 2, "form": "text", "decoder": "vae"}}
ASSETS = [*ALL, synthetic_shards, synthetic_quality]


class Killed(BaseException):
    """Stands in for a killed pod."""


def _key(shard: int, round_key: str = ROUND) -> str:
    return f"{round_key}|{shard:05d}"


def _shard(profile, instance, shard):
    result = materialize(ASSETS, selection=["synthetic_shards"], partition_key=_key(shard),
                         resources=build_resources(profile), instance=instance)
    assert result.success
    return result.asset_materializations_for_node("synthetic_shards")[0]


def _latest(instance, asset, partition):
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]),
                                              limit=5).records
    return records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    sources = make_sources(root / "sources")
    profile = gen_profile(root, sources, "Describe the face.", generation=GENERATION)
    with instance_for_test() as instance:
        curate(profile, instance)
        run_assets(profile, instance, ["fetext", "diffusion_stage1", "diffusion_stage2", "au_adapter"])
        yield profile, instance


def _published(profile, shard):
    return Storage(profile.storage_root).published("synthetic_shards", f"round={ROUND}/shard={shard:05d}")


def test_a_killed_backfill_leaves_no_partial_shard_and_a_rerun_makes_only_the_missing(world, monkeypatch):
    profile, instance = world

    def killed(*args, **kwargs):
        raise Killed()

    for shard in range(4):  # the backfill: one step per shard, shard 2 killed mid-generation
        with monkeypatch.context() as m:
            if shard == 2:
                m.setattr(synthesis_module, "generate_images", killed)
            try:
                _shard(profile, instance, shard)
            except Killed:
                pass
    assert [len(_published(profile, s)) for s in range(4)] == [1, 1, 0, 1]  # no partial shard was published
    done = {r.partition_key for r in instance.fetch_materializations(AssetKey("synthetic_shards"), limit=100).records}
    missing = [s for s in range(4) if _key(s) not in done]
    assert missing == [2]
    for shard in missing:
        _shard(profile, instance, shard)
    assert [len(_published(profile, s)) for s in range(4)] == [1, 1, 1, 1]
    assert [len(_latest(instance, "synthetic_shards", _key(s))) for s in range(4)] == [1, 1, 1, 1]  # no reruns


def test_a_shard_regenerated_from_the_same_seeds_is_identical(world):
    profile, instance = world
    first = _shard(profile, instance, 0)
    folder = Path(first.metadata["uri"].value)
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "ref.json"}  # ref.json names the run
    shutil.rmtree(folder)  # regenerate from nothing
    again = _shard(profile, instance, 0)
    assert again.metadata["uri"].value == str(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "ref.json"} == saved
    assert set(saved) == {"synthetic-000000.tar", "synthetic-000000.parquet"}
    assert again.metadata["images"].value == 2 and again.metadata["guided"].value is True
    assert again.metadata["images_per_s"].value > 0


def test_shards_read_back_with_webdataset_and_datasets(world):
    import datasets
    import webdataset as wds

    profile, instance = world
    tars = sorted(str(p) for p in Path(profile.storage_root, "synthetic_shards", f"round={ROUND}").rglob("*.tar")
                  if "_staging" not in str(p))
    assert len(tars) == 4
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == 8 and all("." not in s["__key__"] for s in samples)
    metas = [s["json"] for s in samples]
    assert len({json.dumps(sorted(m)) for m in metas}) == 1  # the same structure everywhere
    for sample, meta in zip(samples, metas):
        assert sample["png"].size == (64, 64)
        assert set(meta["aus"]) <= set(meta["au_names"]) and meta["round"] == ROUND
        assert meta["au_vector"] == [1.0 if a in meta["aus"] else 0.0 for a in meta["au_names"]]
        assert meta["models"]["diffusion_stage2"] and meta["models"]["au_adapter"] and meta["models"]["fetext"]
        assert meta["guide"].startswith("guide@") and meta["guidance"]["scale"] == 0.5
    loaded = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert loaded.num_rows == 8
    assert sorted(r["label"] for r in loaded["json"]) == sorted(m["label"] for m in metas)
    assert isinstance(loaded[0]["png"], Image.Image)
    png = next(iter(wds.WebDataset(tars[:1], shardshuffle=False)))["png"]
    assert np.asarray(Image.open(io.BytesIO(png))).dtype == np.uint8


def test_the_schedule_requests_every_shard_of_the_newest_round(world):
    profile, instance = world
    defs = build_definitions(profile)
    context = build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                     scheduled_execution_time=dt.datetime(2026, 12, 7, 3, 0, tzinfo=dt.timezone.utc))
    requests = defs.resolve_schedule_def("round_schedule").evaluate_tick(context).run_requests
    assert sorted(r.partition_key for r in requests) == [_key(s, "2026-11-30") for s in range(4)]
    assert defs.resolve_schedule_def("round_schedule").cron_schedule == "0 3 * * 1"


def test_the_sensor_judges_a_complete_round_once(world):
    profile, instance = world
    defs = build_definitions(profile)
    sensor = defs.resolve_sensor_def("round_complete_sensor")
    requests = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs)).run_requests
    assert [r.partition_key for r in requests] == [ROUND]
    result = materialize(ASSETS, selection=["synthetic_quality"], partition_key=ROUND,
                         resources=build_resources(profile), instance=instance)
    assert result.success
    meta = result.asset_materializations_for_node("synthetic_quality")[0].metadata
    for name in ("fer_acc_unguided", "fer_acc_guided", "au_acc_unguided", "au_acc_guided", "round_fer_acc"):
        assert 0.0 <= meta[name].value <= 1.0
    assert meta["round_images"].value == 8
    assert meta["guidance_gain"].value == pytest.approx(meta["fer_acc_guided"].value - meta["fer_acc_unguided"].value)
    again = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
    assert not again.run_requests  # judged: nothing new until a shard changes


def test_a_new_adapter_makes_the_latest_rounds_shards_stale_and_automation_requests_them(world):
    profile, instance = world
    defs = build_definitions(profile)
    first = evaluate_automation_conditions(defs=defs, instance=instance)
    settled = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert settled.total_requested == 0
    run_assets(profile, instance, ["au_adapter"])  # a new materialization of the adapter
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
    requested = sorted(result.get_requested_partitions(AssetKey("synthetic_shards")))
    assert requested == [_key(s) for s in range(4)]  # the latest round only, never every old round
