"""Scheduled regeneration: a schedule starts each new round; a sensor judges a round once all its shards exist.

`round_schedule` (the profile's `generation.cron`) requests every shard of the newest round, one run per shard.
`round_complete_sensor` requests `synthetic_quality` for a round when every shard of it is materialized and newer
than the round's last quality, so the schedule's round reaches everything downstream. Both are stopped until a user
turns them on, as are Dagster's automation conditions (`synthetic_shards` regenerates the latest round's shards
when the stage-2 checkpoint or the adapter changes, once the automation sensor runs).
"""

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    build_schedule_from_partitioned_job,
    sensor,
)

from assets.jobs import quality_job, synthetic_job
from assets.synthesis import round_partitions, round_shard_partitions

round_schedule = build_schedule_from_partitioned_job(
    synthetic_job, name="round_schedule",
    description="A new generation round per cron tick: every shard of the newest round, one run each.")


def _latest_by_partition(instance, asset: str) -> dict[str, int]:
    """partition key -> storage id of its latest materialization."""
    key = AssetKey(asset)
    out = {}
    for record in instance.fetch_materializations(key, limit=10_000).records:
        if record.partition_key is not None and record.partition_key not in out:
            out[record.partition_key] = record.storage_id
    return out


@sensor(job=quality_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.STOPPED,
        description="Judge a round once all its shards are materialized (and again when a shard is regenerated).")
def round_complete_sensor(context: SensorEvaluationContext):
    shards = _latest_by_partition(context.instance, "synthetic_shards")
    quality = _latest_by_partition(context.instance, "synthetic_quality")
    shard_keys = round_shard_partitions.get_partitions_def_for_dimension("shard").get_partition_keys()
    requests = []
    for round_key in round_partitions.get_partition_keys(dynamic_partitions_store=context.instance)[-8:]:
        ids = [shards.get(f"{round_key}|{s}") for s in shard_keys]
        if None in ids:
            continue  # the round is not complete yet
        if quality.get(round_key, -1) < max(ids):
            requests.append(RunRequest(run_key=f"{round_key}:{max(ids)}", partition_key=round_key))
    return requests or SkipReason("no round whose shards are all newer than its quality")
