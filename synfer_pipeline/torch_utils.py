"""Device and dtype choices shared by every model role: the one dtype table."""

from __future__ import annotations

import torch

# Every spelling a profile or a training setting may use. Mixed-precision names ("fp16", "bf16") are entries too.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                                  "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device is checked so a typo fails early."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was configured but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """torch dtype by name; half precision on CPU falls back to float32 (CPU kernels for it are slow or missing)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if device == "cpu" and DTYPES[dtype] is torch.float16:
        return torch.float32
    return DTYPES[dtype]


def mixed_precision_for(dtype: str) -> str:
    """accelerate's mixed-precision name ("no", "fp16", "bf16") for a compute dtype name."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(DTYPES[dtype], "no")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen modules are cast to under accelerate's `mixed_precision` ("no" -> float32)."""
    return DTYPES.get(mixed_precision, torch.float32)
