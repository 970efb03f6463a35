"""FERAnno: a FER classifier that reads the diffusion UNet (paper Sec. 4.3).

An image is encoded to its latent, noised to a small timestep (t = 1) and passed once through the frozen stage-2
UNet with a text conditioning. Two kinds of evidence are collected on the way (`UNetProbe`):

- the multi-scale feature maps: the output of every down block, the mid block and every up block;
- the cross-attention maps of every cross-attention layer (`labels.attention.CrossAttentionRecorder`, which leaves
  the UNet's output untouched): per text token, where the image attended.

Both are pooled to a common grid as they are recorded (average pooling, which commutes with the head's first 1x1
projection), so a probe pass keeps small tensors and the training set's features can be cached: the UNet is frozen
and the probe deterministic (a fixed noise draw), so every epoch would see the same features anyway.
`FERAnnoHead` encodes the two in two branches (per-level 1x1 projections summed, and a 1x1 projection of the
stacked attention maps), fuses them with bidirectional cross-attention (features attend to attention tokens and
attention tokens to features), pools both and classifies with a linear head.

Conditioning. `fixed` (default) conditions every image on one expression-free prompt. `caption` conditions each
image on its own caption / prompt, as the paper describes; for synthetic images that prompt is written from the
*intended* label, so FERAnno then reads the label voting is meant to check from the text, and its vote leans
towards the intended class. `fixed` keeps its evidence in the pixels.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from synfer_pipeline.fer.training import images_tensor
from synfer_pipeline.generation.au_adapter import base_unet_sha256
from synfer_pipeline.labels.attention import CrossAttentionRecorder
from synfer_pipeline.settings import plain, settings
from synfer_pipeline.vocab import EXPRESSIONS, EXPRESSIONS_7

HEAD_FILE, META_FILE = "feranno_head.safetensors", "feranno.json"


@settings
class FERAnnoSettings:
    """timestep: the noise level the image is probed at (paper: 1); conditioning: `fixed` (one expression-free
    `prompt` for every image) or `caption` (each image's own caption / prompt); grid: the side every feature and
    attention map is pooled to; width / heads / dropout: the fusion head; epochs, batch_size, lr, weight_decay,
    label_smoothing: AdamW with cosine decay on the head only; mirror: also train on mirrored faces;
    probe_batch_size: images per UNet pass; seed: the probe's noise draw and the head's initialisation."""

    timestep: int = 1
    conditioning: Literal["fixed", "caption"] = "fixed"
    prompt: str = "a photo of a face"
    grid: int = 8
    width: int = 64
    heads: int = 4
    dropout: float = 0.1
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mirror: bool = True
    probe_batch_size: int = 32
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.timestep < 0:
            raise ValueError("timestep must be >= 0")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass
class ProbeFeatures:
    """features: (N, sum(channels), g, g) the pooled block outputs, stacked; channels: each block's share;
    attention: (N, layers x tokens, g, g) the pooled cross-attention maps, stacked layer by layer."""

    features: torch.Tensor
    channels: list[int]
    attention: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, index) -> ProbeFeatures:
        return ProbeFeatures(self.features[index], self.channels, self.attention[index])

    @staticmethod
    def cat(parts: Sequence[ProbeFeatures]) -> ProbeFeatures:
        return ProbeFeatures(torch.cat([p.features for p in parts]), parts[0].channels,
                             torch.cat([p.attention for p in parts]))


class UNetProbe:
    """The frozen UNet of a `SynferSampler` (no adapter), probed at one timestep.

    `features(images, prompts)` -> `ProbeFeatures` for (N, 3, H, W) images in [-1, 1]. The noise added to the
    latent is one fixed draw (`seed`), so a probe is deterministic and independent of how images are batched.
    """

    def __init__(self, sampler, timestep: int = 1, grid: int = 8, seed: int = 0):
        if sampler.n_aus is not None:
            raise ValueError("FERAnno probes the stage-2 UNet without the AU adapter")
        self.sampler, self.timestep, self.grid, self.seed = sampler, int(timestep), int(grid), int(seed)
        self._noise: torch.Tensor | None = None

    @property
    def resolution(self) -> int:
        return self.sampler.resolution

    def unet_sha256(self) -> str:
        return base_unet_sha256(self.sampler.unet)

    def _noise_like(self, latents: torch.Tensor) -> torch.Tensor:
        if self._noise is None or self._noise.shape != latents.shape[1:]:
            gen = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn(tuple(latents.shape[1:]), generator=gen)
        return self._noise.to(latents.device, latents.dtype).expand_as(latents)

    @torch.no_grad()
    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> ProbeFeatures:
        s = self.sampler
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        dtype = next(s.unet.parameters()).dtype
        x = images.to(s.device, dtype)
        latents = s.vae.encode(x).latent_dist.mean * s.vae.config.scaling_factor
        t = torch.tensor([self.timestep], device=s.device)
        noisy = s.scheduler.add_noise(latents, self._noise_like(latents), t) if self.timestep > 0 else latents
        text = s.encode_prompts(list(prompts))
        blocks: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            blocks.append(F.adaptive_avg_pool2d(out.float(), self.grid))

        unet = s.unet
        hooks = [b.register_forward_hook(keep) for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
                 if b is not None]
        recorder = CrossAttentionRecorder(grid=self.grid).attach(unet)
        layers = list(recorder.layers)
        try:
            recorder.expect(noisy.shape[-2:])
            s.noise(noisy, t, text, None)
        finally:
            recorder.detach()
            for h in hooks:
                h.remove()
        attention = torch.cat([recorder.maps[name] for name in layers], dim=1)
        return ProbeFeatures(torch.cat(blocks, dim=1).cpu().contiguous(), [b.shape[1] for b in blocks],
                             attention.float().cpu().contiguous())

    def extract(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 32,
                progress: Callable[[int, int], None] = lambda done, total: None) -> ProbeFeatures:
        """`features` over many images in batches of `batch_size`."""
        parts = []
        for start in range(0, len(images), batch_size):
            parts.append(self.features(images[start:start + batch_size], prompts[start:start + batch_size]))
            progress(min(start + batch_size, len(images)), len(images))
        return ProbeFeatures.cat(parts)


class FERAnnoHead(nn.Module):
    """Two branches (UNet features, cross-attention maps) fused by bidirectional cross-attention, then linear."""

    def __init__(self, channels: Sequence[int], attention_channels: int, classes: int, grid: int = 8, width: int = 64,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.channels = list(channels)
        # Per-token projections (a 1x1 convolution written as a linear map over channels, much faster on CPU).
        self.feature_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.feature_in = nn.Linear(sum(channels), width)
        self.attention_in = nn.Sequential(nn.LayerNorm(attention_channels), nn.Linear(attention_channels, width))
        self.position_f = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.position_a = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.f_from_a = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.a_from_f = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_f, self.norm_a = nn.LayerNorm(width), nn.LayerNorm(width)
        self.classifier = nn.Sequential(nn.LayerNorm(2 * width), nn.Dropout(dropout), nn.Linear(2 * width, classes))

    def forward(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        tokens = features.flatten(2).transpose(1, 2)                          # (N, g*g, sum(channels))
        levels = tokens.split(self.channels, dim=-1)
        f = self.feature_in(torch.cat([norm(level) for norm, level in zip(self.feature_norms, levels)], dim=-1))
        f = F.gelu(f) + self.position_f                                       # (N, g*g, width)
        a = F.gelu(self.attention_in(attention.flatten(2).transpose(1, 2))) + self.position_a
        f2 = self.norm_f(f + self.f_from_a(f, a, a, need_weights=False)[0])  # features attend to attention tokens
        a2 = self.norm_a(a + self.a_from_f(a, f, f, need_weights=False)[0])  # and attention tokens to features
        return self.classifier(torch.cat([f2.mean(1), a2.mean(1)], dim=1))


class FERAnno:
    """A trained FERAnno: the probe and the head, with the class order it was trained on.

    Answers like a voter (`predict_proba` -> (N, 8) over `vocab.EXPRESSIONS`, `predict`); `prompts` are needed only
    with `caption` conditioning.
    """

    def __init__(self, probe: UNetProbe, head: FERAnnoHead, class_names: Sequence[str], cfg: FERAnnoSettings,
                 name: str = "feranno", info: dict | None = None):
        self.probe, self.head, self.class_names, self.cfg = probe, head.eval(), tuple(class_names), cfg
        self.name, self.info = name, dict(info or {})

    def prompts_for(self, n: int, prompts: Sequence[str] | None) -> list[str]:
        if self.cfg.conditioning == "fixed":
            return [self.cfg.prompt] * n
        if prompts is None or len(prompts) != n:
            raise ValueError(f"FERAnno with caption conditioning needs one prompt per image ({n})")
        return list(prompts)

    def images_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return images_tensor(images, self.probe.resolution)

    def probabilities(self, feats: ProbeFeatures, batch_size: int = 256) -> np.ndarray:
        """(N, 8) over `vocab.EXPRESSIONS` from probe features (classes it was not trained on: 0)."""
        device = self.cfg.device
        out = np.zeros((len(feats), len(EXPRESSIONS)), np.float32)
        columns = [EXPRESSIONS.index(c) for c in self.class_names]
        self.head.eval()
        with torch.no_grad():
            for start in range(0, len(feats), batch_size):
                part = feats.subset(slice(start, start + batch_size))
                logits = self.head(part.features.to(device), part.attention.to(device))
                out[start:start + len(part), columns] = torch.softmax(logits, 1).cpu().numpy()
        return out

    def predict_proba(self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str] | None = None,
                      ) -> np.ndarray:
        x = images if isinstance(images, torch.Tensor) else self.images_tensor(images)
        feats = self.probe.extract(x, self.prompts_for(len(x), prompts), self.cfg.probe_batch_size)
        return self.probabilities(feats)

    def predict(self, images, prompts: Sequence[str] | None = None) -> list[str]:
        return [EXPRESSIONS[i] for i in self.predict_proba(images, prompts).argmax(axis=1)]

    def save(self, folder: str | Path, metrics: dict | None = None) -> Path:
        """`feranno_head.safetensors` and `feranno.json` (classes, settings, shapes, the UNet it reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_FILE))
        meta = {"class_names": list(self.class_names), "settings": plain(self.cfg), "channels": self.head.channels,
                "attention_channels": self.head.attention_in[1].in_features, "unet_sha256": self.probe.unet_sha256(),
                "metrics": metrics or {}, "name": self.name}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=list))
        return folder

    @classmethod
    def load(cls, folder: str | Path, sampler, device: str = "cpu", check_unet: bool = True) -> FERAnno:
        """A head saved by `save`, on the UNet of `sampler` (which must be the one it was trained on)."""
        folder = Path(folder)
        if not (folder / META_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {META_FILE}: not a FERAnno saved by the pipeline")
        meta = json.loads((folder / META_FILE).read_text())
        cfg = FERAnnoSettings(**{**meta["settings"], "device": device})
        probe = UNetProbe(sampler, cfg.timestep, cfg.grid, cfg.seed)
        if check_unet and meta.get("unet_sha256") and meta["unet_sha256"] != probe.unet_sha256():
            raise ValueError(f"the FERAnno head in {folder} was trained on another UNet than the one given")
        head = FERAnnoHead(meta["channels"], meta["attention_channels"], len(meta["class_names"]), cfg.grid, cfg.width,
                           cfg.heads, cfg.dropout)
        head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return cls(probe, head.to(device), meta["class_names"], cfg, meta.get("name", "feranno"),
                   {"kind": "feranno", "source": str(folder), "metrics": meta.get("metrics", {})})


def train_feranno(sampler, images: Sequence[Image.Image], labels: Sequence[str], cfg: FERAnnoSettings,
                  prompts: Sequence[str] | None = None,
                  progress: Callable[[str, int, int, float], None] = lambda stage, done, total, loss: None,
                  ) -> tuple[FERAnno, dict]:
    """Train the head on labelled PIL faces (the UNet stays frozen); returns (FERAnno, {loss_curve, seconds, ...})."""
    started = time.perf_counter()
    unknown = sorted(set(labels) - set(EXPRESSIONS))
    if unknown:
        raise ValueError(f"FERAnno training labels {unknown} are not canonical expressions")
    classes = [c for c in EXPRESSIONS if c in set(labels)] if "contempt" in labels else list(EXPRESSIONS_7)
    index = {c: i for i, c in enumerate(classes)}
    probe = UNetProbe(sampler, cfg.timestep, cfg.grid, cfg.seed)
    holder = FERAnno(probe, FERAnnoHead([1], 1, 1), classes, cfg)  # for prompts_for / images_tensor only
    x = holder.images_tensor(images)
    texts = holder.prompts_for(len(x), prompts)
    y = torch.tensor([index[label] for label in labels])
    views = [x, x.flip(-1)] if cfg.mirror else [x]
    total_images = len(x) * len(views)
    parts = []
    for v, view in enumerate(views):
        parts.append(probe.extract(view, texts, cfg.probe_batch_size, lambda done, total, v=v: progress(
            "probe", v * len(x) + done, total_images, float("nan"))))
    feats = ProbeFeatures.cat(parts)
    targets = y.repeat(len(views))
    probe_seconds = time.perf_counter() - started
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = FERAnnoHead(feats.channels, feats.attention.shape[1], len(classes), cfg.grid, cfg.width, cfg.heads,
                           cfg.dropout).to(cfg.device)
        optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(len(feats) / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, steps))
        gen = torch.Generator().manual_seed(cfg.seed)
        curve = []
        head.train()
        for epoch in range(cfg.epochs):
            order, running = torch.randperm(len(feats), generator=gen), 0.0
            for start in range(0, len(feats), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                part = feats.subset(idx)
                logits = head(part.features.to(cfg.device), part.attention.to(cfg.device))
                loss = F.cross_entropy(logits, targets[idx].to(cfg.device), label_smoothing=cfg.label_smoothing)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                running += loss.item() * len(idx)
            curve.append(running / len(feats))
            progress("head", epoch + 1, cfg.epochs, curve[-1])
    model = FERAnno(probe, head.eval(), classes, cfg, info={"kind": "feranno"})
    return model, {"loss_curve": curve, "seconds": round(time.perf_counter() - started, 1),
                   "probe_seconds": round(probe_seconds, 1), "n_train": len(x),
                   "feature_channels": int(feats.features.shape[1]), "attention_channels": int(feats.attention.shape[1]),
                   "attention_layers": len([n for n in sampler.unet.attn_processors if n.endswith("attn2.processor")])}
