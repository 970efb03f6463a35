"""Generation rounds: what shard k of round r holds, and how it is drawn.

A round is a set of synthetic images generated from one stage-2 checkpoint and AU adapter; it is cut into a fixed
number of shards so that each shard is one independent unit of work (a Dagster partition "round r, shard k"). Every
image's identity is (round, shard, index): its seed, label, AUs and prompt derive from it, so regenerating a shard
reproduces it bit for bit on the same hardware. A round holds `multiple` x the real labelled training set by
default (the paper's 5x), with labels drawn uniformly over the classes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from synfer_pipeline.generation.conditions import Condition, LLMPrompts, TemplatePrompts, make_conditions, seed_of
from synfer_pipeline.generation.guidance import GuidanceSettings
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS_7

SHARD_NAME = "synthetic"


@settings
class PromptSettings:
    """kind: `template` (the template captioner's FEText-style paragraph from label and AUs) or `llm` (a text LLM,
    `id` a hub id or folder, enriches a coarse description); seed: the template's phrasing seed."""

    kind: Literal["template", "llm"] = "template"
    id: str | None = None
    max_new_tokens: int = 120
    seed: int = 0

    def __post_init__(self):
        if self.kind == "llm" and not self.id:
            raise ValueError("prompts of kind 'llm' need the model's id (a hub id or a local folder)")


@settings
class RoundSettings:
    """images: images per round (None: `multiple` x the real labelled training set); shards: shards per round (the
    static partition dimension); cron / start: a new round per cron tick from `start` (the time dimension; the
    schedule's cron); steps, cfg_scale, scheduler DDIM from the model's config; guidance: semantic guidance (its
    `scale` 0 turns it off); layout_init: start from a DDIM-inverted random FEText image (paper, optional);
    batch_size: images per sampler call; prompts: how prompts are written."""

    images: int | None = None
    multiple: float = 5.0
    shards: int = 8
    cron: str = "0 3 * * 1"
    start: str = "2026-01-05"
    timezone: str = "UTC"
    steps: int = 50
    cfg_scale: float = 7.5
    guidance: GuidanceSettings = GuidanceSettings()
    layout_init: bool = False
    batch_size: int = 16
    prompts: PromptSettings = PromptSettings()

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError("shards must be at least 1")
        if self.guidance.last_steps > self.steps:
            raise ValueError(f"guidance.last_steps {self.guidance.last_steps} exceeds the {self.steps} steps")


def round_size(cfg: RoundSettings, labelled_train: int) -> int:
    """Images in a round: `cfg.images`, or `cfg.multiple` x the labelled training set."""
    if cfg.images is not None:
        return int(cfg.images)
    if labelled_train <= 0:
        raise ValueError("a round's size defaults to a multiple of the real labelled training set, which is empty; "
                         "set generation.images")
    return int(math.ceil(cfg.multiple * labelled_train))


def shard_range(total: int, shards: int, shard: int) -> range:
    """The global image indices of `shard` when `total` images are cut into `shards` nearly equal shards."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    per = math.ceil(total / shards)
    return range(min(total, shard * per), min(total, (shard + 1) * per))


def sample_key(round_key: str, shard: int, index: int) -> str:
    """The WebDataset key of an image: no dots (webdataset splits keys from extensions on the first dot)."""
    return f"r{round_key}-s{shard:05d}-{index:06d}".replace(".", "_")


def make_prompter(cfg: PromptSettings, device: str = "cpu"):
    if cfg.kind == "llm":
        return LLMPrompts.from_pretrained(cfg.id, device=device, max_new_tokens=cfg.max_new_tokens)
    return TemplatePrompts(cfg.seed)


def shard_conditions(round_key: str, shard: int, indices: Sequence[int], au_names: Sequence[str], prompter,
                     classes: Sequence[str] = EXPRESSIONS_7) -> list[Condition]:
    """The conditions of a shard's images: seeds from (round, shard, index), labels uniform, AUs a random non-empty
    subset of the label's set, prompts from `prompter`."""
    seeds = [seed_of("synthetic", round_key, shard, i) for i in indices]
    keys = [sample_key(round_key, shard, i) for i in indices]
    return make_conditions(seeds, keys, au_names, prompter, classes)


@dataclass
class ShardImages:
    images: torch.Tensor          # (N, 3, H, W) in [-1, 1]
    text_shift: torch.Tensor      # (N,) how far guidance moved each text embedding
    layout_sources: list[str]     # the FEText key each image's layout came from ("" without layout init)
    seconds: float


def generate_images(sampler, conditions: Sequence[Condition], cfg: RoundSettings, guide=None,
                    layout: Callable[[int], tuple[str, torch.Tensor]] | None = None,
                    progress: Callable[[int, int], None] = lambda done, total: None) -> ShardImages:
    """Images for `conditions` in batches of `cfg.batch_size`; with `guide`, semantic guidance by `cfg.guidance`;
    with `layout` (seed -> (FEText key, (3, H, W) image)), DDIM-inverted starting latents."""
    started = time.perf_counter()
    images, shifts, sources = [], [], []
    for start in range(0, len(conditions), cfg.batch_size):
        chunk = conditions[start:start + cfg.batch_size]
        au = torch.tensor([c.au_vector for c in chunk]) if sampler.n_aus is not None else None
        latents = None
        if cfg.layout_init and layout is not None:
            picked = [layout(c.seed) for c in chunk]
            sources += [key for key, _ in picked]
            latents = sampler.invert(torch.stack([im for _, im in picked]), num_inference_steps=cfg.steps)
        else:
            sources += [""] * len(chunk)
        out = sampler([c.prompt for c in chunk], [c.seed for c in chunk], au=au, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.cfg_scale, guide=guide, targets=torch.tensor([c.label_index for c in chunk]),
                      guidance=cfg.guidance, latents=latents)
        images.append(out.images.cpu())
        shifts.append(out.text_shift.cpu())
        progress(min(start + cfg.batch_size, len(conditions)), len(conditions))
    return ShardImages(torch.cat(images), torch.cat(shifts), sources, time.perf_counter() - started)


def sample_json(condition: Condition, au_names: Sequence[str], cfg: RoundSettings, round_key: str, shard: int,
                index: int, models: dict, guide_id: str, guided: bool, text_shift: float, layout_source: str) -> dict:
    """The JSON beside each image: the same keys and types for every sample (so `datasets` infers one schema)."""
    g = cfg.guidance
    return {
        "label": condition.label, "label_index": condition.label_index, "aus": list(condition.aus),
        "au_names": list(au_names), "au_vector": list(condition.au_vector), "prompt": condition.prompt,
        "seed": str(condition.seed), "round": round_key, "shard": shard, "index": index,
        "guidance": {"scale": float(g.scale if guided else 0.0), "last_steps": int(g.last_steps if guided else 0),
                     "form": g.form, "decoder": g.decoder},
        "cfg_scale": float(cfg.cfg_scale), "steps": int(cfg.steps), "guide": guide_id if guided else "",
        "text_shift": round(float(text_shift), 6), "layout_source": layout_source, "models": models,
    }


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounding as the PNGs store them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def models_record(stage2, adapter, fetext, captions: dict) -> dict:
    """The versions a sample came from: stage-2 checkpoint, adapter, FEText and the captions behind it."""
    return {"diffusion_stage2": stage2.data_version, "au_adapter": adapter.data_version,
            "fetext": fetext.data_version, "captions": json.loads(json.dumps(captions, sort_keys=True))}
