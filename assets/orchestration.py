"""Materialize the whole graph in order: each partitioned job once per partition, then the jobs downstream of it.

Used by `synfer demo` and the end-to-end test. Runs execute in process (one import of torch), and are recorded in
the given instance exactly as runs launched from the UI are, under the same job names.
"""

from __future__ import annotations

from collections.abc import Callable

from dagster import DagsterInstance, Definitions

# Step events stay in the instance (the UI shows them all); the terminal only gets warnings and errors.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

# (job name, partitions to run: "all" or None for an unpartitioned job), in dependency order.
PLAN: list[tuple[str, str | None]] = [
    ("faces_job", "all"),
    ("au_detector_job", None),
    ("fer_job", None),
    ("annotations_job", "all"),
    ("fetext_job", None),
    ("generator_job", None),
    ("synthetic_job", "latest_round"),   # every shard of the newest round
    ("quality_job", "latest"),
]


def _keys(partitions_def, which: str | None, instance) -> list:
    """"all" partitions, the "latest" one, the "latest_round"'s shards (a round x shard definition), or [None]."""
    if which is None:
        return [None]
    keys = partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    if which == "all":
        return keys
    if which == "latest":
        return keys[-1:]
    latest = max(k.keys_by_dimension["round"] for k in keys)
    return [k for k in keys if k.keys_by_dimension["round"] == latest]


def materialize_all(defs: Definitions, instance: DagsterInstance, log: Callable[[str], None] = lambda s: None,
                    plan: list[tuple[str, str | None]] | None = None) -> list[tuple[str, bool]]:
    """Run every job of `plan` (default PLAN); returns (run label, success) in order, stopping at the first failure."""
    results = []
    for job_name, partitions in plan or PLAN:
        job = defs.resolve_job_def(job_name)
        keys = _keys(job.partitions_def, partitions, instance)
        for key in keys:
            label = f"{job_name}[{key}]" if key else job_name
            log(f"running {label} ...")
            result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False,
                                            tags={"synfer/launched_by": "synfer demo"}, run_config=QUIET)
            results.append((label, result.success))
            if not result.success:
                for event in result.all_events:
                    if event.is_failure:
                        log(f"  {event.step_key}: {event.message}")
                return results
    return results
