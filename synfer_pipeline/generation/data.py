"""FEText streaming for diffusion fine-tuning: WebDataset shards -> tokenised, normalised training batches.

The shards' Parquet indexes are read first: the filters (native high resolution only for stage 2, chosen sources)
run on the index, before any sample is assigned to a process or stream, so every process and every stream gets
its share of the kept samples however few shards hold them. The order of samples is a pure function of
(seed, process rank, world size, number of streams):
1. in each epoch the kept samples are permuted together, with a generator seeded by (seed, epoch): a global
   shuffle, so batches mix samples across shards and sources;
2. process `rank` takes every `world_size`-th sample of that order, and its logical stream `j` every
   `num_streams`-th of those: streams differ by at most one sample per epoch, none is left empty;
3. each stream reads its samples by their byte range in the shards (one ranged read each, local or S3), cuts
   batches of `batch_size` (an epoch's last batch may be smaller), then goes on with the next epoch, endlessly.
A stream is what one DataLoader worker produces (one stream when loading in the training process); the DataLoader
takes batches from the workers in turn. The training loop records, per stream, the epoch and the batches consumed
in it (`DataPosition`); a resumed run skips exactly those samples without reading them and rotates the workers so
that the round-robin continues where it stopped. One DataLoader lives for the whole run: no restart per epoch.
Caption and AU dropout are decided per sample from a hash of (seed, epoch, key): no random state to carry.
AU vectors are read by name (each FEText sample names its AU list), in the order the job asks for.

Urls may be local paths or `s3://` (reached through `synfer_pipeline.io.shards`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from synfer_pipeline.io.shards import index_of, read_sample


@dataclass(frozen=True)
class StreamSpec:
    """How one process reads FEText. Everything here fixes the sample order, so a resume must use the same spec.

    resolution: square training size in pixels; batch_size: samples per batch (per process);
    caption_dropout / au_dropout: probability that a sample's caption becomes "" / its AUs become unconditional;
    native_hr_only: keep only samples whose index row says native_hr (stage 2); sources: keep only these sources
    (None: all); au_names: the AU vector's entries in the order the job wants them (None: the job reads no AUs);
    num_streams: max(1, DataLoader workers).
    """

    urls: tuple[str, ...]
    resolution: int
    batch_size: int
    seed: int = 0
    caption_dropout: float = 0.0
    au_dropout: float = 0.0
    native_hr_only: bool = False
    sources: tuple[str, ...] | None = None
    au_names: tuple[str, ...] | None = None
    rank: int = 0
    world_size: int = 1
    num_streams: int = 1


@dataclass
class DataPosition:
    """Where a process stands in its data: per stream the epoch it is in and the batches consumed in that epoch,
    and the stream whose batch the loop takes next."""

    epochs: list[int] = field(default_factory=list)
    consumed: list[int] = field(default_factory=list)
    next_stream: int = 0

    @classmethod
    def start(cls, num_streams: int) -> DataPosition:
        return cls([0] * num_streams, [0] * num_streams, 0)

    def advance(self, stream: int, epoch: int, num_streams: int) -> None:
        """Record that the loop took one batch of `epoch` from `stream`."""
        if epoch != self.epochs[stream]:
            self.epochs[stream], self.consumed[stream] = epoch, 0
        self.consumed[stream] += 1
        self.next_stream = (stream + 1) % num_streams

    def to_dict(self) -> dict:
        return {"epochs": list(self.epochs), "consumed": list(self.consumed), "next_stream": self.next_stream}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls([int(e) for e in d["epochs"]], [int(c) for c in d["consumed"]], int(d["next_stream"]))


def unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from the parts' text: the same parts give the same number in any process."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sample_table(spec: StreamSpec) -> pd.DataFrame:
    """The kept samples of every shard (url, key, offset, length, source, native_hr), filtered on the indexes."""
    frames = []
    for url in spec.urls:
        index = index_of(url)
        for column in ("native_hr", "source"):
            if column not in index.columns:
                raise ValueError(f"the index of {url} has no {column!r} column: rebuild the FEText shards")
        frames.append(index.assign(url=url)[["url", "key", "offset", "length", "source", "native_hr"]])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["url", "key"])
    if spec.native_hr_only:
        table = table[table["native_hr"].astype(bool)]
    if spec.sources is not None:
        table = table[table["source"].isin(spec.sources)]
    return table.reset_index(drop=True)


def epoch_samples(spec: StreamSpec, n_samples: int, epoch: int, stream: int) -> np.ndarray:
    """Rows of the sample table that stream `stream` of process `spec.rank` reads in `epoch`, in reading order."""
    order = np.random.default_rng([spec.seed, epoch]).permutation(n_samples)
    return order[spec.rank :: spec.world_size][stream :: spec.num_streams]


def load_image_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """Decode an image and return it as a (3, resolution, resolution) float32 tensor in [-1, 1].

    The shorter side is resized to `resolution` (bicubic), then the centre square is cropped.
    """
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class AUReader:
    """AU vectors of FEText samples in a requested AU order, looked up by name in each sample's own list."""

    def __init__(self, au_names: tuple[str, ...] | None):
        self.au_names = au_names
        self._index: dict[tuple[str, ...], np.ndarray] = {}

    def __call__(self, key: str, meta: dict) -> np.ndarray:
        if self.au_names is None:
            return np.zeros(0, dtype=np.float32)
        written = tuple(meta.get("au_names") or ())
        if written not in self._index:
            missing = [a for a in self.au_names if a not in written]
            if missing:
                raise ValueError(f"FEText sample {key} has no value for {missing} (its AUs: {list(written) or 'none'});"
                                 " rebuild fetext with the profile's action_units")
            self._index[written] = np.array([written.index(a) for a in self.au_names])
        return np.asarray(meta["au_vector"], dtype=np.float32)[self._index[written]]


class FETextBatches(IterableDataset):
    """Endless batches from the given position on; each DataLoader worker produces one logical stream.

    Yields dicts of numpy arrays and lists (`as_tensors` turns them into tensors): pixel_values (B, 3, R, R) float32
    in [-1, 1]; input_ids (B, T) int64; au (B, n_aus) float32 0/1 (n_aus 0 without au_names); au_dropped (B,) bool;
    labels (B,) int64; keys, sources (lists of str); native_hr (list of bool); stream, epoch (int).
    Physical worker i plays stream (i + position.next_stream) % num_streams.
    """

    def __init__(self, spec: StreamSpec, tokenizer, position: DataPosition):
        self.spec, self.tokenizer, self.position = spec, tokenizer, position
        self.read_au = AUReader(spec.au_names)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        stream = (physical + self.position.next_stream) % self.spec.num_streams
        epoch, skip = self.position.epochs[stream], self.position.consumed[stream]
        table = sample_table(self.spec)
        while True:
            rows = epoch_samples(self.spec, len(table), epoch, stream)
            if not len(rows):
                return  # this stream has no sample at all: `_tracked` says why
            yield from self._epoch(table, rows[skip * self.spec.batch_size:], stream, epoch)
            epoch, skip = epoch + 1, 0

    def _epoch(self, table: pd.DataFrame, rows: np.ndarray, stream: int, epoch: int) -> Iterator[dict]:
        for start in range(0, len(rows), self.spec.batch_size):
            picked = table.iloc[rows[start:start + self.spec.batch_size]]
            batch = [read_sample(r.url, r.offset, r.length) for r in picked.itertuples()]
            yield self._collate(batch, stream, epoch)

    def _collate(self, batch: list[tuple[str, dict[str, bytes]]], stream: int, epoch: int) -> dict:
        spec = self.spec
        keys = [k for k, _ in batch]
        metas = [json.loads(m["json"]) for _, m in batch]
        captions = ["" if unit_hash(spec.seed, epoch, k, "caption") < spec.caption_dropout else m["txt"].decode("utf-8")
                    for k, (_, m) in zip(keys, batch)]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        au = np.stack([self.read_au(k, meta) for k, meta in zip(keys, metas)])
        dropped = [unit_hash(spec.seed, epoch, k, "au") < spec.au_dropout for k in keys]
        # Small arrays stay numpy: pickled inline between processes, cheaper than a shared-memory tensor each.
        return {
            "pixel_values": torch.stack([load_image_tensor(m["jpg"], spec.resolution) for _, m in batch]),
            "input_ids": ids.astype(np.int64),
            "au": au,
            "au_dropped": np.array(dropped, dtype=bool),
            "labels": np.array([int(m["cls"]) for _, m in batch], dtype=np.int64),
            "keys": keys,
            "sources": [str(meta.get("source", "")) for meta in metas],
            "native_hr": [bool(meta.get("native_hr", False)) for meta in metas],
            "stream": stream,
            "epoch": epoch,
        }


def _identity(batch: dict) -> dict:
    return batch


def as_tensors(batch: dict) -> dict:
    """The batch with its numpy arrays as torch tensors (zero-copy)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _tracked(source, position: DataPosition, spec: StreamSpec) -> Iterator[dict]:
    # A function, not a method: the generator must not hold the feed, so that dropping a feed also stops its workers.
    for batch in source:
        position.advance(batch["stream"], batch["epoch"], spec.num_streams)
        yield as_tensors(batch)
    raise RuntimeError(f"the FEText stream of process {spec.rank} of {spec.world_size} ended: no kept samples")


class BatchFeed:
    """Endless training batches for one process, tracking the exact `DataPosition`.

    `position` is updated as each batch is handed out, so saving it between two batches records exactly what was
    consumed (batches the workers prefetched but the loop never took are produced again after a resume).
    With num_workers=0 the batches are made in this process, without a DataLoader.
    """

    def __init__(self, spec: StreamSpec, tokenizer, num_workers: int = 0, position: DataPosition | None = None,
                 prefetch_factor: int = 4, pin_memory: bool = False):
        if spec.num_streams != max(1, num_workers):
            raise ValueError(f"spec.num_streams ({spec.num_streams}) must equal max(1, num_workers={num_workers})")
        self.spec, self.tokenizer, self.num_workers = spec, tokenizer, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.position = position or DataPosition.start(spec.num_streams)
        if len(self.position.consumed) != spec.num_streams:
            raise ValueError(f"data position has {len(self.position.consumed)} streams, spec has {spec.num_streams}")
        self._iterator: Iterator[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        if self._iterator is None:
            spec, kept = self.spec, len(sample_table(self.spec))
            if kept < spec.world_size * spec.num_streams:
                raise ValueError(
                    f"{kept} FEText samples kept (native_hr_only={spec.native_hr_only}, sources={spec.sources}, "
                    f"{len(spec.urls)} shards) cannot feed {spec.world_size} process(es) x {spec.num_streams} stream(s)")
            dataset = FETextBatches(self.spec, self.tokenizer, copy.deepcopy(self.position))
            if self.num_workers:
                source = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                                    prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory)
            else:
                source = dataset
            self._iterator = _tracked(source, self.position, self.spec)
        return self._iterator

    def __next__(self) -> dict:
        return next(iter(self))

    def close(self) -> None:
        """Stop the DataLoader workers (if any)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
