"""randn_philox: standard normal noise from a seed held in a device tensor (counter-based Philox).

CUDA-graph safe: the seed is read by the kernel from device memory, so a captured graph draws fresh noise
on every replay after `seed.fill_(s)`, with no recapture and no host round trip; the same (seed, stream)
gives the same numbers eagerly and in a replay. Element i of stream k uses the Philox counter
(q mod 2^32, q div 2^32, k, 0) with q = i // 4 (lane i % 4), so the first n values of a stream do not depend on
how many are drawn (a batch padded up to a bucket keeps its first rows' noise); the high word of q (0 below
2^34 values) lets one draw exceed 2^32 values (an OWT bucket of 8192 holds 6.4e9). randn_philox_fwd's `offset`
starts a draw inside the stream (a multiple of 4: the tests reach the high word with it). Four consecutive
elements share one Philox call (lanes 0-3).

Reference: none in reference.py (the published code draws with torch.randn; any N(0, 1) source is the
same law). Backends: 'triton' (CUDA, or CPU under TRITON_INTERPRET=1); 'torch' — torch.randn from a CPU
generator seeded with (seed, stream): host-side, for CPU runs only (it reads the seed tensor).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._backend import resolve, triton_available
from ._rng import fast_math

if triton_available():
    import triton
    import triton.language as tl

    from ._rng import box_muller

    # Triton specializes an int argument equal to 1 into a constexpr (stream=1 then has no .to()): keep them runtime.
    @triton.jit(do_not_specialize=["n", "stream", "q0"])
    def _randn_philox_kernel(OUT, SEED, n, stream, q0, BLOCK: tl.constexpr, FAST: tl.constexpr):
        """OUT[i] = element 4·q0 + i of the stream: lane i % 4 of Philox4x32-10 on the counter (q mod 2^32,
        q div 2^32, stream, 0), q = q0 + i // 4: one Philox call and two Box–Muller pairs per four normals
        (tl.randn spends one call per normal and uses the precise log/sin/cos; on the H100 it drew 25M bf16 values
        in 127 µs, ~4x what the stores alone cost)."""
        q = q0.to(tl.int64) + tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        q_lo = (q & 0xFFFFFFFF).to(tl.uint32)
        q_hi = (q >> 32).to(tl.uint32)
        zero = tl.zeros((BLOCK // 4,), dtype=tl.uint32)
        seed = tl.load(SEED)
        x0, x1, x2, x3 = tl.philox(seed, q_lo, q_hi, zero + stream.to(tl.uint32), zero)
        n0, n1 = box_muller(x0, x1, FAST)
        n2, n3 = box_muller(x2, x3, FAST)
        # join(join(n0, n2), join(n1, n3))[q, i, k] = n_{2i+k}: the row-major reshape puts it at 4q + 2i + k
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:    # full block: unmasked, so the stores vectorize (n is not specialized)
            tl.store(OUT + offs, z.to(OUT.dtype.element_ty))
        else:
            tl.store(OUT + offs, z.to(OUT.dtype.element_ty), mask=offs < n)


def randn_philox_fwd(out: torch.Tensor, seed: torch.Tensor, stream: int, offset: int = 0) -> torch.Tensor:
    """out[i] = element offset + i of stream `stream` (offset: a non-negative multiple of 4)."""
    n = out.numel()
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if offset < 0 or offset % 4 or offset + n > 2 ** 63:
        raise ValueError(f"offset must be a non-negative multiple of 4 with offset + n ≤ 2^63, got {offset}")
    block = 1024 if out.device.type == "cuda" else max(16, min(4096, triton.next_power_of_2(n)))
    _randn_philox_kernel[(triton.cdiv(n, block),)](out, seed, n, int(stream), int(offset) // 4, BLOCK=block,
                                                   FAST=fast_math(), num_warps=4 if out.device.type == "cuda" else 1)
    return out


def compile_specs() -> list[dict]:
    if not triton_available():
        return []
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        out.append(dict(name=f"_randn_philox_kernel[{dt}]", fn=_randn_philox_kernel,
                        signature={"OUT": f"*{dt}", "SEED": "*i64", "n": "i32", "stream": "i32", "q0": "i64",
                                   "BLOCK": "constexpr", "FAST": "constexpr"},
                        constexprs={"BLOCK": 1024, "FAST": True}, num_warps=4, num_stages=1))
    return out


def randn_philox(shape: Sequence[int], seed: torch.Tensor, stream: int = 0, dtype: torch.dtype = torch.float32,
                 out: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """N(0, 1) samples of `shape` on seed's device. seed: int64 tensor with one element (device-resident:
    update it with `seed.fill_(s)`); stream: a non-negative int naming an independent stream."""
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError("seed must be an int64 tensor with one element")
    if not 0 <= int(stream) < 2 ** 31:
        raise ValueError("stream must be in [0, 2^31)")
    if out is None:
        out = torch.empty(tuple(shape), device=seed.device, dtype=dtype)
    be = resolve(backend, seed.device)
    if be == "triton":
        return randn_philox_fwd(out, seed, stream)
    if seed.device.type == "cuda":
        raise RuntimeError("randn_philox on CUDA needs backend='triton' (the torch fallback reads the seed on the host)")
    g = torch.Generator().manual_seed((int(seed.item()) * 1_000_003 + int(stream)) % 2 ** 63)
    return out.copy_(torch.randn(out.shape, generator=g, dtype=torch.float32))
