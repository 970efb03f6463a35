"""Generation quality as the paper's ablation measures it: does a classifier see the intended expression (FER acc),
and does the AU detector see the intended action units (AU acc), on a fixed evaluation batch.

The batch is N images per class with fixed seeds and prompts, the same for every checkpoint, so the rows of the
ablation (base, stage 1, stage 2, adapter, adapter + guidance) differ only by the model. The judge must not be the
classifier that guided the images (a circular metric); `check_judge` refuses it.

FER acc: the judge's accuracy against the intended labels. AU acc: over every (image, AU) of the intended label's
AU set (supplementary Table 3), the share where the detector's call (present or not) equals the intended one (the
sampled subset the adapter injects); neutral images have no AU set and do not count. Checkpoints without an adapter
get the same targets through their prompts only, which is what the AU row of the ablation measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from synfer_pipeline.fer.role import RoleError
from synfer_pipeline.generation.conditions import Condition, make_conditions, seed_of
from synfer_pipeline.generation.rounds import to_uint8
from synfer_pipeline.io.preview import grid_image
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7


@settings
class EvaluationBatchSettings:
    """per_class: images per class; steps: DDIM steps; cfg_scale: classifier-free guidance; seed: the batch's seed."""

    per_class: int = 10
    steps: int = 20
    cfg_scale: float = 7.5
    seed: int = 2024
    batch_size: int = 35


@dataclass
class QualityReport:
    """fer_acc, au_acc (None without AU targets), per-class FER acc, per-image predictions, grids per class (PIL)."""

    fer_acc: float
    au_acc: float | None
    per_class: dict[str, float]
    predicted: list[str]
    grids: dict[str, Image.Image] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self) -> dict:
        return {"fer_acc": round(self.fer_acc, 4), "au_acc": None if self.au_acc is None else round(self.au_acc, 4),
                **{f"acc_{c}": round(v, 3) for c, v in self.per_class.items()}}


def check_judge(judge, guide) -> None:
    """Refuse a judge that is the guide (the same object or the same weights)."""
    if guide is None or judge is None:
        return
    same = judge is guide or (judge.info.get("fingerprint") and judge.info.get("fingerprint") == guide.info.get("fingerprint"))
    if same:
        raise RoleError(f"the judge {judge.name!r} is the guide {guide.name!r}: it would judge the images it steered "
                        "(a circular metric that over-states FER accuracy); judge with another classifier")


def evaluation_conditions(cfg: EvaluationBatchSettings, au_names: Sequence[str], prompts,
                          classes: Sequence[str] = EXPRESSIONS_7, seed_parts: Sequence = ()) -> list[Condition]:
    """The fixed evaluation batch: `per_class` images of every class, seeds and prompts from `cfg.seed` (and
    `seed_parts`, e.g. a generation round: each round its own fixed batch) only."""
    labels = [c for c in classes for _ in range(cfg.per_class)]
    seeds = [seed_of("evaluation", cfg.seed, *seed_parts, c, i) for c in classes for i in range(cfg.per_class)]
    tag = "-".join(map(str, (cfg.seed, *seed_parts)))
    keys = [f"eval{tag}-{c}-{i}" for c in classes for i in range(cfg.per_class)]
    return make_conditions(seeds, keys, au_names, prompts, classes, labels=labels)


def generate(sampler, conditions: Sequence[Condition], cfg: EvaluationBatchSettings, guide=None, guidance=None,
             progress=lambda done, total: None) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] for the conditions, in batches of `cfg.batch_size`."""
    out = []
    for start in range(0, len(conditions), cfg.batch_size):
        chunk = conditions[start:start + cfg.batch_size]
        au = torch.tensor([c.au_vector for c in chunk]) if sampler.n_aus is not None else None
        targets = torch.tensor([c.label_index for c in chunk])
        result = sampler([c.prompt for c in chunk], [c.seed for c in chunk], au=au, num_inference_steps=cfg.steps,
                         guidance_scale=cfg.cfg_scale, guide=guide, targets=targets, guidance=guidance)
        out.append(result.images.cpu())
        progress(min(start + cfg.batch_size, len(conditions)), len(conditions))
    return torch.cat(out)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def au_accuracy(conditions: Sequence[Condition], detected: Sequence[Sequence[str]]) -> float | None:
    """Agreement of detected AUs with the intended ones over each image's label AU set (see module docstring)."""
    agree = total = 0
    for condition, found in zip(conditions, detected):
        pool = EXPRESSION_AUS.get(condition.label, ())
        for au in pool:
            agree += (au in condition.aus) == (au in set(found))
            total += 1
    return agree / total if total else None


def score(images: torch.Tensor, conditions: Sequence[Condition], judge, au_detector=None) -> QualityReport:
    """FER acc (the judge), AU acc (the detector) and per-class grids of generated images."""
    pil = to_pil(images)
    predicted = judge.predict(pil)
    labels = [c.label for c in conditions]
    fer_acc = float(np.mean([p == t for p, t in zip(predicted, labels)]))
    per_class = {c: float(np.mean([p == c for p, t in zip(predicted, labels) if t == c]))
                 for c in dict.fromkeys(labels)}
    au_acc = None
    if au_detector is not None:
        calls = au_detector.predict(pil)
        detected = [[a for a, v in zip(au_detector.au_names, row) if v] for row in calls]
        au_acc = au_accuracy(conditions, detected)
    grids = {c: grid_image([im for im, t in zip(pil, labels) if t == c],
                           [p for p, t in zip(predicted, labels) if t == c], thumb=64, columns=10)
             for c in dict.fromkeys(labels)}
    return QualityReport(fer_acc, au_acc, per_class, predicted, grids)
