"""Label voting (paper Sec. 4.3): the voters' class probabilities averaged, the average replacing the intended label
where they disagree.

Probabilities are tables: one row per synthetic sample (`key`, `intended`), and a float column `{voter}:{class}`
per voter and canonical class (`vocab.EXPRESSIONS`; a class a voter lacks has probability 0). `vote` turns such a
table into labels:

- the vote is the weighted mean of the voters' distributions (weights from config, 1 by default);
- the voted label is its most probable class; on a tie the intended label wins if it is among the tied classes
  (a tie is no evidence against it), otherwise the first tied class in canonical order;
- `relabelled` marks samples whose voted label differs from the intended one; both labels are kept;
- with `min_confidence`, a sample whose voted class has a mean probability below it is dropped: recorded with
  `kept = False` and its reason, never deleted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field

import numpy as np
import pandas as pd

from synfer_pipeline.fer.role import confusion_matrix
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS, EXPRESSIONS_7

TIE_TOLERANCE = 1e-6


@settings
class VotingSettings:
    """weights: {voter: weight} (voters not named weigh 1; a weight of 0 leaves a voter out of the vote but its
    probabilities are still recorded); min_confidence: drop samples whose voted class has a lower mean probability
    (None keeps all)."""

    weights: dict[str, float] = field(default_factory=dict)
    min_confidence: float | None = None

    def __post_init__(self):
        bad = {k: w for k, w in self.weights.items() if w < 0}
        if bad:
            raise ValueError(f"voting weights must be >= 0, got {bad}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must lie in [0, 1], got {self.min_confidence}")


def probability_table(keys: Sequence[str], intended: Sequence[str], probabilities: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The table `vote` reads: keys, intended labels and each voter's (N, 8) probabilities as `{voter}:{class}`."""
    unknown = sorted(set(intended) - set(EXPRESSIONS))
    if unknown:
        raise ValueError(f"intended labels {unknown} are not canonical expressions")
    columns: dict[str, object] = {"key": list(keys), "intended": list(intended)}
    for voter, p in probabilities.items():
        p = np.asarray(p, dtype=np.float32)
        if p.shape != (len(keys), len(EXPRESSIONS)):
            raise ValueError(f"voter {voter!r}: probabilities of shape {p.shape}, expected ({len(keys)}, {len(EXPRESSIONS)})")
        for j, c in enumerate(EXPRESSIONS):
            columns[f"{voter}:{c}"] = p[:, j]
    return pd.DataFrame(columns)


def voters_of(table: pd.DataFrame) -> list[str]:
    """The voters a probability table holds, in column order."""
    seen: list[str] = []
    for column in table.columns:
        if ":" in column:
            voter = column.rsplit(":", 1)[0]
            if voter not in seen:
                seen.append(voter)
    return seen


def probabilities_of(table: pd.DataFrame, voter: str) -> np.ndarray:
    """(N, 8) probabilities of one voter from a probability table."""
    missing = [c for c in EXPRESSIONS if f"{voter}:{c}" not in table.columns]
    if missing:
        raise KeyError(f"the probability table has no columns for voter {voter!r} ({missing[0]}...)")
    return table[[f"{voter}:{c}" for c in EXPRESSIONS]].to_numpy(dtype=np.float64)


def vote(table: pd.DataFrame, cfg: VotingSettings | None = None, voters: Sequence[str] | None = None) -> pd.DataFrame:
    """Voted labels for a probability table: key, intended, voted, relabelled, confidence (mean probability of the
    voted class), intended_probability, kept, drop_reason, and each voter's own call `call:{voter}`.

    voters: which of the table's voters vote (default all); `cfg.weights` may only name voters of the table.
    """
    cfg = cfg or VotingSettings()
    present = voters_of(table)
    voters = list(present if voters is None else voters)
    if not voters:
        raise ValueError("no voters: the probability table holds no `{voter}:{class}` columns")
    unknown = [v for v in list(voters) + list(cfg.weights) if v not in present]
    if unknown:
        raise ValueError(f"voters {sorted(set(unknown))} are not in the probability table (it has {present})")
    weights = np.array([cfg.weights.get(v, 1.0) for v in voters], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError(f"the voting weights of {voters} sum to 0")
    stacked = np.stack([probabilities_of(table, v) for v in voters])            # (V, N, 8)
    mean = np.tensordot(weights / weights.sum(), stacked, axes=1)               # (N, 8)
    intended_index = np.array([EXPRESSIONS.index(c) for c in table["intended"]], dtype=np.int64)
    best = mean.max(axis=1, keepdims=True)
    tied = mean >= best - TIE_TOLERANCE
    first = tied.argmax(axis=1)
    rows = np.arange(len(mean))
    voted_index = np.where(tied[rows, intended_index], intended_index, first)
    confidence = mean[rows, voted_index]
    out = pd.DataFrame({
        "key": table["key"].to_numpy(), "intended": table["intended"].to_numpy(),
        "voted": [EXPRESSIONS[i] for i in voted_index],
        "confidence": confidence.astype(np.float32),
        "intended_probability": mean[rows, intended_index].astype(np.float32),
    })
    out["relabelled"] = out["voted"] != out["intended"]
    kept = np.ones(len(out), dtype=bool) if cfg.min_confidence is None else confidence >= cfg.min_confidence
    out["kept"] = kept
    out["drop_reason"] = ["" if k else f"confidence {c:.3f} < min_confidence {cfg.min_confidence}"
                          for k, c in zip(kept, confidence)]
    for v, p in zip(voters, stacked):
        out[f"call:{v}"] = [EXPRESSIONS[i] for i in p.argmax(axis=1)]
    return out


def vote_summary(labels: pd.DataFrame, classes: Sequence[str] = EXPRESSIONS_7) -> dict:
    """What a user checks of a vote: agreement (voted == intended) and relabel rates, the drop rate, per-class counts
    (intended, voted, voted among kept), each voter's agreement with the intended label, and the intended-vs-voted
    confusion counts (rows intended, columns voted) over `classes`."""
    n = len(labels)
    voters = [c.split(":", 1)[1] for c in labels.columns if c.startswith("call:")]
    kept = labels[labels["kept"]]

    def rate(mask) -> float:
        return float(np.mean(mask)) if n else 0.0

    return {
        "samples": n,
        "agreement_rate": rate(labels["voted"] == labels["intended"]),
        "relabel_rate": rate(labels["relabelled"]),
        "drop_rate": rate(~labels["kept"]),
        "kept": len(kept),
        "counts_intended": {c: int((labels["intended"] == c).sum()) for c in classes},
        "counts_voted": {c: int((labels["voted"] == c).sum()) for c in classes},
        "counts_kept": {c: int((kept["voted"] == c).sum()) for c in classes},
        "voter_agreement_with_intended": {v: rate(labels[f"call:{v}"] == labels["intended"]) for v in voters},
        "confusion": confusion_matrix(labels["intended"], labels["voted"], classes).tolist(),
        "classes": list(classes),
    }
