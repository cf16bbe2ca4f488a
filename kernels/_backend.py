"""Backend selection shared by the ops: 'reference' | 'torch' (chunked, any device) | 'triton' | 'auto'."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "reference", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return backend


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
