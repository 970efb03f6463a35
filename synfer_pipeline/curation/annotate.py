"""Per-image annotations for FEText: AU vectors from the AU detector and the reference expression of each image.

The reference expression is what a caption is validated against: the dataset's label where there is one, else the
prediction of the configured FER classifier (recorded as such). AU ground truth for training the detector comes
from AU-labelled sources as CSV files (`image,aus` with AUs like `AU6 AU12` or RAF-AU's `6+12`).
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from synfer_pipeline.curation.readers import sample_id_for
from synfer_pipeline.io.datasets import Sample, image_member, open_image
from synfer_pipeline.io.storage import read_uri

_AU_TOKEN = re.compile(r"(?:AU)?([LR]?)(\d+)", re.IGNORECASE)


def parse_aus(text: str | float | None) -> tuple[str, ...]:
    """'AU6 AU12', '6+12', 'AUL1,AUR2' -> ('AU6', 'AU12') ...; empty/NaN -> ()."""
    if not isinstance(text, str) or not text.strip():
        return ()
    out = []
    for token in re.split(r"[\s+,;]+", text.strip()):
        m = _AU_TOKEN.fullmatch(token)
        if not m:
            raise ValueError(f"cannot read action unit {token!r} in {text!r}")
        out.append(f"AU{m.group(1).upper()}{int(m.group(2))}")
    return tuple(out)


def read_au_csv(uri: str, fmt: str, source: str, image_column: str = "image", aus_column: str = "aus") -> dict[str, tuple[str, ...]]:
    """AU ground truth of a source: {sample_id: AUs}, ids made exactly as the source's reader makes them."""
    df = pd.read_csv(io.BytesIO(read_uri(uri)), dtype=str, keep_default_na=False)
    missing = [c for c in (image_column, aus_column) if c not in df.columns]
    if missing:
        raise ValueError(f"{uri} lacks column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    return {sample_id_for(fmt, source, name): parse_aus(aus) for name, aus in zip(df[image_column], df[aus_column])}


def au_training_set(samples: Sequence[Sample], truth: Mapping[str, Sequence[str]], au_names: Sequence[str]):
    """(images, targets (N, n_aus) 0/1, keys, outside) for the samples that have AU ground truth.

    Targets are in `au_names` order. Ground-truth AUs the configured list does not hold cannot be learned; they
    are left out of the targets and counted in `outside` ({AU: samples}), which the asset reports.
    """
    index = {a: i for i, a in enumerate(au_names)}
    images, rows, keys, outside = [], [], [], Counter()
    for key, members in samples:
        if key not in truth:
            continue
        outside.update(a for a in truth[key] if a not in index)
        vec = np.zeros(len(au_names), np.float32)
        vec[[index[a] for a in truth[key] if a in index]] = 1.0
        images.append(open_image(image_member(members)))
        rows.append(vec)
        keys.append(key)
    targets = np.stack(rows) if rows else np.zeros((0, len(au_names)), np.float32)
    return images, targets, keys, dict(outside)


def annotate_samples(samples: Sequence[Sample], detector, fer_classifier=None) -> pd.DataFrame:
    """One row per sample: AU probabilities and the AUs at the detector's threshold, and the reference expression."""
    metas = [json.loads(m["json"]) for _, m in samples]
    images = [open_image(image_member(m)) for _, m in samples]
    probs = detector.predict_proba(images) if images else np.zeros((0, len(detector.au_names)), np.float32)
    unlabelled = [i for i, meta in enumerate(metas) if not meta.get("label")]
    predicted = {}
    if unlabelled:
        if fer_classifier is None:
            raise ValueError("unlabelled images need a configured FER classifier (models.fer_reference)")
        predicted = dict(zip(unlabelled, fer_classifier.predict([images[i] for i in unlabelled])))
    source_name = f"classifier:{fer_classifier.name}" if fer_classifier is not None else None
    return pd.DataFrame({
        "key": [k for k, _ in samples],
        "sample_id": [m["sample_id"] for m in metas],
        "source": [m["source"] for m in metas],
        "label": [m.get("label") for m in metas],
        "expression": [m.get("label") or predicted[i] for i, m in enumerate(metas)],
        "expression_source": ["label" if m.get("label") else source_name for m in metas],
        "au_probs": [p.astype(np.float32) for p in probs],
        "aus": [[a for a, v in zip(detector.au_names, p) if v >= detector.threshold] for p in probs],
    })
