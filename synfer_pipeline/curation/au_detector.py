"""The AU detector role: a multi-label facial action unit classifier (sigmoid head over the configured AU list).

The paper labels every FEText image with OpenGraphAU's 41 AUs. Here the role is any transformers image backbone
(`AutoModelForImageClassification`) with one logit per AU, either loaded from a checkpoint this module saved or
trained by the pipeline on an AU-labelled dataset (the toy faces in the demo, whose AUs are known exactly).
A checkpoint is a transformers folder (safetensors) plus `synfer_au_detector.json` (AU list, input size,
threshold, normalisation, training settings and held-out metrics).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification
from transformers.utils import cached_file

from synfer_pipeline.io.storage import data_version_of
from synfer_pipeline.io.versions import weights_version
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import OPENGRAPHAU_41

TINY_BACKBONE = "tiny-resnet"
DETECTOR_JSON = "synfer_au_detector.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@settings
class AUDetectorSettings:
    """Hyper-parameters of the AU detector (configuration, not code).

    backbone: `tiny-resnet` (a small ResNet built from config, random init: the demo) or a hub id / local path of a
    transformers image-classification model (e.g. `microsoft/resnet-50`, a ViT) whose head is replaced.
    image_size: square input side in px. lr, weight_decay: AdamW. threshold: probability -> 0/1.
    holdout: share of keys held out for metrics. augment: mirror (swapping left/right AUs) plus colour/scale jitter.
    pos_weight: weight positives of rare AUs by negatives/positives (capped) in the BCE loss.
    """

    backbone: str = TINY_BACKBONE
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    threshold: float = 0.5
    holdout: float = 0.2
    seed: int = 0
    augment: bool = True
    pos_weight: bool = False
    device: str = "cpu"


@settings
class TrainedAUDetectorSpec:
    """The detector is trained by the pipeline on the profile's `au_detector.train_on` sources."""

    kind: Literal["train"] = "train"


@settings
class AUDetectorCheckpointSpec:
    """A detector folder saved by `AUDetector.save` (local path or hub id)."""

    id: str
    kind: Literal["checkpoint"] = "checkpoint"


AUDetectorSpec = Annotated[TrainedAUDetectorSpec | AUDetectorCheckpointSpec, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------------------------
# Building the network.


def _label_maps(au_names: Sequence[str]) -> dict:
    return {"id2label": dict(enumerate(au_names)), "label2id": {a: i for i, a in enumerate(au_names)}}


def build_au_model(backbone: str, au_names: Sequence[str]) -> tuple[torch.nn.Module, tuple, tuple]:
    """A fresh detector network with one logit per AU, and the (mean, std) its inputs are normalised with.

    `tiny-resnet`: random init, ImageNet statistics. Otherwise the backbone's pretrained weights with a new
    multi-label head (`ignore_mismatched_sizes` drops the old classifier) and its image processor's statistics.
    """
    labels = _label_maps(au_names)
    if backbone == TINY_BACKBONE:
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                              layer_type="basic", num_labels=len(au_names),
                              problem_type="multi_label_classification", **labels)
        return ResNetForImageClassification(config), IMAGENET_MEAN, IMAGENET_STD
    # id2label sets num_labels (passing both makes transformers warn of a mismatch with the old head).
    model = AutoModelForImageClassification.from_pretrained(
        backbone, problem_type="multi_label_classification", ignore_mismatched_sizes=True, **labels)
    try:
        processor = AutoImageProcessor.from_pretrained(backbone, backend="pil")
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):  # no preprocessor config: the usual ImageNet statistics
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return model, mean, std


def _check_input_size(model: torch.nn.Module, image_size: int, source: str) -> None:
    """Backbones with position embeddings (ViT) accept only the size they were built for: say so early."""
    fixed = getattr(model.config, "image_size", None)
    if isinstance(fixed, int) and fixed != image_size:
        raise ValueError(f"{source} expects {fixed} px inputs; set the AU detector's image_size to {fixed}")


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images (any mode, any size) -> (N, 3, size, size) float32 RGB in [0, 1], bilinear resize."""
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(out).permute(0, 3, 1, 2).div_(255.0)


# ---------------------------------------------------------------------------------------------------------------
# The detector.


class AUDetector:
    """A trained AU detector: PIL face crops in, per-AU sigmoid probabilities over `au_names` out."""

    def __init__(self, model: torch.nn.Module, au_names: Sequence[str], image_size: int, threshold: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 settings: AUDetectorSettings | None = None, metrics: dict | None = None, source: str = "",
                 device: str = "cpu") -> None:
        self.au_names = tuple(au_names)
        self.image_size = int(image_size)
        self.threshold = float(threshold)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.settings, self.metrics, self.source = settings, metrics or {}, source
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the backbone's input statistics."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] -> (N, len(au_names)) logits (gradients kept: used by training)."""
        return self.model(pixel_values=self.normalise(x.to(self.device))).logits

    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """(N, len(au_names)) float32 sigmoid probabilities, one row per image, columns in `au_names` order."""
        chunks = [np.zeros((0, len(self.au_names)), dtype=np.float32)]
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = images_to_tensor(images[start:start + batch_size], self.image_size)
                chunks.append(torch.sigmoid(self.logits(x)).float().cpu().numpy())
        return np.concatenate(chunks)

    def predict(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """(N, len(au_names)) uint8 0/1: probability at or above `threshold`."""
        return (self.predict_proba(images, batch_size) >= self.threshold).astype(np.uint8)

    def describe(self) -> dict:
        """JSON-serialisable facts for lineage: source, backbone, AU list, input size, threshold, held-out metrics."""
        return {"role": "au_detector", "source": self.source, "model_type": self.model.config.model_type,
                "au_names": list(self.au_names), "image_size": self.image_size, "threshold": self.threshold,
                "mean": list(self.mean), "std": list(self.std),
                "settings": asdict(self.settings) if self.settings else None,
                "macro_f1": self.metrics.get("macro_f1"), "n_train": self.metrics.get("n_train")}

    def save(self, folder: str | Path) -> Path:
        """Write the transformers folder (config.json + model.safetensors) and `synfer_au_detector.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        meta = {"au_names": list(self.au_names), "image_size": self.image_size, "threshold": self.threshold,
                "mean": list(self.mean), "std": list(self.std),
                "settings": asdict(self.settings) if self.settings else None, "metrics": self.metrics}
        (folder / DETECTOR_JSON).write_text(json.dumps(meta, indent=2))
        return folder

    @staticmethod
    def version(folder: str | Path) -> str:
        """Content version of a folder written by `save`: its weights and what turns them into AU calls (AU list,
        input size, threshold, normalisation, architecture); training time and metrics do not enter it."""
        folder = Path(folder)
        meta = json.loads((folder / DETECTOR_JSON).read_text())
        config = json.loads((folder / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
        calls = {k: meta[k] for k in ("au_names", "image_size", "threshold", "mean", "std")}
        return data_version_of([weights_version(folder), json.dumps(calls, sort_keys=True), json.dumps(config, sort_keys=True)])

    @classmethod
    def load(cls, path_or_id: str | Path, device: str = "cpu") -> AUDetector:
        """Load a folder (or hub repo) written by `save`. The model's id2label must equal the json's AU list."""
        meta_file = cached_file(str(path_or_id), DETECTOR_JSON)
        meta = json.loads(Path(meta_file).read_text())
        model = AutoModelForImageClassification.from_pretrained(str(path_or_id))
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if labels != list(meta["au_names"]):
            raise ValueError(f"{meta_file}: AU list {meta['au_names']} does not match the checkpoint's id2label "
                             f"{labels} (config.json in {path_or_id})")
        settings = AUDetectorSettings(**meta["settings"]) if meta.get("settings") else None
        return cls(model, meta["au_names"], meta["image_size"], meta["threshold"], meta["mean"], meta["std"],
                   settings, meta.get("metrics"), source=str(path_or_id), device=device)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation: a mirrored face shows its left AUs on the right.


def mirrored_au_index(au_names: Sequence[str]) -> np.ndarray:
    """Index `m` with `targets[:, m]` = the targets of the mirrored image: AUL<n> <-> AUR<n>, others unchanged.

    A side without its partner in the list stays where it is (its truth is then unknown after a flip, but such
    lists do not occur with OpenGraphAU's pairs).
    """
    position = {a: i for i, a in enumerate(au_names)}
    out = np.arange(len(au_names))
    for i, name in enumerate(au_names):
        match = re.fullmatch(r"AU([LR])(\d+)", name)
        if match:
            partner = f"AU{'R' if match.group(1) == 'L' else 'L'}{match.group(2)}"
            out[i] = position.get(partner, i)
    return out


def horizontal_flip(x: torch.Tensor, targets: torch.Tensor, mirror: torch.Tensor, which: torch.Tensor) -> tuple:
    """Mirror the images selected by the bool mask `which` (N,) left-right and swap their L/R AU columns.

    x: (N, C, H, W); targets: (N, A); mirror: (A,) long from `mirrored_au_index`. Returns new tensors.
    """
    which_x = which.view(-1, 1, 1, 1)
    x = torch.where(which_x, x.flip(-1), x)
    targets = torch.where(which.view(-1, 1), targets[:, mirror], targets)
    return x, targets


def augment_batch(x: torch.Tensor, targets: torch.Tensor, mirror: torch.Tensor, gen: torch.Generator) -> tuple:
    """Random mirror (half the images), scale 0.9-1.1 and shift +-5% (border padding), brightness/contrast/colour
    jitter of about 10%. x: (N, 3, S, S) in [0, 1]; returns (x, targets) of the same shapes, x clamped to [0, 1]."""
    n = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    x, targets = horizontal_flip(x, targets, mirror, torch.rand(n, generator=gen) < 0.5)
    scale, shift = uniform(0.9, 1.1), uniform(-0.05, 0.05, 2)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / scale, 1 / scale, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - grey) * uniform(0.9, 1.1, 1, 1, 1) + grey + uniform(-0.1, 0.1, 1, 1, 1)
    return (x * uniform(0.93, 1.07, 3, 1, 1)).clamp_(0.0, 1.0), targets


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


def per_au_f1(y_true: np.ndarray, y_pred: np.ndarray, au_names: Sequence[str]) -> dict[str, dict]:
    """Per-AU {"f1", "precision", "recall", "support"} of 0/1 predictions against 0/1 truth, both (N, A).

    support = positives in the truth. precision is None with no predicted positive, recall None with no support;
    f1 is None only when there is neither (nothing to find, nothing claimed), 0.0 when one side is empty.
    """
    y_true, y_pred = np.asarray(y_true) > 0.5, np.asarray(y_pred) > 0.5
    if y_true.shape != y_pred.shape or y_true.shape[1:] != (len(au_names),):
        raise ValueError(f"truth {y_true.shape} and predictions {y_pred.shape} must both be (N, {len(au_names)})")
    tp = (y_true & y_pred).sum(axis=0)
    support, claimed = y_true.sum(axis=0), y_pred.sum(axis=0)
    out = {}
    for j, name in enumerate(au_names):
        precision = float(tp[j] / claimed[j]) if claimed[j] else None
        recall = float(tp[j] / support[j]) if support[j] else None
        f1 = None if not (claimed[j] or support[j]) else float(2 * tp[j] / (claimed[j] + support[j]))
        out[name] = {"f1": f1, "precision": precision, "recall": recall, "support": int(support[j])}
    return out


def macro_f1(stats: dict[str, dict]) -> float | None:
    """Mean F1 over the AUs with support in the truth (None when none has any)."""
    scores = [s["f1"] for s in stats.values() if s["support"] > 0]
    return float(np.mean(scores)) if scores else None


# ---------------------------------------------------------------------------------------------------------------
# Training.


def holdout_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """(N,) bool, True for held-out keys: a stable hash of each key alone, so neither order nor seed moves it."""
    buckets = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "big") / 2**64 for k in keys]
    return np.asarray(buckets) < fraction


def _pos_weight(targets: torch.Tensor, enabled: bool) -> torch.Tensor | None:
    """negatives/positives per AU, capped at 10 (1 for AUs without positives); None when disabled."""
    if not enabled:
        return None
    positives = targets.sum(dim=0)
    ratio = (targets.shape[0] - positives) / positives.clamp(min=1)
    return torch.where(positives > 0, ratio.clamp(max=10.0), torch.ones_like(ratio))


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN picks convolution algorithms by timing, and some sum in varying order: fix both while training."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def _fit(detector: AUDetector, x: torch.Tensor, y: torch.Tensor, settings: AUDetectorSettings) -> list[float]:
    """AdamW on BCE-with-logits over (x, y) for `settings.epochs`; returns the mean train loss per epoch."""
    gen = torch.Generator().manual_seed(settings.seed)
    mirror = torch.from_numpy(mirrored_au_index(detector.au_names))
    pos_weight = _pos_weight(y, settings.pos_weight)
    pos_weight = None if pos_weight is None else pos_weight.to(detector.device)
    optimiser = torch.optim.AdamW(detector.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(x) // settings.batch_size)
    # Cosine decay to zero: the last epochs refine rather than bounce, which steadies the held-out F1.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    curve = []
    detector.model.train()
    for _ in range(settings.epochs):
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for start in range(0, len(x), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            xb, yb = x[idx], y[idx]
            if settings.augment:
                xb, yb = augment_batch(xb, yb, mirror, gen)
            loss = F.binary_cross_entropy_with_logits(detector.logits(xb), yb.to(detector.device),
                                                      pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        curve.append(total / len(x))
    detector.model.eval()
    return curve


def train_au_detector(images: Sequence[Image.Image], targets: np.ndarray, keys: Sequence[str],
                      au_names: Sequence[str] = OPENGRAPHAU_41,
                      settings: AUDetectorSettings = AUDetectorSettings()) -> tuple[AUDetector, dict]:
    """Train a detector on AU-labelled face crops and score it on a held-out split.

    images: N PIL face crops; targets: (N, len(au_names)) 0/1; keys: N stable sample ids (they choose the held-out
    split, a `settings.holdout` share, and the training order, so input order does not matter).
    Same seed, data, device and thread count -> same weights (float sums change with the thread count).
    Returns (detector, metrics) with metrics: per_au_f1 {AU: F1 or None}, per_au_support {AU: held-out positives},
    per_au (f1/precision/recall/support), macro_f1 (over AUs with support; None without a held-out split),
    n_train, n_holdout, loss_curve (mean train loss per epoch), threshold, seconds.
    """
    started = time.perf_counter()
    targets = np.asarray(targets, dtype=np.float32)
    if not (len(images) == len(keys) == len(targets)) or targets.shape[1:] != (len(au_names),):
        raise ValueError(f"need N images, N keys and (N, {len(au_names)}) targets; got {len(images)}, {len(keys)}, "
                         f"{targets.shape}")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique: they decide the held-out split")
    held = holdout_mask(keys, settings.holdout)
    train_idx = sorted(np.flatnonzero(~held), key=lambda i: keys[i])  # canonical order: input order is irrelevant
    hold_idx = sorted(np.flatnonzero(held), key=lambda i: keys[i])
    if not train_idx:
        raise ValueError("no training samples left after the held-out split")
    # The seed fixes the head's init and any dropout; fork_rng leaves the caller's global RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model, mean, std = build_au_model(settings.backbone, au_names)
        _check_input_size(model, settings.image_size, settings.backbone)
        detector = AUDetector(model, au_names, settings.image_size, settings.threshold, mean, std, settings,
                              source=f"trained:{settings.backbone}", device=settings.device)
        x = images_to_tensor([images[i] for i in train_idx], settings.image_size)
        with _deterministic_cudnn():
            curve = _fit(detector, x, torch.from_numpy(targets[train_idx]), settings)
    metrics = {"n_train": len(train_idx), "n_holdout": len(hold_idx), "loss_curve": curve, "macro_f1": None,
               "per_au_f1": {}, "per_au_support": {}, "per_au": {}, "threshold": settings.threshold}
    if hold_idx:
        stats = per_au_f1(targets[hold_idx], detector.predict([images[i] for i in hold_idx]), au_names)
        metrics.update(per_au=stats, per_au_f1={a: s["f1"] for a, s in stats.items()},
                       per_au_support={a: s["support"] for a, s in stats.items()}, macro_f1=macro_f1(stats))
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    detector.metrics = metrics
    return detector, metrics
