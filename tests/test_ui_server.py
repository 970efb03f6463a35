"""`make ui`'s server: the webserver loads workspace.yaml on 127.0.0.1 and shows the demo's materializations."""

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import write_profile
from dagster import DagsterInstance, materialize
from dataset_fixtures import write_unlabelled

from assets.definitions import build_resources
from assets.ingest import raw_faces
from synfer_pipeline.config import load_profile

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())["data"]


def _default_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _listening(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port` on this machine (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = bytes.fromhex(address)
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def test_make_ui_serves_the_graph_on_loopback_only(tmp_path, monkeypatch):
    """Runs the very command `make ui` runs (read from `make -n ui`) and checks where it listens, then that the UI's
    GraphQL shows the asset graph and a materialization."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    write_unlabelled(tmp_path / "ffhq", 3)
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", str(tmp_path / "storage"), {
        "ffhq": {"format": "unlabelled", "uri": str(tmp_path / "ffhq"), "ingest": {"aligned": True, "face_size": 32}}})))
    with DagsterInstance.get() as instance:
        assert materialize([raw_faces], partition_key="ffhq", resources=build_resources(profile), instance=instance).success

    port = _free_port()
    dry = subprocess.run(["make", "-n", "ui", f"UI_PORT={port}", f"DAGSTER_HOME={home}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    (command,) = [line for line in dry.splitlines() if "dagster dev " in line]
    assert "-h 127.0.0.1" in command  # the Makefile's default host
    server = subprocess.Popen(shlex.split(command), cwd=REPO, env={**os.environ, "SYNFER_PROFILE": str(profile.path)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=_default_signals)
    try:
        deadline = time.time() + 120
        while True:
            try:
                data = _graphql(port, "{ assetNodes { assetKey { path } groupName } }")
                if data["assetNodes"]:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "dagster dev did not come up"
            time.sleep(1)
        assert _listening(port) == {"127.0.0.1"}  # loopback only: not 0.0.0.0, not ::
        assert {"path": ["raw_faces"]} in [n["assetKey"] for n in data["assetNodes"]]
        mats = _graphql(port, '{ assetOrError(assetKey: {path: ["raw_faces"]}) { ... on Asset { assetMaterializations { partition } } } }')
        assert [m["partition"] for m in mats["assetOrError"]["assetMaterializations"]] == ["ffhq"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_listening_addresses_are_read_from_the_kernel():
    """The check above can fail: a socket on all addresses is seen as such."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert _listening(s.getsockname()[1]) == {"0.0.0.0"}
