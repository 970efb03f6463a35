"""Leases: work in progress is owned by one run at a time, on a local folder or an object store.

A lease on `path` is a series of numbered files `{path}.lease-000001`, `-000002`...; the newest one names the owner
(run, host, pid) and a heartbeat counter the owner's thread advances every `ttl / 4` seconds. A lease is taken by
creating the next number with an exclusive create (`O_EXCL` locally, `If-None-Match: *` on S3), so two runs can
never both take it. A waiter takes over when the owner is gone: at once when the owner is a dead process on this
host (or this very process, whose earlier step failed without giving the lease back), otherwise when the heartbeat
has not moved for `ttl` seconds on the waiter's own clock (no clock is compared across machines). An owner whose lease was taken over learns it at its next heartbeat and `check()` raises.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable

LEASE_TTL_S = float(os.environ.get("SYNFER_LEASE_TTL_S", "120"))
_LIVE: dict[str, Lease] = {}  # token -> lease, for the leases this process holds
LEASE_WAIT_S = float(os.environ.get("SYNFER_LEASE_WAIT_S", "21600"))  # how long a second run waits for the first


class LeaseBusy(RuntimeError):
    """The work is owned by another live run and did not come free within the wait."""


class LeaseLost(RuntimeError):
    """Another run took this lease over (this run stopped heartbeating for longer than the lease's ttl)."""


class Lease:
    """Exclusive ownership of the work at `path` (a folder uri) for one run; see the module docstring."""

    def __init__(self, storage, path: str, owner: str = "", ttl: float = LEASE_TTL_S, wait: float = LEASE_WAIT_S,
                 poll: float = 1.0, log: Callable[[str], None] = lambda s: None):
        self.storage, self.path, self.ttl, self.wait, self.poll, self.log = storage, path.rstrip("/"), ttl, wait, poll, log
        self.owner = {"run": owner, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.number: int | None = None
        self.lost = False
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        """Take the lease, waiting while a live run owns it; LeaseBusy after `wait` seconds."""
        started, seen, since = time.monotonic(), None, time.monotonic()
        while True:
            number, holder = self._newest()
            if holder is not None and holder.get("token") == self.owner["token"]:
                return self
            if holder is None or holder.get("released") or self._owner_dead(holder) or (
                    seen == (number, holder.get("beat")) and time.monotonic() - since >= self.ttl):
                if self._create(number + 1):
                    self._start(number + 1, took_over=holder is not None and not holder.get("released"))
                    return self
                continue  # another waiter won this number: look again at once
            if seen != (number, holder.get("beat")):
                seen, since = (number, holder.get("beat")), time.monotonic()
                self.log(f"{self.path} is in use by run {holder.get('run')} ({holder.get('host')}, pid "
                         f"{holder.get('pid')}); waiting for it")
            if time.monotonic() - started > self.wait:
                raise LeaseBusy(f"{self.path} is in use by run {holder.get('run')} on {holder.get('host')} (pid "
                                f"{holder.get('pid')}); gave up after {self.wait:.0f} s. Run again when it finishes: "
                                "its result is then reused")
            time.sleep(self.poll)

    def release(self) -> None:
        """Stop heartbeating and mark the lease free (kept as the newest number, so numbering never restarts)."""
        if self.number is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self._write(self.number, {**self.owner, "beat": self._beats, "released": True})
        _LIVE.pop(self.owner["token"], None)
        self.number = None

    def check(self) -> None:
        """Raise LeaseLost if another run took the lease over (call before writing into the owned folder)."""
        if self.lost:
            raise LeaseLost(f"run {self.owner['run']} lost {self.path} to another run (no heartbeat for {self.ttl} s)")

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the files ---------------------------------------------------------------------------------------------------
    def _file(self, number: int) -> str:
        return f"{self.path}.lease-{number:06d}"

    def _newest(self) -> tuple[int, dict | None]:
        folder, name = posixpath.split(self.path)
        found = self.storage.list(folder, f"{name}.lease-[0-9]*")
        if not found:
            return 0, None
        newest = max(found)
        try:
            return int(newest.rsplit("-", 1)[1]), json.loads(self.storage.read_bytes(newest))
        except (FileNotFoundError, ValueError):  # being replaced or written right now: look again
            return int(newest.rsplit("-", 1)[1]), {"beat": None}

    def _create(self, number: int) -> bool:
        return self.storage.create_exclusive(self._file(number), json.dumps({**self.owner, "beat": 0}).encode())

    def _write(self, number: int, state: dict) -> None:
        self.storage.write_bytes(self._file(number), json.dumps(state).encode())

    def _owner_dead(self, holder: dict) -> bool:
        """The owner is a process of this host that no longer runs (a crash or a kill)."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        if holder["pid"] == os.getpid():
            # This process: an earlier step that failed without giving its lease back. Steps of one process run
            # one after another, so it is abandoned; stop its heartbeat.
            abandoned = _LIVE.pop(holder.get("token"), None)
            if abandoned is not None:
                abandoned.lost = True
                abandoned._stop.set()
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # -- heartbeat ---------------------------------------------------------------------------------------------------
    def _start(self, number: int, took_over: bool) -> None:
        self.number, self.lost, self._beats = number, False, 0
        _LIVE[self.owner["token"]] = self
        if took_over:
            self.log(f"took over {self.path} from a run that is gone (lease {number})")
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{posixpath.basename(self.path)}",
                                        daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4) and self.beat():
            pass

    def beat(self) -> bool:
        """One heartbeat: advance the counter, or learn that the lease was taken over (then False, and `lost`)."""
        try:
            newest, _ = self._newest()
            if newest != self.number:
                self.lost = True
                return False
            self._beats += 1
            self._write(self.number, {**self.owner, "beat": self._beats})
        except OSError as e:  # a passing storage fault: beat again next time (ttl allows three misses)
            self.log(f"heartbeat of {self.path} failed ({e}); retrying")
        return True
