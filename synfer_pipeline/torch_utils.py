"""Device and dtype choices shared by every model role."""

from __future__ import annotations

import torch


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
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    if device == "cpu" and table[dtype] is torch.float16:
        return torch.float32
    return table[dtype]
