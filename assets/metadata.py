"""Metadata helpers shared by the assets: what a user looks at in the UI."""

from __future__ import annotations

import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from synfer_pipeline.io.preview import markdown_image
from synfer_pipeline.io.storage import ArtifactRef


def ref_metadata(ref: ArtifactRef) -> dict:
    return {"uri": MetadataValue.path(ref.uri), "data_version": ref.data_version, **{f"n_{k}": v for k, v in ref.counts.items()}}


def counts_table(df: pd.DataFrame, rows: str, columns: str | None = None) -> MetadataValue:
    """A markdown table of counts (e.g. class x split) for the metadata panel."""
    if not len(df):
        return MetadataValue.md("(no samples)")
    table = (pd.crosstab(df[rows].fillna("(none)"), df[columns].fillna("(none)"), margins=True)
             if columns else df[rows].fillna("(none)").value_counts().rename("count").to_frame())
    return MetadataValue.md(table.to_markdown())


def preview(png: bytes, alt: str = "preview") -> MetadataValue:
    return MetadataValue.md(markdown_image(png, alt))


def rejects_table(rejects: pd.DataFrame, columns: dict[str, str], rows: int = 20) -> MetadataValue:
    """The first `rows` rejects as a table the UI shows; `columns` maps the table's column names to the frame's."""
    schema = TableSchema(columns=[TableColumn(name, "string") for name in columns])
    records = [TableRecord({name: "" if pd.isna(row[src]) else str(row[src]) for name, src in columns.items()})
               for _, row in rejects.head(rows).iterrows()]
    return MetadataValue.table(records=records, schema=schema)
