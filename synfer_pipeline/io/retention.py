"""Retention: the one way published versions and leftovers are deleted (reruns never delete anything).

Per asset partition the `keep` newest versions stay, and so does everything a kept version was built from (the
chain of inputs in each `ref.json`), so no kept checkpoint's `lineage.json` points at a deleted folder. Leftovers of
work in progress (`_staging/`, `_work/`, the caption `_cache/`, released or abandoned `_leases/`) go once nothing in
them has changed for `leftover_age_s`; work a live run holds (its lease heartbeats) is never touched.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field

from synfer_pipeline.io.storage import LEASES, REF_FILE, STAGING, Storage

WORK_FOLDERS = (STAGING, "_work", "_cache")


@dataclass
class RetentionPlan:
    versions: list[str] = field(default_factory=list)       # published folders to delete
    leftovers: list[str] = field(default_factory=list)      # work-in-progress folders and lease files to delete
    kept_for_lineage: list[str] = field(default_factory=list)  # older versions kept because a kept one needs them

    @property
    def doomed(self) -> list[str]:
        return self.versions + self.leftovers


def _mtime(storage: Storage, uri: str) -> float:
    info = storage.fs.info(uri)
    stamp = info.get("mtime") or info.get("LastModified") or 0
    return float(stamp.timestamp() if hasattr(stamp, "timestamp") else stamp)


def _last_change(storage: Storage, folder: str) -> float:
    """Newest modification time of any file under `folder` (a folder's own time misses rewrites of its files)."""
    return max((_mtime(storage, f) for f in storage.fs.find(folder)), default=0.0)


def retention_plan(storage: Storage, keep: int, protect: set[str] = frozenset(), order: dict[str, int] | None = None,
                   leftover_age_s: float | None = None, now: float | None = None) -> RetentionPlan:
    """What retention would delete (nothing is deleted here).

    keep: newest versions kept per asset partition (at least 1); protect: folders kept whatever their age (the
    latest materialization Dagster records of each partition); order: uri -> rank, higher is newer (the instance's
    event ids); versions without a rank are ordered by their ref.json's time, before every ranked one.
    leftover_age_s: also list work-in-progress leftovers unchanged for this long (None: none).
    """
    if keep < 1:
        raise ValueError("retention must keep at least one version per asset partition")
    order = order or {}
    refs = {posixpath.dirname(p): json.loads(storage.read_bytes(p)) for p in storage.list(storage.root, f"*/*/*/{REF_FILE}")}
    by_partition: dict[str, list[tuple]] = {}
    for uri in refs:
        rank = (1, order[uri]) if uri in order else (0, _mtime(storage, posixpath.join(uri, REF_FILE)))
        by_partition.setdefault(posixpath.dirname(uri), []).append((rank, uri))
    kept = set(protect) & set(refs)
    for versions in by_partition.values():
        kept |= {uri for _, uri in sorted(versions, reverse=True)[:keep]}
    newest = set(kept)
    todo = list(kept)
    while todo:  # everything a kept version was built from stays
        for summary in refs.get(todo.pop(), {}).get("inputs", {}).values():
            uri = summary.get("uri") if isinstance(summary, dict) else None
            if uri in refs and uri not in kept:
                kept.add(uri)
                todo.append(uri)
    plan = RetentionPlan(versions=sorted(set(refs) - kept), kept_for_lineage=sorted(kept - newest))
    if leftover_age_s is not None:
        plan.leftovers = _leftovers(storage, leftover_age_s, time.time() if now is None else now)
    return plan


def _leftovers(storage: Storage, age_s: float, now: float) -> list[str]:
    found = []
    for name in WORK_FOLDERS:
        for folder in storage.list(storage.root, f"*/*/{name}/*"):
            lease = storage.list(storage.join(LEASES, *folder[len(storage.root) + 1:].split("/")[:2]),
                                 f"{posixpath.basename(folder)}.lease-*")
            last = max([_last_change(storage, folder)] + [_mtime(storage, f) for f in lease])
            if now - last > age_s:
                found.append(folder)
    for lease in storage.list(storage.join(LEASES), "*/*/*.lease-*"):
        if now - _mtime(storage, lease) > age_s:
            found.append(lease)
    return sorted(found)


def apply(storage: Storage, plan: RetentionPlan) -> None:
    """Delete what the plan lists."""
    for uri in plan.doomed:
        if storage.exists(uri):
            storage.fs.rm(uri, recursive=True)
