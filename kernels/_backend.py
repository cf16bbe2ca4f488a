"""Backend selection shared by the ops: 'reference' | 'torch' (chunked, any device) | 'triton' | 'auto'."""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading

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


def valid_rows(n_valid, rows: int) -> int:
    """n_valid (None: all `rows`) as an int in (0, rows]; a float, even 2.0, is refused rather than truncated."""
    if n_valid is None:
        return rows
    if isinstance(n_valid, bool) or not isinstance(n_valid, int) and not hasattr(n_valid, "__index__"):
        raise TypeError(f"n_valid must be an int, got {n_valid!r}")
    V = operator.index(n_valid)
    if not 0 < V <= rows:
        raise ValueError(f"n_valid must be in (0, {rows}], got {V}")
    return V


def check_indices(idx: torch.Tensor, n: int, name: str, ignore: "int | None" = None) -> None:
    """idx must be an integer tensor with every entry in [0, n) (or equal to `ignore`): an index past the table
    would read out of bounds in a kernel (garbage, or an illegal address on a GPU) and one in the padding would
    be silently wrong. CPU tensors are checked here (ValueError); CUDA tensors by a device-side assert, which
    costs no host synchronization (a failure surfaces at the next synchronizing call); not while torch.compile
    traces."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32/int64, got {idx.dtype}")
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (idx < 0) | (idx >= n)
    if ignore is not None:
        bad &= idx != ignore
    if idx.device.type == "cuda":
        torch._assert_async(~bad.any(), f"{name} out of range [0, {n})")
    elif bool(bad.any()):
        i = int(bad.nonzero()[0].tolist()[0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name} must lie in [0, {n})" + (f" or be {ignore}" if ignore is not None else "")
                         + f"; {name}[{i}] = {int(idx[i])}")


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


class ChunkBufs:
    """Chunk-sized scratch tensors for the chunked 'torch' backends, reused across chunks: on a 2-core CPU a
    fresh chunk tensor per chunk cost a page-faulting allocation each time (measurements at the call sites).
    Slot i holds one live chunk; get() views its first rows·cols elements."""

    def __init__(self, rows: int, cols: int, device, dtype):
        self.size, self.device, self.dtype, self.flat = rows * cols, device, dtype, {}

    def get(self, slot: int, rows: int, cols: int) -> torch.Tensor:
        if slot not in self.flat:
            self.flat[slot] = torch.empty(self.size, device=self.device, dtype=self.dtype)
        return self.flat[slot][:rows * cols].view(rows, cols)


def chunk_logits(hr: torch.Tensor, weight: torch.Tensor, bias, v0: int, v1: int, out=None) -> torch.Tensor:
    """hr·W[v0:v1]ᵀ + b[v0:v1] in hr's dtype, one addmm with the bias folded in, into `out` when given."""
    w = weight[v0:v1].to(hr.dtype).T
    if bias is not None:
        return torch.addmm(bias[v0:v1].to(hr.dtype), hr, w, out=out)
    return torch.mm(hr, w, out=out)


def no_autocast(fn):
    """For the chunked 'torch' backends, which compute in acc_dtype: run fn with autocast off on the device of
    its first argument, so an enclosing bf16 autocast (the trainer's) does not turn their fp32 GEMMs into bf16
    ones (and in-place updates of fp32 accumulators by bf16 products into dtype errors)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(device_type=args[0].device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@functools.lru_cache(maxsize=1)
def host_descriptors() -> bool:
    """Whether triton has host tensor descriptors (triton.tools.tensor_descriptor, triton ≥ 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except Exception:
        return False
    return True


def tma_device_ok(t: torch.Tensor) -> bool:
    """The device half of the rule every TMA kernel shares: host tensor descriptors exist; on CUDA,
    sm_90+ and 16-bit data (the variants exist to feed wgmma; fp32 runs the exact FMA dot, where a TMA kernel
    at the fp32 configs spilled in the compile check). The interpreter takes fp32 (its bf16 math is wrong)."""
    if not host_descriptors():
        return False
    return not (t.device.type == "cuda" and (t.dtype == torch.float32 or torch.cuda.get_device_capability(t.device)[0] < 9))


def tma_rows_ok(block_k: int, *tensors: torch.Tensor) -> bool:
    """Whether 2-D row-major operands (row strides in elements, last stride 1) can back host tensor descriptors
    with a [·, block_k] box: 16-byte aligned bases and row strides, a box row of a multiple of 16 bytes, rows that
    do not overlap (a descriptor's row stride must cover the row: an expanded h with row stride 0 passed the
    alignment test and would fail to encode on a GPU). TMA zero-fills out-of-bounds boxes, so neither the row count
    nor D % block_k matters."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(-1) == 1
               and t.stride(0) >= t.shape[-1] for t in tensors) and (block_k * tensors[0].element_size()) % 16 == 0


# ---------------------------------------------------------------------------------------------
# Programmatic dependent launch (opt-in: Sampler kernel option "pdl")
# ---------------------------------------------------------------------------------------------
_PDL = threading.local()


@contextlib.contextmanager
def pdl_launches(enabled: bool = True, prefetch: bool = False):
    """Within this block the launchers that support it (linear, adaln, softcap attention, logits_argmax) launch
    their kernels with programmatic dependent launch on sm_90+: a kernel may be scheduled while its predecessor
    in the stream finishes (hiding the launch gap between two short kernels, which at batch 1 is a large part of
    a graph replay), and it waits (griddepcontrol.wait) for the predecessor's completion and memory before its
    first load or store, so every read-after-write and write-after-read order is kept. A CUDA graph captured in
    the block keeps the programmatic edges. prefetch (with enabled): the kernels that read weights (linear, the
    pointer logits_argmax) first ask L2 for their weight lines, then wait (kernels/_prefetch.py)."""
    prev = getattr(_PDL, "on", False), getattr(_PDL, "prefetch", False)
    _PDL.on, _PDL.prefetch = bool(enabled), bool(enabled and prefetch)
    try:
        yield
    finally:
        _PDL.on, _PDL.prefetch = prev


@functools.lru_cache(maxsize=None)
def _pdl_device_ok(index: int) -> bool:
    try:
        import triton.language.extra.cuda as tlc  # noqa: PLC0415
    except Exception:
        return False
    return hasattr(tlc, "gdc_wait") and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_active(t: torch.Tensor) -> bool:
    """Whether a launch for tensor t's device should use programmatic dependent launch now (see pdl_launches):
    inside the block, on CUDA sm_90+ (never under the interpreter), with a triton that has griddepcontrol."""
    if not getattr(_PDL, "on", False) or t.device.type != "cuda" or interpreting():
        return False
    return _pdl_device_ok(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_prefetch_active(t: torch.Tensor) -> bool:
    """Whether a PDL launch for tensor t's device should also prefetch its weights into L2 before the wait."""
    return getattr(_PDL, "prefetch", False) and pdl_active(t)


# ---------------------------------------------------------------------------------------------
# Deep operand pipelines for the small-row GEMMs (opt-in: Sampler kernel option "gemm_deep_pipeline")
# ---------------------------------------------------------------------------------------------
_DEEP = threading.local()


@contextlib.contextmanager
def deep_pipelines(enabled: bool = True):
    """Within this block the small-row GEMM launcher (kernels/linear.py) gives each program as many operand stages
    as its K loop has steps, within linear.DEEP_PIPELINE_SMEM of shared memory, so that all of a program's loads
    are in flight before its first MMA instead of num_stages − 1 at a time. A launch policy like pdl_launches:
    it changes no value (the same tiles, dots and order), only when the loads are issued."""
    prev = getattr(_DEEP, "on", False)
    _DEEP.on = bool(enabled)
    try:
        yield
    finally:
        _DEEP.on = prev


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def deep_pipelines_active(t: torch.Tensor) -> bool:
    """Whether a launch for tensor t should take deep pipelines now: inside the block, on CUDA, not interpreting."""
    return getattr(_DEEP, "on", False) and t.device.type == "cuda" and not interpreting()


def pdl_launch_kwargs(active: bool) -> dict:
    """The launch keywords for a kernel with a USE_PDL constexpr: USE_PDL, and launch_pdl when active (the
    interpreter's launcher does not take launch_pdl)."""
    return {"USE_PDL": True, "launch_pdl": True} if active else {"USE_PDL": False}


def launch_opts(cfg: dict) -> dict:
    """num_warps and num_stages of a launcher config, and its register cap `maxnreg` when it sets one (ptxas
    .maxnreg: e.g. 128 registers let two 8-warp CTAs share an SM). The interpreter has no registers: the cap is
    dropped there."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg") and not interpreting():
        opts["maxnreg"] = int(cfg["maxnreg"])
    return opts


def with_default_constexprs(specs: list[dict]) -> list[dict]:
    """Compile specs (bench/compile_check.py) completed with every trailing constexpr parameter that has a
    default and that the spec leaves out (e.g. USE_PDL = False): triton.compile's ASTSource wants a value for
    each parameter. A spec that names such a parameter keeps its own value."""
    import inspect  # noqa: PLC0415

    out = []
    for spec in specs:
        sig, const = dict(spec["signature"]), dict(spec.get("constexprs", {}))
        for name, p in inspect.signature(spec["fn"].fn).parameters.items():
            if name not in sig and p.default is not inspect.Parameter.empty:
                sig[name] = "constexpr"
                const.setdefault(name, p.default)
        out.append({**spec, "signature": sig, "constexprs": const})
    return out


ADDMM_FP32_OUT: dict = {}      # device → whether addmm(out_dtype=float32) accumulates in place, correctly


def addmm_fp32_ok(device: torch.device) -> bool:
    """Probe once per device, outside graph capture: torch.addmm(C_fp32, A_16, B_16, out_dtype=float32, out=C)
    (cuBLAS with beta = 1 into the fp32 output; CUDA-only, torch ≥ 2.9) against an fp32 reference."""
    key = str(device)
    if key not in ADDMM_FP32_OUT:
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False
        ADDMM_FP32_OUT[key] = _probe_addmm_fp32(device)
    return ADDMM_FP32_OUT[key]


def _probe_addmm_fp32(device: torch.device) -> bool:
    # autocast off: the first call can come from inside the trainer's bf16 autocast (the FMLM loss's
    # vocab_attention), where the fp32 reference product would be computed in bf16, fail the comparison, and
    # the cached False would turn the fp32 accumulation off for the whole process
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(64, 96, device=device, generator=g).to(torch.bfloat16)
            b = torch.randn(96, 48, device=device, generator=g).to(torch.bfloat16)
            c = torch.randn(64, 48, device=device, generator=g)
            want = c + a.float() @ b.float()
            got = torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            return got.data_ptr() == c.data_ptr() and bool(torch.allclose(c, want, rtol=1e-4, atol=1e-3))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def accumulate_mm(out: torch.Tensor, p: torch.Tensor, e: torch.Tensor, fp32_addmm: bool = True) -> None:
    """out (fp32) += p·e. Where torch has addmm(out_dtype=float32) on this device, one cuBLAS GEMM accumulates
    into out in fp32 (beta = 1); otherwise p·e comes back in p's dtype and a second kernel adds it, which costs
    a bf16 rounding of every chunk's partial sum and ~150 MB of extra traffic per chunk at 16384 rows
    (napkin: ~50 µs per chunk on an H100, ~0.35 ms per 16384-row call; not yet measured). Used by the chunked
    vocab_attention ("gemm": o += p·E) and linear_cross_entropy backward (dh += dS·W[chunk])."""
    if fp32_addmm and p.dtype != out.dtype and addmm_fp32_ok(out.device):
        torch.addmm(out, p, e, out_dtype=torch.float32, out=out)
    else:
        out += p @ e
