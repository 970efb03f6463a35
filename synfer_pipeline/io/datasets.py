"""What every dataset-producing stage does the same way: map input shards to outputs resumably, then publish.

A stage reads an upstream artifact's shards in order and makes, per input shard, one output shard (images) or one
Parquet part (annotations). An output whose index/part exists is finished, so a killed run skips it when started
again. `publish_dataset` writes the tables, derives the data version from content and publishes the folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd
from PIL import Image

from synfer_pipeline.io.shards import SHARD_PATTERN, iter_shard, read_index, write_shard
from synfer_pipeline.io.storage import ArtifactRef, ArtifactWriter, Storage, data_version_of

Sample = tuple[str, dict[str, bytes]]                    # (key, {extension: bytes})
OutSample = tuple[str, Mapping[str, Any], Mapping[str, Any]]  # (key, members, index row)


def input_shards(storage: Storage, ref: ArtifactRef, name: str) -> list[str]:
    shards = storage.list(ref.uri, f"{name}-*.tar")
    if not shards and ref.counts.get("samples", 0):
        raise FileNotFoundError(f"{ref.uri} should hold {name}-*.tar shards but has none")
    return shards


def map_shards(storage: Storage, ref: ArtifactRef, in_name: str, writer: ArtifactWriter, out_name: str,
               transform: Callable[[list[Sample]], list[OutSample]], log: Callable[[str], None] = lambda s: None) -> pd.DataFrame:
    """Input shard i -> output shard i (skipped when already written); returns the output index."""
    for i, shard in enumerate(input_shards(storage, ref, in_name)):
        if writer.exists(SHARD_PATTERN.format(name=out_name, index=i) + ".parquet"):
            continue
        out = transform(list(iter_shard(storage, shard)))
        write_shard(storage, writer.staging, out_name, i, out)
        log(f"{out_name} shard {i}: {len(out)} samples")
    return read_index(storage, writer.staging, out_name)


def map_shards_to_table(storage: Storage, ref: ArtifactRef, in_name: str, writer: ArtifactWriter, out_name: str,
                        transform: Callable[[list[Sample]], pd.DataFrame], log: Callable[[str], None] = lambda s: None) -> pd.DataFrame:
    """Input shard i -> Parquet part `{out_name}-part-{i}.parquet` (skipped when present); returns all parts."""
    frames = []
    for i, shard in enumerate(input_shards(storage, ref, in_name)):
        part = f"{out_name}-part-{i:06d}.parquet"
        if writer.exists(part):
            frames.append(read_parquet(storage, writer.path(part)))
            continue
        df = transform(list(iter_shard(storage, shard)))
        write_parquet(writer, part, df)
        frames.append(df)
        log(f"{out_name} part {i}: {len(df)} rows")
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_parquet(storage: Storage, uri: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))


def write_parquet(writer: ArtifactWriter, name: str, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    writer.write_bytes(name, buf.getvalue())


def read_table(storage: Storage, ref: ArtifactRef, name: str) -> pd.DataFrame:
    """A published table of an artifact, e.g. `manifest.parquet`."""
    return read_parquet(storage, ref.file(name))


def publish_dataset(writer: ArtifactWriter, tables: Mapping[str, pd.DataFrame], run_id: str, counts: Mapping[str, int],
                    inputs: Mapping[str, Any] | None = None, preview_png: bytes | None = None,
                    version_lines: Iterable[str] = ()) -> ArtifactRef:
    """Write `{name}.parquet` for each table (+ preview.png), version the content, publish; returns the ref.

    The data version hashes every table's rows (a `sample_hash` column stands for its sample's bytes), so the same
    content gives the same version whatever run wrote it.
    """
    lines = list(version_lines)
    for name, df in tables.items():
        write_parquet(writer, f"{name}.parquet", df)
        lines.append(f"table:{name}:{pd.util.hash_pandas_object(_hashable(df), index=False).sum() if len(df) else 0}")
    if preview_png is not None:
        writer.write_bytes("preview.png", preview_png)
    ref = ArtifactRef(writer.asset, writer.partition, writer.staging, data_version_of(sorted(lines)), dict(counts), run_id,
                      dict(inputs or {}))
    return writer.publish(ref)


def _hashable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows as strings for hashing: lists/arrays (e.g. AU vectors) become their text form."""
    df = df.sort_values(list(df.columns[:1])).reset_index(drop=True) if len(df.columns) else df
    return df.map(lambda v: repr(list(v)) if hasattr(v, "__len__") and not isinstance(v, str) else repr(v))


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def image_member(members: Mapping[str, bytes]) -> bytes:
    """The image bytes of a sample, whichever image extension it carries."""
    for ext in ("jpg", "png", "jpeg", "webp"):
        if ext in members:
            return members[ext]
    raise KeyError(f"sample has no image member (has {sorted(members)})")

