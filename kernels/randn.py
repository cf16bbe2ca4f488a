"""randn_philox: standard normal noise from a seed held in a device tensor (counter-based Philox).

CUDA-graph safe: the seed is read by the kernel from device memory, so a captured graph draws fresh noise
on every replay after `seed.fill_(s)`, with no recapture and no host round trip; the same (seed, stream)
gives the same numbers eagerly and in a replay. Element i of stream k uses the Philox counter
(k·2^32 + i), so the first n values of a stream do not depend on how many are drawn (a batch padded up
to a bucket keeps its first rows' noise).

Reference: none in reference.py (the published code draws with torch.randn; any N(0, 1) source is the
same law). Backends: 'triton' (CUDA, or CPU under TRITON_INTERPRET=1); 'torch' — torch.randn from a CPU
generator seeded with (seed, stream): host-side, for CPU runs only (it reads the seed tensor).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._backend import resolve, triton_available

if triton_available():
    import triton
    import triton.language as tl

    # Triton specializes an int argument equal to 1 into a constexpr (stream=1 then has no .to()): keep them runtime.
    @triton.jit(do_not_specialize=["n", "stream"])
    def _randn_philox_kernel(OUT, SEED, n, stream, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(SEED)
        z = tl.randn(seed, offs + stream.to(tl.int64) * 4294967296)
        tl.store(OUT + offs, z.to(OUT.dtype.element_ty), mask=offs < n)


def randn_philox_fwd(out: torch.Tensor, seed: torch.Tensor, stream: int) -> torch.Tensor:
    n = out.numel()
    if n >= 2 ** 32:
        raise ValueError("a stream holds at most 2^32 values")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    block = 1024 if out.device.type == "cuda" else max(16, min(4096, triton.next_power_of_2(n)))
    _randn_philox_kernel[(triton.cdiv(n, block),)](out, seed, n, int(stream), BLOCK=block,
                                                   num_warps=4 if out.device.type == "cuda" else 1)
    return out


def compile_specs() -> list[dict]:
    if not triton_available():
        return []
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        out.append(dict(name=f"_randn_philox_kernel[{dt}]", fn=_randn_philox_kernel,
                        signature={"OUT": f"*{dt}", "SEED": "*i64", "n": "i32", "stream": "i32", "BLOCK": "constexpr"},
                        constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1))
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
