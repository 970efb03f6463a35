"""FEText streaming for diffusion fine-tuning: WebDataset shards -> tokenised, normalised training batches.

The order of samples is a pure function of (seed, process rank, world size, number of streams):
1. in each epoch the shard list is permuted with a generator seeded by (seed, epoch);
2. process `rank` takes every `world_size`-th shard, and its logical stream `j` every `num_streams`-th of those;
3. each stream reads its shards in that order, drops filtered samples (json only, nothing decoded yet), shuffles
   through a buffer seeded by (seed, epoch, rank, j), and cuts batches of `batch_size` (an epoch's last batch may
   be smaller); then it goes on with the next epoch, endlessly (a stream whose epoch holds no sample ends).
A stream is what one DataLoader worker produces (one stream when loading in the training process); the DataLoader
takes batches from the workers in turn. The training loop records, per stream, the epoch and the batches consumed
in it (`DataPosition`); a resumed run skips exactly those samples before decoding them and rotates the workers so
that the round-robin continues where it stopped. One DataLoader lives for the whole run: no restart per epoch.
Caption and AU dropout are decided per sample from a hash of (seed, epoch, key): no random state to carry.

Urls may be local paths or `s3://` (opened through `synfer_pipeline.io.shards`' fsspec opener).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from synfer_pipeline.io import shards as shard_io
from synfer_pipeline.io.storage import filesystem_for
from synfer_pipeline.vocab import OPENGRAPHAU_41


@dataclass(frozen=True)
class StreamSpec:
    """How one process reads FEText. Everything here fixes the sample order, so a resume must use the same spec.

    resolution: square training size in pixels; batch_size: samples per batch (per process);
    caption_dropout / au_dropout: probability that a sample's caption becomes "" / its AUs become unconditional;
    native_hr_only: keep only samples whose json says native_hr (stage 2); sources: keep only these sources (None: all);
    shuffle_buffer: samples held for the in-stream shuffle; num_streams: max(1, DataLoader workers).
    """

    urls: tuple[str, ...]
    resolution: int
    batch_size: int
    seed: int = 0
    caption_dropout: float = 0.0
    au_dropout: float = 0.0
    native_hr_only: bool = False
    sources: tuple[str, ...] | None = None
    shuffle_buffer: int = 256
    au_names: tuple[str, ...] = OPENGRAPHAU_41
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


def epoch_shards(spec: StreamSpec, epoch: int, stream: int) -> list[str]:
    """The shard urls stream `stream` of process `spec.rank` reads in `epoch`, in reading order."""
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(spec.urls))
    mine = [spec.urls[i] for i in order][spec.rank :: spec.world_size]
    return mine[stream :: spec.num_streams]


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


_WORKER_OPENERS: set[str] = set()  # protocols this DataLoader worker process registered itself


def _ensure_opener(url: str) -> None:
    # An s3fs instance inherited through fork refuses to work ("not fork-safe"), and workers started by spawn
    # inherit none: each worker opens remote shards through its own filesystem, built from the environment's
    # settings as `Storage` does by default (AWS_ENDPOINT_URL...).
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("file", "http", "https", "pipe"):
        return
    in_worker = get_worker_info() is not None
    if protocol not in wds.gopen_schemes or (in_worker and protocol not in _WORKER_OPENERS):
        shard_io.register_filesystem(filesystem_for(url)[0], protocol)
        if in_worker:
            _WORKER_OPENERS.add(protocol)


def _buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class FETextBatches(IterableDataset):
    """Endless batches from the given position on; each DataLoader worker produces one logical stream.

    Yields dicts of numpy arrays and lists (`as_tensors` turns them into tensors): pixel_values (B, 3, R, R) float32
    in [-1, 1]; input_ids (B, T) int64; au (B, n_aus) float32 0/1; au_dropped (B,) bool; labels (B,) int64;
    keys, sources (lists of str); native_hr (list of bool); stream, epoch (int).
    Physical worker i plays stream (i + position.next_stream) % num_streams.
    """

    def __init__(self, spec: StreamSpec, tokenizer, position: DataPosition):
        self.spec, self.tokenizer, self.position = spec, tokenizer, position
        self._au_index = [OPENGRAPHAU_41.index(a) for a in spec.au_names]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        stream = (physical + self.position.next_stream) % self.spec.num_streams
        epoch, skip = self.position.epochs[stream], self.position.consumed[stream]
        while True:
            produced = 0
            for batch in self._epoch(stream, epoch, skip * self.spec.batch_size):
                produced += 1
                yield batch
            if not produced and not skip:
                return  # no sample for this stream in a whole epoch: it ends rather than spin
            epoch, skip = epoch + 1, 0

    def _epoch(self, stream: int, epoch: int, skip: int) -> Iterator[dict]:
        kept = (s for s in self._samples(stream, epoch) if self._keep(s))
        rng = random.Random(f"{self.spec.seed}:{epoch}:{self.spec.rank}:{stream}")
        batch: list[dict] = []
        for n, sample in enumerate(_buffer_shuffle(kept, self.spec.shuffle_buffer, rng)):
            if n < skip:
                continue  # consumed before the checkpoint: not decoded again
            batch.append(sample)
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch, stream, epoch)
                batch = []
        if batch:
            yield self._collate(batch, stream, epoch)

    def _samples(self, stream: int, epoch: int) -> Iterator[dict]:
        urls = epoch_shards(self.spec, epoch, stream)
        for url in urls:
            _ensure_opener(url)
        # reraise: a broken sample stops training loudly instead of silently shrinking the data set
        return wds.tariterators.tarfile_samples(({"url": u} for u in urls), handler=wds.reraise_exception)

    def _keep(self, sample: dict) -> bool:
        meta = json.loads(sample["json"])
        sample["meta"] = meta
        if self.spec.native_hr_only and not meta.get("native_hr", False):
            return False
        return self.spec.sources is None or meta.get("source") in self.spec.sources

    def _collate(self, batch: list[dict], stream: int, epoch: int) -> dict:
        spec = self.spec
        keys = [s["__key__"] for s in batch]
        captions = [s["txt"].decode("utf-8") for s in batch]
        captions = ["" if unit_hash(spec.seed, epoch, k, "caption") < spec.caption_dropout else c
                    for k, c in zip(keys, captions)]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        au = np.stack([np.asarray(s["meta"]["au_vector"], dtype=np.float32)[self._au_index] for s in batch])
        dropped = [unit_hash(spec.seed, epoch, k, "au") < spec.au_dropout for k in keys]
        # Small arrays stay numpy: pickled inline between processes, cheaper than a shared-memory tensor each.
        return {
            "pixel_values": torch.stack([load_image_tensor(s["jpg"], spec.resolution) for s in batch]),
            "input_ids": ids.astype(np.int64),
            "au": au,
            "au_dropped": np.array(dropped, dtype=bool),
            "labels": np.array([int(s["cls"]) for s in batch], dtype=np.int64),
            "keys": keys,
            "sources": [str(s["meta"].get("source", "")) for s in batch],
            "native_hr": [bool(s["meta"].get("native_hr", False)) for s in batch],
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
    raise RuntimeError(
        f"no training samples for process {spec.rank} of {spec.world_size}: {len(spec.urls)} shards, "
        f"native_hr_only={spec.native_hr_only}, sources={spec.sources} (fewer shards than processes, or the filter "
        "removed everything)")


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
