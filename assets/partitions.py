"""Partitions: per-dataset stages are partitioned by the source datasets of the active profile."""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from synfer_pipeline.config import load_profile

dataset_partitions = StaticPartitionsDefinition(sorted(load_profile().datasets))
