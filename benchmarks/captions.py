"""Caption benchmarks: `python benchmarks/captions.py`.

Runs each part in `PARTS` and ends with one `name: value` line per part, in order, so a caller can read the
numbers from the last lines. Timings are on one CPU core (the process pins itself to one, torch to one thread)
and are the best of a few repeats, since the machine may be shared:
- batch_speedup: MLLM captions per CPU second at batch size 8 over one image at a time (tiny random LLaVA).
- validation_per_s: captions validated per second.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))  # the tiny checkpoint builders live with the tests

from tiny_models import save_tiny_llava  # noqa: E402

from synfer_pipeline.curation.captions import TemplateCaptioner, validate_captions  # noqa: E402
from synfer_pipeline.curation.captions.mllm import GenerationSettings, MLLMCaptioner  # noqa: E402
from synfer_pipeline.demo.toyfaces import draw_toy_face  # noqa: E402
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7  # noqa: E402

# FEText-like sentences that a multimodal LLM adds around the face description (supplementary Fig. 4 style).
_EXTRA_SENTENCES = (
    "The background of the image is blurred, but it appears to be a soft grey color that contrasts with the skin tone.",
    "The lighting is even and falls softly on the face, leaving no harsh shadows on the forehead or the chin.",
    "The head is turned slightly to one side, and the hair is pulled back behind the ears.",
    "Her lips are slightly parted as if she is about to speak, and her teeth are barely visible.",
    "There is no sign of tension in the jaw, and the skin around the eyes is smooth.",
)
_SUPPLEMENTARY_SAD = (
    "The man in the image is displaying a sad facial expression. His eyes are closed, and his nose is prominent. "
    "His cheeks are slightly puffed out, and his eyebrows are furrowed. The mouth is slightly open, and the lips are "
    "slightly parted. The gaze is directed downwards, and the overall expression conveys a sense of sadness or "
    "melancholy. He is neither angry nor afraid, and there is no trace of a smile on his face."
)


def realistic_captions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n FEText-like captions (~80 words: template descriptions plus background, lighting and negated asides)
    and their image labels; about a third assert a wrong expression, as unvalidated LLM captions do."""
    rng = random.Random(seed)
    captioner = TemplateCaptioner(seed)
    captions, labels = [], []
    for i in range(n):
        label = EXPRESSIONS_7[i % len(EXPRESSIONS_7)]
        asserted = label if rng.random() < 0.62 else rng.choice(EXPRESSIONS_7)
        if rng.random() < 0.1:
            caption = _SUPPLEMENTARY_SAD
        else:
            aus = rng.sample(EXPRESSION_AUS[asserted], rng.randint(0, len(EXPRESSION_AUS[asserted])))
            caption = captioner.caption(asserted, aus, rng.choice(["woman", "man", "person"]), key=str(i))
            caption += " " + " ".join(rng.sample(_EXTRA_SENTENCES, rng.randint(1, 2)))
        captions.append(caption)
        labels.append(label)
    return captions, labels


def _pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    # torch sized its thread pool for every core at import; threads sharing one core only wait on each other.
    torch.set_num_threads(1)


def bench_validation(n: int = 20000, repeats: int = 3) -> float:
    """Captions validated per second by `validate_captions` on one core (best of `repeats` passes over n captions)."""
    _pin_to_one_core()
    captions, labels = realistic_captions(n)
    words = sum(len(c.split()) for c in captions) / n
    validate_captions(captions[:500], labels[:500])  # warm up regex caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        verdicts = validate_captions(captions, labels)
        best = min(best, time.perf_counter() - start)
    kept = sum(v.ok for v in verdicts) / n
    print(f"# validation: {n} captions, {words:.1f} words on average, {kept:.1%} accepted", flush=True)
    return n / best


def _best_captions_per_s(captioners: dict[int, MLLMCaptioner], images: list, repeats: int) -> dict[int, dict]:
    """Per batch size: best captions per CPU second and per wall second over `repeats` passes, and the captions.

    CPU time (`process_time`) is the figure of merit: pinned to one core with one thread it equals wall time on an
    idle machine, and it does not count the time other processes hold the shared core, which made the best-of-3
    wall-clock ratio range from 3.3 to 6.3 between runs here. The passes of the batch sizes alternate, so a load change hits them alike.
    """
    best = {size: {"cpu": 0.0, "wall": 0.0, "captions": []} for size in captioners}
    for _ in range(repeats):
        for size, captioner in captioners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            captions = captioner.caption(images)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            record = best[size]
            record.update(cpu=max(record["cpu"], len(images) / cpu), wall=max(record["wall"], len(images) / wall))
            record["captions"] = captions
    return best


def bench_batch_speedup(n_images: int = 32, repeats: int = 3) -> float:
    """Caption throughput (per CPU second) at batch size 8 over one image at a time: same tiny LLaVA, same
    images, same run.

    The Llama is 128 wide with 4 layers: like a real captioner decoding on a GPU (bandwidth- and launch-bound, so a
    step of 8 costs little more than a step of 1), per-step cost here is mostly fixed, which is what batching
    amortises. (At width 256 the CPU's matrix products start to dominate and the speedup falls to about 3.)
    Captions are greedy, 64 new tokens, so both modes produce the same text.
    """
    _pin_to_one_core()
    rng = np.random.default_rng(0)
    images = [draw_toy_face(EXPRESSIONS_7[i % 7], rng, size=128).image for i in range(n_images)]
    with tempfile.TemporaryDirectory() as folder:
        path = save_tiny_llava(folder, hidden_size=128, num_layers=4)
        settings = GenerationSettings(max_new_tokens=64, batch_size=8)
        batched = MLLMCaptioner.from_pretrained(str(path), generation=settings, local_files_only=True)
        single = MLLMCaptioner(batched.model, batched.processor, str(path), generation=replace(settings, batch_size=1))
        batched.caption(images[:8])  # warm up: first-call allocations and lazy initialisation
        best = _best_captions_per_s({8: batched, 1: single}, images, repeats)
    print(
        f"# batch_speedup: tiny LLaVA (Llama 128x4), {n_images} toy faces, 64 new tokens, one core, best of {repeats}: "
        f"batch 1 {best[1]['cpu']:.1f} captions per CPU s ({best[1]['wall']:.1f} per wall s), "
        f"batch 8 {best[8]['cpu']:.1f} ({best[8]['wall']:.1f}), "
        f"same captions: {best[1]['captions'] == best[8]['captions']}",
        flush=True,
    )
    return best[8]["cpu"] / best[1]["cpu"]


# (result name, function returning the value), run and reported in this order.
PARTS: list[tuple[str, Callable[[], float]]] = [
    ("batch_speedup", bench_batch_speedup),
    ("validation_per_s", bench_validation),
]


def main() -> dict[str, float]:
    """Run every part, then print the `name: value` lines (the last lines of the output)."""
    transformers.utils.logging.disable_progress_bar()  # loading bars would interleave with the results
    results = {name: part() for name, part in PARTS}
    for name, value in results.items():
        print(f"{name}: {value:.2f}" if value < 100 else f"{name}: {value:.0f}")
    return results


if __name__ == "__main__":
    main()
