"""A small pure-Python reader for TensorFlow Lite model files (no TensorFlow, no tflite runtime).

A `.tflite` file is a FlatBuffer of the public schema (tensorflow/lite/schema/schema.fbs). This reads the one part a
PyTorch port needs: the first subgraph's tensors (name, shape, dtype, constant data as stored, with float16 widened
and int8 dequantised to float32 by `Tensor.constant()`) and its operators in execution order (builtin name,
input/output tensor ids, the options of the operators BlazeFace uses).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# schema.fbs enum TensorType -> numpy dtype (only the ones a float model can hold)
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}

# schema.fbs enum BuiltinOperator (the subset that image models use)
BUILTIN_OPS = {0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D",
               6: "DEQUANTIZE", 9: "FULLY_CONNECTED", 14: "LOGISTIC", 17: "MAX_POOL_2D", 18: "MUL", 19: "RELU",
               21: "RELU6", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 34: "PAD", 39: "TRANSPOSE", 54: "PRELU",
               97: "RESIZE_NEAREST_NEIGHBOR"}

# Option tables as (field name, struct format, schema default) in schema field order.
_CONV = [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0), ("activation", "b", 0),
         ("dilation_w", "i", 1), ("dilation_h", "i", 1)]
_DEPTHWISE = [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0), ("depth_multiplier", "i", 0),
              ("activation", "b", 0), ("dilation_w", "i", 1), ("dilation_h", "i", 1)]
_POOL = [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0), ("filter_w", "i", 0),
         ("filter_h", "i", 0), ("activation", "b", 0)]
_RESIZE = [("new_height", "i", 0), ("new_width", "i", 0), ("align_corners", "?", False),
           ("half_pixel_centers", "?", False)]
_OPTIONS = {"CONV_2D": _CONV, "DEPTHWISE_CONV_2D": _DEPTHWISE, "MAX_POOL_2D": _POOL, "RESIZE_BILINEAR": _RESIZE,
            "ADD": [("activation", "b", 0)], "CONCATENATION": [("axis", "i", 0), ("activation", "b", 0)]}
PADDING = {0: "SAME", 1: "VALID"}
ACTIVATION = {0: None, 1: "RELU", 3: "RELU6"}


@dataclass
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None = None        # stored constant (weights, paddings) as in the file; None for activations
    scale: np.ndarray | None = None       # int8/uint8 quantisation: real = (q - zero_point) * scale along `axis`
    zero_point: np.ndarray | None = None
    axis: int = 0

    def constant(self) -> np.ndarray:
        """The stored value: float weights as float32 (float16 widened, integers dequantised), int32 as is."""
        if self.data is None:
            raise ValueError(f"tensor {self.name!r} holds no constant data")
        if self.scale is not None:
            return dequantize(self.data, self.scale, self.zero_point, self.axis)
        return self.data.astype(np.float32) if self.dtype == np.float16 else self.data


@dataclass
class Operator:
    op: str
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)


@dataclass
class TFLiteGraph:
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]


class _Table:
    """One FlatBuffer table: fields by index through its vtable."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, i: int) -> int:
        slot = 4 + 2 * i
        off = struct.unpack_from("<H", self.buf, self.vtable + slot)[0] if slot < self.vsize else 0
        return self.pos + off if off else 0

    def scalar(self, i: int, fmt: str, default=0):
        p = self._field(i)
        return struct.unpack_from("<" + fmt, self.buf, p)[0] if p else default

    def _target(self, i: int) -> int:
        p = self._field(i)
        return p + struct.unpack_from("<I", self.buf, p)[0] if p else 0

    def table(self, i: int) -> _Table | None:
        p = self._target(i)
        return _Table(self.buf, p) if p else None

    def vector(self, i: int, fmt: str) -> list:
        p = self._target(i)
        if not p:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf, p + 4))

    def bytes(self, i: int) -> memoryview:
        p = self._target(i)
        if not p:
            return memoryview(b"")
        n = struct.unpack_from("<I", self.buf, p)[0]
        return memoryview(self.buf)[p + 4:p + 4 + n]

    def string(self, i: int) -> str:
        return bytes(self.bytes(i)).decode()

    def tables(self, i: int) -> list[_Table]:
        p = self._target(i)
        if not p:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        return [_Table(self.buf, q + struct.unpack_from("<I", self.buf, q)[0]) for q in range(p + 4, p + 4 + 4 * n, 4)]


def read_tflite(path: str | Path) -> TFLiteGraph:
    """The first subgraph of a `.tflite` file: tensors (constants as stored) and operators in execution order."""
    buf = Path(path).read_bytes()
    if buf[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a TFLite model (file identifier {buf[4:8]!r}, expected b'TFL3')")
    model = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
    # Model fields: 1 operator_codes, 2 subgraphs, 4 buffers.
    codes = [_op_code(c) for c in model.tables(1)]
    buffers = [b.bytes(0) for b in model.tables(4)]
    graph = model.tables(2)[0]
    # SubGraph fields: 0 tensors, 1 inputs, 2 outputs, 3 operators.
    tensors = [_tensor(i, t, buffers) for i, t in enumerate(graph.tables(0))]
    operators = [_operator(o, codes) for o in graph.tables(3)]
    return TFLiteGraph(tensors, operators, graph.vector(1, "i"), graph.vector(2, "i"))


def _op_code(code: _Table) -> str:
    # OperatorCode: 0 deprecated_builtin_code (int8), 3 builtin_code (int32, for codes past 127).
    number = max(code.scalar(0, "b"), code.scalar(3, "i"))
    return BUILTIN_OPS.get(number, f"BUILTIN_{number}")


def _tensor(index: int, t: _Table, buffers: list[memoryview]) -> Tensor:
    # Tensor fields: 0 shape, 1 type, 2 buffer, 3 name, 4 quantization.
    shape, type_id, name = tuple(t.vector(0, "i")), t.scalar(1, "b"), t.string(3)
    if type_id not in _DTYPES:
        raise ValueError(f"tensor {name!r} has TFLite type {type_id}, which this reader does not handle")
    tensor = Tensor(index, name, shape, _DTYPES[type_id])
    raw = buffers[t.scalar(2, "I")]
    if len(raw):
        tensor.data = np.frombuffer(raw, dtype=_DTYPES[type_id]).reshape(shape)
    quant = t.table(4)
    # QuantizationParameters: 2 scale, 3 zero_point, 6 quantized_dimension.
    if quant is not None and quant.vector(2, "f") and tensor.dtype in (np.int8, np.uint8, np.int16):
        tensor.scale = np.array(quant.vector(2, "f"), np.float32)
        tensor.zero_point = np.array(quant.vector(3, "q") or [0], np.float32)
        tensor.axis = quant.scalar(6, "i")
    return tensor


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 0) -> np.ndarray:
    """Integer values to float32: (q - zero_point) * scale, per tensor or per slice along `axis`."""
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = scale.size
    zero = zero_point.reshape(shape) if zero_point.size > 1 else zero_point.reshape(())
    return ((q.astype(np.float32) - zero) * scale.reshape(shape)).astype(np.float32)


def _operator(o: _Table, codes: list[str]) -> Operator:
    # Operator fields: 0 opcode_index, 1 inputs, 2 outputs, 3 builtin_options_type, 4 builtin_options.
    name = codes[o.scalar(0, "I")]
    spec = _OPTIONS.get(name, [])
    table = o.table(4)
    options = {key: table.scalar(i, fmt, default) if table else default for i, (key, fmt, default) in enumerate(spec)}
    if "padding" in options:
        options["padding"] = PADDING[options["padding"]]
    if "activation" in options:
        if options["activation"] not in ACTIVATION:
            raise ValueError(f"{name} has fused activation {options['activation']}, which this reader does not handle")
        options["activation"] = ACTIVATION[options["activation"]]
    return Operator(name, o.vector(1, "i"), o.vector(2, "i"), options)
