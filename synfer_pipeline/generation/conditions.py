"""What each synthetic image is asked to show: its target label, its AUs, its prompt and its seed.

Labels are drawn uniformly over the classes; each image's AUs are a random non-empty subset of its label's AU set
(supplementary Table 3; neutral has none), so the text sets the global expression and the AUs the local movement.
The prompt is FEText-style: the template captioner's paragraph for the label and AUs by default, or a coarse
description enriched by a text LLM (`AutoModelForCausalLM` + chat template), as the paper does. Every draw comes
from a generator seeded by the image's own identity (e.g. round, shard, index), so regenerating reproduces it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from synfer_pipeline.curation.captions.template import TemplateCaptioner
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSION_INDEX, EXPRESSIONS_7, au_vector

COARSE = "a close-up photo of a face showing {article} {expression} expression{aus}"
ENRICH_INSTRUCTION = ("Rewrite this as a detailed description of the person's facial expression in one paragraph: "
                      "begin with the overall expression, then describe the eyes, nose, cheeks, mouth, eyebrows and "
                      "gaze. Description: {coarse}")


def seed_of(*parts) -> int:
    """A 63-bit seed from the parts' text (e.g. round, shard, index): the same parts, the same seed, anywhere."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True)
class Condition:
    """One image to generate: target label (canonical name), its AUs (names), AU vector in the configured order,
    prompt, and the seed of its starting noise."""

    label: str
    aus: tuple[str, ...]
    au_vector: tuple[float, ...]
    prompt: str
    seed: int

    @property
    def label_index(self) -> int:
        return EXPRESSION_INDEX[self.label]


def sample_label_and_aus(seed: int, classes: Sequence[str] = EXPRESSIONS_7) -> tuple[str, tuple[str, ...]]:
    """A uniform label and a uniformly chosen non-empty subset of its AU set (empty for neutral)."""
    rng = np.random.default_rng(seed)
    label = classes[int(rng.integers(len(classes)))]
    pool = EXPRESSION_AUS.get(label, ())
    if not pool:
        return label, ()
    mask = int(rng.integers(1, 2 ** len(pool)))  # 1 .. 2^n - 1: every non-empty subset equally likely
    return label, tuple(au for i, au in enumerate(pool) if mask >> i & 1)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


ADJECTIVE = {"anger": "angry", "fear": "fearful", "surprise": "surprised", "disgust": "disgusted", "sad": "sad",
             "happy": "happy", "neutral": "neutral", "contempt": "contemptuous"}


def coarse_description(label: str, aus: Sequence[str]) -> str:
    adjective = ADJECTIVE[label]
    listed = f", with {', '.join(aus)}" if aus else ""
    return COARSE.format(article=_article(adjective), expression=adjective, aus=listed)


class TemplatePrompts:
    """FEText-style prompts from the label and AUs by the template captioner (the demo's and the default)."""

    def __init__(self, seed: int = 0):
        self.captioner = TemplateCaptioner(seed)

    def __call__(self, labels: Sequence[str], aus: Sequence[Sequence[str]], keys: Sequence[str]) -> list[str]:
        return [self.captioner.caption(label, list(a), key=key) for label, a, key in zip(labels, aus, keys)]

    def describe(self) -> dict:
        return {"kind": "template", **self.captioner.describe()}


class LLMPrompts:
    """A text LLM enriches each coarse description into an FEText-style paragraph (greedy decoding: reproducible)."""

    def __init__(self, model, tokenizer, model_id: str, max_new_tokens: int = 120):
        self.model, self.tokenizer, self.model_id, self.max_new_tokens = model.eval(), tokenizer, model_id, max_new_tokens
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, model_id: str, device: str = "cpu", max_new_tokens: int = 120,
                        local_files_only: bool = False) -> LLMPrompts:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(model_id, local_files_only=local_files_only).to(device)
        return cls(model, tokenizer, model_id, max_new_tokens)

    def __call__(self, labels: Sequence[str], aus: Sequence[Sequence[str]], keys: Sequence[str]) -> list[str]:
        chats = [[{"role": "user", "content": ENRICH_INSTRUCTION.format(coarse=coarse_description(label, a))}]
                 for label, a in zip(labels, aus)]
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]

    def describe(self) -> dict:
        return {"kind": "llm", "model": self.model_id, "instruction": ENRICH_INSTRUCTION,
                "max_new_tokens": self.max_new_tokens}


def make_conditions(seeds: Sequence[int], keys: Sequence[str], au_names: Sequence[str], prompts,
                    classes: Sequence[str] = EXPRESSIONS_7, labels: Sequence[str] | None = None) -> list[Condition]:
    """One Condition per seed: label (drawn, unless `labels` fixes them) and AUs from the seed, the prompt from
    `prompts(labels, aus, keys)`, the AU vector over `au_names` (AUs the list does not hold are left out)."""
    drawn = [sample_label_and_aus(s, classes) for s in seeds]
    if labels is not None:
        drawn = [(label, sample_label_and_aus(s, [label])[1]) for s, label in zip(seeds, labels)]
    texts = prompts([label for label, _ in drawn], [a for _, a in drawn], list(keys))
    return [Condition(label, aus, tuple(float(v) for v in au_vector(aus, au_names, outside="drop")), text, int(s))
            for (label, aus), text, s in zip(drawn, texts, seeds)]
