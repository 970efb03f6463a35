"""FER classifiers the pipeline trains on real labelled faces: a transformers ResNet or ViT, from scratch (a config)
or from a hub checkpoint, with no torchvision and no timm. The same recipe serves the guide, the judge, the voters
and the downstream evaluation (ResNet-18 depth for the paper profile).

Training sees augmented faces (mirror, small shift and scale, brightness, contrast and colour jitter, blur, noise):
the judge and the guide read generated images, which are softer and noisier than the real ones, and a classifier
trained on clean crops alone mistakes that for an expression. A trained classifier is saved as a transformers folder
(config.json with id2label + model.safetensors) plus `synfer_fer.json` (class order, input size, normalisation,
settings, metrics) and loaded back with `load_trained`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetConfig, ViTConfig

from synfer_pipeline.fer.role import FERClassifier
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS_7

FER_JSON = "synfer_fer.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@settings
class FERTrainSettings:
    """architecture: `resnet` or `vit` built from config (the sizes below), or `pretrained`: a hub id / folder of an
    image classifier whose head is replaced. resnet_depths/resnet_widths: ResNet stages (ResNet-18: [2, 2, 2, 2],
    [64, 128, 256, 512]); vit_*: ViT width, depth, heads and patch. image_size: input side (px).
    epochs, batch_size, lr, weight_decay: AdamW with warm-up and cosine decay; label_smoothing; augment; seed."""

    architecture: Literal["resnet", "vit"] = "resnet"
    pretrained: str | None = None
    image_size: int = 64
    resnet_depths: tuple[int, ...] = (1, 1, 1, 1)
    resnet_widths: tuple[int, ...] = (16, 32, 64, 128)
    resnet_embedding: int = 16
    vit_width: int = 64
    vit_depth: int = 4
    vit_heads: int = 4
    vit_patch: int = 8
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: bool = True
    seed: int = 0
    device: str = "cpu"


def build_network(cfg: FERTrainSettings, classes: Sequence[str]) -> tuple[torch.nn.Module, tuple, tuple]:
    """A fresh classifier over `classes` and the (mean, std) its inputs are normalised with."""
    labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    if cfg.pretrained:  # a hub id or folder: its head is replaced by one over `classes`, its statistics kept
        model = AutoModelForImageClassification.from_pretrained(cfg.pretrained, ignore_mismatched_sizes=True, **labels)
        native = getattr(model.config, "image_size", None)
        if isinstance(native, int) and native != cfg.image_size and model.config.model_type == "vit":
            raise ValueError(f"{cfg.pretrained} is a ViT for {native} px inputs; set image_size: {native}")
        try:
            processor = AutoImageProcessor.from_pretrained(cfg.pretrained)
            return model, tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, AttributeError, TypeError):  # no (usable) image processor saved with it
            return model, IMAGENET_MEAN, IMAGENET_STD
    if cfg.architecture == "resnet":
        config = ResNetConfig(embedding_size=cfg.resnet_embedding, hidden_sizes=list(cfg.resnet_widths),
                              depths=list(cfg.resnet_depths), layer_type="basic", **labels)
    else:
        config = ViTConfig(image_size=cfg.image_size, patch_size=cfg.vit_patch, hidden_size=cfg.vit_width,
                           num_hidden_layers=cfg.vit_depth, num_attention_heads=cfg.vit_heads,
                           intermediate_size=4 * cfg.vit_width, hidden_dropout_prob=0.1, **labels)
    return AutoModelForImageClassification.from_config(config), IMAGENET_MEAN, IMAGENET_STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> a randomly mirrored, shifted/scaled, jittered, blurred and noised copy."""
    n = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    x = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
    scale, shift = uniform(0.9, 1.1), uniform(-0.06, 0.06, 2)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / scale, 1 / scale, shift
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.75, 1.25, 1, 1, 1) + mean + uniform(-0.2, 0.2, 1, 1, 1)
    x = x * uniform(0.9, 1.1, 3, 1, 1)
    sigma = uniform(0.0, 1.5)  # blur: a 5-tap Gaussian per image
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    blurred = _separable_blur(x, kernel)
    x = torch.where((sigma > 0.3).view(-1, 1, 1, 1), blurred, x)
    x = x + uniform(0.0, 0.08, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def _separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    k = kernel.repeat_interleave(c, 0)  # (n*c, 5)
    y = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (2, 2, 0, 0), mode="replicate"), k.view(n * c, 1, 1, 5), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k.view(n * c, 1, 5, 1), groups=n * c)
    return y.view(n, c, h, w)


def images_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8 (PIL bilinear): a quarter of the memory of the float tensor."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1]."""
    return x.float().div(127.5).sub(1)


def images_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float in [-1, 1]."""
    return to_unit(images_uint8(images, size))


def train_fer_classifier(images: Sequence[Image.Image], labels: Sequence[str], cfg: FERTrainSettings, name: str = "",
                         progress: Callable[[int, int, float], None] = lambda epoch, epochs, loss: None,
                         ) -> tuple[FERClassifier, dict]:
    """Train a classifier on PIL face crops with canonical labels; returns (classifier, {loss_curve, seconds, n})."""
    started = time.perf_counter()
    classes = [c for c in EXPRESSIONS_7 if c in set(labels)] if set(labels) - set(EXPRESSIONS_7) else list(EXPRESSIONS_7)
    classes += sorted(set(labels) - set(classes))
    index = {c: i for i, c in enumerate(classes)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        network, mean, std = build_network(cfg, classes)
        clf = FERClassifier(network, classes, cfg.image_size, mean, std, name=name,
                            info={"kind": "trained", "architecture": cfg.pretrained or cfg.architecture})
        clf.to(cfg.device)
        x_all = images_uint8(images, cfg.image_size)  # batches become float as they are drawn
        y_all = torch.tensor([index[label] for label in labels])
        steps_per_epoch = max(1, math.ceil(len(x_all) / cfg.batch_size))
        total = cfg.epochs * steps_per_epoch
        optimiser = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, total // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        gen = torch.Generator().manual_seed(cfg.seed)
        curve = []
        clf.train()
        for epoch in range(cfg.epochs):
            order, running = torch.randperm(len(x_all), generator=gen), 0.0
            for start in range(0, len(x_all), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                xb = to_unit(x_all[idx])
                xb = augment(xb, gen) if cfg.augment else xb
                logits = clf.model_logits(clf.preprocess(xb.to(cfg.device)))
                loss = F.cross_entropy(logits, y_all[idx].to(cfg.device), label_smoothing=cfg.label_smoothing)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                running += loss.item() * len(idx)
            curve.append(running / len(x_all))
            progress(epoch + 1, cfg.epochs, curve[-1])
        clf.eval()
    return clf, {"loss_curve": curve, "seconds": round(time.perf_counter() - started, 1), "n_train": len(x_all)}


def save_trained(clf: FERClassifier, folder: str | Path, settings_used: FERTrainSettings | None = None,
                 metrics: dict | None = None) -> Path:
    """Write the transformers folder and `synfer_fer.json` for a classifier with a transformers network."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clf.network.save_pretrained(folder, safe_serialization=True)
    meta = {"class_names": list(clf.class_names), "input_size": clf.input_size, "grayscale": clf.grayscale,
            "mean": clf.mean.flatten().tolist(), "std": clf.std.flatten().tolist(), "name": clf.name,
            "settings": None if settings_used is None else json.loads(json.dumps(
                {k: getattr(settings_used, k) for k in settings_used.__dataclass_fields__}, default=list)),
            "metrics": metrics or {}, "info": clf.info}
    (folder / FER_JSON).write_text(json.dumps(meta, indent=2))
    return folder


def load_trained(folder: str | Path, name: str | None = None, device: str = "cpu") -> FERClassifier:
    """A classifier saved by `save_trained` (weights read as safetensors)."""
    folder = Path(folder)
    meta_file = folder / FER_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} has no {FER_JSON}: not a FER classifier saved by the pipeline")
    meta = json.loads(meta_file.read_text())
    network = AutoModelForImageClassification.from_pretrained(str(folder), use_safetensors=True)
    labels = [network.config.id2label[i] for i in range(network.config.num_labels)]
    if labels != meta["class_names"]:
        raise ValueError(f"{meta_file}: class order {meta['class_names']} differs from config.json's id2label {labels}")
    clf = FERClassifier(network, meta["class_names"], meta["input_size"], meta["mean"], meta["std"],
                        meta.get("grayscale", False), name or meta.get("name", ""),
                        {**meta.get("info", {}), "source": str(folder), "metrics": meta.get("metrics", {})})
    return clf.to(device).eval()
