"""A float TFLite graph (as read by `tflite_reader`) rebuilt as PyTorch layers.

TFLite stores activations NHWC, convolution kernels OHWI and depthwise kernels 1HWC; here activations are NCHW and
kernels OIHW. 'SAME' padding is TensorFlow's: with stride 2 on an even side the extra row/column goes after (bottom,
right), which no symmetric `padding=` of `nn.Conv2d` reproduces. float16 weights reach their layer through a
DEQUANTIZE op in the file; the conversion is done once here.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synfer_pipeline.curation.tflite_reader import Operator, TFLiteGraph

_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial side: (before, after) pixels; the odd one goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Step(nn.Module):
    """One TFLite operator; `relu` is a following RELU folded in (applied in place on this step's own output)."""

    relu = False

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        y = self.run(*xs)
        return y.relu_() if self.relu else y


def _frozen(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, np.float32)), requires_grad=False)


class _Conv(_Step):
    """A k x k (or depthwise) convolution; asymmetric 'SAME' padding is an explicit zero pad first."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int, pads: tuple[int, int, int, int],
                 groups: int, dilation: int):
        super().__init__()
        left, right, top, bottom = pads
        symmetric = left == right and top == bottom
        self.pad = None if symmetric else (left, right, top, bottom)
        self.padding = (top, left) if symmetric else (0, 0)
        self.stride, self.groups, self.dilation = stride, groups, dilation
        self.weight, self.bias = _frozen(weight), _frozen(bias)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad) if self.pad else x
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _Pointwise(_Step):
    """A 1x1 convolution as one matrix product over the pixels (channels-last input: no copies).

    oneDNN's convolution costs tens of microseconds of set-up per call on CPU; a GEMM call costs a few.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.weight, self.bias = _frozen(weight[:, :, 0, 0]), _frozen(bias)  # (out, in)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(n * h * w, c), self.weight.t())
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)


class _MaxPool(_Step):
    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int]):
        super().__init__()
        self.pad = pads if any(pads) else None
        self.kernel, self.stride = kernel, stride

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad, value=float("-inf")) if self.pad else x
        return F.max_pool2d(x, self.kernel, self.stride)


class _Add(_Step):
    def run(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.add(a, b)


class _AddInto(_Step):
    """ADD(x, y) or ADD(PAD(x, zero channels after), y) as y[:, :C] += x: the BlazeBlock residual, no copies.

    Only built where `y` is a step's output with no other reader, so writing into it is safe.
    """

    def run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y[:, :x.shape[1]].add_(x)  # not `+=` on the slice: that also copies the slice back onto itself
        return y


class _Relu(_Step):
    def run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class _Pad(_Step):
    def __init__(self, nhwc_pads: np.ndarray, ndim: int):
        super().__init__()
        order = [0, 3, 1, 2] if ndim == 4 else list(range(ndim))  # NCHW dims in NHWC terms
        self.pad = tuple(int(v) for dim in reversed(order) for v in nhwc_pads[dim])

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class _Reshape(_Step):
    def __init__(self, shape: tuple[int, ...], from_4d: bool):
        super().__init__()
        self.shape, self.from_4d = shape, from_4d

    def run(self, x: torch.Tensor) -> torch.Tensor:
        # TFLite reshapes in NHWC element order; the batch dimension follows the input's (batches of images).
        return (x.permute(0, 2, 3, 1) if self.from_4d else x).reshape(x.shape[0], *self.shape[1:])


class _Concat(_Step):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.axis)


class _Resize(_Step):
    def __init__(self, size: tuple[int, int], align_corners: bool):
        super().__init__()
        self.size, self.align_corners = size, align_corners

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, self.size, mode="bilinear", align_corners=self.align_corners)


class TFLiteNet(nn.Module):
    """The graph's operators as layers, run in file order.

    Input: float32 NCHW (1, C, H, W) of the graph's input shape (channels-last memory is fastest). Output: the
    graph's outputs in file order, shaped as in the file (3-D outputs in NHWC element order, as its RESHAPEs define).
    With `fold` (the default), a RELU joins the layer before it and a residual ADD (with its channel PAD) adds in
    place; without, every operator is its own layer. `sources` maps each parameter name to the index of the file
    tensor it was loaded from; `constants_used` counts how often each constant file tensor was read;
    `output_shapes` are the file's output shapes.
    """

    def __init__(self, graph: TFLiteGraph, fold: bool = True):
        super().__init__()
        self.fold = fold
        self.graph_inputs, self.graph_outputs = list(graph.inputs), list(graph.outputs)
        self.output_shapes = [graph.tensors[i].shape for i in graph.outputs]
        self.sources: dict[str, int] = {}
        self.constants_used: Counter[int] = Counter()
        self.steps = nn.ModuleList()
        self.wiring: list[tuple[list[int], int]] = []  # per step: file tensors it reads, file tensor it writes
        self._tensors = graph.tensors
        self._dequantized = {op.outputs[0]: op.inputs[0] for op in graph.operators
                             if op.op == "DEQUANTIZE" and graph.tensors[op.inputs[0]].data is not None}
        for t in graph.tensors:
            if t.data is None and t.index not in self._dequantized and t.dtype != np.float32:
                raise ValueError(f"activation {t.name!r} is {t.dtype.__name__}: only float graphs are supported")
        self._consumers = Counter(i for op in graph.operators for i in op.inputs)
        self._producer: dict[int, int] = {}   # file tensor -> step that writes it
        self._channel_pads: dict[int, int] = {}  # PAD output -> PAD input, for PADs folded into the next ADD
        for op in graph.operators:
            self._add(op)
        self._make_plan(len(graph.tensors))
        del self._tensors, self._dequantized, self._consumers, self._producer, self._channel_pads  # build-time only

    def _add(self, op: Operator) -> None:
        """Append the step for one operator (or fold it into a neighbour)."""
        if op.op == "DEQUANTIZE" and op.outputs[0] in self._dequantized:
            return  # its float16 constant is widened once, where a layer reads it
        if self.fold and self._folded(op):
            return
        step, inputs = self._residual(op) if self.fold and op.op == "ADD" else self._layer(op, len(self.steps))
        activation = op.options.get("activation")
        if activation not in (None, "RELU"):
            raise ValueError(f"{op.op} with fused activation {activation} is not supported")
        step.relu = step.relu or activation == "RELU"
        self._producer[op.outputs[0]] = len(self.steps)
        self.steps.append(step)
        self.wiring.append((inputs, op.outputs[0]))

    def _folded(self, op: Operator) -> bool:
        """Hold a channel PAD for the ADD that reads it, or make a RELU part of the step that writes its input."""
        out, src = op.outputs[0], op.inputs[0]
        if op.op == "PAD" and self._consumers[out] == 1 and self._appends_channels(op):
            self._channel_pads[out] = src
            return True
        if op.op == "RELU" and self._owned(src) and not self.steps[self._producer[src]].relu:
            step = self._producer.pop(src)
            self.steps[step].relu = True
            self.wiring[step] = (self.wiring[step][0], out)
            self._producer[out] = step
            return True
        return False

    def _owned(self, index: int) -> bool:
        """Whether a tensor is a step's output that only one operator reads (so that one may overwrite it)."""
        return index in self._producer and self._consumers[index] == 1

    def _residual(self, op: Operator) -> tuple[_Step, list[int]]:
        """ADD: in place into an input no one else reads (a folded channel PAD becomes a channel slice)."""
        a, b = op.inputs[:2]
        for x, y in ((a, b), (b, a)):
            if self._owned(y) and y not in self._channel_pads:
                return _AddInto(), [self._channel_pads.pop(x, x)]  + [y]
        if a in self._channel_pads or b in self._channel_pads:
            raise ValueError(f"cannot fold the channel PAD before ADD {op.outputs[0]}: its other input is shared")
        return _Add(), [a, b]  # neither input may be overwritten

    def _appends_channels(self, op: Operator) -> bool:
        """A PAD of a 4-D tensor that appends zero channels and nothing else (counts its constant as read if so)."""
        pads = self._tensors[op.inputs[1]].constant()
        if len(self._shape(op.inputs[0])) == 4 and not pads[:3].any() and pads[3, 0] == 0:
            self.constants_used[op.inputs[1]] += 1
            return True
        return False

    def _const(self, index: int) -> np.ndarray:
        index = self._dequantized.get(index, index)
        self.constants_used[index] += 1
        return self._tensors[index].constant()

    def _shape(self, index: int) -> tuple[int, ...]:
        return self._tensors[index].shape

    def _layer(self, op: Operator, position: int) -> tuple[_Step, list[int]]:
        """The layer for one operator and the activation tensors it reads (constants are loaded into it)."""
        o, x = op.options, op.inputs[0]
        if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            if o["stride_w"] != o["stride_h"] or o["dilation_w"] != o["dilation_h"]:
                raise ValueError(f"{op.op} with unequal strides or dilations is not supported")
            w, b = self._const(op.inputs[1]), self._const(op.inputs[2])
            depthwise = op.op == "DEPTHWISE_CONV_2D"
            w = w.transpose(3, 0, 1, 2) if depthwise else w.transpose(0, 3, 1, 2)  # 1HWC / OHWI -> OIHW
            pads = self._pads(x, w.shape[2:], o, o["dilation_h"])
            if w.shape[2:] == (1, 1) and o["stride_h"] == 1 and not depthwise and not any(pads):
                step = _Pointwise(w, b)
            else:
                step = _Conv(w, b, o["stride_h"], pads, self._shape(x)[3] if depthwise else 1, o["dilation_h"])
            self.sources[f"steps.{position}.weight"] = self._dequantized.get(op.inputs[1], op.inputs[1])
            self.sources[f"steps.{position}.bias"] = self._dequantized.get(op.inputs[2], op.inputs[2])
            return step, [x]
        if op.op == "MAX_POOL_2D":
            kernel = (o["filter_h"], o["filter_w"])
            return _MaxPool(kernel, (o["stride_h"], o["stride_w"]), self._pads(x, kernel, o)), [x]
        if op.op == "ADD":
            return _Add(), op.inputs[:2]
        if op.op == "RELU":
            return _Relu(), [x]
        if op.op == "PAD":
            return _Pad(self._const(op.inputs[1]), len(self._shape(x))), [x]
        if op.op == "RESHAPE":
            for extra in op.inputs[1:]:  # an optional constant shape; the output tensor's shape says the same
                self._const(extra)
            return _Reshape(self._shape(op.outputs[0]), len(self._shape(x)) == 4), [x]
        if op.op == "CONCATENATION":
            ndim = len(self._shape(x))
            axis = o["axis"] % ndim
            return _Concat(_NHWC_TO_NCHW_AXIS[axis] if ndim == 4 else axis), list(op.inputs)
        if op.op == "RESIZE_BILINEAR":
            if not (o["half_pixel_centers"] or o["align_corners"]):
                raise ValueError("RESIZE_BILINEAR without half_pixel_centers or align_corners is not supported")
            return _Resize(tuple(int(v) for v in self._const(op.inputs[1])), o["align_corners"]), [x]
        raise ValueError(f"TFLite operator {op.op} is not supported")

    def _pads(self, x: int, kernel: tuple[int, int], o: dict, dilation: int = 1) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) for the op's padding mode on input tensor `x`."""
        if o["padding"] == "VALID":
            return 0, 0, 0, 0
        _, h, w, _ = self._shape(x)
        top, bottom = same_padding(h, kernel[0], o["stride_h"], dilation)
        left, right = same_padding(w, kernel[1], o["stride_w"], dilation)
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        values = self._run(x, keep=False)
        return [values[i] for i in self.graph_outputs]

    def trace(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every activation the graph computes, by file tensor index (4-D ones NCHW), for checking shapes."""
        values = self._run(x, keep=True)
        return {i: v for i, v in enumerate(values) if v is not None}

    def _run(self, x: torch.Tensor, keep: bool) -> list[torch.Tensor | None]:
        values: list[torch.Tensor | None] = [None] * self._n_tensors
        values[self.graph_inputs[0]] = x
        for run, relu, inputs, output, dead in self._plan:
            y = run(*[values[i] for i in inputs])
            values[output] = y.relu_() if relu else y
            if not keep:
                for i in dead:  # freed at its last read: the next layers reuse that memory while it is in cache
                    values[i] = None
        return values

    def _make_plan(self, n_tensors: int) -> None:
        """The run list: per step its `run`, relu, the tensors it reads and writes, and those read for the last time.

        `run` is called directly: module-call hooks cost more than the smaller layers themselves.
        """
        last = {i: n for n, (inputs, _) in enumerate(self.wiring) for i in inputs}
        self._n_tensors = n_tensors
        self._plan = [(step.run, step.relu, inputs, output,
                       [i for i in set(inputs) if last[i] == n and i not in self.graph_outputs])
                      for n, (step, (inputs, output)) in enumerate(zip(self.steps, self.wiring))]
