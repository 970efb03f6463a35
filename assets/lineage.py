"""Lineage from the Dagster instance: which exact upstream materializations fed a materialization.

Every artifact reference records its inputs (asset, partition, data version, run id). Starting from the latest (or
a given run's) materialization of an asset, this walks those records back through the instance, so a question such
as "which captions fed this checkpoint" is answered with the captions' data version, run and captioner.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from resources.io_manager import REF_KEY

UNPARTITIONED = "all"


@dataclass
class LineageNode:
    asset: str
    partition: str | None
    data_version: str
    run_id: str
    timestamp: float
    uri: str
    details: dict = field(default_factory=dict)  # non-artifact inputs, e.g. the captioner (model, prompt)
    inputs: list[LineageNode] = field(default_factory=list)

    def find(self, asset: str) -> list[LineageNode]:
        """Every node of `asset` in this chain (depth first)."""
        here = [self] if self.asset == asset else []
        return here + [n for child in self.inputs for n in child.find(asset)]


def _records(instance: DagsterInstance, asset: str, partition: str | None, limit: int = 1000):
    partitions = [partition] if partition and partition != UNPARTITIONED else None
    return instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=partitions),
                                           limit=limit).records


def find_materialization(instance: DagsterInstance, asset: str, partition: str | None = None, run_id: str | None = None,
                         data_version: str | None = None):
    """The materialization record of `asset` (latest, or the one of `run_id`, or of `data_version`); None if absent."""
    for record in _records(instance, asset, partition, limit=1 if not (run_id or data_version) else 1000):
        mat = record.asset_materialization
        if run_id and record.run_id != run_id:
            continue
        if data_version and mat.tags.get("dagster/data_version") != data_version:
            continue
        return record
    return None


def lineage(instance: DagsterInstance, asset: str, partition: str | None = None, run_id: str | None = None,
            depth: int = 20) -> LineageNode:
    """The chain of materializations behind one materialization; raises LookupError when it does not exist."""
    record = find_materialization(instance, asset, partition, run_id)
    if record is None:
        what = f"{asset}" + (f"[{partition}]" if partition else "") + (f" in run {run_id}" if run_id else "")
        raise LookupError(f"no materialization of {what} in the instance at {instance.root_directory}")
    return _node(instance, record, depth)


def _node(instance: DagsterInstance, record, depth: int) -> LineageNode:
    mat = record.asset_materialization
    ref = mat.metadata[REF_KEY].value if REF_KEY in mat.metadata else {}
    node = LineageNode(mat.asset_key.to_user_string(), mat.partition, ref.get("data_version", ""), record.run_id,
                       record.timestamp, ref.get("uri", ""))
    for name, summary in sorted((ref.get("inputs") or {}).items()):
        if not isinstance(summary, dict) or "data_version" not in summary or "asset" not in summary:
            node.details[name] = summary
            continue
        upstream = find_materialization(instance, summary["asset"], summary.get("partition"), summary.get("run_id"),
                                        summary["data_version"]) if depth > 0 else None
        if upstream is None:
            node.inputs.append(LineageNode(summary["asset"], summary.get("partition"), summary["data_version"],
                                           summary.get("run_id", ""), 0.0, summary.get("uri", ""), {"note": "not in this instance"}))
        else:
            node.inputs.append(_node(instance, upstream, depth - 1))
    return node


def format_lineage(node: LineageNode) -> str:
    """A readable tree, the asked-for materialization first, each input indented under what it fed. A
    materialization reached a second time (a shared ancestor) is printed once and then referred to."""
    lines: list[str] = []
    seen: set[tuple] = set()

    def walk(n: LineageNode, depth: int) -> None:
        pad = "    " * depth
        arrow = "<- " if depth else ""
        where = f"[{n.partition}]" if n.partition else ""
        ident = (n.asset, n.partition, n.data_version, n.run_id)
        when = dt.datetime.fromtimestamp(n.timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if n.timestamp else "-"
        head = f"{pad}{arrow}{n.asset}{where}  version {n.data_version}  run {n.run_id[:8]}"
        if ident in seen:
            lines.append(f"{head}  (shown above)")
            return
        seen.add(ident)
        lines.append(f"{head}  {when}")
        lines.append(f"{pad}{' ' * len(arrow)}   {n.uri}")
        for key, value in n.details.items():
            if isinstance(value, dict) and value.get("kind") in ("mllm", "template"):
                value = {k: value.get(k) for k in ("kind", "model", "name", "prompt_hash", "prompt") if value.get(k) is not None}
            lines.append(f"{pad}{' ' * len(arrow)}   {key}: {value}")
        for child in n.inputs:
            walk(child, depth + 1)

    walk(node, 0)
    return "\n".join(lines)


def latest_uris(instance: DagsterInstance) -> set[str]:
    """The artifact folder of the latest materialization of every asset partition in the instance."""
    uris = set()
    for key in instance.get_asset_keys():
        partitions = instance.get_materialized_partitions(key) or {None}
        for pk in partitions:
            record = find_materialization(instance, key.to_user_string(), pk)
            ref = record.asset_materialization.metadata.get(REF_KEY) if record else None
            if ref is not None:
                uris.add(ref.value["uri"])
    return uris


def materialization_order(instance: DagsterInstance) -> dict[str, int]:
    """uri -> the event id of the newest materialization that published it (higher is newer), every asset."""
    order: dict[str, int] = {}
    for key in instance.get_asset_keys():
        for record in instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=100_000).records:
            ref = record.asset_materialization.metadata.get(REF_KEY)
            if ref is not None:
                order[ref.value["uri"]] = max(order.get(ref.value["uri"], -1), record.storage_id)
    return order
