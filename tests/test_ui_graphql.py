"""The Dagster UI as users use it: `dagster dev` over a real instance, driven through its GraphQL API (POST /graphql,
as the UI's own pages do), and a headless-Chromium screenshot of the asset graph.

One server serves every test of this module (starting it costs seconds of imports on a small machine). It is
`dagster dev`, the command `make ui` runs: the webserver and the daemon (which turns backfills into runs and
dequeues the QueuedRunCoordinator's runs) share one code server, so the pipeline's code (torch, diffusers) is
imported once for both instead of twice. It runs in its own process group with default signal handlers and is
stopped by process group.

The synthetic shards need their whole upstream (demo data, faces, AU detector, FER classifiers, captions, FEText,
generator checkpoints). The test materializes it in process first, with the end-to-end test's small budgets, into
the same DAGSTER_HOME the server reads, while the server starts. The profile asks for the in-process executor: the
runs the daemon launches then execute their step in the run worker instead of a second process that imports torch
again (the executor is the profile's choice; what is tested here is the UI's path: backfill, daemon, runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, AssetRecordsFilter, AssetSelection, DagsterInstance
from PIL import Image
from test_demo_end_to_end import small_demo_profile
from test_ui_server import _default_signals, _free_port, _listening

from assets.definitions import build_definitions
from assets.jobs import JOBS
from assets.lineage import lineage
from assets.orchestration import PLAN, materialize_all
from resources.io_manager import REF_KEY
from synfer_pipeline.config import load_profile
from synfer_pipeline.demo.data import ensure_demo_data
from synfer_pipeline.generation.rounds import SHARD_NAME, shard_range
from synfer_pipeline.io.shards import iter_shard, shard_urls
from synfer_pipeline.io.storage import Storage

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT_SCRIPT = REPO / "scripts" / "ui_screenshot.py"
SHARDS = AssetKey("synthetic_shards")
CHECKPOINT = AssetKey("au_adapter")  # the checkpoint whose upstream materializations are read back
SERVER_START_S, BACKFILL_S = 240, 420


class GraphQLError(AssertionError):
    pass


@dataclass
class UI:
    port: int
    server: subprocess.Popen
    log: Path
    profile_path: Path
    tmp: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"\n--- dagster dev log (last {chars} chars of {self.log}) ---\n{text[-chars:]}"

    def gql(self, query: str, timeout: float = 60, **variables) -> dict:
        """POST a query as the UI does; raises with the server's errors (and its log tail) if the answer has any."""
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=timeout).read())
        if answer.get("errors"):
            raise GraphQLError(f"GraphQL errors: {answer['errors']}{self.log_tail()}")
        return answer["data"]


def _upstream_plan(defs) -> list[tuple[str, str | None]]:
    """The entries of `synfer demo`'s plan whose jobs make an ancestor of synthetic_shards (and nothing below it)."""
    graph = defs.resolve_asset_graph()
    needed = AssetSelection.assets(SHARDS).upstream().resolve(graph) - {SHARDS}
    selections = {job.name: job.selection.resolve(graph) for job in JOBS}
    plan = [(name, which) for name, which in PLAN if selections[name] <= needed]
    assert set().union(*(selections[name] for name, _ in plan)) == needed, "the plan does not cover the shards' upstream"
    return plan


def _wait_until_loaded(ui: UI, deadline: float) -> None:
    """The webserver answers and its one code location has loaded (or failed to: then its error is the message)."""
    query = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
                 locationOrLoadError { __typename ... on PythonError { message stack } } } } } }"""
    while True:
        assert ui.server.poll() is None, f"dagster dev exited with {ui.server.returncode}{ui.log_tail()}"
        try:
            entries = ui.gql(query, timeout=10)["workspaceOrError"].get("locationEntries") or []
        except (OSError, GraphQLError):
            entries = []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errors = [e["locationOrLoadError"] for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
            assert not errors, f"the code location failed to load: {errors}{ui.log_tail()}"
            return
        assert time.time() < deadline, f"dagster dev did not load workspace.yaml in {SERVER_START_S} s{ui.log_tail()}"
        time.sleep(1)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                members.append(int(entry))
    return members


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (dagster dev stops its webserver and daemon), then SIGKILL to whatever
    of the group is still there after a grace period (the code server's own shutdown can take a minute)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + 10
    while _group_members(server.pid) and time.time() < deadline:
        time.sleep(0.5)
    if _group_members(server.pid):
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[UI]:
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "home"
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    profile_path = small_demo_profile(tmp / "demo-small.yaml")
    raw = yaml.safe_load(profile_path.read_text())
    raw["execution"] = {"executor": "in_process"}
    profile_path.write_text(yaml.safe_dump(raw))

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SYNFER_HOME", str(home))
        env.setenv("DAGSTER_HOME", str(dagster_home))
        env.setenv("SYNFER_PROFILE", str(profile_path))
        log = tmp / "dagster-dev.log"
        port = _free_port()
        dagster = Path(sys.executable).with_name("dagster")
        with open(log, "wb") as out:
            server = subprocess.Popen([str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                                      cwd=REPO, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True,  # ignored SIGINT/SIGTERM are inherited: reset them
                                      preexec_fn=_default_signals)  # noqa: PLW1509 - only signal.signal, no locks
        ui = UI(port, server, log, profile_path, tmp)
        try:
            started = time.time()
            # while the server starts: the shards' upstream, in process, into the instance the server reads
            profile = load_profile(str(profile_path))
            ensure_demo_data(profile.demo_data)
            defs = build_definitions(profile)
            with DagsterInstance.get() as instance:
                results = materialize_all(defs, instance, plan=_upstream_plan(defs))
            assert results and all(ok for _, ok in results), f"upstream materialization failed: {results}"
            print(f"\nupstream of synthetic_shards materialized in {time.time() - started:.0f} s")
            _wait_until_loaded(ui, started + SERVER_START_S)
            print(f"dagster dev ready after {time.time() - started:.0f} s")
            yield ui
        finally:
            _stop(server)


def _graph():
    return build_definitions(load_profile()).resolve_asset_graph()


def test_the_server_listens_on_loopback_only(ui):
    assert _listening(ui.port) == {"127.0.0.1"}


def test_every_asset_is_there_with_its_group_description_and_kinds(ui):
    graph = _graph()
    nodes = ui.gql("{ assetNodes { assetKey { path } groupName description kinds isPartitioned } }")["assetNodes"]
    served = {AssetKey(n["assetKey"]["path"]): n for n in nodes}
    assert set(served) == set(graph.get_all_asset_keys())
    for key in graph.get_all_asset_keys():
        node, ours = served[key], graph.get(key)
        assert node["groupName"] == ours.group_name, key
        assert node["description"] == ours.description, key
        assert set(node["kinds"]) == set(ours.kinds), key
        assert node["isPartitioned"] == (ours.partitions_def is not None), key


BACKFILL = """query Backfill($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
  ... on PartitionBackfill { status numPartitions partitionNames assetSelection { path }
                             runs { runId status tags { key value } } error { message stack } }
  ... on PythonError { message } } }"""

SHARD_MATERIALIZATIONS = """query Shards($partitions: [String!]) { assetOrError(assetKey: {path: ["synthetic_shards"]}) {
  ... on Asset { assetMaterializations(partitions: $partitions) { partition runId tags { key value }
    metadataEntries { label __typename ... on IntMetadataEntry { intValue } ... on JsonMetadataEntry { jsonString }
                      ... on BoolMetadataEntry { boolValue } } } } } }"""


def _metadata(entries: list[dict]) -> dict:
    values = {}
    for e in entries:
        if e["__typename"] == "JsonMetadataEntry":
            values[e["label"]] = json.loads(e["jsonString"])
        else:
            values[e["label"]] = e.get("intValue", e.get("boolValue"))
    return values


def _run_failures(ui: UI, run_ids: list[str]) -> str:
    """The failure messages of runs, for an assertion message."""
    query = """query Events($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection { events { __typename
               ... on MessageEvent { message level } ... on ExecutionStepFailureEvent { error { message } } } } } }"""
    lines = []
    for run_id in run_ids:
        events = ui.gql(query, runId=run_id)["logsForRun"].get("events", [])
        lines += [f"{run_id[:8]}: {e.get('error', {}).get('message') or e.get('message')}" for e in events
                  if e.get("level") == "ERROR" or e["__typename"] == "ExecutionStepFailureEvent"]
    return "\n".join(lines[-20:])


def test_a_backfill_of_two_shards_runs_through_the_daemon(ui):
    graph = _graph()
    keys = graph.get(SHARDS).partitions_def.get_partition_keys()
    newest = max(k.keys_by_dimension["round"] for k in keys)
    partitions = [str(k) for k in keys if k.keys_by_dimension["round"] == newest][:2]
    assert len(partitions) == 2
    launched = ui.gql("""mutation Launch($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                         __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack }
                         ... on PartitionKeysNotFoundError { message } ... on InvalidSubsetError { message } } }""",
                      params={"assetSelection": [{"path": SHARDS.path}], "partitionNames": partitions,
                              "title": "two shards from the UI test"})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    deadline = time.time() + BACKFILL_S
    while True:
        backfill = ui.gql(BACKFILL, id=backfill_id)["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        if backfill["status"] not in ("REQUESTED", "CANCELING", "FAILING"):
            break
        assert time.time() < deadline, (f"backfill {backfill_id} still {backfill['status']} after {BACKFILL_S} s, runs "
                                        f"{[(r['runId'][:8], r['status']) for r in backfill['runs']]}{ui.log_tail()}")
        time.sleep(2)
    runs = backfill["runs"]
    assert backfill["status"] == "COMPLETED_SUCCESS", (
        f"backfill {backfill['status']}: {backfill['error']}; runs {[(r['runId'][:8], r['status']) for r in runs]}\n"
        f"{_run_failures(ui, [r['runId'] for r in runs])}{ui.log_tail()}")
    assert sorted(backfill["partitionNames"]) == sorted(partitions) and backfill["numPartitions"] == 2
    assert backfill["assetSelection"] == [{"path": SHARDS.path}]
    # one run per shard (the asset has no single-run backfill policy), each tagged with the backfill and its shard
    assert [r["status"] for r in runs] == ["SUCCESS", "SUCCESS"]
    tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs]
    assert {t["dagster/backfill"] for t in tags} == {backfill_id}
    assert sorted(t["dagster/partition"] for t in tags) == sorted(partitions)
    run_ids = {r["runId"] for r in runs}

    profile = load_profile()
    store = Storage(profile.storage_root)
    mats = ui.gql(SHARD_MATERIALIZATIONS, partitions=partitions)["assetOrError"]["assetMaterializations"]
    assert sorted(m["partition"] for m in mats) == sorted(partitions)
    with DagsterInstance.get() as instance:
        for mat in mats:
            assert mat["runId"] in run_ids
            meta, tags = _metadata(mat["metadataEntries"]), {t["key"]: t["value"] for t in mat["tags"]}
            # what the UI shows is what the instance recorded
            (record,) = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=SHARDS, asset_partitions=[mat["partition"]]), limit=5).records
            assert record.run_id == mat["runId"]
            assert record.asset_materialization.tags["dagster/data_version"] == tags["dagster/data_version"]
            ref = meta[REF_KEY]
            assert ref == record.asset_materialization.metadata[REF_KEY].value
            assert ref["data_version"] == tags["dagster/data_version"]
            # the image count: the shard's share of the round, as many samples in the published shard
            shard = int(mat["partition"].split("|")[1])
            expected = len(shard_range(ref["counts"]["round_images"], profile.generation.shards, shard))
            assert expected > 0
            assert meta["images"] == meta["n_samples"] == expected
            samples = [k for url in shard_urls(store, ref["uri"], SHARD_NAME) for k, _ in iter_shard(store, url)]
            assert len(samples) == expected
            assert sum(meta["label_counts"].values()) == expected


LATEST_WITH_TAGS = """query Latest($path: [String!]!) { assetNodeOrError(assetKey: {path: $path}) { ... on AssetNode {
  dependencyKeys { path } assetMaterializations(limit: 1) { runId timestamp tags { key value }
    metadataEntries { label __typename ... on JsonMetadataEntry { jsonString } } } } } }"""

MATERIALIZATIONS = """query Mats($path: [String!]!, $partitions: [String!]) { assetNodeOrError(assetKey: {path: $path}) {
  ... on AssetNode { assetMaterializations(partitions: $partitions) { runId timestamp partition tags { key value }
    metadataEntries { label __typename ... on JsonMetadataEntry { jsonString } } } } } }"""


def _tags(event: dict) -> dict:
    return {t["key"]: t["value"] for t in event["tags"]}


def _json_entry(event: dict, label: str):
    return next(json.loads(e["jsonString"]) for e in event["metadataEntries"] if e["label"] == label)


def _served_materialization(ui: UI, key: AssetKey, data_version: str, partition: str | None = None) -> dict:
    """The one materialization of `key` (`partition`) with `data_version`, as the UI lists it on the asset's page."""
    listed = ui.gql(MATERIALIZATIONS, path=key.path, partitions=[partition] if partition else None)
    matching = [m for m in listed["assetNodeOrError"]["assetMaterializations"]
                if _tags(m).get("dagster/data_version") == data_version]
    assert len(matching) == 1, f"{key.to_user_string()}[{partition}] version {data_version}: {len(matching)} listed"
    return matching[0]


def test_a_checkpoints_upstream_materializations_are_read_through_graphql(ui):
    """What the UI shows of a checkpoint's latest materialization: for every upstream asset the data version and the
    event of the exact materialization the step read (Dagster's input tags); the pipeline's lineage metadata (the
    artifact reference's inputs, the captions used) names the same materializations, down to the captions behind
    the FEText it was trained on; and all of it is what the instance records (and what `synfer lineage` prints)."""
    node = ui.gql(LATEST_WITH_TAGS, path=CHECKPOINT.path)["assetNodeOrError"]
    dependencies = {AssetKey(k["path"]) for k in node["dependencyKeys"]}
    assert dependencies == set(_graph().get(CHECKPOINT).parent_keys)
    (latest,) = node["assetMaterializations"]
    tags, ref = _tags(latest), _json_entry(latest, REF_KEY)
    trained_from = {AssetKey.from_user_string(v["asset"]): v for v in ref["inputs"].values()
                    if isinstance(v, dict) and "asset" in v}
    assert set(trained_from) == dependencies, trained_from  # ref.json names every input Dagster recorded
    with DagsterInstance.get() as instance:
        (record,) = instance.fetch_materializations(AssetRecordsFilter(asset_key=CHECKPOINT), limit=1).records
        assert record.run_id == latest["runId"] == ref["run_id"]
        assert record.asset_materialization.tags == tags
        upstream = {}
        for dep in dependencies:  # every upstream asset: the materialization Dagster fixed as the step's input
            version = tags[f"dagster/input_data_version/{dep.to_user_string()}"]
            pointer = int(tags[f"dagster/input_event_pointer/{dep.to_user_string()}"])
            (upstream[dep],) = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=dep, storage_ids=[pointer]), limit=1).records
            assert upstream[dep].asset_materialization.tags["dagster/data_version"] == version
            served = _served_materialization(ui, dep, version)
            assert served["runId"] == upstream[dep].run_id
            assert int(served["timestamp"]) == int(upstream[dep].timestamp * 1000)
        for dep, summary in trained_from.items():  # ... and the ones our lineage metadata names are those
            assert summary["data_version"] == upstream[dep].asset_materialization.tags["dagster/data_version"]
            assert summary["run_id"] == upstream[dep].run_id

        # Which captions fed the checkpoint: `captions_used` names, per dataset, the captions version behind the FEText
        # it read; that FEText's own event, as the UI lists it, recorded exactly those captions materializations.
        captions_used = _json_entry(latest, "captions_used")
        fetext = _served_materialization(ui, AssetKey("fetext"), tags["dagster/input_data_version/fetext"])
        fetext_inputs = _json_entry(fetext, REF_KEY)["inputs"]
        assert sorted(captions_used) == sorted(load_profile().datasets)
        for dataset, used in captions_used.items():
            recorded = fetext_inputs[f"mllm_captions/{dataset}"]
            assert recorded["data_version"] == used["data_version"]
            served = _served_materialization(ui, AssetKey("mllm_captions"), used["data_version"], dataset)
            assert served["runId"] == recorded["run_id"]
        # Dagster's version of a multi-partition input: sha256 over the partitions' versions in key order
        combined = hashlib.sha256("".join(captions_used[d]["data_version"] for d in sorted(captions_used)).encode())
        assert _tags(fetext)["dagster/input_data_version/mllm_captions"] == combined.hexdigest()

        # `synfer lineage au_adapter` walks the same records
        chain = lineage(instance, CHECKPOINT.to_user_string())
    assert chain.run_id == latest["runId"]
    assert {(n.asset, n.data_version, n.run_id) for n in chain.inputs} == {
        (k.to_user_string(), s["data_version"], s["run_id"]) for k, s in trained_from.items()}
    assert {n.partition: n.data_version for n in chain.find("mllm_captions")} == {
        d: u["data_version"] for d, u in captions_used.items()}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_screenshot_shows_the_asset_graph(ui):
    """scripts/ui_screenshot.py against this server: the page's DOM at the moment of the picture has a node for
    every asset of the Definitions, and the PNG is a picture, not a blank page."""
    if _chromium() is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH: the UI screenshot needs a headless browser "
                    "(Debian: apt-get install chromium)")
    out, dom = ui.tmp / "asset-graph.png", ui.tmp / "asset-graph.html"
    proc = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), "--url", ui.url, "--out", str(out),
                           "--size", "1800x1500", "--dump-dom", str(dom)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + ui.log_tail()
    html = dom.read_text(errors="replace")
    # the graph's nodes (their name boxes), not the loading spinner or the community prompt
    drawn = set(re.findall(r'class="AssetNode_assetName[^"]*"[^>]*>([^<]+)<', html))
    assert drawn == {k.to_user_string() for k in _graph().get_all_asset_keys()}, f"nodes drawn: {sorted(drawn)}"
    assert "Join the Dagster community" not in html
    image = Image.open(out).convert("RGB")
    assert image.size == (1800, 1500)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is nearly blank"
    # the background covers most of the picture, but not all of it: text, nodes and edges are drawn
    assert max(count for count, _ in colours) < 0.95 * image.size[0] * image.size[1]
