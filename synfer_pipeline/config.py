"""Configuration profiles: YAML files a user edits (`profiles/demo.yaml`, `profiles/paper.yaml`, or their own).

One setting chooses the profile: `SYNFER_PROFILE` (a name under `profiles/` or a path; default `demo`). Values may use
`${VAR}` and `${VAR:-default}` to read the environment (paths, buckets; never put secrets in a profile). Every model
role and hyper-parameter lives in the profile; the code only holds the defaults of the dataclasses it fills.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synfer_pipeline.curation.ingest import IngestSettings
from synfer_pipeline.vocab import OPENGRAPHAU_41

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class DatasetConfig:
    """One source dataset: a partition of every per-dataset asset."""

    name: str
    format: str                  # rafdb | affectnet | fer2013 | folder | unlabelled
    uri: str                     # local path or s3:// url of the source in its own layout
    native_hr: bool = False      # native high resolution (FFHQ, CelebA-HQ): no super-resolution, used in stage 2
    options: dict = field(default_factory=dict)  # reader options (e.g. RAF-DB variant, FERPlus csv)
    ingest: IngestSettings = field(default_factory=IngestSettings)


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    storage_root: str
    datasets: dict[str, DatasetConfig]
    checks: dict[str, float]
    compute: dict[str, Any]
    models: dict[str, Any]
    stages: dict[str, dict[str, Any]]  # per-stage hyper-parameters, read by each stage's own settings class
    raw: dict[str, Any]

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise KeyError(f"dataset {name!r} is not in profile {self.name} ({self.path}); has {sorted(self.datasets)}")
        return self.datasets[name]

    def stage(self, name: str) -> dict[str, Any]:
        return dict(self.stages.get(name) or {})

    def model(self, role: str) -> dict[str, Any] | None:
        """A model role's entry (`{kind: ..., id: ...}`), or None when the profile leaves it out."""
        spec = self.models.get(role)
        return dict(spec) if spec else None

    @property
    def au_names(self) -> tuple[str, ...]:
        """The configured action-unit list (default: OpenGraphAU's 41, in its order)."""
        return tuple(self.raw.get("action_units") or OPENGRAPHAU_41)


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def profile_path(name_or_path: str | None = None) -> Path:
    """The YAML file for a profile name (`demo`, `paper`) or path; default from `SYNFER_PROFILE`, else demo."""
    choice = name_or_path or os.environ.get("SYNFER_PROFILE") or "demo"
    path = Path(choice)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{choice}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"profile {choice!r}: {path} does not exist (profiles: {sorted(p.stem for p in PROFILES_DIR.glob('*.yaml'))})")
    return path


def from_dict(cls, values: dict[str, Any] | None):
    """Fill a dataclass from a mapping, refusing unknown keys (a typo in a profile is an error, not a no-op)."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}")
    return cls(**values)


def load_profile(name_or_path: str | None = None) -> Profile:
    """Read and validate a profile; see the module docstring."""
    path = profile_path(name_or_path)
    raw = _expand(yaml.safe_load(path.read_text()) or {})
    ingest_defaults = raw.get("ingest") or {}
    datasets = {}
    for name, spec in (raw.get("datasets") or {}).items():
        spec = dict(spec)
        ingest = from_dict(IngestSettings, {**ingest_defaults, **(spec.pop("ingest", None) or {})})
        datasets[name] = DatasetConfig(name=name, ingest=ingest, **spec)
    return Profile(
        name=raw.get("name", path.stem), path=str(path), storage_root=raw["storage"]["root"], datasets=datasets,
        checks=dict(raw.get("checks") or {}), compute=dict(raw.get("compute") or {}), models=dict(raw.get("models") or {}),
        stages={k: v for k, v in raw.items()
                if k not in {"name", "storage", "datasets", "ingest", "checks", "compute", "models", "action_units"}},
        raw=raw,
    )


def settings_hash(*objects: Any) -> str:
    """Short hash of settings (dataclasses or plain values), recorded with artifacts for lineage."""
    def plain(o: Any) -> Any:
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o
    return hashlib.sha256(json.dumps([plain(o) for o in objects], sort_keys=True, default=str).encode()).hexdigest()[:12]
