"""Caption benchmarks: `python benchmarks/captions.py`.

Runs each part in `PARTS` and ends with one `name: value` line per part, in order, so a caller can read the
numbers from the last lines. Timings are on one CPU core (the process pins itself to one) and are the best of
a few repeats, since the machine may be shared.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from synfer_pipeline.captions import TemplateCaptioner, validate_captions  # noqa: E402
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


# (result name, function returning the value), run and reported in this order.
PARTS: list[tuple[str, Callable[[], float]]] = [
    ("validation_per_s", bench_validation),
]


def main() -> dict[str, float]:
    """Run every part, then print the `name: value` lines (the last lines of the output)."""
    results = {name: part() for name, part in PARTS}
    for name, value in results.items():
        print(f"{name}: {value:.2f}" if value < 100 else f"{name}: {value:.0f}")
    return results


if __name__ == "__main__":
    main()
