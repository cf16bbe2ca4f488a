"""NVTX ranges for Nsight Systems / torch.profiler: `with nvtx.range("block3"): ...`.

Uses the `nvtx` package when it imports, else torch.cuda.nvtx when CUDA is available, else a no-op. Ranges
are host-side markers: free without a profiler attached, and they vanish inside a replayed CUDA graph (the
graph's kernels appear under the range that was open when it was launched).
"""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=1)
def _impl():
    try:
        import nvtx as _nvtx  # noqa: PLC0415
        return "nvtx", _nvtx
    except Exception:
        pass
    if torch.cuda.is_available():
        return "torch", torch.cuda.nvtx
    return "none", None


def backend() -> str:
    """'nvtx' (the nvtx package), 'torch' (torch.cuda.nvtx) or 'none'."""
    return _impl()[0]


@contextlib.contextmanager
def _torch_range(mod, name):
    mod.range_push(name)
    try:
        yield
    finally:
        mod.range_pop()


_record = [False]      # set by `with record_functions():` (fmlm profile), never at import


@contextlib.contextmanager
def record_functions(enabled: bool = True):
    """Also emit torch.profiler record_function ranges (so the ranges show in torch.profiler traces) while
    active. Off by default: a record_function costs a few µs of host time per range."""
    old, _record[0] = _record[0], enabled
    try:
        yield
    finally:
        _record[0] = old


def _nvtx_range(name: str):
    kind, mod = _impl()
    if kind == "nvtx":
        return mod.annotate(name, domain="fmlm")
    if kind == "torch":
        return _torch_range(mod, name)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _both(name: str):
    with torch.profiler.record_function(name), _nvtx_range(name):
        yield


def range(name: str):  # noqa: A001 (mirrors nvtx.annotate / torch.cuda.nvtx.range)
    """A context manager marking `name` on the NVTX timeline (a no-op without NVTX)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if _record[0]:
        return _both(name)
    return _nvtx_range(name)
