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
    ("feranno_job", None),
    ("labels_job", "latest_round"),
    ("evaluation_job", "latest"),
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


LAUNCHER, PID_TAG = "synfer/launched_by", "synfer/pid"


def release_dead_runs(instance: DagsterInstance, log: Callable[[str], None] = lambda s: None) -> list[str]:
    """Runs an earlier `synfer demo` started in a process that no longer exists (killed, crashed) are marked failed
    and their concurrency slots freed: otherwise their claim on the `gpu` pool makes every later GPU step wait."""
    import os

    from dagster import DagsterRunStatus, RunsFilter

    released = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING],
                                            tags={LAUNCHER: "synfer demo"})):
        pid = int(run.tags.get(PID_TAG, "0") or 0)
        if pid > 0:
            try:
                os.kill(pid, 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        instance.report_run_failed(run, "its process ended without finishing the run (killed or crashed)")
        released.append(run.run_id)
        log(f"released run {run.run_id} ({run.job_name}): its process is gone")
    return released


def materialize_all(defs: Definitions, instance: DagsterInstance, log: Callable[[str], None] = lambda s: None,
                    plan: list[tuple[str, str | None]] | None = None) -> list[tuple[str, bool]]:
    """Run every job of `plan` (default PLAN); returns (run label, success) in order, stopping at the first failure."""
    import os

    release_dead_runs(instance, log)
    results = []
    for job_name, partitions in plan or PLAN:
        job = defs.resolve_job_def(job_name)
        keys = _keys(job.partitions_def, partitions, instance)
        for key in keys:
            label = f"{job_name}[{key}]" if key else job_name
            log(f"running {label} ...")
            result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False,
                                            tags={LAUNCHER: "synfer demo", PID_TAG: str(os.getpid())}, run_config=QUIET)
            results.append((label, result.success))
            if not result.success:
                for event in result.all_events:
                    if event.is_failure:
                        log(f"  {event.step_key}: {event.message}")
                return results
    return results
