"""Shared Triton helpers for counter-based normals (Philox4x32-10 → Box–Muller), used by interp_embed and randn."""
from __future__ import annotations

from ._backend import interpreting, triton_available

if triton_available():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def log_near_one(v):
        """log(1 − v) for 0 < v < 2^-6 by its series −(v + v²/2 + v³/3 + v⁴/4): truncation below v⁵/5, i.e.
        relative error < 1e-8, in FMAs (fp32 rounding on top)."""
        return -v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25)))

    @triton.jit
    def box_muller(x, y, FAST: tl.constexpr):
        """Two uint32 → two N(0, 1): u = (top 23 bits + ½)·2^-23 ∈ (0, 1), never 0, so log(u) is finite.

        FAST (CUDA): the MUFU approximations (lg2/sin/cos.approx through libdevice's fast_* functions) instead of
        the precise libdevice log/sin/cos, which compile to long software sequences (sm_90a PTX: the precise
        interp_embed_hidden_fwd kernel has 4582 lines and no MUFU op for them, the fast one 2364; philox_normal
        drops from 103 to 55 registers). sin/cos.approx are accurate to 2^-20.9 absolutely on [−π, π] only, so
        they take θ − π ∈ [−π, π) and negate: cos θ = −cos(θ − π), sin θ = −sin(θ − π). The normals then
        differ from the precise ones by a few 1e-6 absolutely (r < 5.8), far below the bf16 rounding they get
        next; the counters, hence the streams, are unchanged. The interpreter has no libdevice: FAST=False there.
        lg2.approx's error is absolute (~2^-22 on [0.5, 2]), large against log u1 ≈ −(1 − u1) as u1 → 1: there
        r = √(−2 log u1) would be off by up to ~6e-4, or NaN from a positive log at u1 = 1 − 2^-24; for
        1 − u1 < 2^-6 (exact in fp32) log_near_one's series takes over, so r stays within ~2e-6 everywhere."""
        u1 = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        u2 = ((y >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        if FAST:
            v = 1.0 - u1
            r = tl.sqrt(-2.0 * tl.where(v < 0.015625, log_near_one(v), libdevice.fast_logf(u1)))
            th = 6.283185307179586 * u2 - 3.141592653589793
            return -r * libdevice.fast_cosf(th), -r * libdevice.fast_sinf(th)
        else:
            r = tl.sqrt(-2.0 * tl.log(u1))
            th = 6.283185307179586 * u2
            return r * tl.cos(th), r * tl.sin(th)


def fast_math() -> bool:
    """MUFU approximations in Box–Muller on a GPU; the exact functions under the interpreter (no libdevice)."""
    return not interpreting()
