"""Progress of long steps, as users of accelerate and diffusers expect it: a tqdm bar on the terminal (training
steps with loss and throughput, generated batches) and the same figures in the run's log, which the UI shows."""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


class Progress:
    """A bar of `total` units for one step; `update(done, **figures)` moves it to `done` and shows the figures.

    The run log gets a line at every tenth of the way (and at the end), so the UI carries the same progress.
    The bar goes to stderr, and is off when SYNFER_PROGRESS=0 (CI logs, tests).
    """

    def __init__(self, context, desc: str, total: int, unit: str = "step"):
        self.context, self.desc, self.total, self.unit = context, desc, max(1, int(total)), unit
        self.started, self.done, self.next_log = time.perf_counter(), 0, 0.1
        enabled = os.environ.get("SYNFER_PROGRESS", "1") != "0"
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        leave=False, disable=not enabled)

    def update(self, done: int, **figures) -> None:
        self.bar.update(max(0, done - self.done))
        self.done = done
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()}
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        shown[f"{self.unit}s/s"] = f"{rate:.2f}"
        self.bar.set_postfix(shown, refresh=False)
        if done / self.total >= self.next_log or done == self.total:
            self.next_log = done / self.total + 0.1
            text = ", ".join(f"{k} {v}" for k, v in shown.items())
            self.context.log.info(f"{self.desc}: {done}/{self.total} {self.unit}s ({text})")

    def close(self) -> None:
        self.bar.close()
