"""The one `Definitions` of the SynFER pipeline, built from the active profile (`SYNFER_PROFILE`, default demo)."""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from assets import curation, evaluation, fer, fetext, generator, ingest, labels, synthesis
from assets.automation import round_complete_sensor, round_schedule
from assets.execution import executor_for
from assets.jobs import JOBS
from resources import ArtifactIOManager, ComputeResource, SettingsResource, StorageResource
from synfer_pipeline.config import Profile, load_profile

ASSET_MODULES = [ingest, curation, fer, fetext, generator, synthesis, labels, evaluation]


def build_resources(profile: Profile) -> dict:
    """Resources for a profile; tests call this with their own profile."""
    return {
        "storage": StorageResource(root=profile.storage.root, endpoint_url=profile.storage.endpoint_url),
        "settings": SettingsResource(profile=profile.path),
        "compute": ComputeResource(device=profile.compute.device, dtype=profile.compute.dtype),
        "artifact_io": ArtifactIOManager(),
    }


def build_definitions(profile: Profile) -> Definitions:
    return Definitions(
        assets=load_assets_from_modules(ASSET_MODULES),
        asset_checks=load_asset_checks_from_modules(ASSET_MODULES),
        jobs=JOBS,
        schedules=[round_schedule],
        sensors=[round_complete_sensor],
        resources=build_resources(profile),
        executor=executor_for(profile.execution),
    )


defs = build_definitions(load_profile())
