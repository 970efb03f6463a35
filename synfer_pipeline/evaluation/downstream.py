"""Downstream evaluation (paper Sec. 5): does the synthetic data teach a FER model?

One recipe (`fer.training.FERTrainSettings`; ResNet-18 depth in the paper profile) is trained on each training set
and tested on the real test split:

- `real`: the real labelled training faces;
- `synthetic`: the kept synthetic samples with their voted labels;
- `real+synthetic`: both;
- `synthetic (no FERAnno)`: the same images voted without FERAnno (supplementary Table 1), when FERAnno votes;
- `synthetic (intended)`: every synthetic image with the label it was generated for (no voting): what voting adds.

`training_sets` decides which samples each training sees; that is the part a user must be able to trust, and it
keeps the sample keys of each set so the asset can record them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from synfer_pipeline.fer.role import accuracy_and_confusion
from synfer_pipeline.fer.training import FERTrainSettings, train_fer_classifier
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS_7

REAL, SYNTHETIC, BOTH = "real", "synthetic", "real+synthetic"
NO_FERANNO, INTENDED = "synthetic (no FERAnno)", "synthetic (intended)"


@settings
class DownstreamSettings:
    """train: the one recipe every set is trained with; feranno_ablation: also train on labels voted without FERAnno
    (when FERAnno votes); intended_ablation: also train on the intended labels without voting; seeds: each set is
    trained once per seed and the accuracies averaged (the spread is reported)."""

    train: FERTrainSettings = FERTrainSettings(resnet_depths=(2, 2, 2, 2))
    feranno_ablation: bool = True
    intended_ablation: bool = True
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")


@dataclass
class TrainingSet:
    name: str
    keys: list[str]
    labels: list[str]
    images: list

    def fingerprint(self) -> str:
        """sha256 of the sorted (key, label) pairs: which samples, with which labels, this training saw."""
        h = hashlib.sha256()
        for key, label in sorted(zip(self.keys, self.labels)):
            h.update(f"{key}\t{label}\n".encode())
        return h.hexdigest()[:16]


def training_sets(real_keys: Sequence[str], real_images: Sequence, real_labels: Sequence[str],
                  synthetic_images: Mapping[str, object], voted: pd.DataFrame, voted_without_feranno: pd.DataFrame | None,
                  cfg: DownstreamSettings) -> list[TrainingSet]:
    """The sets of the evaluation; `voted` (and `voted_without_feranno`) are `labels.voting.vote` tables over
    `synthetic_images`' keys. Dropped samples (kept False) stay out of the voted sets."""
    missing = sorted(set(voted["key"]) - set(synthetic_images))
    if missing:
        raise KeyError(f"{len(missing)} voted samples have no synthetic image (first: {missing[0]})")
    real = TrainingSet(REAL, list(real_keys), list(real_labels), list(real_images))

    def voted_set(name: str, table: pd.DataFrame) -> TrainingSet:
        kept = table[table["kept"]]
        return TrainingSet(name, kept["key"].tolist(), kept["voted"].tolist(),
                           [synthetic_images[k] for k in kept["key"]])

    synthetic = voted_set(SYNTHETIC, voted)
    sets = [real, synthetic, TrainingSet(BOTH, real.keys + synthetic.keys, real.labels + synthetic.labels,
                                         real.images + synthetic.images)]
    if cfg.feranno_ablation and voted_without_feranno is not None:
        sets.append(voted_set(NO_FERANNO, voted_without_feranno))
    if cfg.intended_ablation:
        sets.append(TrainingSet(INTENDED, voted["key"].tolist(), voted["intended"].tolist(),
                                [synthetic_images[k] for k in voted["key"]]))
    return sets


def evaluate_sets(sets: Sequence[TrainingSet], test_images: Sequence, test_labels: Sequence[str],
                  cfg: DownstreamSettings, progress: Callable[[str, int, int, float], None] = lambda *a: None,
                  ) -> dict[str, dict]:
    """Train the recipe on each set (once per seed) and test on the real test split: {set: row}."""
    rows = {}
    for ts in sets:
        row = {"n_train": len(ts.keys), "fingerprint": ts.fingerprint(),
               "label_counts": {c: ts.labels.count(c) for c in EXPRESSIONS_7}}
        if len(set(ts.labels)) < 2:
            rows[ts.name] = {**row, "test_accuracy": None, "skipped": f"{len(set(ts.labels))} class(es) to learn"}
            continue
        accuracies, matrices, started = [], [], time.perf_counter()
        for seed in cfg.seeds:
            recipe = dataclasses.replace(cfg.train, seed=seed)
            clf, _ = train_fer_classifier(ts.images, ts.labels, recipe, ts.name,
                                          lambda e, n, loss, name=ts.name: progress(name, e, n, loss))
            acc, matrix = accuracy_and_confusion(clf, test_images, test_labels)
            accuracies.append(acc)
            matrices.append(matrix)
        rows[ts.name] = {**row, "test_accuracy": float(np.mean(accuracies)), "accuracies": accuracies,
                         "spread": float(np.std(accuracies)), "confusion": np.sum(matrices, axis=0).tolist(),
                         "seconds": round(time.perf_counter() - started, 1)}
    return rows


def format_table(rows: Mapping[str, dict], n_test: int) -> str:
    """The evaluation as terminal text: a line per training set."""
    lines = [f"{'training set':<24} {'images':>7} {'real test acc':>14}"]
    order = {name: i for i, name in enumerate((REAL, SYNTHETIC, BOTH, NO_FERANNO, INTENDED))}
    for name, row in sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order))):
        acc = row.get("test_accuracy")
        shown = f"{acc:.1%}" if acc is not None else f"- ({row.get('skipped', '')})"
        spread = f" ± {row['spread']:.1%}" if acc is not None and len(row.get("accuracies", [])) > 1 else ""
        lines.append(f"{name:<24} {row['n_train']:>7} {shown + spread:>14}")
    lines.append(f"(tested on {n_test} real test faces)")
    return "\n".join(lines)
