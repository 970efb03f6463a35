"""A FER classifier as a role (guide, judge, voter): one module whatever the network behind it.

Every classifier declares what it expects and answers: its input size, channels (RGB or grey), normalisation and
its own class order, mapped to `vocab.EXPRESSIONS`. `forward` is differentiable from images in [-1, 1] (any size)
to logits over the canonical classes, which the semantic guidance of the sampler back-propagates through; classes
the network lacks (contempt, for 7-class models) get a logit of `MISSING_LOGIT`, i.e. probability 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from synfer_pipeline.vocab import EXPRESSIONS, map_class_order

MISSING_LOGIT = -1e4
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as OpenCV's and PIL's grey conversion


class RoleError(ValueError):
    """A role assignment the pipeline refuses (e.g. a judge that is also the guide)."""


class FERClassifier(nn.Module):
    """A FER network with what it expects around it.

    network: maps the normalised (N, C, S, S) input to (N, K) logits in `class_names` order (or an object with
    `.logits`); class_names: the network's own order (spellings `vocab.canonical_expression` knows); input_size: S;
    mean/std: per-channel normalisation of [0, 1] pixels; grayscale: the network reads one luma channel;
    info: facts for lineage (kind, source, fingerprint, metrics); antialias: low-pass filter when shrinking, as
    PIL's resize does (False for models whose own test transform is cv2's bilinear resize, e.g. APViT).
    """

    def __init__(self, network: nn.Module, class_names: Sequence[str], input_size: int,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 grayscale: bool = False, name: str = "", info: dict | None = None, antialias: bool = True):
        super().__init__()
        self.network = network
        self.class_names = tuple(class_names)
        self.input_size, self.grayscale, self.name = int(input_size), bool(grayscale), name
        self.antialias = bool(antialias)
        channels = 1 if grayscale else 3
        self.register_buffer("mean", torch.tensor(list(mean)[:channels], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)[:channels], dtype=torch.float32).view(1, -1, 1, 1))
        order = map_class_order(self.class_names)
        self.register_buffer("order", torch.from_numpy(np.maximum(order, 0)))
        self.register_buffer("present", torch.from_numpy(order >= 0))
        self.info = dict(info or {})

    # -- the differentiable path -----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> the network's normalised (N, C, S, S) input (bilinear, antialiased)."""
        x = (images.clamp(-1, 1) + 1) / 2
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=self.antialias)
        if self.grayscale:
            x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return (x - self.mean) / self.std

    def model_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network on its normalised input: (N, K) logits in its own class order."""
        out = self.network(x)
        return getattr(out, "logits", out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, len(EXPRESSIONS)) logits in canonical order."""
        logits = self.model_logits(self.preprocess(images))
        canonical = logits.index_select(1, self.order)
        return torch.where(self.present, canonical, torch.full_like(canonical, MISSING_LOGIT))

    # -- PIL images in, numbers out ----------------------------------------------------------------------------------
    def images_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, S, S) in [-1, 1] at the input size (PIL bilinear, as the repos' test transforms)."""
        size = (self.input_size, self.input_size)
        arr = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BILINEAR)) for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    def predict_proba(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """(N, 8) float32 probabilities over `vocab.EXPRESSIONS` (missing classes 0) for PIL images or a tensor."""
        device = self.mean.device
        out = [np.zeros((0, len(EXPRESSIONS)), np.float32)]
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                x = chunk if isinstance(chunk, torch.Tensor) else self.images_tensor(chunk)
                out.append(torch.softmax(self(x.to(device).float()), dim=1).cpu().numpy())
        self.train(was_training)
        return np.concatenate(out)

    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> list[str]:
        """The most probable canonical expression per image."""
        return [EXPRESSIONS[i] for i in self.predict_proba(images).argmax(axis=1)]

    def frozen(self) -> FERClassifier:
        """This classifier in eval mode with no trainable parameters (a guide: gradients reach only its input)."""
        self.eval()
        self.requires_grad_(False)
        return self

    def describe(self) -> dict:
        """Lineage facts: name, own class order, input, and what `info` holds (kind, source, fingerprint...)."""
        return {"role": "fer_classifier", "name": self.name, "model_classes": list(self.class_names),
                "input_size": self.input_size, "grayscale": self.grayscale,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), **self.info}


def confusion_matrix(truth: Sequence[str], predicted: Sequence[str],
                     classes: Sequence[str] = EXPRESSIONS[:7]) -> np.ndarray:
    """(len(classes), len(classes)) counts, rows the true class, columns the predicted one; labels outside
    `classes` are not counted."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        if t in index and p in index:
            matrix[index[t], index[p]] += 1
    return matrix


def accuracy_and_confusion(classifier: Callable, images, labels: Sequence[str],
                           classes: Sequence[str] = EXPRESSIONS[:7]) -> tuple[float, np.ndarray]:
    """Accuracy of `classifier.predict(images)` against `labels`, and their `confusion_matrix` over `classes`."""
    predicted = classifier.predict(images)
    correct = sum(t == p for t, p in zip(labels, predicted))
    return (correct / len(labels) if len(labels) else float("nan")), confusion_matrix(labels, predicted, classes)
