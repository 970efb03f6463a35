"""Dagster resources: the outside world (storage, profile settings, compute, models) for the asset graph."""

from resources.io_manager import ArtifactIOManager
from resources.settings import ComputeResource, SettingsResource
from resources.storage import StorageResource

__all__ = ["ArtifactIOManager", "ComputeResource", "SettingsResource", "StorageResource"]
