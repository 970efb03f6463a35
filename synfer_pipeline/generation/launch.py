"""One training loop on N processes: the multi-GPU path of the training assets.

With `num_processes == 1` the job runs in the calling process. With more, the calling process (a Dagster step)
writes the job to a control folder and starts `torch.distributed.run --standalone --nproc-per-node N`, which runs
`python -m synfer_pipeline.generation.launch CONTROL` once per rank. accelerate reads the launcher's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with one GPU per rank, or gloo on CPU. Every rank trains on
its share of the shards (`data.py`), gradients are averaged, and only rank 0 writes the output folder and the
report; the step that launched the ranks publishes the artifact, as in a single-process run.

The ranks talk to the launching step through two channels:
- rank 0 prints one line per event on stdout, prefixed with `EVENT_PREFIX`: a training log record (the step's
  progress bar and run log) or a finished checkpoint folder; a failing rank prints its traceback the same way;
  other output is passed on to the step's log;
- after a checkpoint event rank 0 waits for the step's acknowledgement (a file in the control folder), so that the
  step's `on_checkpoint` (which snapshots the folder for upload) runs before the loop may prune that checkpoint.

The launcher runs in its own process group and dies with the step (PR_SET_PDEATHSIG on Linux); when the step ends
early the group is stopped. A killed run resumes from its newest checkpoint like a single-process one, provided it
is resumed with the same number of processes (the data order depends on it; the checkpoint fingerprint checks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from synfer_pipeline.generation.settings import TrainReport, TrainSettings

EVENT_PREFIX = "@@synfer-event "
JOB_FILE, REPORT_FILE, ACK_DIR = "job.json", "report.json", "acks"
ACK_TIMEOUT_S = 900.0


@dataclass
class LaunchJob:
    """A training run as plain data: `kind` "unet" (`train_unet`) or "au_adapter" (`train_au_adapter`, with
    `adapter`, an AUAdapterConfig as a dict)."""

    kind: str
    settings: dict
    shard_urls: list[str]
    base_model: str
    output_dir: str
    state_dir: str
    adapter: dict | None = None
    env: dict[str, str] = field(default_factory=dict)

    def run(self, on_checkpoint: Callable[[Path], None] | None, log: Callable[[dict], None] | None) -> TrainReport:
        settings = TrainSettings(**self.settings)
        if self.kind == "unet":
            from synfer_pipeline.generation.train import train_unet

            return train_unet(settings, self.shard_urls, self.base_model, Path(self.output_dir),
                              Path(self.state_dir), on_checkpoint, log)
        if self.kind == "au_adapter":
            from synfer_pipeline.generation.au_adapter import AUAdapterConfig, train_au_adapter

            return train_au_adapter(settings, AUAdapterConfig.from_dict(self.adapter or {}), self.shard_urls,
                                    self.base_model, Path(self.output_dir), Path(self.state_dir), on_checkpoint, log)
        raise ValueError(f"unknown training job kind {self.kind!r} (unet or au_adapter)")


def train(job: LaunchJob, num_processes: int = 1, on_checkpoint: Callable[[Path], None] | None = None,
          log: Callable[[dict], None] | None = None, output: Callable[[str], None] | None = None,
          device: str = "auto") -> TrainReport:
    """Run `job` on `num_processes` processes and return rank 0's report.

    on_checkpoint(folder) / log(record): as in `run_training`, called in this process; output(line): the ranks'
    other output lines (default: this process's stderr). device: "cpu" forces the ranks onto the CPU (gloo), even
    on a machine with GPUs; anything else lets accelerate choose (one GPU per rank when there are GPUs).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, not {num_processes}")
    if num_processes == 1:
        return job.run(on_checkpoint, log)
    with tempfile.TemporaryDirectory(prefix="synfer-launch-") as control:
        return _launch(job, num_processes, Path(control), on_checkpoint, log, output or _to_stderr, device)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _launch(job: LaunchJob, n: int, control: Path, on_checkpoint, log, output, device: str) -> TrainReport:
    (control / ACK_DIR).mkdir()
    (control / JOB_FILE).write_text(json.dumps(job.__dict__, indent=2))
    env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-c", _WITH_PARENT, sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", "-m", "synfer_pipeline.generation.launch", str(control)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not line.startswith(EVENT_PREFIX):
                tail.append(line)
                output(line)
                continue
            event = json.loads(line[len(EVENT_PREFIX):])
            if event["type"] == "log" and log is not None:
                log(event["record"])
            elif event["type"] == "error":
                errors.append(f"rank {event['rank']}: {event['traceback']}")
            elif event["type"] == "checkpoint":
                if on_checkpoint is not None:
                    on_checkpoint(Path(event["folder"]))
                (control / ACK_DIR / Path(event["folder"]).name).touch()
        code = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc)
    if code != 0:
        cause = "\n".join(errors[:1]) or "last output:\n" + "\n".join(tail)
        raise RuntimeError(f"training on {n} processes failed (exit {code}); {cause}")
    report = control / REPORT_FILE
    if not report.exists():
        raise RuntimeError(f"training on {n} processes exited without rank 0's report {report}")
    return TrainReport(**json.loads(report.read_text()))


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and its ranks: SIGTERM to the group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# Runs first in the launcher's process, then execs the launcher: default SIGINT/SIGTERM handlers (shells may start
# us with them ignored, and ignored signals survive exec) and, on Linux, SIGTERM when the launching step dies
# (PR_SET_PDEATHSIG survives exec), so no rank outlives a killed run. A wrapper rather than `preexec_fn`, which is
# unsafe in a step that runs threads (checkpoint uploads).
_WITH_PARENT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
os.execv(sys.argv[1], sys.argv[1:])
"""


# --- in each rank ---------------------------------------------------------------------------------------------------

def _emit(event: dict) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def _rank_main(control: Path) -> None:
    job = LaunchJob(**json.loads((control / JOB_FILE).read_text()))
    rank = int(os.environ.get("RANK", "0"))

    def log(record: dict) -> None:
        _emit({"type": "log", "record": record})

    def on_checkpoint(folder: Path) -> None:
        _emit({"type": "checkpoint", "folder": str(folder)})
        ack, deadline = control / ACK_DIR / folder.name, time.monotonic() + ACK_TIMEOUT_S
        while not ack.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the launching step did not acknowledge checkpoint {folder}")
            time.sleep(0.05)

    # run_training calls both only on the main process; rank 0 alone writes the report
    try:
        report = job.run(on_checkpoint, log)
    except BaseException:
        _emit({"type": "error", "rank": rank, "traceback": traceback.format_exc(limit=-8)})
        raise
    if rank == 0:
        tmp = control / f".{REPORT_FILE}.tmp"
        tmp.write_text(json.dumps(report.to_dict()))
        tmp.replace(control / REPORT_FILE)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
