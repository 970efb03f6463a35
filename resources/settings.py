"""The active profile (datasets and per-stage hyper-parameters) and the compute settings, as resources."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from synfer_pipeline.config import Profile, load_profile


class SettingsResource(ConfigurableResource):
    """The profile file (`demo`, `paper`, or a path) that holds datasets and stage settings."""

    profile: str = "demo"
    _loaded: Profile | None = PrivateAttr(default=None)

    def get(self) -> Profile:
        if self._loaded is None:
            self._loaded = load_profile(self.profile)
        return self._loaded


class ComputeResource(ConfigurableResource):
    """Device and precision for model steps; batch sizes live with each stage's settings in the profile."""

    device: str = "cpu"
    dtype: str = "float32"
