"""`make ui`'s server: the webserver loads workspace.yaml on 127.0.0.1 and shows the demo's materializations."""

import json
import os
import signal
import socket
import subprocess
import sys
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


def test_webserver_serves_the_asset_graph_and_its_materializations(tmp_path, monkeypatch):
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
    exe = Path(sys.executable).parent / "dagster-webserver"
    server = subprocess.Popen([str(exe), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)], cwd=REPO,
                              env={**os.environ, "SYNFER_PROFILE": str(profile.path)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_signals)
    try:
        deadline = time.time() + 90
        while True:
            try:
                data = _graphql(port, "{ assetNodes { assetKey { path } groupName } }")
                if data["assetNodes"]:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "webserver did not come up"
            time.sleep(1)
        assert {"path": ["raw_faces"]} in [n["assetKey"] for n in data["assetNodes"]]
        mats = _graphql(port, '{ assetOrError(assetKey: {path: ["raw_faces"]}) { ... on Asset { assetMaterializations { partition } } } }')
        assert [m["partition"] for m in mats["assetOrError"]["assetMaterializations"]] == ["ffhq"]
        with socket.socket() as s:  # bound to loopback only
            ips = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
            for ip in ips:
                assert s.connect_ex((ip, port)) != 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
