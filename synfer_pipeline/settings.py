"""The one way a wing declares its settings: `@settings` makes a frozen dataclass that pydantic validates.

Values are coerced where the meaning is unambiguous (`"1e-4"` from YAML becomes the float 0.0001, a list becomes a
tuple) and checked against the annotation; an unknown keyword is an error, so a typo in a profile never passes
silently. `dataclasses.asdict`, `dataclasses.replace` and `dataclasses.fields` work as on any dataclass.
`synfer_pipeline.config` assembles every wing's settings into the typed profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.dataclasses import dataclass

STRICT_KEYS = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def settings(cls):
    """Decorator: `cls` as a frozen, validated dataclass that refuses unknown keys."""
    return dataclass(frozen=True, config=STRICT_KEYS)(cls)


def plain(obj: Any) -> Any:
    """JSON-ready form of settings: dataclasses and pydantic models become dicts, tuples lists (recursively)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, BaseModel):
        return plain(obj.model_dump())
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def settings_hash(*objects: Any) -> str:
    """Short stable hash of settings (dataclasses, profile sections or plain values), recorded for lineage."""
    text = json.dumps([plain(o) for o in objects], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
