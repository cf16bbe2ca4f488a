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


@functools.lru_cache(maxsize=1)
def host_descriptors() -> bool:
    """Whether triton has host tensor descriptors (triton.tools.tensor_descriptor, triton ≥ 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except Exception:
        return False
    return True


def tma_device_ok(t: torch.Tensor) -> bool:
    """The device half of the rule every opt-in TMA kernel shares: host tensor descriptors exist; on CUDA,
    sm_90+ and 16-bit data (the variants exist to feed wgmma; fp32 runs the exact FMA dot, where a TMA kernel
    at the fp32 configs spilled in the compile check). The interpreter takes fp32 (its bf16 math is wrong)."""
    if not host_descriptors():
        return False
    return not (t.device.type == "cuda" and (t.dtype == torch.float32 or torch.cuda.get_device_capability(t.device)[0] < 9))


def tma_rows_ok(block_k: int, *tensors: torch.Tensor) -> bool:
    """Whether 2-D row-major operands (row strides in elements, last stride 1) can back host tensor descriptors
    with a [·, block_k] box: 16-byte aligned bases and row strides, a box row of a multiple of 16 bytes. TMA
    zero-fills out-of-bounds boxes, so neither the row count nor D % block_k matters."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(-1) == 1
               for t in tensors) and (block_k * tensors[0].element_size()) % 16 == 0
