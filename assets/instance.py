"""The Dagster instance's storage: PostgreSQL when the `DAGSTER_PG_*` variables are set, SQLite under $DAGSTER_HOME
otherwise, from the one `dagster.yaml` (named there as `instance_class`).

This module imports Dagster only (no torch): the webserver and the daemon load it to read the instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml
from dagster import DagsterInstance
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import ConfigurableClassData

# the variables, in the order an error lists them; the port is the only optional one (PostgreSQL's 5432)
REQUIRED = ("DAGSTER_PG_HOST", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")
OPTIONAL = ("DAGSTER_PG_PORT",)
VARIABLES = REQUIRED + OPTIONAL
# the dagster-postgres config key each variable fills
_FIELDS = {"DAGSTER_PG_HOST": "hostname", "DAGSTER_PG_USERNAME": "username", "DAGSTER_PG_PASSWORD": "password",
           "DAGSTER_PG_DB": "db_name", "DAGSTER_PG_PORT": "port"}


class PostgresSettingsError(DagsterInvariantViolationError):
    """Some `DAGSTER_PG_*` variables are set and others are missing or malformed; `variables` names the culprits."""

    def __init__(self, message: str, variables: list[str]):
        super().__init__(message)
        self.variables = variables


def postgres_storage_data(environ: Mapping[str, str] | None = None) -> ConfigurableClassData | None:
    """dagster-postgres's storage, configured from the `DAGSTER_PG_*` variables, or None when none of them is set.

    The config names the variables (`{env: DAGSTER_PG_PASSWORD}`), never their values: it is what Dagster serializes
    into the instance ref that run and step workers receive, and each of them reads the values from its own
    environment. A partial configuration is an error, never a silent fallback to SQLite.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in VARIABLES if environ.get(name)]
    if not present:
        return None
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise PostgresSettingsError(
            f"PostgreSQL instance storage: {', '.join(missing)} not set (or empty), while {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'}. Set all of {', '.join(REQUIRED)} (and optionally "
            "DAGSTER_PG_PORT, default 5432) for PostgreSQL, or none of them for SQLite under $DAGSTER_HOME.", missing)
    port = environ.get("DAGSTER_PG_PORT")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise PostgresSettingsError(f"PostgreSQL instance storage: DAGSTER_PG_PORT must be a TCP port number, "
                                    f"got {port!r}.", ["DAGSTER_PG_PORT"])
    db = {_FIELDS[name]: {"env": name} for name in VARIABLES if environ.get(name)}
    # SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, which is not installed; dagster-postgres brings psycopg2
    db["scheme"] = "postgresql+psycopg2"
    return ConfigurableClassData("dagster_postgres", "DagsterPostgresStorage",
                                 yaml.dump({"postgres_db": db}, default_flow_style=False))


class SynferInstance(DagsterInstance):
    """A DagsterInstance whose default storage is chosen from the environment when its `dagster.yaml` is read.

    Why this hook: a YAML file has no conditionals, and Dagster's `storage: postgres:` block, even with `{env: ...}`
    values, cannot fall back to SQLite. `InstanceRef.from_dir` (dagster 1.13.27, `_core/instance/ref.py`) builds every
    instance from `dagster.yaml` and asks a configured `instance_class` for its `config_defaults(base_dir)`, which
    fill whatever the file leaves out. The file has no `storage:` section, so the defaults decide:
    - any `DAGSTER_PG_*` variable set: dagster-postgres's `DagsterPostgresStorage` (runs, events, schedules), its
      config naming the variables (see `postgres_storage_data`); a partial set raises `PostgresSettingsError`;
    - none set: Dagster's own SQLite defaults under `base_dir` ($DAGSTER_HOME; `dagster dev` without DAGSTER_HOME
      passes its temporary directory, as without this class).
    The choice is made once, by the process that reads `dagster.yaml` (webserver, daemon, CLI, `DagsterInstance.get()`),
    and travels inside the instance ref that run and step workers (subprocesses, containers, Kubernetes pods) are
    given: a worker never re-decides, so one that lacks the variables fails naming the missing one instead of writing
    its events to a SQLite file nobody reads. No value, secret or not, is written into the ref or any file.

    Rejected: a custom `storage:` class whose `from_config_value` picks the backend from the environment. It would
    re-decide in every worker (silent SQLite in a worker that lacks the variables) and has no instance directory to
    put SQLite in when DAGSTER_HOME is unset (`dagster dev`'s temporary instance).
    An explicit `storage:` (or `run_storage:` ...) section in `dagster.yaml` still wins over these defaults.
    """

    @classmethod
    def config_schema(cls) -> dict:
        return {}  # no settings of its own: `InstanceRef.from_dir` merges this into the instance's schema

    @staticmethod
    def config_defaults(base_dir: str) -> Mapping[str, ConfigurableClassData | None]:
        defaults = dict(InstanceRef.config_defaults(base_dir))
        postgres = postgres_storage_data()
        if postgres is not None:
            defaults["storage"] = postgres
            # the per-storage entries Dagster keeps in the ref for older readers, the same config
            for key, cls in (("run_storage", "PostgresRunStorage"), ("event_log_storage", "PostgresEventLogStorage"),
                             ("schedule_storage", "PostgresScheduleStorage")):
                defaults[key] = ConfigurableClassData("dagster_postgres", cls, postgres.config_yaml)
        return defaults
