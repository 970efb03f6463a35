"""The repository's dagster.yaml: a shared PostgreSQL instance when the DAGSTER_PG_* variables are set (checked on a
throwaway PostgreSQL cluster on 127.0.0.1), SQLite under $DAGSTER_HOME otherwise, a clear error in between."""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import write_profile
from dagster import AssetKey, DagsterInstance, materialize
from dagster._serdes import deserialize_value, serialize_value
from dataset_fixtures import write_unlabelled
from test_ui_server import _free_port

from assets.definitions import build_resources
from assets.ingest import raw_faces
from assets.instance import REQUIRED, VARIABLES, PostgresSettingsError
from synfer_pipeline.config import load_profile

REPO = Path(__file__).resolve().parent.parent
USER, DB = "synfer", "synfer_dagster"


def _postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: on PATH, or Debian's /usr/lib/postgresql/<ver>/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += sorted((Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
                         key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, reverse=True)
    for d in candidates:
        if all((d / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _unprivileged() -> tuple[list[str], int, int] | str:
    """initdb and postgres refuse to run as root: as root, a command prefix that runs them as an existing
    unprivileged user (Debian's `postgres`, else `nobody`) with its uid and gid; otherwise no prefix. A string says
    why neither works."""
    if os.geteuid() != 0:
        return [], os.geteuid(), os.getegid()
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"], \
                user.pw_uid, user.pw_gid
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], user.pw_uid, user.pw_gid
        return "running as root, and neither setpriv nor runuser is available to start PostgreSQL unprivileged"
    return "running as root, and no unprivileged user (postgres, nobody) to start PostgreSQL as"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL cluster of its own on 127.0.0.1 (password auth: scram-sha-256), with an empty database; stopped
    (immediate mode) and removed at the end. Yields the DAGSTER_PG_* values that point at it."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH nor under "
                    "/usr/lib/postgresql/*/bin: install Debian's postgresql package (.ci/run does)")
    runner = _unprivileged()
    if isinstance(runner, str):
        pytest.skip(runner)
    prefix, uid, gid = runner
    # as root, pytest's own tmp dirs (mode 0700, root's) are closed to the server's user: a private dir of its own
    base = Path(tempfile.mkdtemp(prefix="synfer-pg-")) if prefix else tmp_path_factory.mktemp("pg")
    data, sockets = base / "data", base / "s"
    sockets.mkdir()
    password = "pw/@:" + secrets.token_urlsafe(12)  # characters a connection URL must quote
    (base / "pwfile").write_text(password + "\n")
    if prefix:
        for path in (base, sockets, base / "pwfile"):
            os.chown(path, uid, gid)
    port = _free_port()
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
    started = False
    try:
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "--username", USER, "--auth=scram-sha-256",
                        f"--pwfile={base / 'pwfile'}", "--encoding=UTF8", "--no-locale", "--no-sync",
                        "--no-instructions"], cwd=base, check=True, capture_output=True, text=True, timeout=120)
        (base / "pwfile").unlink()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sockets} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        # the server outlives pg_ctl: its output goes to the log file, never to a pipe of ours
        subprocess.run([*pg_ctl, "-l", str(base / "server.log"), "-w", "-t", "60", "-o", options, "start"],
                       cwd=base, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True, timeout=90)
        started = True
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DB}")
        conn.close()
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USERNAME": USER,
               "DAGSTER_PG_PASSWORD": password, "DAGSTER_PG_DB": DB}
    except subprocess.CalledProcessError as err:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        raise AssertionError(f"{err.cmd[len(prefix)]} failed: {err.stderr or ''}{log}") from err
    finally:
        if started:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], check=False, cwd=base, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if prefix:
            shutil.rmtree(base, ignore_errors=True)


def _dagster_home(tmp_path: Path, monkeypatch, env: dict[str, str]) -> Path:
    """A DAGSTER_HOME holding a copy of the repository's dagster.yaml, with exactly the DAGSTER_PG_* `env`."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return home


def _materialize_raw_faces(tmp_path: Path, instance: DagsterInstance):
    write_unlabelled(tmp_path / "ffhq", 3)
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", str(tmp_path / "storage"), {
        "ffhq": {"format": "unlabelled", "uri": str(tmp_path / "ffhq"), "ingest": {"aligned": True, "face_size": 32}}})))
    result = materialize([raw_faces], partition_key="ffhq", resources=build_resources(profile), instance=instance)
    assert result.success
    (mat,) = result.asset_materializations_for_node("raw_faces")
    return mat


# what a run or step worker does with the ref it is given: a fresh process, a fresh instance, read the record back
_READ_BACK = """
import json, sys
from dagster import AssetKey, DagsterInstance
from dagster._serdes import deserialize_value
with DagsterInstance.from_ref(deserialize_value(sys.stdin.read())) as instance:
    (record,) = instance.fetch_materializations(AssetKey("raw_faces"), limit=10).records
    mat = record.asset_materialization
    print(json.dumps({"storage": type(instance.event_log_storage).__name__, "partition": mat.partition,
                      "data_version": mat.metadata["data_version"].value, "n_samples": mat.metadata["n_samples"].value}))
"""


def test_postgres_instance_from_the_environment(postgres, tmp_path, monkeypatch):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    home = _dagster_home(tmp_path, monkeypatch, postgres)
    assert postgres["DAGSTER_PG_PASSWORD"] not in (home / "dagster.yaml").read_text()
    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        mat = _materialize_raw_faces(tmp_path, instance)
        ref = serialize_value(instance.get_ref())
    assert mat.partition == "ffhq" and mat.metadata["n_samples"].value == 3
    # the ref that workers receive names the variables and holds none of their values
    assert "DAGSTER_PG_PASSWORD" in ref and postgres["DAGSTER_PG_PASSWORD"] not in ref
    assert not (home / "history").exists() and not (home / "schedules").exists()  # nothing went to SQLite

    # a worker process: the ref plus the inherited environment, and the materialization is there
    read = subprocess.run([sys.executable, "-c", _READ_BACK], input=ref, capture_output=True, text=True, check=False,
                          timeout=120, cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == {"storage": "PostgresEventLogStorage", "partition": "ffhq",
                                       "data_version": mat.metadata["data_version"].value, "n_samples": 3}

    # ... and in the database itself
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=int(postgres["DAGSTER_PG_PORT"]), user=USER,
                            password=postgres["DAGSTER_PG_PASSWORD"], dbname=DB)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        rows = cur.fetchall()
    conn.close()
    assert rows == [(AssetKey("raw_faces").to_string(), "ffhq")]

    # the password is the environment's: with another one the server refuses the instance
    import dagster_postgres.utils

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-the-password")
    monkeypatch.setattr(dagster_postgres.utils, "calculate_delay", lambda **_: 0)  # its retries, without the backoff
    with pytest.raises(Exception) as refused:
        DagsterInstance.from_ref(deserialize_value(ref))
    chain, err = [], refused.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert "password authentication failed" in " ".join(chain)


def test_sqlite_under_dagster_home_without_the_variables(tmp_path, monkeypatch):
    from dagster._core.storage.event_log import SqliteEventLogStorage
    from dagster._core.storage.runs import SqliteRunStorage

    home = _dagster_home(tmp_path, monkeypatch, {})
    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, SqliteRunStorage)
        assert isinstance(instance.event_log_storage, SqliteEventLogStorage)
        mat = _materialize_raw_faces(tmp_path, instance)
        run_id = instance.get_runs(limit=1)[0].run_id
    for name in ("history/runs.db", "history/runs/index.db", f"history/runs/{run_id}.db", "schedules/schedules.db"):
        assert (home / name).is_file(), name
    with DagsterInstance.get() as fresh:
        (record,) = fresh.fetch_materializations(AssetKey("raw_faces"), limit=10).records
    assert record.asset_materialization.partition == "ffhq"
    assert record.asset_materialization.metadata["data_version"] == mat.metadata["data_version"]


GOOD = {"DAGSTER_PG_HOST": "db.example", "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "s3cret-value-9137",
        "DAGSTER_PG_DB": "dagster"}


@pytest.mark.parametrize("env, culprits", [
    ({"DAGSTER_PG_HOST": "db.example"}, ["DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"]),
    ({k: v for k, v in GOOD.items() if k != "DAGSTER_PG_PASSWORD"}, ["DAGSTER_PG_PASSWORD"]),
    ({**GOOD, "DAGSTER_PG_HOST": ""}, ["DAGSTER_PG_HOST"]),  # empty counts as not set
    ({"DAGSTER_PG_PORT": "5432"}, list(REQUIRED)),  # any variable selects PostgreSQL, even the optional one
    ({**GOOD, "DAGSTER_PG_PORT": "54x2"}, ["DAGSTER_PG_PORT"]),
], ids=["host-only", "no-password", "empty-host", "port-only", "bad-port"])
def test_a_partial_configuration_names_what_is_missing(tmp_path, monkeypatch, env, culprits):
    _dagster_home(tmp_path, monkeypatch, env)
    with pytest.raises(PostgresSettingsError) as err:
        DagsterInstance.get()
    assert err.value.variables == culprits
    message = str(err.value)
    head = message.split(" not set", 1)[0] if "not set" in message else message.split(" must be", 1)[0]
    assert head == "PostgreSQL instance storage: " + ", ".join(culprits)  # the message leads with the culprits
    assert "s3cret-value-9137" not in message
    assert not (tmp_path / "dagster_home" / "history").exists()  # no silent SQLite


def test_a_worker_without_the_variables_fails_naming_them(tmp_path, monkeypatch):
    """The choice travels in the instance ref: a worker that lacks the variables does not fall back to SQLite."""
    from dagster._core.instance.ref import InstanceRef

    home = _dagster_home(tmp_path, monkeypatch, GOOD)
    ref = InstanceRef.from_dir(str(home))  # what the webserver or daemon builds; connects to nothing yet
    assert ref.storage_data.class_name == "DagsterPostgresStorage"
    assert all(name in ref.storage_data.config_yaml for name in REQUIRED)
    assert "s3cret-value-9137" not in serialize_value(ref)
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    with pytest.raises(Exception, match="DAGSTER_PG_PASSWORD"):
        DagsterInstance.from_ref(ref)
    assert not (home / "history").exists()


def test_loading_the_instance_class_imports_no_torch():
    """The webserver and the daemon import `assets.instance` to read dagster.yaml: it must stay light."""
    code = "import sys, assets.instance; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                           cwd=REPO)
    assert probe.stdout.strip() == "[]"
