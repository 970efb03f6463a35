"""The storage root: a local folder or `s3://bucket/prefix`; credentials only from the environment."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from synfer_pipeline.io.storage import Storage, s3_storage_options


class StorageResource(ConfigurableResource):
    """Where every artifact is written: `{root}/{asset}/{partition}/{data_version}/`.

    For S3 the endpoint comes from `endpoint_url` or `AWS_ENDPOINT_URL`; keys from `AWS_ACCESS_KEY_ID` and
    `AWS_SECRET_ACCESS_KEY` (never from configuration).
    """

    root: str
    endpoint_url: str | None = None
    _storage: Storage | None = PrivateAttr(default=None)

    def get(self) -> Storage:
        if self._storage is None:
            options = s3_storage_options(self.endpoint_url) if self.root.startswith("s3://") else None
            self._storage = Storage(self.root, options)
        return self._storage
