"""vocab_attention: softmax(cap(h·Wᵀ+b))·E and its log-sum-exp, never writing (rows, V) logits;
flow_map_step: the same with the flow-map update h_next = a·h_state + b·(D·E) + c·noise as epilogue.

Reference: fmlm.kernels.reference.vocab_attention_ref (and flow_map_update_ref for the epilogue).
It is attention over the vocabulary: queries = output features h, keys = output weights W, values =
the input embedding E, head dim D; an online softmax over V tiles (DESIGN.md §2.2).

Backends: 'triton' — the fused kernel below; 'torch' — chunked plain PyTorch (any device);
'reference' — materializes logits.

Triton design and napkin math (H100 SXM, bf16, rows = 16384, V = 50258, D = De = 768):
  useful work 4·rows·V·D = 2.53 TFLOP → 3.3 ms at the measured 766 TFLOP/s bf16 ceiling.
  The constraint is the register file: the fp32 accumulator O is BLOCK_M × De = 64 × 768 × 4 B = 192 KiB
  of the SM's 256 KiB, so one program holds at most 64 rows with all of De (128 rows would need 384 KiB).
  Alternatives and why they lost on paper (FLOPs below are always the useful 4·rows·V·D):
    • split De over programs (BLOCK_M=128, 2 or 3 De slices): S = h·Wᵀ recomputed per slice → 6 or 8
      rows·V·D executed, ≤ 67 % / ≤ 50 % of the ceiling as useful work;
    • two passes (lse first, then P·E): 6 rows·V·D executed;
    • K loop over D per V tile with E loaded in the epilogue: the pipeliner only prefetches loads that
      feed top-level dots, so the 96 KiB E tile load was exposed on every tile (measured in the TTGIR:
      a synchronous tt.load inside the scf.if), and h is re-read from L2 for every tile.
  Chosen ("n16"): the 64-row query block h (64×768 bf16 = 96 KiB) is loaded once and stays in shared
  memory; each loop iteration takes one V tile of BLOCK_N = 16 rows of W and of E (2·16·768·2 B = 48 KiB,
  double-buffered: 196 KiB of shared memory in all), all three dot groups at the top level of a single
  loop, so both W and E are prefetched (async copies, checked in the TTGIR). Per tile: S = h·Wᵀ (3 dots of
  K = 256), bias, cap, mask columns ≥ n_valid, softmax, O += P·E (3 dots of N = 256). L2 traffic per
  program and tile: W + E = 48 KiB for 4·64·16·768 FLOP → 64 FLOP/B, the bound of a 64-row block
  (at ~40-50 B/clk/SM of L2 bandwidth the MMA cannot run at its peak of 4096 FLOP/clk/SM).
  Known costs measured in the TTGIR / compile check: with 8 warps Triton computes the 64×16 S tile in both
  warpgroups (warpsPerCTA [8, 1]; 1.5× the useful MMA work), waits on each S dot, and uses 255 registers
  (no spills). "n16_w4_de384" (one warpgroup, De split in two: S computed twice) trades that redundancy
  for recomputation; bench/bench_vocab_attention.py times every config in CONFIGS.
  Softmax: with a cap ≤ 40 and bf16/fp32 P, exp(z − cap) needs no running max (FIXED_MAX: z ≤ cap), so O is
  never rescaled; fp16 or uncapped logits take a lazily rescaled online softmax (the reference max moves
  only when the row max grows by > 8). Per S element: 3 MUFU ops (exp for tanh, reciprocal, exp).
  Small row counts (B=1, L=128: 2 row blocks) split V across programs (grid axis 1, one wave); each split
  writes (m, l, O) partials (splits × rows × De fp32, never rows × V) and a combine kernel merges them. The
  flow-map update runs in that combine kernel (for flow_map_step the partial path is always taken: an
  extra rows × De fp32 round trip, < 1 % of the sweep over V, instead of a register-heavy epilogue that
  spilled ~1 KiB in the main kernel).
  Padded columns (≥ n_valid) are masked to −inf after the cap (cap(−inf) = −cap, so a −inf bias is
  not enough).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import reference as ref
from ._backend import (ChunkBufs, acc_dtype, chunk_logits, no_autocast, resolve, tma_device_ok, tma_rows_ok,
                       valid_rows)
from ._backend import accumulate_mm as _accumulate_mm

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without triton; backend='triton' then raises
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no host tensor descriptors, {"impl": "gemm_fused", "tma": True} runs pointers
    TensorDescriptor = None

TORCH_V_CHUNK = 4096     # (rows × 4096) fp32 logits per chunk: 16 MB at 1024 rows
TORCH_ROW_CHUNK = 8192

# Hopper configs for 16-bit inputs at D = De = 768 (see the napkin math above; the bench measures each).
# Shared memory: h block 64×768×2 = 96 KiB resident + per stage W and E rows 2·BLOCK_N·768·2 B.
CONFIGS = {
    "n16": dict(BLOCK_M=64, BLOCK_N=16, BLOCK_DE=256, DE_CHUNKS=3, num_warps=8, num_stages=2),
    "n16_de384": dict(BLOCK_M=64, BLOCK_N=16, BLOCK_DE=128, DE_CHUNKS=3, num_warps=8, num_stages=3),
    "n16_w4_de384": dict(BLOCK_M=64, BLOCK_N=16, BLOCK_DE=128, DE_CHUNKS=3, num_warps=4, num_stages=3),
}
GPU_CONFIG = "n16"
# fp32 inputs run the exact (non-tensor-core) dot, whose operands live in registers: only narrow output
# slices (64 columns per program) compile without spills. A correctness path: backend='auto' sends fp32
# to the chunked torch backend instead.
GPU_CONFIG_FP32 = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DE=32, DE_CHUNKS=2, num_warps=8, num_stages=2)
# The interpreter runs each program in numpy with a fixed Python cost per loop iteration: few, wide V tiles
# and a row block no taller than needed are fastest there.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=4096, BLOCK_DE=256, DE_CHUNKS=3, num_warps=4, num_stages=1)
COMBINE_BLOCK_M, COMBINE_BLOCK_DE = 16, 128


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _vocab_attention_fwd_kernel(
        h_ptr, w_ptr, b_ptr, e_ptr,
        out_ptr, lse_ptr, pm_ptr, pl_ptr,
        M, n_valid, D, DE, stride_h, stride_w, stride_e, stride_out,
        tiles_per_split, cap, two_over_cap,
        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, FIXED_MAX: tl.constexpr, SPLIT_V: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
        BLOCK_DE: tl.constexpr, DE_CHUNKS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_e = tl.program_id(2)
        n_tiles = tl.cdiv(n_valid, BLOCK_N)
        t_begin = pid_s * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        dd0 = tl.arange(0, BLOCK_D)
        dd1 = dd0 + BLOCK_D
        dd2 = dd1 + BLOCK_D
        de0 = pid_e * (BLOCK_DE * DE_CHUNKS) + tl.arange(0, BLOCK_DE)
        de1 = de0 + BLOCK_DE
        de2 = de1 + BLOCK_DE

        # The query block stays in shared memory for the whole V sweep (loaded once, D in up to three
        # chunks): per V tile only W and E rows stream in, and both feed top-level dots, so the
        # pipeliner prefetches them num_stages tiles ahead.
        h_rows = h_ptr + rows64[:, None] * stride_h
        h0 = tl.load(h_rows + dd0[None, :], mask=row_ok[:, None] & (dd0 < D)[None, :], other=0.0)
        h1 = h0
        h2 = h0
        if D_CHUNKS >= 2:
            h1 = tl.load(h_rows + dd1[None, :], mask=row_ok[:, None] & (dd1 < D)[None, :], other=0.0)
        if D_CHUNKS >= 3:
            h2 = tl.load(h_rows + dd2[None, :], mask=row_ok[:, None] & (dd2 < D)[None, :], other=0.0)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        if FIXED_MAX:
            m_i = tl.full((BLOCK_M,), 0.0, tl.float32) + cap
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        o0 = tl.zeros((BLOCK_M, BLOCK_DE), tl.float32)
        o1 = tl.zeros((BLOCK_M, BLOCK_DE), tl.float32)
        o2 = tl.zeros((BLOCK_M, BLOCK_DE), tl.float32)
        # Software prefetch of the bias one tile ahead (the pipeliner only prefetches dot operands).
        b_nx = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_BIAS:
            cols_nx = t_begin * BLOCK_N + offs_n
            b_nx = tl.load(b_ptr + cols_nx, mask=cols_nx < n_valid, other=0.0).to(tl.float32)
        for tile in range(t_begin, t_end):
            cols = tile * BLOCK_N + offs_n
            col_ok = cols < n_valid
            cols64 = cols.to(tl.int64)
            w_rows = w_ptr + cols64[:, None] * stride_w
            w0 = tl.load(w_rows + dd0[None, :], mask=col_ok[:, None] & (dd0 < D)[None, :], other=0.0)
            if IEEE:
                s = tl.dot(h0, tl.trans(w0), input_precision="ieee")
            else:
                s = tl.dot(h0, tl.trans(w0))
            if D_CHUNKS >= 2:
                w1 = tl.load(w_rows + dd1[None, :], mask=col_ok[:, None] & (dd1 < D)[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(h1, tl.trans(w1), s, input_precision="ieee")
                else:
                    s = tl.dot(h1, tl.trans(w1), s)
            if D_CHUNKS >= 3:
                w2 = tl.load(w_rows + dd2[None, :], mask=col_ok[:, None] & (dd2 < D)[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(h2, tl.trans(w2), s, input_precision="ieee")
                else:
                    s = tl.dot(h2, tl.trans(w2), s)
            z = s + b_nx[None, :]
            if HAS_BIAS:
                cols_nx = cols + BLOCK_N
                b_nx = tl.load(b_ptr + cols_nx, mask=cols_nx < n_valid, other=0.0).to(tl.float32)
            if HAS_CAP:
                # cap·tanh(z/cap) via exp: tanh(x) = sign(x)(1 − e^{−2|x|})/(1 + e^{−2|x|}); absolute
                # error ~1 ulp of 1 (libdevice tanh is not available in the interpreter).
                t = tl.exp(-two_over_cap * tl.abs(z))
                th = cap * tl.fdiv(1.0 - t, 1.0 + t)
                z = tl.where(z >= 0, th, -th)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            if FIXED_MAX:
                # capped logits are ≤ cap, so exp(z − cap) ∈ [e^{−2cap}, 1] needs no running max when P
                # keeps fp32's exponent range (bf16 / fp32, cap ≤ 40): no rescaling of O at all.
                p = tl.exp(z - cap)
                l_i += tl.sum(p, axis=1)
            else:
                # lazy rescaling: move the reference max only when the row max grew by > 8 (p ≤ e^8 fits
                # fp16), so O is rescaled on few tiles.
                m_new = tl.maximum(m_i, tl.max(z, axis=1))
                grow = m_new > m_i + 8.0
                m_use = tl.where(grow, m_new, m_i)
                m_ref = tl.where(m_use == float("-inf"), 0.0, m_use)
                alpha = tl.exp(m_i - m_ref)
                if tl.max(grow.to(tl.int32), axis=0) > 0:
                    o0 = o0 * alpha[:, None]
                    o1 = o1 * alpha[:, None]
                    o2 = o2 * alpha[:, None]
                    l_i = l_i * alpha
                p = tl.exp(z - m_ref[:, None])
                l_i += tl.sum(p, axis=1)
                m_i = m_use
            pe = p.to(e_ptr.dtype.element_ty)
            e_rows = e_ptr + cols64[:, None] * stride_e
            e0 = tl.load(e_rows + de0[None, :], mask=col_ok[:, None] & (de0 < DE)[None, :], other=0.0)
            if IEEE:
                o0 = tl.dot(pe, e0, o0, input_precision="ieee")
            else:
                o0 = tl.dot(pe, e0, o0)
            if DE_CHUNKS >= 2:
                e1 = tl.load(e_rows + de1[None, :], mask=col_ok[:, None] & (de1 < DE)[None, :], other=0.0)
                if IEEE:
                    o1 = tl.dot(pe, e1, o1, input_precision="ieee")
                else:
                    o1 = tl.dot(pe, e1, o1)
            if DE_CHUNKS >= 3:
                e2 = tl.load(e_rows + de2[None, :], mask=col_ok[:, None] & (de2 < DE)[None, :], other=0.0)
                if IEEE:
                    o2 = tl.dot(pe, e2, o2, input_precision="ieee")
                else:
                    o2 = tl.dot(pe, e2, o2)

        if SPLIT_V:
            # Partials relative to this split's own running max; the combine kernel rescales them.
            part = (pid_s * M + rows64)[:, None] * DE
            if pid_e == 0:
                tl.store(pm_ptr + pid_s * M + rows, m_i, mask=row_ok)
                tl.store(pl_ptr + pid_s * M + rows, l_i, mask=row_ok)
            for c in tl.static_range(DE_CHUNKS):
                if c == 0:
                    o = o0
                elif c == 1:
                    o = o1
                else:
                    o = o2
                de = de0 + c * BLOCK_DE
                tl.store(out_ptr + part + de[None, :], o, mask=row_ok[:, None] & (de < DE)[None, :])
        else:
            inv_l = 1.0 / l_i
            if pid_e == 0:
                tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)
            for c in tl.static_range(DE_CHUNKS):
                if c == 0:
                    o = o0
                elif c == 1:
                    o = o1
                else:
                    o = o2
                de = de0 + c * BLOCK_DE
                mask = row_ok[:, None] & (de < DE)[None, :]
                tl.store(out_ptr + rows64[:, None] * stride_out + de[None, :], o * inv_l[:, None], mask=mask)

    @triton.jit
    def _vocab_attention_combine_kernel(
        po_ptr, pm_ptr, pl_ptr, out_ptr, lse_ptr,
        hs_ptr, noise_ptr, ca_ptr, cb_ptr, cc_ptr,
        M, DE, seq_len, n_split, stride_out, stride_hs, stride_noise,
        FLOW: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        de = tl.program_id(1) * BLOCK_DE + tl.arange(0, BLOCK_DE)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & (de < DE)[None, :]
        m_tot = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        # rows past M read m = 0, l = 1 so that they stay finite (they are never stored)
        for s in range(0, n_split):
            m_tot = tl.maximum(m_tot, tl.load(pm_ptr + s * M + rows, mask=row_ok, other=0.0))
        l_tot = tl.zeros((BLOCK_M,), tl.float32)
        o = tl.zeros((BLOCK_M, BLOCK_DE), tl.float32)
        for s in range(0, n_split):
            m_s = tl.load(pm_ptr + s * M + rows, mask=row_ok, other=0.0)
            # a split whose logits are all −inf (possible only without a cap) contributes nothing
            scale = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_tot))
            l_tot += scale * tl.load(pl_ptr + s * M + rows, mask=row_ok, other=1.0)
            po = tl.load(po_ptr + (s * M + rows64)[:, None] * DE + de[None, :], mask=mask, other=0.0)
            o += scale[:, None] * po
        o = o / l_tot[:, None]
        if FLOW:
            bidx = rows // seq_len
            ca = tl.load(ca_ptr + bidx, mask=row_ok, other=0.0).to(tl.float32)
            cb = tl.load(cb_ptr + bidx, mask=row_ok, other=0.0).to(tl.float32)
            hs = tl.load(hs_ptr + rows64[:, None] * stride_hs + de[None, :], mask=mask, other=0.0)
            o = ca[:, None] * hs.to(tl.float32) + cb[:, None] * o
            if HAS_NOISE:
                cc = tl.load(cc_ptr + bidx, mask=row_ok, other=0.0).to(tl.float32)
                nz = tl.load(noise_ptr + rows64[:, None] * stride_noise + de[None, :], mask=mask, other=0.0)
                o += cc[:, None] * nz.to(tl.float32)
        else:
            if tl.program_id(1) == 0:
                tl.store(lse_ptr + rows, m_tot + tl.log(l_tot), mask=row_ok)
        tl.store(out_ptr + rows64[:, None] * stride_out + de[None, :], o, mask=mask)


# ---------------------------------------------------------------------------------------------
# The "gemm" implementation: cuBLAS for both products, one fused Triton pass in between.
# Measured on an H100 (bf16, 16384 rows × V=50258 × D=768, 2026-11-27): the fused single kernel above ran at
# 115 TFLOP/s (22 ms) — its 64×768 fp32 accumulator caps the row block, so W and E stream from L2 once per 64
# rows — while cuBLAS ran the two products, unfused, at 739 TFLOP/s (3.4 ms). Chunking V keeps that rate
# without the (rows, V) tensor: per chunk of GEMM_V_CHUNK columns, z = h·Wᵀ (cuBLAS) → p = exp(cap(z+b) − cap)
# in place as bf16, row sums of p (this kernel: one read and one write of the chunk) → o += p·E (cuBLAS).
# Under the cap, logits lie in [−cap, cap], so exp(z − cap) needs no running max (e^{−2·30} is a normal fp32).
# H100, 16384 rows: 5.45 ms (464 TFLOP/s) with 8192-column chunks, 5.80 ms (436) with 4096 (2026-11-27).
GEMM_V_CHUNK = 8192        # rows × 8192 bf16 = 268 MB at 16384 rows, 1/6 of the full logits at V=50304
GEMM_MIN_ROWS = 256        # below this the fused kernel's V split fills the GPU better (bench_vocab_attention)
# _cap_exp_rowsum_kernel's program: (rows, columns per step, warps). The pass is memory-bound (one read and one write
# of each chunk: ~2.3 ms of a ~10.5 ms call at 32768 rows, napkin); bench_vocab_attention times other shapes beside it
GEMM_PASS_BLOCK = (16, 256, 4)
if triton is not None:
    @triton.jit
    def _cap_exp_rowsum_kernel(z_ptr, b_ptr, s_ptr, M, C, n_cols, stride_z, cap, inv_cap2,
                               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """z (M, C) logits chunk, overwritten by p = exp(cap·tanh(z/cap) − cap) (0 for columns ≥ n_cols);
        s[m] += Σ_c p[m, c] computed from the stored (rounded) p, so o/s is an exact weighted mean."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :]
            z = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
            # cap·tanh(z/cap) − cap = −2·cap / (1 + e^{2z/cap}): one exp, exact at both ends
            t = -2.0 * cap / (1.0 + tl.exp(z * inv_cap2))
            p = tl.where((cols < n_cols)[None, :], tl.exp(t), 0.0)
            p = p.to(z_ptr.dtype.element_ty)
            tl.store(ptrs, p, mask=rmask[:, None] & cmask[None, :])
            acc += tl.sum(p.to(tl.float32), axis=1)
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        tl.store(s_ptr + rows, s + acc, mask=rmask)


# ---- "gemm_fused": the cap/exp pass moved into the epilogue of the first GEMM (opt-in candidate) ----------------
# config={"impl": "gemm_fused"} (pointer loads) or {"impl": "gemm_fused", "tma": True} (TMA loads and a TMA store).
# Per V chunk a Triton GEMM computes each (row block × V tile) of h·W[chunk]ᵀ (K = D) and, in its epilogue, adds the
# bias, applies the cap, exponentiates (the formula of _cap_exp_rowsum_kernel), zeroes columns ≥ n_valid, stores p
# (the inputs' dtype) into the chunk buffer and writes the tile's row sums of the stored (rounded) p into a
# (tiles, rows) fp32 buffer, summed by torch after the last chunk (deterministic: no atomics). Then the same cuBLAS
# out += p·E. The logits are never rounded to bf16 before the cap (cuBLAS's z is), so this is slightly closer to the
# fp32-logit reference than "gemm".
# Why (napkin, H100, 16384 rows, 8192-column chunks): the pass reads and writes each 268 MB chunk: 3.3 GB of
# traffic per call, ~1.1 ms at ~3 TB/s of the measured 5.45 ms; the fused GEMM writes p once and reads nothing extra.
# Why it may not win (napkin, unmeasured): the epilogue costs 3 MUFU ops per element (exp, reciprocal, exp):
# 128·256·3 / 16 per clk = 6144 clk per 128×256 tile against 12288 clk of MMA at the tensor-core peak. At
# 128×256×64, 8 warps, 3 stages (compile check, sm_90a: 144 KiB of shared memory, 222 registers pointer / 255 TMA)
# one CTA fits per SM, so nothing overlaps that epilogue: ≤ 2/3 of the MMA rate. Per call the MUFU work alone is
# ~0.67 ms (16384·50304·3 ops at 16 per clk per SM, 132 SMs, ~1.75 GHz): ~2.5-3.2 ms in all with the MMA part at
# 700-500 TFLOP/s (cuBLAS / logits_argmax, measured), against cuBLAS (~1.8 ms) + the pass (~1.1 ms) today.
# "bm128_bn128_w4" (one warpgroup, 96 KiB of shared memory, 168 registers TMA / 255 pointer, so 2 CTAs fit per SM)
# lets one CTA's epilogue overlap the other's MMA; the 8-warp 128×128 tile took 151-181 registers (one CTA per SM:
# a smaller tile for nothing, dropped). bench/bench_vocab_attention.py times them beside the default.
# Program order: grouped (GROUP_M row blocks per sweep over the chunk's V tiles, as in Triton's matmul tutorial).
# Unmeasured reasoning: h (25 MB) and the W chunk (12.6 MB) would both fit the 50 MB L2, but the p stores (268 MB per
# chunk) stream through it; grouping keeps a wave's working set small (132 CTAs ≈ 8 h blocks (1.6 MB) + ~17 W tiles
# (6.5 MB), row-major order: ~4 h blocks + all 32 W tiles (12.6 MB)), so W and h are more likely to be L2 hits.
GEMM_FUSED_CONFIGS = {
    "bm128_bn256": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "bm128_bn128_w4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
}
GEMM_FUSED_CONFIG = "bm128_bn256"
# fp32 on CUDA: the exact (FMA) dot needs small tiles (logits_argmax's fp32 config: no spills on sm_90a).
GEMM_FUSED_CONFIG_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
if triton is not None:
    @triton.jit
    def _tile_order(pid, M, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, V tile of the chunk) of program pid: GROUP_M row blocks per sweep over the V tiles."""
        num_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * tl.cdiv(C, BLOCK_N)
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _cap_exp_tile(acc, bias, col_ok, cap, inv_cap2):
        """p = exp(cap·tanh((acc + bias)/cap) − cap) in fp32, 0 where not col_ok (the _cap_exp_rowsum_kernel formula:
        cap·tanh(z/cap) − cap = −2·cap / (1 + e^{2z/cap}), one exp, exact at both ends)."""
        z = acc + bias[None, :]
        t = -2.0 * cap / (1.0 + tl.exp(z * inv_cap2))
        return tl.where(col_ok[None, :], tl.exp(t), 0.0)

    @triton.jit
    def _vocab_logits_cap_exp_kernel(
        h_ptr, w_ptr, b_ptr, p_ptr, ps_ptr,
        M, C, col0, n_valid, D, stride_h, stride_w, stride_p, ps_row0, cap, inv_cap2,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One (row block × V tile) of the chunk [col0, col0 + C): p[rows, cols − col0] = capped exp of h·Wᵀ + b
        (stored in p's dtype; 0 for columns ≥ n_valid); ps[ps_row0 + tile, rows] = row sums of the stored p.
        A tile that crosses the chunk end computes the next chunk's first columns and discards them."""
        pid_m, pid_n = _tile_order(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        lcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        gcols = col0 + lcols
        row_ok = rows < M
        col_ok = (lcols < C) & (gcols < n_valid)
        rows64 = rows.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = h_ptr + rows64[:, None] * stride_h
        w_rows = w_ptr + gcols.to(tl.int64)[:, None] * stride_w
        # the bias is not a dot operand (never prefetched by the pipeliner): loaded before the K loop so its
        # latency hides behind it
        bias = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + gcols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            if EVEN_K:
                a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
                w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0.0)
            else:
                a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :], other=0.0)
                w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < D)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        p = _cap_exp_tile(acc, bias, col_ok, cap, inv_cap2).to(p_ptr.dtype.element_ty)
        tl.store(p_ptr + rows64[:, None] * stride_p + lcols[None, :], p, mask=row_ok[:, None] & (lcols < C)[None, :])
        tl.store(ps_ptr + (ps_row0 + pid_n).to(tl.int64) * M + rows, tl.sum(p.to(tl.float32), axis=1), mask=row_ok)

    @triton.jit
    def _vocab_logits_cap_exp_tma_kernel(
        h_desc, w_desc, b_ptr, p_desc, ps_ptr,
        M, C, col0, n_valid, D, ps_row0, cap, inv_cap2,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """The same tile through host tensor descriptors (Hopper TMA): h (M, D) boxes [BLOCK_M, BLOCK_K], W[:n_valid]
        (n_valid, D) boxes [BLOCK_N, BLOCK_K] (zero fill past M, n_valid and the K tail: no load masks), and p's
        chunk view (M, C) boxes [BLOCK_M, BLOCK_N]: the store goes through shared memory as one bulk copy that
        TMA clips at rows ≥ M and columns ≥ C."""
        pid_m, pid_n = _tile_order(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        lcols = off_n + tl.arange(0, BLOCK_N)
        gcols = col0 + lcols
        col_ok = (lcols < C) & (gcols < n_valid)
        bias = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + gcols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for ki in range(0, tl.cdiv(D, BLOCK_K)):
            a = h_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([col0 + off_n, ki * BLOCK_K])
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        p = _cap_exp_tile(acc, bias, col_ok, cap, inv_cap2).to(p_desc.dtype)
        p_desc.store([off_m, off_n], p)
        rows = off_m + tl.arange(0, BLOCK_M)
        tl.store(ps_ptr + (ps_row0 + pid_n).to(tl.int64) * M + rows, tl.sum(p.to(tl.float32), axis=1), mask=rows < M)


IMPLS = ("fused", "gemm", "gemm_fused")


def _use_gemm(h, cap, config) -> bool:
    config = config or {}
    impl = config.get("impl", "fused" if "BLOCK_M" in config or "BLOCK_N" in config else None)
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"vocab_attention config impl must be one of {IMPLS}, got {impl!r}")
    if impl is not None:
        return impl in ("gemm", "gemm_fused")
    return (h.device.type == "cuda" and h.dtype == torch.bfloat16 and bool(cap) and 0.0 < float(cap) <= 40.0
            and h.shape[0] >= GEMM_MIN_ROWS)


def tma_usable(h: torch.Tensor, weight: torch.Tensor, block_k: int) -> bool:
    """Whether the "gemm_fused" TMA kernel can read h and weight (logits_argmax.tma_usable's rule): host tensor
    descriptors need a 16-byte aligned base and row stride and a box row of a multiple of 16 bytes; on CUDA,
    sm_90+ and 16-bit inputs (fp32 takes the FMA dot, for which the variant brings nothing). The p buffer's
    descriptor is aligned by construction (its row stride is padded, see _vocab_attention_gemm)."""
    return tma_device_ok(h) and tma_rows_ok(block_k, h, weight)


def gemm_fused_config(M: int, device: torch.device, dtype: torch.dtype, D: int, chunk: int) -> dict:
    if device.type != "cuda":
        # interpreter: few, wide programs (a fixed Python cost per program and per K step)
        return dict(BLOCK_M=min(32, _pow2(M)), BLOCK_N=min(512, max(16, _pow2(chunk))),
                    BLOCK_K=min(256, max(16, _pow2(D))), GROUP_M=8, num_warps=4, num_stages=1)
    return dict(GEMM_FUSED_CONFIG_FP32 if dtype == torch.float32 else GEMM_FUSED_CONFIGS[GEMM_FUSED_CONFIG])


def _vocab_attention_gemm(h, weight, bias, embed, cap, n_valid, config=None):
    """(out fp32 (M, De), lse fp32 (M,)) by V chunks: z = h·Wᵀ, capped exp and row sums, cuBLAS o += p·E.
    impl "gemm": cuBLAS z, then _cap_exp_rowsum_kernel in place; impl "gemm_fused": one Triton GEMM with the
    cap/exp epilogue (config keys BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, tma).
    Columns past n_valid inside the last chunk (the engine pads V to a multiple of 128) get p = 0."""
    out, ssum = _gemm_sums(h, weight, bias, embed, cap, n_valid, config)
    out /= ssum[:, None]
    return out, float(cap) + torch.log(ssum)


def _gemm_sums(h, weight, bias, embed, cap, n_valid, config=None):
    """The "gemm" / "gemm_fused" chunk loop: (Σ p·E (M, De) fp32, Σ p (M,) fp32) with p = exp(cap(z) − cap)."""
    if triton is None:
        raise RuntimeError("vocab_attention needs the triton package for backend='triton'")
    if not cap or not 0.0 < float(cap) <= 40.0 or h.dtype == torch.float16:
        raise ValueError("the gemm implementation needs a logit cap in (0, 40] and bf16/fp32 inputs "
                         "(exp(z − cap) down to e^{−2·cap} underflows in fp16)")
    h, weight, bias, embed = _prepare(h, weight, bias, embed)
    config = config or {}
    M = h.shape[0]
    chunk = int(config.get("v_chunk", GEMM_V_CHUNK))
    fp32_addmm = bool(config.get("fp32_addmm", True))
    out = torch.zeros(M, embed.shape[1], device=h.device, dtype=torch.float32)
    Vp = min(weight.shape[0], embed.shape[0])
    # padded ends: aligned shapes for the logits GEMM; the p·E product stops at n_valid, so padding rows that are not
    # finite (the op's contract allows any) cannot leak. Its last K is then ragged (1106 at V = 50258: ~2 % of the
    # product's flops; the cost of the ragged K on cuBLAS is not measured yet, the engine's padding is zeros)
    spans = [(v0, min(Vp, v0 + chunk)) for v0 in range(0, n_valid, chunk)]
    if config.get("impl") == "gemm_fused":
        ssum = _gemm_fused_chunks(h, weight, bias, embed, float(cap), n_valid, spans, out, fp32_addmm, config)
    else:
        ssum = torch.zeros(M, device=h.device, dtype=torch.float32)
        # the pass's (rows, columns, warps) per program; config "pass_block" overrides (bench_vocab_attention sweeps)
        bm, bc, nw = config.get("pass_block") or (GEMM_PASS_BLOCK if h.device.type == "cuda"
                                                   else (min(16, _pow2(M)), 256, 4))
        for r0, r1 in _row_spans(M, config.get("row_chunk")):
            hr, outr, sr, mr = h[r0:r1], out[r0:r1], ssum[r0:r1], r1 - r0
            for v0, v1 in spans:
                z = hr @ weight[v0:v1].T
                _cap_exp_rowsum_kernel[(triton.cdiv(mr, bm),)](
                    z, bias[v0:] if bias is not None else z, sr, mr, v1 - v0, min(n_valid, v1) - v0, z.stride(0),
                    float(cap), 2.0 / float(cap), HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_C=bc, num_warps=nw)
                k = min(n_valid, v1) - v0            # E's padding rows stay out of the product: 0·inf would be NaN
                _accumulate_mm(outr, z[:, :k], embed[v0:v0 + k], fp32_addmm)
                del z                                # free this chunk before the next one is allocated
    return out, ssum


def _row_spans(M: int, row_chunk) -> list:
    """The "gemm" loop's row blocks: all M rows at once (the default), or config "row_chunk" rows at a time
    (opt-in, unmeasured): with R rows and a C-column chunk, the logits chunk z (R·C in the input dtype) can stay in
    the L2 cache (50 MB on an H100) between the GEMM that writes it, the cap/exp pass that rewrites it as p and the
    GEMM that reads p, where a 16384-row chunk (268 MB at C = 8192) goes through DRAM three times (~3.3 GB per call
    at 16384 rows, the pass alone ~1.1 ms of the 5.4 measured). The price: R/M-sized GEMMs (less efficient) and W and
    E re-read once per row block."""
    if row_chunk is None:
        return [(0, M)]
    if isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk < 1:
        raise ValueError(f"vocab_attention config row_chunk must be a positive int, got {row_chunk!r}")
    return [(r0, min(M, r0 + row_chunk)) for r0 in range(0, M, row_chunk)]


if triton is not None:
    @triton.jit
    def _flow_finish_kernel(o_ptr, s_ptr, hs_ptr, nz_ptr, a_ptr, b_ptr, c_ptr, out_ptr, M, L, DE,
                            stride_o, stride_hs, stride_nz, stride_out,
                            HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DE: tl.constexpr):
        """The "gemm" implementation's flow-map epilogue in one pass: h_next = a·h_state + b·(o / s) [+ c·noise],
        a, b, c per batch (row // L), fp32 arithmetic in reference.flow_map_update_ref's order, stored in h_next's
        dtype. Replaces the division of o and the four or five elementwise torch kernels of the update."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_DE + tl.arange(0, BLOCK_DE)
        rm = rows < M
        mask = rm[:, None] & (cols < DE)[None, :]
        bi = rows // L
        r64 = rows.to(tl.int64)[:, None]
        a = tl.load(a_ptr + bi, mask=rm, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + bi, mask=rm, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + rows, mask=rm, other=1.0)
        de = tl.load(o_ptr + r64 * stride_o + cols[None, :], mask=mask, other=0.0) / s[:, None]
        hs = tl.load(hs_ptr + r64 * stride_hs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = a[:, None] * hs + bb[:, None] * de
        if HAS_NOISE:
            c = tl.load(c_ptr + bi, mask=rm, other=0.0).to(tl.float32)
            nz = tl.load(nz_ptr + r64 * stride_nz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            out = out + c[:, None] * nz
        tl.store(out_ptr + r64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _flow_finish(o, ssum, hs2, a, b, c, nz2, L):
    """h_next (M, De) in hs2's dtype from the unnormalized Σ p·E `o` and Σ p `ssum` (_flow_finish_kernel)."""
    M, DE = o.shape
    out = torch.empty_like(hs2)
    bm, bd = (8, 256) if o.device.type == "cuda" else (min(16, _pow2(M)), min(256, _pow2(DE)))
    _flow_finish_kernel[(triton.cdiv(M, bm), triton.cdiv(DE, bd))](
        o, ssum, hs2, nz2 if nz2 is not None else hs2, a, b, c if c is not None else a, out, M, L, DE,
        o.stride(0), hs2.stride(0), nz2.stride(0) if nz2 is not None else 0, out.stride(0),
        HAS_NOISE=nz2 is not None, BLOCK_M=bm, BLOCK_DE=bd, num_warps=4)
    return out


def _gemm_fused_chunks(h, weight, bias, embed, cap, n_valid, spans, out, fp32_addmm, config):
    """The "gemm_fused" chunk loop: per chunk one launch of the cap/exp GEMM into a reused (M, chunk) buffer, then
    out += p·E; returns the row sums (M,) fp32, the per-tile partials summed in one torch reduction at the end."""
    M, D = h.shape
    width = max(v1 - v0 for v0, v1 in spans)
    cfg = {**gemm_fused_config(M, h.device, h.dtype, D, width), **config}
    BM, BN, BK, GM = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"]
    # one buffer for every chunk (the last may be narrower: a view), its row stride padded to 16 elements so that
    # it is always a valid TMA descriptor (16-byte aligned rows) and the cuBLAS operand rows stay 32-byte aligned
    p_buf = torch.empty(M, triton.cdiv(width, 16) * 16, device=h.device, dtype=h.dtype)
    tiles = [triton.cdiv(v1 - v0, BN) for v0, v1 in spans]
    parts = torch.empty(sum(tiles), M, device=h.device, dtype=torch.float32)
    if M == 0:
        return parts.sum(0)
    common = dict(HAS_BIAS=bias is not None, IEEE=h.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                  GROUP_M=GM, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    b_arg = bias if bias is not None else h
    scal = (cap, 2.0 / cap)
    use_tma = bool(cfg.get("tma")) and tma_usable(h, weight, BK)
    if use_tma:
        h_desc = TensorDescriptor.from_tensor(h, [BM, BK])
        w_desc = TensorDescriptor.from_tensor(weight[:n_valid], [BN, BK])
    row0 = 0
    for (v0, v1), nt in zip(spans, tiles):
        C = v1 - v0
        p = p_buf[:, :C]
        grid = (triton.cdiv(M, BM) * nt,)
        if use_tma:
            _vocab_logits_cap_exp_tma_kernel[grid](
                h_desc, w_desc, b_arg, TensorDescriptor.from_tensor(p, [BM, BN]), parts,
                M, C, v0, n_valid, D, row0, *scal, **common)
        else:
            _vocab_logits_cap_exp_kernel[grid](
                h, weight, b_arg, p, parts, M, C, v0, n_valid, D, h.stride(0), weight.stride(0), p.stride(0),
                row0, *scal, EVEN_K=D % BK == 0, **common)
        k = min(n_valid, v1) - v0                # E's padding rows stay out of the product (as in _gemm_sums)
        _accumulate_mm(out, p[:, :k], embed[v0:v0 + k], fp32_addmm)
        row0 += nt
    return parts.sum(0)


# Launcher
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(M: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, V: int = 50304) -> dict:
    if device.type != "cuda":
        # the interpreter's dot has no 16-row minimum: a row block no taller than M wastes nothing
        return dict(INTERPRET_CONFIG, BLOCK_M=min(INTERPRET_CONFIG["BLOCK_M"], _pow2(M)),
                    BLOCK_N=min(INTERPRET_CONFIG["BLOCK_N"], max(16, _pow2(V))))
    return dict(GPU_CONFIG_FP32 if dtype == torch.float32 else CONFIGS[GPU_CONFIG])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _blocks(D: int, DE: int, cfg: dict) -> tuple[int, int, int, int]:
    """(BLOCK_D, D_CHUNKS, BLOCK_DE, DE_CHUNKS): D in ≤ 3 power-of-two chunks (768 = 3·256), the output
    columns in DE_CHUNKS chunks of BLOCK_DE per program (fewer for a narrow De)."""
    bd = cfg.get("BLOCK_D") or max(16, _pow2(triton.cdiv(D, 3)))
    dc = triton.cdiv(D, bd)
    if dc > 3:
        raise ValueError(f"BLOCK_D={bd} needs {dc} chunks for D={D}; at most 3")
    nc = cfg["DE_CHUNKS"]
    if not 1 <= nc <= 3:
        raise ValueError("DE_CHUNKS must be 1, 2 or 3")
    bde = min(cfg["BLOCK_DE"], max(16, _pow2(triton.cdiv(DE, nc))))
    return bd, dc, bde, min(nc, triton.cdiv(DE, bde))


def _prepare(h, weight, bias, embed):
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton vocab_attention takes fp16/bf16/fp32 inputs, got {h.dtype} (use backend='torch')")
    dt = functools.reduce(torch.promote_types, (h.dtype, weight.dtype, embed.dtype))
    h, weight, embed = (t.to(dt) if t.dtype != dt else t for t in (h, weight, embed))
    h, weight, embed = (t if t.stride(-1) == 1 else t.contiguous() for t in (h, weight, embed))
    return h, weight, None if bias is None else bias.contiguous(), embed


def _vocab_attention_launch(h, weight, bias, embed, cap, n_valid, flow=None, config=None):
    """Shared launcher: flow = None → (out fp32 (M, De), lse fp32 (M,)); flow = (h_state, a, b, c, noise,
    seq_len) → h_next (M, De) in h_state's dtype."""
    if triton is None:
        raise RuntimeError("vocab_attention needs the triton package for backend='triton'")
    h, weight, bias, embed = _prepare(h, weight, bias, embed)
    M, D = h.shape
    DE = embed.shape[1]
    cfg = {**default_config(M, h.device, h.dtype, n_valid), **(config or {})}
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    BD, DC, BDE, NC = _blocks(D, DE, cfg)
    de_per_prog = BDE * NC
    dev = h.device
    if flow is None:
        out = torch.empty(M, DE, device=dev, dtype=torch.float32)
        lse = torch.empty(M, device=dev, dtype=torch.float32)
        hs = noise = ca = cb = cc = out
        seq_len = 1
    else:
        hs, ca, cb, cc, noise, seq_len = flow
        out = torch.empty(M, DE, device=dev, dtype=hs.dtype)
        lse = out
        if noise is None:
            noise, cc = hs, ca
    if M == 0:
        return out if flow is not None else (out, lse)
    row_blocks = triton.cdiv(M, BM)
    de_blocks = triton.cdiv(DE, de_per_prog)
    n_tiles = triton.cdiv(n_valid, BN)
    splits = cfg.get("splits")
    if splits is None:
        # One wave of programs (one CTA per SM: 196 KiB of shared memory): enough to fill the SMs at B=1
        # while keeping the partials (splits × rows × De fp32) small next to W and E.
        n_sm = _num_sms(torch.cuda.current_device() if dev.index is None else dev.index) if dev.type == "cuda" else 1
        splits = max(1, min(n_tiles, n_sm // (row_blocks * de_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(int(splits), n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)
    cap_f = float(cap) if cap else 0.0
    # exp(z − cap) without a running max needs P's dtype to have fp32's exponent range and e^{−2cap}
    # to stay normal in fp32 (cap ≤ 40); fp16 and uncapped logits take the lazily rescaled path.
    fixed_max = (0.0 < cap_f <= 40.0 and embed.dtype in (torch.bfloat16, torch.float32)
                 and cfg.get("fixed_max", True))
    meta = dict(HAS_BIAS=bias is not None, HAS_CAP=cap_f != 0.0, FIXED_MAX=bool(fixed_max),
                IEEE=h.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, D_CHUNKS=DC,
                BLOCK_DE=BDE, DE_CHUNKS=NC, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    args = (M, n_valid, D, DE, h.stride(0), weight.stride(0), embed.stride(0))
    scal = (tiles_per_split, cap_f, 2.0 / cap_f if cap_f else 0.0)
    b_arg = bias if bias is not None else h
    grid = (row_blocks, splits, de_blocks)
    if splits == 1 and flow is None:
        _vocab_attention_fwd_kernel[grid](h, weight, b_arg, embed, out, lse, lse, lse, *args, out.stride(0), *scal,
                                          SPLIT_V=False, **meta)
        return out, lse
    # V split (small row counts) or the flow-map epilogue: unnormalized partials + the combine kernel, which
    # applies the update (its extra rows × De fp32 round trip is < 1 % of the sweep over V).
    po = torch.empty(splits, M, DE, device=dev, dtype=torch.float32)
    pm = torch.empty(splits, M, device=dev, dtype=torch.float32)
    pl = torch.empty(splits, M, device=dev, dtype=torch.float32)
    _vocab_attention_fwd_kernel[grid](h, weight, b_arg, embed, po, pm, pm, pl, *args, DE, *scal,
                                      SPLIT_V=True, **meta)
    _vocab_attention_combine_kernel[(triton.cdiv(M, COMBINE_BLOCK_M), triton.cdiv(DE, COMBINE_BLOCK_DE))](
        po, pm, pl, out, lse, hs, noise, ca, cb, cc,
        M, DE, seq_len, splits, out.stride(0), hs.stride(0), noise.stride(0),
        FLOW=flow is not None, HAS_NOISE=flow is not None and flow[4] is not None,
        BLOCK_M=COMBINE_BLOCK_M, BLOCK_DE=COMBINE_BLOCK_DE, num_warps=4)
    return out if flow is not None else (out, lse)


def vocab_attention_fwd(h, weight, bias, embed, cap, n_valid, config=None):
    """h (M, D), weight (Vp ≥ n_valid, D), bias (≥ n_valid,) or None, embed (Vp, De)
    → (out (M, De), lse (M,)), fp32. config={"impl": "gemm" | "gemm_fused" | "fused", ...} overrides the choice
    ("gemm_fused": opt-in, see GEMM_FUSED_CONFIGS; flow_map_step_fwd routes it like "gemm"). A negative cap is
    its absolute value (cap·tanh(z/cap) is even in cap; the kernels assume cap > 0)."""
    cap = abs(cap) if cap else cap
    if _use_gemm(h, cap, config):
        return _vocab_attention_gemm(h, weight, bias, embed, cap, n_valid, config)
    return _vocab_attention_launch(h, weight, bias, embed, cap, n_valid, None, config)


def flow_map_step_fwd(u, weight, bias, embed, h_state, a, b, c, noise, cap, n_valid, config=None):
    """u (B, L, D), h_state / noise (B, L, De), a / b / c (B,) device tensors → h_next (B, L, De), h_state's dtype.
    A negative cap is its absolute value (as in vocab_attention_fwd)."""
    cap = abs(cap) if cap else cap
    B, L = u.shape[0], u.shape[1]
    # explicit widths, not -1: reshape cannot infer them for an empty batch (B·L = 0)
    u2 = u.reshape(B * L, u.shape[-1])
    hs2 = h_state.reshape(B * L, h_state.shape[-1])
    nz2 = None if noise is None else noise.reshape(B * L, noise.shape[-1])
    if _use_gemm(u2, cap, config):
        if (config or {}).get("fused_finish", True):
            # one Triton pass for the normalization and the update (config {"fused_finish": False}: torch ops)
            o, ssum = _gemm_sums(u2, weight, bias, embed, cap, n_valid, config)
            out = _flow_finish(o, ssum, hs2.contiguous(), a.contiguous(), b.contiguous(),
                               None if c is None else c.contiguous(), None if nz2 is None else nz2.contiguous(), L)
            return out.view(h_state.shape)
        de, _ = _vocab_attention_gemm(u2, weight, bias, embed, cap, n_valid, config)
        acc = torch.float32
        return ref.flow_map_update_ref(h_state.to(acc), de.view(h_state.shape), a.to(acc), b.to(acc),
                                       None if c is None else c.to(acc),
                                       None if noise is None else noise.to(acc)).to(h_state.dtype)
    hs2 = hs2 if hs2.stride(-1) == 1 else hs2.contiguous()
    if nz2 is not None:
        nz2 = nz2 if nz2.stride(-1) == 1 else nz2.contiguous()
    flow = (hs2, a.contiguous(), b.contiguous(), None if c is None else c.contiguous(), nz2, L)
    out = _vocab_attention_launch(u2, weight, bias, embed, cap, n_valid, flow, config)
    return out.reshape(h_state.shape)


def compile_specs() -> list[dict]:
    """Real configs for the sm_90a compile check (bench/compile_check.py): bf16, D = De = 768."""
    if triton is None:
        return []
    sig = {n: "*bf16" for n in ("h_ptr", "w_ptr", "b_ptr", "e_ptr")}
    sig.update({n: "*fp32" for n in ("out_ptr", "lse_ptr", "pm_ptr", "pl_ptr")})
    sig.update({n: "i32" for n in ("M", "n_valid", "D", "DE", "stride_h", "stride_w", "stride_e", "stride_out",
                                   "tiles_per_split")})
    sig.update({"cap": "fp32", "two_over_cap": "fp32"})
    # what the JIT sees at D = De = 768 with contiguous tensors: aligned pointers, strides and dims ≡ 0 mod 16
    div16 = [n for n, t in sig.items() if t.startswith("*")] + ["D", "DE", "stride_h", "stride_w", "stride_e",
                                                               "stride_out"]
    specs = []
    for label, cfg in CONFIGS.items():
        for split, fixed in ((False, True), (True, True), (False, False)):
            if label != GPU_CONFIG and (split or not fixed):
                continue        # variants of the default config only: keeps the check under a minute
            const = dict(HAS_BIAS=True, HAS_CAP=True, FIXED_MAX=fixed, SPLIT_V=split, IEEE=False,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=256, D_CHUNKS=3,
                         BLOCK_DE=cfg["BLOCK_DE"], DE_CHUNKS=cfg["DE_CHUNKS"])
            tag = label + ("_split" if split else "") + ("" if fixed else "_rescale")
            specs.append(dict(name=f"_vocab_attention_fwd_kernel[{tag}]", fn=_vocab_attention_fwd_kernel,
                              signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=div16))
    cfg = GPU_CONFIG_FP32            # the fp32 correctness path must at least launch (shared memory)
    const = dict(HAS_BIAS=True, HAS_CAP=True, FIXED_MAX=True, SPLIT_V=False, IEEE=True, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], BLOCK_D=256, D_CHUNKS=3, BLOCK_DE=cfg["BLOCK_DE"], DE_CHUNKS=cfg["DE_CHUNKS"])
    specs.append(dict(name="_vocab_attention_fwd_kernel[fp32]", fn=_vocab_attention_fwd_kernel,
                      signature={**sig, **{n: "*fp32" for n in ("h_ptr", "w_ptr", "b_ptr", "e_ptr")},
                                 **{k: "constexpr" for k in const}},
                      constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                      divisible_by_16=div16))
    # "gemm_fused": the cap/exp GEMM at its real configs (bf16, D = 768, 8192-column chunks)
    gsig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "p_ptr": "*bf16", "ps_ptr": "*fp32",
            **{n: "i32" for n in ("M", "C", "col0", "n_valid", "D", "stride_h", "stride_w", "stride_p", "ps_row0")},
            "cap": "fp32", "inv_cap2": "fp32"}
    gdiv = ["h_ptr", "w_ptr", "b_ptr", "p_ptr", "ps_ptr", "C", "col0", "D", "stride_h", "stride_w", "stride_p"]
    for label, cfg in GEMM_FUSED_CONFIGS.items():
        const = dict(HAS_BIAS=True, IEEE=False, EVEN_K=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                     BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"])
        specs.append(dict(name=f"_vocab_logits_cap_exp_kernel[{label}]", fn=_vocab_logits_cap_exp_kernel,
                          signature={**gsig, **{k: "constexpr" for k in const}}, constexprs=const,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=gdiv))
        BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        # host TensorDescriptor arguments are typed "tensordesc<dtype[box]>" (as in logits_argmax.compile_specs)
        tsig = {"h_desc": f"tensordesc<bf16[{BM}, {BK}]>", "w_desc": f"tensordesc<bf16[{BN}, {BK}]>",
                "b_ptr": "*bf16", "p_desc": f"tensordesc<bf16[{BM}, {BN}]>", "ps_ptr": "*fp32",
                **{n: "i32" for n in ("M", "C", "col0", "n_valid", "D", "ps_row0")}, "cap": "fp32", "inv_cap2": "fp32"}
        const = {k: v for k, v in const.items() if k != "EVEN_K"}
        specs.append(dict(name=f"_vocab_logits_cap_exp_tma_kernel[{label}]", fn=_vocab_logits_cap_exp_tma_kernel,
                          signature={**tsig, **{k: "constexpr" for k in const}}, constexprs=const,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          divisible_by_16=["b_ptr", "ps_ptr", "C", "col0", "D"]))
    cfg = GEMM_FUSED_CONFIG_FP32
    const = dict(HAS_BIAS=True, IEEE=True, EVEN_K=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"])
    specs.append(dict(name="_vocab_logits_cap_exp_kernel[fp32]", fn=_vocab_logits_cap_exp_kernel,
                      signature={**gsig, **{n: "*fp32" for n in ("h_ptr", "w_ptr", "b_ptr", "p_ptr")},
                                 **{k: "constexpr" for k in const}},
                      constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=gdiv))
    csig = {"po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32", "out_ptr": "*fp32", "lse_ptr": "*fp32",
            "hs_ptr": "*bf16", "noise_ptr": "*bf16", "ca_ptr": "*fp32", "cb_ptr": "*fp32", "cc_ptr": "*fp32"}
    csig.update({n: "i32" for n in ("M", "DE", "seq_len", "n_split", "stride_out", "stride_hs", "stride_noise")})
    for flow in (False, True):
        const = dict(FLOW=flow, HAS_NOISE=flow, BLOCK_M=COMBINE_BLOCK_M, BLOCK_DE=COMBINE_BLOCK_DE)
        specs.append(dict(name="_vocab_attention_combine_kernel" + ("[flow]" if flow else ""),
                          fn=_vocab_attention_combine_kernel,
                          signature={**csig, "out_ptr": "*bf16" if flow else "*fp32",
                                     **{k: "constexpr" for k in const}},
                          constexprs=const, num_warps=4, num_stages=1))
    # the "gemm" path's cap/exp pass over a bf16 logits chunk: the default program shape and the benchmark's others
    psig = {"z_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*fp32", "M": "i32", "C": "i32", "n_cols": "i32",
            "stride_z": "i32", "cap": "fp32", "inv_cap2": "fp32"}
    for bm, bc, nw in (GEMM_PASS_BLOCK, (32, 256, 8), (8, 512, 4), (16, 512, 8), (4, 1024, 4)):
        const = dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_C=bc)
        specs.append(dict(name=f"_cap_exp_rowsum_kernel[{bm}x{bc}_w{nw}]", fn=_cap_exp_rowsum_kernel,
                          signature={**psig, **{k: "constexpr" for k in const}}, constexprs=const, num_warps=nw,
                          num_stages=1, divisible_by_16=["z_ptr", "b_ptr", "s_ptr", "C", "stride_z"]))
    # the "gemm" path's flow-map epilogue as the sampler runs it (fp32 state and noise)
    fsig = {n: "*fp32" for n in ("o_ptr", "s_ptr", "hs_ptr", "nz_ptr", "a_ptr", "b_ptr", "c_ptr", "out_ptr")}
    fsig.update({n: "i32" for n in ("M", "L", "DE", "stride_o", "stride_hs", "stride_nz", "stride_out")})
    const = dict(HAS_NOISE=True, BLOCK_M=8, BLOCK_DE=256)
    specs.append(dict(name="_flow_finish_kernel", fn=_flow_finish_kernel,
                      signature={**fsig, **{k: "constexpr" for k in const}}, constexprs=const, num_warps=4,
                      num_stages=1))
    return specs


# ---------------------------------------------------------------------------------------------
# torch.library ops (inference only: the samplers run under no_grad, no autograd formula)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fmlm::vocab_attention", mutates_args=())
def _vocab_attention_op(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                        cap: float, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    return vocab_attention_fwd(h, weight, bias, embed, cap, n_valid)


@_vocab_attention_op.register_fake
def _(h, weight, bias, embed, cap, n_valid):
    return (h.new_empty(h.shape[0], embed.shape[1], dtype=torch.float32),
            h.new_empty(h.shape[0], dtype=torch.float32))


@torch.library.custom_op("fmlm::flow_map_step", mutates_args=())
def _flow_map_step_op(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                      h_state: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor],
                      noise: Optional[torch.Tensor], cap: float, n_valid: int) -> torch.Tensor:
    return flow_map_step_fwd(u, weight, bias, embed, h_state, a, b, c, noise, cap, n_valid)


@_flow_map_step_op.register_fake
def _(u, weight, bias, embed, h_state, a, b, c, noise, cap, n_valid):
    return torch.empty_like(h_state, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch chunked backend and the functionals
# ---------------------------------------------------------------------------------------------
@no_autocast
def _vocab_attention_torch(h, weight, bias, embed, cap, n_valid):
    if cap and 0 < cap <= 40:
        return _vocab_attention_torch_capped(h, weight, bias, embed, cap, n_valid)
    acc = acc_dtype(h.dtype)
    N, V = h.shape[0], n_valid
    out = torch.empty(N, embed.shape[1], device=h.device, dtype=acc)
    lse = torch.empty(N, device=h.device, dtype=acc)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        hr = h[r0:r0 + TORCH_ROW_CHUNK].to(acc)
        m = torch.full((hr.shape[0],), float("-inf"), device=h.device, dtype=acc)
        s = torch.zeros_like(m)
        o = torch.zeros(hr.shape[0], embed.shape[1], device=h.device, dtype=acc)
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            z = hr @ weight[v0:v1].to(acc).T
            if bias is not None:
                z += bias[v0:v1].to(acc)
            if cap:
                z = cap * torch.tanh(z / cap)
            m_new = torch.maximum(m, z.amax(-1))
            m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)     # all −inf so far (−inf bias, no cap)
            alpha = torch.exp(m - m_ref)
            pz = torch.exp(z - m_ref[:, None])
            s = s * alpha + pz.sum(-1)
            o = o * alpha[:, None] + pz @ embed[v0:v1].to(acc)
            m = m_new
        out[r0:r0 + hr.shape[0]] = o / s[:, None]
        lse[r0:r0 + hr.shape[0]] = m + torch.log(s)
    return out, lse


def _vocab_attention_torch_capped(h, weight, bias, embed, cap, n_valid):
    """The torch path with a logit cap in (0, 40]: capped logits lie in (−cap, cap), so exp(s − cap) needs no
    running max (as the Triton kernels: values in (e^−2cap, 1], normal in fp32) and no rescaling across chunks.
    Each chunk is one addmm (bias folded in), five in-place passes (cap·tanh(z/cap) − cap, exp) and the p·E
    GEMM accumulated into the output, where the online softmax took ~8 allocating passes per chunk. Measured
    (`fmlm bench sample --steps 4`, 2-core AMD EPYC, 2026-11-27): engine 253.2 → 231.8 ms/sample, peak tensor
    memory 70 → 37 MB."""
    acc = acc_dtype(h.dtype)
    N, V = h.shape[0], n_valid
    out = torch.empty(N, embed.shape[1], device=h.device, dtype=acc)
    lse = torch.empty(N, device=h.device, dtype=acc)
    inv = 1.0 / cap
    bufs = ChunkBufs(min(N, TORCH_ROW_CHUNK), min(V, TORCH_V_CHUNK), h.device, acc)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        hr = h[r0:r0 + TORCH_ROW_CHUNK].to(acc)
        s = torch.zeros(hr.shape[0], device=h.device, dtype=acc)
        o = out[r0:r0 + hr.shape[0]].zero_()
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            z = chunk_logits(hr, weight, bias, v0, v1, out=bufs.get(0, hr.shape[0], v1 - v0))
            p = z.mul_(inv).tanh_().mul_(cap).sub_(cap).exp_()          # exp(cap·tanh(z/cap) − cap)
            s += p.sum(-1)
            o.addmm_(p, embed[v0:v1].to(acc))
        o /= s[:, None]
        lse[r0:r0 + hr.shape[0]] = cap + torch.log(s)
    return out, lse


def _check_shapes(h, weight, bias, embed, n_valid):
    if weight.dim() != 2 or embed.dim() != 2 or h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"embed {tuple(embed.shape)}")
    V = valid_rows(n_valid, weight.shape[0])
    if embed.shape[0] < V:
        raise ValueError(f"embed has {embed.shape[0]} rows, n_valid is {V}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] < V):
        raise ValueError(f"bias must be 1-D with at least n_valid = {V} entries, got {tuple(bias.shape)}")
    return V


def _resolve(backend, h):
    be = resolve(backend, h.device)
    if be == "triton" and backend == "auto" and h.dtype in (torch.float32, torch.float64):
        be = "torch"           # fp64 is torch/reference-only; fp32 runs faster as chunked cuBLAS GEMMs
    return be


def vocab_attention(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                    cap: Optional[float] = 30.0, n_valid: Optional[int] = None, backend: str = "auto"):
    """h (..., D) → (softmax(cap(h·Wᵀ+b))·E of shape (..., De), lse (...)), in fp32 (fp64 for fp64 h).

    weight (Vp, D) and embed (Vp, De) may be padded past the vocabulary: only the first n_valid rows count (padding
    rows never reach the result, even inf or NaN ones).
    backend='auto' runs the Triton kernel for fp16 / bf16 CUDA tensors and the chunked torch path otherwise.
    """
    V = _check_shapes(h, weight, bias, embed, n_valid)
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    b = None if bias is None else bias[:V]
    be = _resolve(backend, h)
    if be == "reference":
        out, lse = ref.vocab_attention_ref(h2, weight[:V], b, embed[:V], cap)
    elif be == "triton":
        out, lse = torch.ops.fmlm.vocab_attention(h2, weight, b, embed, float(cap) if cap else 0.0, V)
    else:
        out, lse = _vocab_attention_torch(h2, weight, b, embed, cap, V)
    return out.reshape(*lead, embed.shape[1]), lse.reshape(lead)


def flow_map_step(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                  h_state: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor] = None,
                  noise: Optional[torch.Tensor] = None, cap: Optional[float] = 30.0, n_valid: Optional[int] = None,
                  backend: str = "auto") -> torch.Tensor:
    """h_next = a·h_state + b·(softmax(cap(u·Wᵀ+b))·E) + c·noise, one fused pass over V.

    u (B, L, D), h_state and noise (B, L, De); a, b, c per-batch coefficients as device tensors (B,),
    so a captured sampler step never reads them on the host. Returns h_next in h_state's dtype.
    """
    V = _check_shapes(u, weight, bias, embed, n_valid)
    if u.dim() != 3 or h_state.shape != (*u.shape[:2], embed.shape[1]):
        raise ValueError(f"u must be (B, L, D) and h_state (B, L, De): got {tuple(u.shape)}, {tuple(h_state.shape)}")
    if (noise is None) != (c is None):
        raise ValueError("pass c and noise together (or neither)")
    if noise is not None and noise.shape != h_state.shape:
        raise ValueError(f"noise must have h_state's shape {tuple(h_state.shape)}, got {tuple(noise.shape)}")
    B = u.shape[0]
    for name, t in (("a", a), ("b", b), ("c", c)):
        if t is not None and (not torch.is_tensor(t) or t.shape != (B,)):
            raise ValueError(f"{name} must be a (B,) = ({B},) tensor (on the device: a captured step never reads "
                             f"it on the host), got {tuple(t.shape) if torch.is_tensor(t) else t!r}")
    if not h_state.is_floating_point():
        raise TypeError(f"h_state must be a floating tensor, got {h_state.dtype}")
    bvec = None if bias is None else bias[:V]
    be = _resolve(backend, u)
    if be == "triton":
        return torch.ops.fmlm.flow_map_step(u, weight, bvec, embed, h_state, a, b, c, noise,
                                            float(cap) if cap else 0.0, V)
    if be == "reference":
        de, _ = ref.vocab_attention_ref(u, weight[:V], bvec, embed[:V], cap)
    else:
        de, _ = vocab_attention(u, weight, bvec, embed, cap, V, backend="torch")
    acc = acc_dtype(h_state.dtype)
    return ref.flow_map_update_ref(h_state.to(acc), de.to(acc), a.to(acc), b.to(acc),
                                   None if c is None else c.to(acc),
                                   None if noise is None else noise.to(acc)).to(h_state.dtype)
