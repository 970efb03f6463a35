"""The shared vocabularies: expression classes and facial action units (one definition each).

Every dataset reader maps its own label codes to `EXPRESSIONS` names; every classifier declares its own
class order and is mapped through `map_class_order`. Class indices stored in artifacts (`.cls`) are indices
into `EXPRESSIONS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# Canonical order: the 7 basic expressions, then contempt for sources that have it (AffectNet-8).
EXPRESSIONS: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
EXPRESSIONS_7: tuple[str, ...] = EXPRESSIONS[:7]
EXPRESSION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EXPRESSIONS)}

# Spellings that datasets and classifiers use for the canonical names.
_EXPRESSION_ALIASES: dict[str, str] = {
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger",
    "contempt": "contempt", "contemptuous": "contempt",
}

# OpenGraphAU's 41 action units in its output order: 27 main AUs, then 14 left/right ones.
OPENGRAPHAU_41: tuple[str, ...] = tuple(
    [f"AU{n}" for n in (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 25, 26, 27, 32, 38, 39)]
    + [f"AU{side}{n}" for n in (1, 2, 4, 6, 10, 12, 14) for side in ("L", "R")]
)

# Supplementary Table 3: the AU set sampled from for each target expression (neutral: none).
EXPRESSION_AUS: dict[str, tuple[str, ...]] = {
    "neutral": (),
    "happy": ("AU6", "AU12"),
    "sad": ("AU1", "AU4", "AU15"),
    "surprise": ("AU1", "AU2", "AU5", "AU26"),
    "fear": ("AU1", "AU2", "AU4", "AU5", "AU7", "AU20", "AU26"),
    "anger": ("AU4", "AU5", "AU7", "AU23"),
    "disgust": ("AU9", "AU15", "AU16"),
}


class UnknownLabelError(ValueError):
    """A label that is not one of the canonical expressions (nor a known spelling of one)."""


def canonical_expression(name: str) -> str:
    """Map a spelling such as 'Happiness' or 'angry' to its canonical name; raise UnknownLabelError otherwise."""
    key = str(name).strip().lower()
    if key not in _EXPRESSION_ALIASES:
        raise UnknownLabelError(f"unknown expression label {name!r}; expected one of {', '.join(EXPRESSIONS)}")
    return _EXPRESSION_ALIASES[key]


def map_class_order(class_names: Sequence[str]) -> np.ndarray:
    """Index array `idx` such that `probs[..., idx]` reorders a classifier's classes into `EXPRESSIONS` order.

    Canonical classes the classifier lacks get index -1; callers treat them as probability 0.
    """
    position = {canonical_expression(c): i for i, c in enumerate(class_names)}
    return np.array([position.get(e, -1) for e in EXPRESSIONS], dtype=np.int64)


def au_vector(aus: Iterable[str], au_names: Sequence[str] = OPENGRAPHAU_41, outside: str = "error") -> np.ndarray:
    """0/1 float32 vector over `au_names` with ones at the given AUs. An AU outside the list is an error, or
    with `outside="drop"` left out (a configured list that does not model it cannot carry it)."""
    index = {a: i for i, a in enumerate(au_names)}
    vec = np.zeros(len(au_names), dtype=np.float32)
    for au in aus:
        if au in index:
            vec[index[au]] = 1.0
        elif outside != "drop":
            raise ValueError(f"action unit {au!r} is not in the configured AU list")
    return vec


def aus_from_vector(vec: Sequence[float], au_names: Sequence[str] = OPENGRAPHAU_41, threshold: float = 0.5) -> list[str]:
    """Names of the AUs whose value is at or above `threshold`, in list order."""
    return [a for a, v in zip(au_names, vec) if v >= threshold]
