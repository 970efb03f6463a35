"""Training-state checkpoints: atomic folders `state_dir/checkpoint-{step}` that a killed run resumes from.

A checkpoint is written under a temporary name (`.tmp-checkpoint-{step}`) and renamed once every file is in it,
so a folder called `checkpoint-N` is always complete; temporary folders left by a crash are ignored and removed.
Old checkpoints are renamed to `.trash-...` before they are deleted, for the same reason. `save_checkpoint` and
`resume` do this for the training loop. Contents: accelerate's `save_state` files (model weights as safetensors,
optimizer, LR scheduler, RNG states, all read back with `torch.load(weights_only=True)`), `progress_{rank}.json`
(step, data position, counters, losses, run fingerprint) and, with EMA, `ema.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from synfer_pipeline.generation.data import DataPosition
from synfer_pipeline.io.storage import atomic_write_bytes, rename_folder_if_absent

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
EMA_FILE = "ema.safetensors"


def progress_file(rank: int) -> str:
    """Name of the progress file of process `rank` inside a checkpoint."""
    return f"progress_{rank}.json"


def list_checkpoints(state_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `state_dir` as (step, folder), oldest first; temporary folders are not listed."""
    if not state_dir.is_dir():
        return []
    found = []
    for entry in state_dir.iterdir():
        m = CHECKPOINT_RE.match(entry.name)
        if m and entry.is_dir() and (entry / progress_file(0)).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(state_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none."""
    found = list_checkpoints(state_dir)
    return found[-1][1] if found else None


def remove_leftovers(state_dir: Path) -> list[Path]:
    """Delete temporary and trash folders a crashed run left behind; returns what was removed."""
    removed = []
    if state_dir.is_dir():
        for entry in state_dir.iterdir():
            if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def temporary_folder(state_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it gets its final name."""
    return state_dir / f"{TMP_PREFIX}checkpoint-{step}"


def publish(tmp: Path, step: int) -> Path:
    """Rename a fully written temporary folder to `checkpoint-{step}` (atomic on one filesystem); when that step was
    saved already by an earlier attempt, the existing checkpoint is kept and the copy dropped."""
    final = tmp.parent / f"checkpoint-{step}"
    if not rename_folder_if_absent(tmp, final):
        shutil.rmtree(tmp)
        return final
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        fd = os.open(tmp.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final


def prune(state_dir: Path, keep: int | None) -> None:
    """Keep only the newest `keep` checkpoints (None keeps all)."""
    if keep is None:
        return
    for step, folder in list_checkpoints(state_dir)[:-keep] if keep > 0 else list_checkpoints(state_dir):
        trash = state_dir / f"{TRASH_PREFIX}checkpoint-{step}"
        os.replace(folder, trash)  # never leave a half-deleted checkpoint-N behind
        shutil.rmtree(trash, ignore_errors=True)


def read_progress(folder: Path, rank: int) -> dict:
    """The progress record process `rank` saved in checkpoint `folder`."""
    path = folder / progress_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {path.name}: was it written by a run with a different process count?")
    return json.loads(path.read_text())


def save_ema(ema, folder: Path) -> dict:
    """Write the EMA shadow weights to `ema.safetensors`; returns its scalar state for progress.json."""
    tensors = {f"shadow.{i:05d}": p.detach().to("cpu", torch.float32).contiguous()
               for i, p in enumerate(ema.shadow_params)}
    save_file(tensors, str(folder / EMA_FILE))
    state = ema.state_dict()
    return {k: v for k, v in state.items() if k != "shadow_params"}


def load_ema(ema, folder: Path, scalars: dict) -> None:
    """Restore EMA shadow weights and counters saved by `save_ema`."""
    tensors = load_file(str(folder / EMA_FILE))
    shadow = [tensors[f"shadow.{i:05d}"] for i in range(len(tensors))]
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{folder}: EMA holds {len(shadow)} tensors, the model trains {len(ema.shadow_params)}")
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.load_state_dict({**scalars, "shadow_params": [t.to(device) for t in shadow]})


@dataclass
class Progress:
    """What a checkpoint records besides accelerate's state (per process)."""

    step: int = 0
    position: DataPosition | None = None
    samples_seen: int = 0
    by_source: Counter = field(default_factory=Counter)
    native_hr: int = 0
    losses: list[float] = field(default_factory=list)

    def to_dict(self, fingerprint: dict, ema_scalars: dict | None) -> dict:
        return {"step": self.step, "position": self.position.to_dict(), "samples_seen": self.samples_seen,
                "by_source": dict(self.by_source), "native_hr": self.native_hr, "losses": self.losses,
                "fingerprint": fingerprint, "ema": ema_scalars}

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        return cls(d["step"], DataPosition.from_dict(d["position"]), d["samples_seen"], Counter(d["by_source"]),
                   d["native_hr"], list(d["losses"]))


def check_fingerprint(folder: Path, saved: dict, current: dict) -> None:
    """Refuse to resume from a checkpoint of another run (other settings, data, base model or process count)."""
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if "settings" in diff:
            s, c = saved.get("settings", {}), current.get("settings", {})
            diff += [f"settings.{k}" for k in sorted(set(s) | set(c)) if s.get(k) != c.get(k)]
        raise ValueError(f"cannot resume from {folder}: it was written by a run with different {', '.join(diff)}; "
                         "use a fresh state_dir or the original settings")


def save_checkpoint(accelerator, state_dir: Path, progress: Progress, fingerprint: dict, ema, keep: int | None) -> Path:
    """Write the full training state to `state_dir/checkpoint-{step}` atomically (all processes take part)."""
    tmp = temporary_folder(state_dir, progress.step)
    if accelerator.is_main_process:
        remove_leftovers(state_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    ema_scalars = save_ema(ema, tmp) if (ema is not None and accelerator.is_main_process) else None
    atomic_write_bytes(tmp / progress_file(accelerator.process_index),
                       json.dumps(progress.to_dict(fingerprint, ema_scalars), sort_keys=True).encode())
    accelerator.wait_for_everyone()  # every process's files are in before the folder gets its final name
    final = tmp.parent / f"checkpoint-{progress.step}"
    if accelerator.is_main_process:
        final = publish(tmp, progress.step)
        prune(state_dir, keep)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, state_dir: Path, fingerprint: dict, ema, feed_streams: int) -> tuple[Progress, int | None]:
    """Load the newest complete checkpoint into the prepared objects; (progress, its step), or a fresh start."""
    if accelerator.is_main_process:
        remove_leftovers(state_dir)
    accelerator.wait_for_everyone()
    folder = latest_checkpoint(state_dir)
    if folder is None:
        return Progress(position=DataPosition.start(feed_streams)), None
    saved = read_progress(folder, accelerator.process_index)
    check_fingerprint(folder, saved["fingerprint"], fingerprint)
    accelerator.load_state(str(folder))
    if ema is not None:
        load_ema(ema, folder, read_progress(folder, 0)["ema"])
    progress = Progress.from_dict(saved)
    return progress, progress.step
