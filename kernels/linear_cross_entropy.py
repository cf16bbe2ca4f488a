"""linear_cross_entropy: −log softmax(cap(h·Wᵀ+b))[y] without writing (rows, V) logits, forward and backward.

Reference: fmlm.kernels.reference.linear_cross_entropy_ref and soft_linear_cross_entropy_ref (they
materialize the logits in the input dtype, then cap and log_softmax in fp32).

Cut Cross-Entropy style (DESIGN.md §2.4): the forward streams logit tiles through an online log-sum-exp and
keeps only (max, log Σ exp(S − max)) per row (two fp32 numbers rather than lse = their sum: p =
exp((S − max) − log l) keeps fp32 accuracy where one rounded lse of magnitude ~30 would not); the backward
recomputes each logit tile, forms
    dS = g·(softmax − onehot)·cap'(z),   cap'(z) = 1 − tanh²(z/cap) = 1 − (S/cap)²,
and writes it, one vocabulary chunk at a time (N × V_CHUNK, never N × V), for two cuBLAS GEMMs:
dh += dS·W[chunk] and dW[chunk] = dSᵀ·h (db from per-row-block column sums written by the same kernel).
The soft-target form (FMLM distillation) reads three logit streams over the same W: the target
δ̄ = λ·softmax(S1) + (1−λ)·softmax(S2) and the prediction softmax(S0); its loss is
lse0 − λ·Σ p1·S0 − (1−λ)·Σ p2·S0, accumulated online in one pass.

Backends: 'reference' (the spec), 'torch' (chunked plain PyTorch, any device; its backward recomputes the
chunks), 'triton' (CUDA, or CPU under TRITON_INTERPRET=1). The ops fmlm::linear_cross_entropy and
fmlm::soft_linear_cross_entropy (with fake impls and registered autograd) are what torch.compile traces;
eager calls go through LinearCrossEntropyFn / SoftLinearCrossEntropyFn, the same impls without the
~0.1 ms Python dispatch of a custom op. Weight rows may be padded past n_valid (the engine pads V to a
multiple of 128): those columns get no probability and zero gradient.

Opt-in TMA variant (launcher config {"tma": True}; {"tma_store": True} in the backward also writes dS through a
descriptor), as logits_argmax's: the same kernels read h (h1, h2) and W through host tensor descriptors (Hopper
bulk tensor copies, zero fill out of bounds) instead of clamped pointer loads (_logit_tile → _dot_tile_tma);
every mask on results stays. The pointer kernels run when a descriptor is impossible (tma_usable). Default off
until the benchmark (bench/bench_linear_cross_entropy.py times TMA_CANDIDATES beside the default) shows a gain.

Opt-in "gemm" implementation (launcher config {"impl": "gemm"}, a cap in (0, 40]): cuBLAS writes each vocabulary
chunk's logits in the input dtype and memory-bound Triton passes read them, the forward's sums
(_lce_chunk_stats_kernel) and the backward's dS in place (_lce_chunk_ds_kernel), as vocab_attention's "gemm"
path does; see IMPLS.

Opt-in backward config {"db_gemm": True} (the fused kernels, hard and soft targets): db from the dW GEMM's ones
column instead of per-tile column sums in the dS kernel (_bwd_chunks).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import reference as ref
from ._backend import (ChunkBufs, acc_dtype, accumulate_mm, check_indices, chunk_logits, interpreting, launch_opts,
                       no_autocast, resolve, tma_device_ok, tma_rows_ok, valid_rows)

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the package imports without triton; backend='triton' then raises in resolve()
    HAS_TRITON = False
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no host tensor descriptors, config={"tma": True} runs the pointer kernels
    TensorDescriptor = None

# Hopper defaults (bf16, D=768): 8 warps; the backward in 128×128×64 tiles, 3 stages (96-128 KB of shared memory),
# the forward in 128×256×64 tiles, 4 stages (below); ptxas gave 178 (fwd, at 128×128) and 213 (bwd) registers with
# triton 3.7.1, 189 and 255 with triton 3.6, no spills (compile_specs()), so one CTA per SM. FLATTEN: Triton
# flattens the (tile, K) loop nest into one pipelined loop, so the next tile's loads overlap the tanh/exp epilogue
# (that epilogue costs ~2 MUFU ops per logit, about a third of the MMA time of a 128×128×768 tile).
# The backward is persistent (one program per SM striding over the tiles) for the same reason.
# The forward's default tile is 128×256 with 4 stages (bf16/fp16): measured on one H100 (bench_linear_cross_entropy,
# 2026-11-27 run5, bench/results/h100-2026-11-27-run5) forward 2.72 ms against 3.58 for 128×128 in 3 stages (the
# previous default, FWD_PREVIOUS), fwd+bwd 10.56 against 11.51 ms, the same losses within 4e-6. 192 KiB of shared
# memory; fp32 inputs (4-byte tiles would need 384) and GPUs with less shared memory per block than that (an A100)
# keep FWD_PREVIOUS's tile (_config).
FWD_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, ctas_per_sm=1, FLATTEN=True)
FWD_PREVIOUS = dict(BLOCK_N=128, num_stages=3)
BWD_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, ctas_per_sm=1,
                  FLATTEN=True, persistent=True, v_chunk=8192)
# Three logit streams per tile: 64-row blocks keep two live fp32 tiles at 32 registers each.
SOFT_FWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, ctas_per_sm=1, FLATTEN=False)
SOFT_BWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, ctas_per_sm=1,
                       FLATTEN=False, persistent=True, v_chunk=8192)
# Opt-in TMA variants (config "tma": True; "tma_store": True also writes the backward's dS through a descriptor),
# label → (forward config, backward config) overrides. Unmeasured: the benchmark times them beside the default
# at the OWT shape so that one H100 run decides. Why try them (reasoning, not a measurement): the pointer
# kernels compute per-element addresses, clamps and masks for every cp.async load; TMA copies a whole box per
# instruction and frees those registers, as in Triton's Hopper matmul tutorials. Compile-only evidence (sm_90a,
# bf16, default tiles; registers default → tma, no spills on either): triton 3.7.1 fwd 178 → 147, bwd 213 → 208
# (211 with tma_store), soft fwd 208 → 191, soft bwd 252 → 196 (172); triton 3.6 fwd 189 → 185, bwd 255 → 254
# (255), soft fwd 210 → 177, soft bwd 254 → 203 (160). Shared memory as before plus 24 B of barriers (tma_store:
# +4 KB, soft +17 KB). Whether any of that moves the 432-462 TFLOP/s is for the benchmark to say.
TMA_CANDIDATES = {"tma": (dict(tma=True), dict(tma=True)),
                  "tma+store": (dict(tma=True), dict(tma=True, tma_store=True))}
# Opt-in forward overrides (unmeasured; bench_linear_cross_entropy times them beside the default): two CTAs per SM,
# so one CTA's tanh/exp epilogue (2 MUFU ops per logit: ~1.2 µs of SFU time per 128×128 tile against ~4.2 µs of MMA
# at the GEMM ceiling) can run beside the other CTA's MMAs. It takes a register cap: 2 × 256 threads × 128 registers
# fill the SM's 64K. Compile-only evidence (sm_90a, bf16, fixed shift): the pointer forward needs 171 registers with
# triton 3.6 (128 with 3.7.1) and compiles to 128 with maxnreg=128 without spills on both; the TMA forward likewise
# (3.6: 160 → 128); shared memory 96 KiB per CTA, 192 of the 227 KiB for two.
FWD_TWO_CTAS = dict(FWD_PREVIOUS, ctas_per_sm=2, maxnreg=128)
# Opt-in backward tile (unmeasured; bench_linear_cross_entropy times it beside the default): 128×256, as the forward
# since run5 (1.31× faster there), for the dS kernel that is ~4.1 of the backward's 7.8 ms (run5: the two cuBLAS
# GEMMs are the rest). At 8 warps the 128×256 backward spills on sm_90a (triton 3.7.1: 724 B, 404 B with db_gemm;
# TMA loads + dS store 4-48 B, 372 B with triton 3.6); with 16 warps, 2 stages and db from the dW GEMM it compiles
# to 128 registers, 0 spills, 160 KiB of shared memory with both triton 3.7.1 and 3.6 (the device's).
BWD_WIDE = dict(BLOCK_N=256, num_warps=16, num_stages=2, db_gemm=True)
# Opt-in implementation (config "impl": "gemm", forward and backward; unmeasured): the logits of each vocabulary
# chunk come from cuBLAS in the input dtype, as vocab_attention's "gemm" path (464 TFLOP/s measured) does, and
# memory-bound Triton passes read them: the forward's sums (_lce_chunk_stats_kernel), the backward's dS in place of
# the logits (_lce_chunk_ds_kernel), before the two cuBLAS GEMMs the backward already runs. Only with a cap in (0,
# 40] (the fixed shift); otherwise the fused kernels run, forward and backward. The fused kernels' main loop ran at
# about half of cuBLAS's rate (forward 3.73 ms against 1.90 for the bare GEMM, H100 run2). Napkin at 16384 × 50258 ×
# 768 (bf16 logits, 1.65 GB per pass over the vocabulary at ~3 TB/s): forward 1.9 ms of GEMM + ~0.6-0.8 of traffic;
# backward three GEMMs (5.7 ms) + ~1.1 of pass traffic: ~9.5-10 ms fwd+bwd, ~500-530 effective TFLOP/s against
# 432-462. Precision: the logits are rounded to the input dtype before the cap, as the published head and the
# reference do (the fused kernels keep them in fp32).
IMPLS = ("fused", "gemm")
# The passes are memory-bound: small tiles per thread, many resident warps (sm_90a, bf16: 64 and 85 registers,
# 4 and 3 CTAs of 8 warps per SM). The forward's programs own BLOCK_R rows across a chunk; the backward's cover
# BLOCK_M rows (the row blocks of the bias partials) SUB_M at a time.
GEMM_STATS_CONFIG = dict(BLOCK_R=16, BLOCK_C=256, num_warps=8)
GEMM_DS_CONFIG = dict(SUB_M=8, BLOCK_N=256, num_warps=8)
# The interpreter costs ~0.5 ms per program plus per-op numpy overhead: small tiles keep CPU tests fast.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1,
                        ctas_per_sm=2, FLATTEN=False, persistent=True, v_chunk=96)

TORCH_V_CHUNK = 4096      # torch backend: (rows × 4096) fp32 logits per chunk
TORCH_ROW_CHUNK = 4096

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tanh(x, MODE: tl.constexpr):
        """tanh of fp32 x. The logit error is cap × the tanh error (cap = 30), so the mode follows the input
        dtype: 0 — MUFU tanh.approx (rel. error 2^-11; bf16 logits already carry 2^-9); 1 — fp32: an odd
        Taylor polynomial for |x| < 0.3 (where (1−e)/(1+e) cancels), the exp form elsewhere (≤ 2.2 ulp);
        2 — the exp form in fp64, correctly rounded to fp32 (fp32 inputs; the interpreter has no libdevice)."""
        if MODE == 0:
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        elif MODE == 2:
            ax = tl.abs(x).to(tl.float64)
            e = tl.exp(-2.0 * ax)
            r = ((1.0 - e) / (1.0 + e)).to(tl.float32)
            return tl.where(x < 0, -r, r)
        else:
            ax = tl.abs(x)
            e = tl.exp(-2.0 * ax)
            big = (1.0 - e) / (1.0 + e)
            x2 = ax * ax
            p = 21844.0 / 6081075.0
            p = p * x2 - 1382.0 / 155925.0
            p = p * x2 + 62.0 / 2835.0
            p = p * x2 - 17.0 / 315.0
            p = p * x2 + 2.0 / 15.0
            p = p * x2 - 1.0 / 3.0
            small = ax + ax * x2 * p
            r = tl.where(ax < 0.3, small, big)
            return tl.where(x < 0, -r, r)

    @triton.jit
    def _dot_tile(x_ptr, rows, stride_x, w_ptr, cols, stride_w, D,
                  PREC: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """x[rows] · W[cols]ᵀ over the full D, fp32 accumulation; rows/cols already clamped in bounds."""
        offs_k = tl.arange(0, BLOCK_K)
        a_base = x_ptr + rows[:, None] * stride_x
        b_base = w_ptr + cols[None, :] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Addresses from k each step, not loop-carried increments: with `flatten`, Triton only pipelines the
        # flattened (tile, k) loop when the load addresses are not carried across the tile boundary.
        for k in range(0, D, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_base + (k + offs_k)[None, :])
                b = tl.load(b_base + (k + offs_k)[:, None])
            else:
                kmask = k + offs_k < D
                a = tl.load(a_base + (k + offs_k)[None, :], mask=kmask[None, :], other=0.0)
                b = tl.load(b_base + (k + offs_k)[:, None], mask=kmask[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        return acc

    @triton.jit
    def _dot_tile_tma(x_desc, off_m, w_desc, off_n, D, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The TMA twin of _dot_tile: x[off_m:+BLOCK_M] · W[off_n:+BLOCK_N]ᵀ through host tensor descriptors
        (boxes [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]). TMA zero-fills rows ≥ N, vocabulary rows ≥ n_valid
        (the W descriptor covers W[:n_valid]) and the K tail ≥ D, so no clamps or masks; the epilogues keep
        every mask on results (columns ≥ n_valid: no probability, zero gradient)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            a = x_desc.load([off_m, k])
            b = w_desc.load([off_n, k])
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _logit_tile(x, rows_c, off_m, stride_x, w, cols_c, off_n, stride_w, D,
                    PREC: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (BLOCK_M × BLOCK_N) fp32 logit tile before bias and cap. TMA (constexpr): x and w are host tensor
        descriptors (Hopper bulk tensor copies, see _dot_tile_tma), else pointers with clamped rows/cols. Every
        kernel below takes either kind in the same argument slots; the JIT specializes on the argument types
        and the branch not taken is never compiled, so the default (pointer) kernels are unchanged."""
        if TMA:
            acc = _dot_tile_tma(x, off_m, w, off_n, D, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _dot_tile(x, rows_c, stride_x, w, cols_c, stride_w, D, PREC, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        return acc

    @triton.jit
    def _store_ds(ds, d, rows, lcols, off_m, off_n, n_cols, N, stride_ds,
                  TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dS tile → ds (N, n_cols) in the input dtype: a masked pointer store, or (TMA_STORE) a bulk tensor
        store through a descriptor over ds[:, :n_cols], which clips rows ≥ N and columns ≥ n_cols itself."""
        if TMA_STORE:
            ds.store([off_m, off_n], d.to(ds.dtype))
        else:
            tl.store(ds + rows[:, None] * stride_ds + lcols[None, :], d.to(ds.dtype.element_ty),
                     mask=(rows < N)[:, None] & (lcols < n_cols)[None, :])

    @triton.jit
    def _capped(acc, b_ptr, cols, cap, inv_cap,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, TANH: tl.constexpr):
        """(S, tanh(z/cap)) for z = acc + b: S = cap·tanh(z/cap); without a cap, (z, z)."""
        z = acc
        if HAS_BIAS:
            z += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        if HAS_CAP:
            t = _tanh(z * inv_cap, TANH)
            return cap * t, t
        else:
            return z, z

    @triton.jit
    def _group_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped tile order: GROUP_M row blocks sweep the vocabulary together, so W tiles are reused in L2."""
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n

    @triton.jit
    def _linear_cross_entropy_fwd_kernel(
            h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr,
            N, V, D, stride_h, stride_w, tiles_per_split, cap, inv_cap,
            HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, TANH: tl.constexpr, PREC: tl.constexpr,
            EVEN_K: tl.constexpr, FLATTEN: tl.constexpr, TMA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXED_SHIFT: tl.constexpr = False):
        """Program (row block, vocabulary split): online (max, sum-exp) and the target logit over its V tiles.
        part: (3, splits, N) fp32 = (m, l, S[target]); the host combines the splits. TMA: h_ptr and w_ptr are
        tensor descriptors of h and W[:V] (see _logit_tile). FIXED_SHIFT (a cap in (0, 40]; the launchers' default
        since the third session of 2026-11-27, config {"fixed_shift": False} for the online softmax): m stays
        cap and l sums exp(S − cap), no running max (see _fixed_shift). Not yet timed on a GPU (bench row
        "online-softmax forward (the previous default)"); compile-only, sm_90a, triton 3.7.1: registers 178 →
        128 (pointer), 147 → 123 (TMA); the soft forward 208 → 186 and 191 → 165."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_c = tl.minimum(rows, N - 1)
        tgt = tl.load(tgt_ptr + rows_c).to(tl.int32)
        if FIXED_SHIFT:
            m = tl.zeros((BLOCK_M,), tl.float32) + cap
        else:
            m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        zt = tl.zeros((BLOCK_M,), tl.float32)
        t0 = pid_s * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_N))
        for i in tl.range(0, t1 - t0, flatten=FLATTEN):
            cols = (t0 + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_c = tl.minimum(cols, V - 1)
            acc = _logit_tile(h_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, (t0 + i) * BLOCK_N, stride_w,
                              D, PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, _ = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            s = tl.where((cols < V)[None, :], s, float("-inf"))
            if FIXED_SHIFT:
                l += tl.sum(tl.exp(s - cap), 1)
            else:
                m_new = tl.maximum(m, tl.max(s, 1))
                # against 0 while every logit so far is −inf (a −inf bias, uncapped): −inf − −inf is NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
                m = m_new
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), 1)
        rmask = rows < N
        out = part_ptr + pid_s * N + rows
        tl.store(out, m, mask=rmask)
        tl.store(out + n_splits * N, l, mask=rmask)
        tl.store(out + 2 * n_splits * N, zt, mask=rmask)

    @triton.jit
    def _linear_cross_entropy_bwd_kernel(
            h_ptr, w_ptr, b_ptr, tgt_ptr, stats_ptr, g_ptr, ds_ptr, dbp_ptr,
            N, V, D, col0, n_cols, stride_h, stride_w, stride_ds, stride_dbp, cap, inv_cap,
            HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, TANH: tl.constexpr, PREC: tl.constexpr,
            EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, TMA: tl.constexpr,
            TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DB_PARTIALS: tl.constexpr = True):
        """Tiles (row block, column block) of the chunk [col0, col0+n_cols), strided over the programs
        (persistent when the grid is smaller than the tile count): recompute S, write
        dS = g·(p − onehot)·cap' to ds (N, n_cols) in the input dtype, and (HAS_BIAS and DB_PARTIALS) its column
        sums to dbp[row block]. TMA: h_ptr, w_ptr are tensor descriptors; TMA_STORE: ds_ptr is one over
        ds[:, :n_cols] (_store_ds)."""
        num_m = tl.cdiv(N, BLOCK_M)
        num_n = tl.cdiv(n_cols, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
            pid_m, pid_n = _group_tile(tile, num_m, num_n, GROUP_M)
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rows_c = tl.minimum(rows, N - 1)
            lcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = col0 + lcols
            cols_c = tl.minimum(cols, V - 1)
            acc = _logit_tile(h_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, col0 + pid_n * BLOCK_N,
                              stride_w, D, PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, t = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            m = tl.load(stats_ptr + rows_c)
            logl = tl.load(stats_ptr + N + rows_c)
            g = tl.load(g_ptr + rows_c)
            tgt = tl.load(tgt_ptr + rows_c).to(tl.int32)
            p = tl.where((cols < V)[None, :], tl.exp((s - m[:, None]) - logl[:, None]), 0.0)
            d = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
            if HAS_CAP:
                d = d * (1.0 - t * t)
            rmask = rows < N
            cmask = lcols < n_cols
            _store_ds(ds_ptr, d, rows, lcols, pid_m * BLOCK_M, pid_n * BLOCK_N, n_cols, N, stride_ds, TMA_STORE,
                      BLOCK_M, BLOCK_N)
            if HAS_BIAS and DB_PARTIALS:
                colsum = tl.sum(tl.where(rmask[:, None], d, 0.0), 0)
                tl.store(dbp_ptr + pid_m * stride_dbp + cols, colsum, mask=cmask)

    @triton.jit
    def _soft_linear_cross_entropy_fwd_kernel(
            h_ptr, h1_ptr, h2_ptr, w_ptr, b_ptr, part_ptr,
            N, V, D, stride_h, stride_w, tiles_per_split, cap, inv_cap,
            HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, TANH: tl.constexpr, PREC: tl.constexpr,
            EVEN_K: tl.constexpr, FLATTEN: tl.constexpr, TMA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXED_SHIFT: tl.constexpr = False):
        """Three streams per W tile: online (m0, l0) of S0 = cap(h·Wᵀ+b) and, for k = 1, 2, online (m_k, l_k)
        of S_k plus t_k = Σ exp(S_k − m_k)·S0. part: (8, splits, N) fp32. FIXED_SHIFT: every m stays cap."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_c = tl.minimum(rows, N - 1)
        if FIXED_SHIFT:
            m0 = tl.zeros((BLOCK_M,), tl.float32) + cap
        else:
            m0 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        m1 = m0
        m2 = m0
        l0 = tl.zeros((BLOCK_M,), tl.float32)
        l1 = tl.zeros((BLOCK_M,), tl.float32)
        l2 = tl.zeros((BLOCK_M,), tl.float32)
        t1 = tl.zeros((BLOCK_M,), tl.float32)
        t2 = tl.zeros((BLOCK_M,), tl.float32)
        ta = pid_s * tiles_per_split
        tb = tl.minimum(ta + tiles_per_split, tl.cdiv(V, BLOCK_N))
        for t in tl.range(ta, tb, flatten=FLATTEN):
            cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_c = tl.minimum(cols, V - 1)
            cmask = (cols < V)[None, :]
            acc = _logit_tile(h_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, t * BLOCK_N, stride_w, D,
                              PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s0, _ = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            s0 = tl.where(cmask, s0, 0.0)       # finite on masked columns: it multiplies e_k = 0 there
            if FIXED_SHIFT:
                l0 += tl.sum(tl.where(cmask, tl.exp(s0 - cap), 0.0), 1)
            else:
                m_new = tl.maximum(m0, tl.max(tl.where(cmask, s0, float("-inf")), 1))
                l0 = l0 * tl.exp(m0 - m_new) + tl.sum(tl.where(cmask, tl.exp(s0 - m_new[:, None]), 0.0), 1)
                m0 = m_new
            acc = _logit_tile(h1_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, t * BLOCK_N, stride_w, D,
                              PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, _ = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            s = tl.where(cmask, s, float("-inf"))
            if FIXED_SHIFT:
                e = tl.exp(s - cap)
                l1 += tl.sum(e, 1)
                t1 += tl.sum(e * s0, 1)
            else:
                m_new = tl.maximum(m1, tl.max(s, 1))
                a = tl.exp(m1 - m_new)
                e = tl.exp(s - m_new[:, None])
                l1 = l1 * a + tl.sum(e, 1)
                t1 = t1 * a + tl.sum(e * s0, 1)
                m1 = m_new
            acc = _logit_tile(h2_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, t * BLOCK_N, stride_w, D,
                              PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, _ = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            s = tl.where(cmask, s, float("-inf"))
            if FIXED_SHIFT:
                e = tl.exp(s - cap)
                l2 += tl.sum(e, 1)
                t2 += tl.sum(e * s0, 1)
            else:
                m_new = tl.maximum(m2, tl.max(s, 1))
                a = tl.exp(m2 - m_new)
                e = tl.exp(s - m_new[:, None])
                l2 = l2 * a + tl.sum(e, 1)
                t2 = t2 * a + tl.sum(e * s0, 1)
                m2 = m_new
        rmask = rows < N
        out = part_ptr + pid_s * N + rows
        step = n_splits * N
        tl.store(out, m0, mask=rmask)
        tl.store(out + step, l0, mask=rmask)
        tl.store(out + 2 * step, m1, mask=rmask)
        tl.store(out + 3 * step, l1, mask=rmask)
        tl.store(out + 4 * step, t1, mask=rmask)
        tl.store(out + 5 * step, m2, mask=rmask)
        tl.store(out + 6 * step, l2, mask=rmask)
        tl.store(out + 7 * step, t2, mask=rmask)

    @triton.jit
    def _soft_linear_cross_entropy_bwd_kernel(
            h_ptr, h1_ptr, h2_ptr, w_ptr, b_ptr, stats_ptr, lam_ptr, g_ptr, ds_ptr, dbp_ptr,
            N, V, D, col0, n_cols, stride_h, stride_w, stride_ds, stride_dbp, cap, inv_cap,
            HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, TANH: tl.constexpr, PREC: tl.constexpr,
            EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, TMA: tl.constexpr,
            TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DB_PARTIALS: tl.constexpr = True):
        """dS = g·(p0 − λ·p1 − (1−λ)·p2)·cap'(z0) per tile, its column sums to dbp (HAS_BIAS and DB_PARTIALS);
        stats (6, N): (max, log l) of the h, h1, h2 streams.
        The target streams go first so that only dS and one accumulator are live at a time."""
        num_m = tl.cdiv(N, BLOCK_M)
        num_n = tl.cdiv(n_cols, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
            pid_m, pid_n = _group_tile(tile, num_m, num_n, GROUP_M)
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rows_c = tl.minimum(rows, N - 1)
            lcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = col0 + lcols
            cols_c = tl.minimum(cols, V - 1)
            cmask = (cols < V)[None, :]
            off_n = col0 + pid_n * BLOCK_N
            lam = tl.load(lam_ptr + rows_c)
            acc = _logit_tile(h1_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, off_n, stride_w, D,
                              PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, _ = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            d = -lam[:, None] * tl.exp((s - tl.load(stats_ptr + 2 * N + rows_c)[:, None])
                                       - tl.load(stats_ptr + 3 * N + rows_c)[:, None])
            acc = _logit_tile(h2_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, off_n, stride_w, D,
                              PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, _ = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            d -= (1.0 - lam)[:, None] * tl.exp((s - tl.load(stats_ptr + 4 * N + rows_c)[:, None])
                                               - tl.load(stats_ptr + 5 * N + rows_c)[:, None])
            acc = _logit_tile(h_ptr, rows_c, pid_m * BLOCK_M, stride_h, w_ptr, cols_c, off_n, stride_w, D,
                              PREC, EVEN_K, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            s, t = _capped(acc, b_ptr, cols_c, cap, inv_cap, HAS_BIAS, HAS_CAP, TANH)
            d += tl.exp((s - tl.load(stats_ptr + rows_c)[:, None]) - tl.load(stats_ptr + N + rows_c)[:, None])
            d = tl.where(cmask, d, 0.0) * tl.load(g_ptr + rows_c)[:, None]
            if HAS_CAP:
                d = d * (1.0 - t * t)
            rmask = rows < N
            lmask = lcols < n_cols
            _store_ds(ds_ptr, d, rows, lcols, pid_m * BLOCK_M, pid_n * BLOCK_N, n_cols, N, stride_ds, TMA_STORE,
                      BLOCK_M, BLOCK_N)
            if HAS_BIAS and DB_PARTIALS:
                colsum = tl.sum(tl.where(rmask[:, None], d, 0.0), 0)
                tl.store(dbp_ptr + pid_m * stride_dbp + cols, colsum, mask=lmask)

    # ---- the opt-in "gemm" implementation: cuBLAS writes a chunk of logits, these passes read it --------------
    @triton.jit
    def _lce_chunk_stats_kernel(z_ptr, b_ptr, tgt_ptr, l_ptr, zt_ptr, N, n_cols, col0, n_valid, stride_z, cap,
                                inv_cap, HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_C: tl.constexpr):
        """Forward pass over one chunk of logits z = h·W[col0:col0+n_cols]ᵀ (N, n_cols) from cuBLAS, with
        S = cap·tanh((z + b)/cap) and the fixed shift (a cap in (0, 40]): l[r] += Σ exp(S − cap) over the chunk's
        columns < n_valid, and zt[r] += S at the row's target when it falls in the chunk. Each program owns
        BLOCK_R rows across the whole chunk, so l and zt are updated without atomics."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1).to(tl.int32) - col0   # negative: not in this chunk
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z
        l = tl.zeros((BLOCK_R,), tl.float32)
        zt = tl.zeros((BLOCK_R,), tl.float32)
        for c in range(0, n_cols, BLOCK_C):
            cols = c + tl.arange(0, BLOCK_C)
            ok = (cols < n_cols) & (col0 + cols < n_valid)
            z = tl.load(z_rows + cols[None, :], mask=rmask[:, None] & ok[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(b_ptr + col0 + cols, mask=ok, other=0.0).to(tl.float32)[None, :]
            sc = cap * _tanh(z * inv_cap, TANH)
            l += tl.sum(tl.where(ok[None, :], tl.exp(sc - cap), 0.0), 1)
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], sc, 0.0), 1)
        tl.store(l_ptr + rows, tl.load(l_ptr + rows, mask=rmask, other=0.0) + l, mask=rmask)
        tl.store(zt_ptr + rows, tl.load(zt_ptr + rows, mask=rmask, other=0.0) + zt, mask=rmask)

    @triton.jit
    def _lce_chunk_ds_kernel(z_ptr, b_ptr, tgt_ptr, stats_ptr, g_ptr, dbp_ptr, N, n_cols, col0, n_valid, stride_z,
                             stride_dbp, cap, inv_cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                             TANH: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Backward pass, in place over one chunk of logits z (N, n_cols) from cuBLAS: z ← dS = g·(p − onehot)·cap'
        in z's dtype (as _linear_cross_entropy_bwd_kernel writes it), columns ≥ n_valid zero, and dS's column sums
        of the BLOCK_M-row block into dbp[pid_m] (the bias gradient's partials). SUB_M rows at a time: a
        memory-bound pass wants many resident warps, not a large tile per thread."""
        pid_m = tl.program_id(0)
        lcols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = col0 + lcols
        cmask = lcols < n_cols
        bias = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=cols < n_valid, other=0.0).to(tl.float32)
        colsum = tl.zeros((BLOCK_N,), tl.float32)
        for r0 in range(0, BLOCK_M, SUB_M):
            rows = pid_m * BLOCK_M + r0 + tl.arange(0, SUB_M)
            rmask = rows < N
            ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_z + lcols[None, :]
            z = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32) + bias[None, :]
            if HAS_CAP:
                t = _tanh(z * inv_cap, TANH)
                sc = cap * t
            else:
                sc = z
            m = tl.load(stats_ptr + rows, mask=rmask, other=0.0)
            logl = tl.load(stats_ptr + N + rows, mask=rmask, other=0.0)
            g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
            tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1).to(tl.int32)
            p = tl.where((cols < n_valid)[None, :], tl.exp((sc - m[:, None]) - logl[:, None]), 0.0)
            d = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
            if HAS_CAP:
                d = d * (1.0 - t * t)
            # padded columns zero whatever W's padding rows hold (their logits may be inf or NaN, and 0·NaN is NaN)
            d = tl.where(rmask[:, None] & (cols < n_valid)[None, :], d, 0.0)
            tl.store(ptrs, d.to(z_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
            colsum += tl.sum(d, 0)
        if HAS_BIAS:
            tl.store(dbp_ptr + pid_m * stride_dbp + cols, colsum, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4     # the interpreter: a few splits, so the split combine is exercised on CPU too


@functools.lru_cache(maxsize=8)
def _smem_optin(device: torch.device) -> int:
    """Bytes of shared memory one CUDA block may opt in to (227 KiB on an H100, 163 on an A100, 99 on sm_86/89/120);
    0 where torch does not report it."""
    return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0))


def _stages_smem(cfg: dict, esz: int) -> int:
    """The operand stages' shared memory of a forward config (A and B tiles per stage), bytes."""
    return cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * esz


def _config(kind: str, dtype: torch.dtype, D: int, config: Optional[dict],
            device: Optional[torch.device] = None) -> dict:
    base = INTERPRET_CONFIG if interpreting() else {"fwd": FWD_CONFIG, "bwd": BWD_CONFIG,
                                                    "soft_fwd": SOFT_FWD_CONFIG, "soft_bwd": SOFT_BWD_CONFIG}[kind]
    if kind == "fwd" and not interpreting():
        # the 128×256 four-stage forward needs 192 KiB of operand stages (+ barriers): fp32 inputs (twice that) and
        # GPUs that cannot give one block that much (an A100's 163 KiB) keep the previous tile (96 KiB in 16 bits)
        small_smem = (device is not None and device.type == "cuda"
                      and _smem_optin(device) < _stages_smem(base, torch.finfo(dtype).bits // 8) + 1024)
        if dtype == torch.float32 or small_smem:
            base = {**base, **FWD_PREVIOUS}
    cfg = {**base, **(config or {})}
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(D)))
    return cfg


def _flags(h: torch.Tensor, bias, cap, D: int, cfg: dict, tma: bool = False) -> dict:
    """Constexpr flags: fp32 inputs keep IEEE fp32 dots (no TF32) and an fp64 tanh; bf16 on a GPU uses the
    MUFU tanh (see _tanh). tma: the operands are tensor descriptors (_operands)."""
    if h.dtype == torch.float32:
        tanh = 2
    else:
        tanh = 0 if h.dtype == torch.bfloat16 and h.device.type == "cuda" and not interpreting() else 1
    return dict(HAS_BIAS=bias is not None, HAS_CAP=bool(cap), TANH=tanh,
                PREC="ieee" if h.dtype == torch.float32 else "tf32", EVEN_K=D % cfg["BLOCK_K"] == 0,
                FLATTEN=cfg["FLATTEN"], TMA=bool(tma), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"])


def tma_usable(h: torch.Tensor, weight: torch.Tensor, block_k: int, *more: torch.Tensor) -> bool:
    """Whether the TMA variant can read h (and the other row operands `more`, e.g. h1, h2) and weight, as
    logits_argmax.tma_usable: host tensor descriptors need a 16-byte aligned base, 16-byte aligned row strides
    (last stride 1, which _contig ensures) and a box row of a multiple of 16 bytes; on CUDA, TMA needs sm_90+.
    D % BLOCK_K need not be 0: TMA zero-fills the K tail. fp32 on CUDA keeps the pointer kernels: the variant
    exists to feed wgmma 16-bit tiles (fp32 runs the exact FMA dot, and backend='auto' in training runs bf16).
    The interpreter takes fp32 (its tests cannot use bf16)."""
    return h.shape[0] > 0 and tma_device_ok(h) and tma_rows_ok(block_k, h, weight, *more)


def _operands(cfg: dict, n_valid: int, weight: torch.Tensor, *xs: torch.Tensor):
    """(tma, [x operands], weight operand): tensor descriptors (boxes [BLOCK_M, BLOCK_K] over each x (N, D),
    [BLOCK_N, BLOCK_K] over W[:n_valid], so vocabulary rows ≥ n_valid read as zeros) when cfg asks for TMA
    ("tma": True) and tma_usable; otherwise the tensors themselves, for the pointer kernels.

    CUDA-graph capture (as logits_argmax): the launcher encodes each CUtensorMap on the host (a driver call
    touching no stream) and passes it by value, so a replay reads the addresses the tensors had at capture."""
    if cfg.get("tma") and tma_usable(xs[0], weight, cfg["BLOCK_K"], *xs[1:]):
        BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        return (True, [TensorDescriptor.from_tensor(x, [BM, BK]) for x in xs],
                TensorDescriptor.from_tensor(weight[:n_valid], [BN, BK]))
    return False, list(xs), weight


def _ds_operand(tma: bool, cfg: dict, ds: torch.Tensor, nc: int):
    """(TMA_STORE, ds operand): config "tma_store": True (with the TMA loads) writes dS through a descriptor
    over ds[:, :nc] (box [BLOCK_M, BLOCK_N]); ds is allocated here, so it is always aligned."""
    if tma and cfg.get("tma_store"):
        return True, TensorDescriptor.from_tensor(ds[:, :nc], [cfg["BLOCK_M"], cfg["BLOCK_N"]])
    return False, ds


def _check_triton_inputs(*tensors):
    if len({t.dtype for t in tensors}) > 1:      # the kernels' dots take one operand dtype (a compile error else)
        raise TypeError(f"backend='triton' needs h, weight (and h1, h2) of one dtype, got {[t.dtype for t in tensors]}")
    for t in tensors:
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"backend='triton' supports fp32/fp16/bf16, got {t.dtype}")
        if t.numel() >= 2 ** 31:
            raise ValueError("backend='triton' indexes with int32: tensors must have < 2^31 elements")


def _splits(N: int, n_tiles: int, cfg: dict, device) -> tuple[int, int]:
    """Enough (row block × vocabulary split) programs to fill every SM ctas_per_sm times, in one wave."""
    m_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    splits = max(1, min(n_tiles, cfg["ctas_per_sm"] * _sm_count(device) // m_blocks))
    per = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per), per


def _combine(m: torch.Tensor, l: torch.Tensor, t: Optional[torch.Tensor] = None):
    """Merge per-split online-softmax partials (splits, N): (max, log l) and, given t, Σ_v softmax_v·S0_v."""
    M = m.amax(0)
    w = torch.exp(m - M)
    L = (l * w).sum(0)
    return (M, torch.log(L)) if t is None else (M, torch.log(L), (t * w).sum(0) / L)


def linear_cross_entropy_fwd(h, weight, bias, targets, cap, ignore_index, n_valid, config=None):
    """Triton forward on 2-D contiguous h (N, D): (loss (N,), stats (2, N) = (max, log l)), fp32."""
    _check_triton_inputs(h, weight)
    N, D = h.shape
    cfg = _config("fwd", h.dtype, D, config, h.device)
    if _impl(cfg) == "gemm" and _fixed_shift(cap):
        return _lce_fwd_gemm(h, weight, bias, targets, cap, ignore_index, n_valid, cfg)
    n_tiles = triton.cdiv(n_valid, cfg["BLOCK_N"])
    splits, per = _splits(N, n_tiles, cfg, h.device)
    part = torch.empty(3, splits, N, device=h.device, dtype=torch.float32)
    tma, (h_op,), w_op = _operands(cfg, n_valid, weight, h)
    _linear_cross_entropy_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]), splits)](
        h_op, w_op, weight if bias is None else bias, targets, part,
        N, n_valid, D, h.stride(0), weight.stride(0), per, float(cap or 1.0), 1.0 / float(cap or 1.0),
        **_flags(h, bias, cap, D, cfg, tma), FIXED_SHIFT=_fixed_shift(cap) and cfg.get("fixed_shift", True),
        **launch_opts(cfg))
    m, logl = _combine(part[0], part[1])
    loss = torch.where(targets != ignore_index, (m - part[2].sum(0)) + logl, 0.0)
    return loss, torch.stack([m, logl])


def _impl(cfg: dict) -> str:
    impl = cfg.get("impl", "fused")
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy config impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _lce_fwd_gemm(h, weight, bias, targets, cap, ignore_index, n_valid, cfg):
    """The "gemm" forward (a cap in (0, 40]): per vocabulary chunk, cuBLAS writes z = h·W[chunk]ᵀ in h's dtype
    into one reused (N, v_chunk) buffer and _lce_chunk_stats_kernel folds it into l = Σ exp(S − cap) and the
    target's S; the stats are (cap, log l) as the fused kernel's."""
    N = h.shape[0]
    chunk = min(int(cfg.get("v_chunk", BWD_CONFIG["v_chunk"])), triton.cdiv(n_valid, 128) * 128)
    buf = torch.empty(N, chunk, device=h.device, dtype=h.dtype)
    l = torch.zeros(N, device=h.device, dtype=torch.float32)
    zt = torch.zeros(N, device=h.device, dtype=torch.float32)
    sc = GEMM_STATS_CONFIG
    for c0 in range(0, n_valid, chunk):
        nc = min(chunk, n_valid - c0)
        z = buf[:, :nc]
        torch.mm(h, weight[c0:c0 + nc].t(), out=z)
        _lce_chunk_stats_kernel[(triton.cdiv(N, sc["BLOCK_R"]),)](
            z, weight if bias is None else bias, targets, l, zt, N, nc, c0, n_valid, buf.stride(0), float(cap),
            1.0 / float(cap), HAS_BIAS=bias is not None, TANH=_flags(h, bias, cap, h.shape[1], cfg)["TANH"],
            BLOCK_R=sc["BLOCK_R"], BLOCK_C=sc["BLOCK_C"], num_warps=sc["num_warps"])
    m = torch.full_like(l, float(cap))
    logl = torch.log(l)
    loss = torch.where(targets != ignore_index, (m - zt) + logl, 0.0)
    return loss, torch.stack([m, logl])


def _ds_chunk(N: int, v_chunk: int, BN: int, v_end: int) -> int:
    """Columns of the backward's (N, chunk) dS buffer: v_chunk rounded up to BLOCK_N, at most the valid width, and
    small enough that N·chunk < 2^31 (the kernels index dS with int32: rows·stride + column)."""
    chunk = min(triton.cdiv(v_chunk, BN) * BN, triton.cdiv(v_end, BN) * BN)
    chunk = max(BN, min(chunk, (2 ** 31 - 1) // max(N, 1) // BN * BN))
    if N * chunk >= 2 ** 31:
        raise ValueError(f"backend='triton': {N} rows × {chunk} dS columns exceed int32 indexing; split the rows")
    return chunk


def _bwd_chunks(h, weight, bias, n_valid, kind, config, launch):
    """Shared backward driver: per vocabulary chunk, the kernel writes dS (N, chunk) and db partials;
    cuBLAS then does dh += dS·W[chunk] (fp32 accumulator) and dW[chunk] = dSᵀ·h.
    config {"db_gemm": True} (opt-in; the fused kernels, hard and soft targets): no db partials in the kernel (a
    cross-warp column sum and a store per tile, and the (row blocks × V) fp32 partials zeroed, written and summed);
    db comes from the dW GEMM instead, as the column of dSᵀ·[h, 1] (h copied once with a ones column, rows padded
    to 16 bytes), i.e. summed from the stored, rounded dS as the published head's autograd sums its 16-bit
    gradient; dW is copied out of that product per chunk."""
    N, D = h.shape
    Vp = weight.shape[0]
    cfg = _config(kind, h.dtype, D, config)
    BN = cfg["BLOCK_N"]
    v_end = min(Vp, triton.cdiv(n_valid, 128) * 128)       # padded columns past this get zero gradient
    chunk = _ds_chunk(N, cfg["v_chunk"], BN, v_end)
    ds = torch.empty(N, chunk, device=h.device, dtype=h.dtype)
    m_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    db_gemm = bool(cfg.get("db_gemm")) and bias is not None and (kind == "soft_bwd" or _impl(cfg) != "gemm")
    dbp = torch.zeros(m_blocks, Vp, device=h.device, dtype=torch.float32) if bias is not None and not db_gemm \
        else None
    if db_gemm:
        per16 = 16 // h.element_size()
        h_one = torch.zeros(N, triton.cdiv(D + 1, per16) * per16, device=h.device, dtype=h.dtype)
        h_one[:, :D] = h
        h_one[:, D] = 1
        dwb = torch.empty(chunk, h_one.shape[1], device=h.device, dtype=h.dtype)
        db = torch.zeros(Vp, device=h.device, dtype=bias.dtype)
    dh = torch.zeros(N, D, device=h.device, dtype=torch.float32)
    dW = torch.empty_like(weight)
    dW[v_end:].zero_()
    for c0 in range(0, v_end, chunk):
        nc = min(chunk, v_end - c0)
        tiles = m_blocks * triton.cdiv(nc, BN)
        grid = min(tiles, cfg["ctas_per_sm"] * _sm_count(h.device)) if cfg["persistent"] else tiles
        launch(ds, dbp, c0, nc, cfg, (grid,))
        dsc = ds[:, :nc]
        kv = min(nc, n_valid - c0)     # dh's product stops at n_valid: W's padding rows (zero dS) may be non-finite
        if kv <= 0:                    # a chunk wholly in the padding (small chunks): dS is zero there, dh unchanged
            pass
        elif h.dtype == torch.float32:
            dh.addmm_(dsc[:, :kv], weight[c0:c0 + kv])
        else:
            # one cuBLAS GEMM accumulating into the fp32 dh where torch allows it; config {"fp32_addmm": False}: a
            # 16-bit product then an add (the previous default: each chunk's partial rounded to bf16, ~125 MB more
            # traffic per chunk at 16384 rows)
            accumulate_mm(dh, dsc[:, :kv], weight[c0:c0 + kv], bool(cfg.get("fp32_addmm", True)))
        if db_gemm:
            torch.mm(dsc.t(), h_one, out=dwb[:nc])
            dW[c0:c0 + nc] = dwb[:nc, :D]
            db[c0:c0 + nc] = dwb[:nc, D]
        else:
            torch.mm(dsc.t(), h, out=dW[c0:c0 + nc])
    if not db_gemm:
        db = dbp.sum(0).to(bias.dtype) if bias is not None else weight.new_empty(0)
    return dh.to(h.dtype), dW, db


def linear_cross_entropy_bwd(grad, h, weight, bias, targets, stats, cap, ignore_index, n_valid, config=None):
    """Triton backward: (dh, dW, db) for per-row loss gradients grad (N,); db is empty without a bias."""
    _check_triton_inputs(h, weight)
    g = (grad.float() * (targets != ignore_index)).contiguous()
    D = h.shape[1]

    def launch(ds, dbp, c0, nc, cfg, grid):
        if _impl(cfg) == "gemm" and _fixed_shift(cap):
            # cuBLAS writes the chunk's logits into the dS buffer, the pass turns them into dS in place. Only with
            # the "gemm" forward's statistics (a cap in (0, 40]): p = exp(S − m − log l) needs the logits the
            # statistics were summed from, and the fused forward's are fp32 where these are rounded to h's dtype
            z = ds[:, :nc]
            torch.mm(h, weight[c0:c0 + nc].t(), out=z)
            bm, dc = cfg["BLOCK_M"], GEMM_DS_CONFIG      # dbp has one row per BLOCK_M rows
            _lce_chunk_ds_kernel[(triton.cdiv(h.shape[0], bm), triton.cdiv(nc, dc["BLOCK_N"]))](
                z, weight if bias is None else bias, targets, stats, g, ds if dbp is None else dbp, h.shape[0], nc,
                c0, n_valid, ds.stride(0), 0 if dbp is None else dbp.stride(0), float(cap or 1.0),
                1.0 / float(cap or 1.0), HAS_BIAS=bias is not None, HAS_CAP=bool(cap),
                TANH=_flags(h, bias, cap, D, cfg)["TANH"], BLOCK_M=bm, SUB_M=min(dc["SUB_M"], bm),
                BLOCK_N=dc["BLOCK_N"], num_warps=dc["num_warps"])
            return
        tma, (h_op,), w_op = _operands(cfg, n_valid, weight, h)
        tma_store, ds_op = _ds_operand(tma, cfg, ds, nc)
        _linear_cross_entropy_bwd_kernel[grid](
            h_op, w_op, weight if bias is None else bias, targets, stats, g, ds_op, ds if dbp is None else dbp,
            h.shape[0], n_valid, D, c0, nc, h.stride(0), weight.stride(0), ds.stride(0),
            0 if dbp is None else dbp.stride(0), float(cap or 1.0), 1.0 / float(cap or 1.0),
            GROUP_M=cfg["GROUP_M"], TMA_STORE=tma_store, **_flags(h, bias, cap, D, cfg, tma),
            DB_PARTIALS=dbp is not None, **launch_opts(cfg))

    return _bwd_chunks(h, weight, bias, n_valid, "bwd", config, launch)


def soft_linear_cross_entropy_fwd(h, weight, bias, h1, h2, lam, cap, n_valid, config=None):
    """Triton forward of the soft-target loss: (loss (N,), stats (6, N) = (max, log l) of the h, h1, h2 streams)."""
    _check_triton_inputs(h, weight, h1, h2)
    N, D = h.shape
    cfg = _config("soft_fwd", h.dtype, D, config)
    n_tiles = triton.cdiv(n_valid, cfg["BLOCK_N"])
    splits, per = _splits(N, n_tiles, cfg, h.device)
    part = torch.empty(8, splits, N, device=h.device, dtype=torch.float32)
    tma, xs, w_op = _operands(cfg, n_valid, weight, h, h1, h2)
    _soft_linear_cross_entropy_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]), splits)](
        *xs, w_op, weight if bias is None else bias, part,
        N, n_valid, D, h.stride(0), weight.stride(0), per, float(cap or 1.0), 1.0 / float(cap or 1.0),
        **_flags(h, bias, cap, D, cfg, tma), FIXED_SHIFT=_fixed_shift(cap) and cfg.get("fixed_shift", True),
        **launch_opts(cfg))
    m0, ll0 = _combine(part[0], part[1])
    m1, ll1, e1 = _combine(part[2], part[3], part[4])
    m2, ll2, e2 = _combine(part[5], part[6], part[7])
    loss = (m0 + ll0) - lam * e1 - (1.0 - lam) * e2
    return loss, torch.stack([m0, ll0, m1, ll1, m2, ll2])


def soft_linear_cross_entropy_bwd(grad, h, weight, bias, h1, h2, lam, stats, cap, n_valid, config=None):
    _check_triton_inputs(h, weight, h1, h2)
    g = grad.float().contiguous()
    D = h.shape[1]

    def launch(ds, dbp, c0, nc, cfg, grid):
        tma, xs, w_op = _operands(cfg, n_valid, weight, h, h1, h2)
        tma_store, ds_op = _ds_operand(tma, cfg, ds, nc)
        _soft_linear_cross_entropy_bwd_kernel[grid](
            *xs, w_op, weight if bias is None else bias, stats, lam, g, ds_op, ds if dbp is None else dbp,
            h.shape[0], n_valid, D, c0, nc, h.stride(0), weight.stride(0), ds.stride(0),
            0 if dbp is None else dbp.stride(0), float(cap or 1.0), 1.0 / float(cap or 1.0),
            GROUP_M=cfg["GROUP_M"], TMA_STORE=tma_store, **_flags(h, bias, cap, D, cfg, tma),
            DB_PARTIALS=dbp is not None, **launch_opts(cfg))

    return _bwd_chunks(h, weight, bias, n_valid, "soft_bwd", config, launch)


# ---- the 'torch' backend: chunked plain PyTorch, never more than (TORCH_ROW_CHUNK × TORCH_V_CHUNK) logits
def _chunk_logits(hr, weight, bias, v0, v1, cap, need_t: bool = False, bufs: Optional[ChunkBufs] = None,
                  slot: int = 0):
    """(S = cap(h·Wᵀ + b) of one chunk, tanh(z/cap) when need_t else None): one addmm, in-place passes. With
    bufs, the result lives in bufs slot `slot` (and S in slot + 1 when need_t), valid until that slot's reuse."""
    out = bufs.get(slot, hr.shape[0], v1 - v0) if bufs is not None else None
    z = chunk_logits(hr, weight, bias, v0, v1, out=out)
    if cap:
        t = z.mul_(1.0 / cap).tanh_()
        if not need_t:
            return t.mul_(cap), None
        return torch.mul(t, cap, out=bufs.get(slot + 1, *t.shape) if bufs is not None else None), t
    return z, None


def _bufs(h, rows: int, V: int) -> ChunkBufs:
    return ChunkBufs(min(rows, TORCH_ROW_CHUNK), min(V, TORCH_V_CHUNK), h.device, acc_dtype(h.dtype))


def _fixed_shift(cap) -> bool:
    """A cap in (0, 40] bounds the logits to (−cap, cap): softmax sums can take exp(s − cap) with no running
    max (values in (e^−2cap, 1], normal in fp32), as the Triton kernels do. With that and in-place passes (the
    old path allocated ~6 chunk-sized temporaries per chunk), `fmlm bench train` on a 2-core CPU (V=30522,
    L=128, B=16, hidden 128; 2026-11-27, runs alternated with the old code): engine step 3180 / 3109 ms →
    1467 / 1498 ms, peak 273 → 177 MB; reusing the chunk buffers (ChunkBufs) then 1533 / 1573 → 1253 / 1207 ms,
    peak 177 → 147 MB."""
    return bool(cap) and 0 < cap <= 40


def _online(m, l, s, cap=None):
    """One chunk of the online softmax: (m_new, rescale of the previous sums, e = exp(s − m_new), l_new). With
    a fixed shift (_fixed_shift(cap)) m stays cap and the rescale is 1; e is computed in place of s then."""
    if _fixed_shift(cap):
        e = s.sub_(cap).exp_()
        return m, 1.0, e, l + e.sum(-1)
    m_new = torch.maximum(m, s.amax(-1))
    m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)     # all −inf so far (−inf bias, no cap): not NaN
    a = torch.exp(m - m_ref)
    e = torch.exp(s - m_ref[:, None])
    return m_new, a, e, l * a + e.sum(-1)


def _init_m(rows: int, cap, device, dtype):
    return torch.full((rows,), float(cap) if _fixed_shift(cap) else float("-inf"), device=device, dtype=dtype)


@no_autocast
def _lce_fwd_torch(h, weight, bias, targets, cap, ignore_index, V):
    acc = acc_dtype(h.dtype)
    N = h.shape[0]
    stats = torch.empty(2, N, device=h.device, dtype=acc)
    zt = torch.zeros(N, device=h.device, dtype=acc)
    bufs = _bufs(h, N, V)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        hr = h[r0:r0 + TORCH_ROW_CHUNK].to(acc)
        tr = targets[r0:r0 + TORCH_ROW_CHUNK]
        m = _init_m(hr.shape[0], cap, h.device, acc)
        l = torch.zeros_like(m)
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            s, _ = _chunk_logits(hr, weight, bias, v0, v1, cap, bufs=bufs)
            inside = (tr >= v0) & (tr < v1)
            picked = s.gather(1, (tr - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]      # before _online: in place
            zt[r0:r0 + hr.shape[0]] += torch.where(inside, picked, 0.0)
            m, _, _, l = _online(m, l, s, cap)
        stats[0, r0:r0 + hr.shape[0]] = m
        stats[1, r0:r0 + hr.shape[0]] = torch.log(l)
    return torch.where(targets != ignore_index, (stats[0] - zt) + stats[1], 0.0), stats


def _bwd_torch(h, weight, bias, V, dsoft):
    """Shared chunked backward: dsoft(r0, r1, v0, v1, s, hr) → dS for that chunk (before cap')."""
    acc = acc_dtype(h.dtype)
    N, D = h.shape
    dh = torch.zeros(N, D, device=h.device, dtype=acc)
    dW = torch.zeros(weight.shape, device=h.device, dtype=acc)
    db = torch.zeros(weight.shape[0], device=h.device, dtype=acc)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        r1 = min(N, r0 + TORCH_ROW_CHUNK)
        hr = h[r0:r1].to(acc)
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            d = dsoft(r0, r1, v0, v1, hr)
            dh[r0:r1] += d @ weight[v0:v1].to(acc)
            dW[v0:v1] += d.T @ hr
            db[v0:v1] += d.sum(0)
    return dh.to(h.dtype), dW.to(weight.dtype), (db.to(bias.dtype) if bias is not None else weight.new_empty(0))


@no_autocast
def _lce_bwd_torch(grad, h, weight, bias, targets, stats, cap, ignore_index, V):
    acc = acc_dtype(h.dtype)
    g = grad.to(acc) * (targets != ignore_index)
    bufs = _bufs(h, h.shape[0], V)

    def dsoft(r0, r1, v0, v1, hr):
        s, t = _chunk_logits(hr, weight, bias, v0, v1, cap, need_t=True, bufs=bufs)
        d = s.sub_(stats[0, r0:r1, None]).sub_(stats[1, r0:r1, None]).exp_()       # softmax, in place of s
        tr = targets[r0:r1]
        inside = ((tr >= v0) & (tr < v1)).to(acc)
        d.scatter_add_(1, (tr - v0).clamp(0, v1 - v0 - 1)[:, None], -inside[:, None])
        d *= g[r0:r1, None]
        return d.mul_(t.mul_(t).neg_().add_(1)) if cap else d         # · cap'(z) = 1 − tanh²

    return _bwd_torch(h, weight, bias, V, dsoft)


@no_autocast
def _soft_fwd_torch(h, weight, bias, h1, h2, lam, cap, V):
    acc = acc_dtype(h.dtype)
    N = h.shape[0]
    loss = torch.empty(N, device=h.device, dtype=acc)
    stats = torch.empty(6, N, device=h.device, dtype=acc)
    bufs = _bufs(h, N, V)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        r1 = min(N, r0 + TORCH_ROW_CHUNK)
        hs = [x[r0:r1].to(acc) for x in (h, h1, h2)]
        m = [_init_m(r1 - r0, cap, h.device, acc) for _ in range(3)]
        l = [torch.zeros(r1 - r0, device=h.device, dtype=acc) for _ in range(3)]
        tk = [torch.zeros(r1 - r0, device=h.device, dtype=acc) for _ in range(3)]
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            s0 = _chunk_logits(hs[0], weight, bias, v0, v1, cap, bufs=bufs, slot=0)[0]
            for k in (1, 2):
                s = _chunk_logits(hs[k], weight, bias, v0, v1, cap, bufs=bufs, slot=1)[0]
                m[k], a, e, l[k] = _online(m[k], l[k], s, cap)
                tk[k] = tk[k] * a + (e * s0).sum(-1)
            m[0], _, _, l[0] = _online(m[0], l[0], s0, cap)      # last: with a fixed shift it reuses s0's memory
        for k in range(3):
            stats[2 * k, r0:r1] = m[k]
            stats[2 * k + 1, r0:r1] = torch.log(l[k])
        lr = lam[r0:r1].to(acc)
        loss[r0:r1] = (m[0] + stats[1, r0:r1]) - lr * tk[1] / l[1] - (1 - lr) * tk[2] / l[2]
    return loss, stats


@no_autocast
def _soft_bwd_torch(grad, h, weight, bias, h1, h2, lam, stats, cap, V):
    acc = acc_dtype(h.dtype)
    g = grad.to(acc)
    lam = lam.to(acc)
    bufs = _bufs(h, h.shape[0], V)

    def dsoft(r0, r1, v0, v1, hr):
        s, t = _chunk_logits(hr, weight, bias, v0, v1, cap, need_t=True, bufs=bufs)     # slots 0 (t), 1 (s)
        d = s.sub_(stats[0, r0:r1, None]).sub_(stats[1, r0:r1, None]).exp_()
        for k, x, w in ((1, h1, lam[r0:r1]), (2, h2, 1 - lam[r0:r1])):
            sk = _chunk_logits(x[r0:r1].to(acc), weight, bias, v0, v1, cap, bufs=bufs, slot=2)[0]
            d -= sk.sub_(stats[2 * k, r0:r1, None]).sub_(stats[2 * k + 1, r0:r1, None]).exp_().mul_(w[:, None])
        d *= g[r0:r1, None]
        return d.mul_(t.mul_(t).neg_().add_(1)) if cap else d

    return _bwd_torch(h, weight, bias, V, dsoft)


# ---------------------------------------------------------------------------------------------
# torch.library registration (2-D contiguous inputs; the functional reshapes)
# ---------------------------------------------------------------------------------------------
def _contig(*ts):
    return [None if t is None else t.contiguous() for t in ts]


def _lce_fwd_impl(h, weight, bias, targets, cap, ignore_index, n_valid, backend):
    h, weight, bias, targets = _contig(h, weight, bias, targets)
    if backend == "triton":
        return linear_cross_entropy_fwd(h, weight, bias, targets, cap, ignore_index, n_valid)
    return _lce_fwd_torch(h, weight, bias, targets, cap, ignore_index, n_valid)


def _lce_bwd_impl(grad, h, weight, bias, targets, stats, cap, ignore_index, n_valid, backend):
    grad, h, weight, bias, targets, stats = _contig(grad, h, weight, bias, targets, stats)
    if backend == "triton":
        return linear_cross_entropy_bwd(grad, h, weight, bias, targets, stats, cap, ignore_index, n_valid)
    return _lce_bwd_torch(grad, h, weight, bias, targets, stats, cap, ignore_index, n_valid)


def _soft_fwd_impl(h, weight, bias, h1, h2, lam, cap, n_valid, backend):
    h, weight, bias, h1, h2, lam = _contig(h, weight, bias, h1, h2, lam)
    if backend == "triton":
        return soft_linear_cross_entropy_fwd(h, weight, bias, h1, h2, lam, cap, n_valid)
    return _soft_fwd_torch(h, weight, bias, h1, h2, lam, cap, n_valid)


def _soft_bwd_impl(grad, h, weight, bias, h1, h2, lam, stats, cap, n_valid, backend):
    grad, h, weight, bias, h1, h2, lam, stats = _contig(grad, h, weight, bias, h1, h2, lam, stats)
    if backend == "triton":
        return soft_linear_cross_entropy_bwd(grad, h, weight, bias, h1, h2, lam, stats, cap, n_valid)
    return _soft_bwd_torch(grad, h, weight, bias, h1, h2, lam, stats, cap, n_valid)


@torch.library.custom_op("fmlm::linear_cross_entropy", mutates_args=())
def _lce_op(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
            cap: Optional[float], ignore_index: int, n_valid: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), stats (2, N) = (max, log Σ exp(S − max))) in fp32 (fp64 for fp64 inputs on the torch backend)."""
    return _lce_fwd_impl(h, weight, bias, targets, cap, ignore_index, n_valid, backend)


@_lce_op.register_fake
def _(h, weight, bias, targets, cap, ignore_index, n_valid, backend):
    acc = acc_dtype(h.dtype)
    return h.new_empty(h.shape[0], dtype=acc), h.new_empty(2, h.shape[0], dtype=acc)


@torch.library.custom_op("fmlm::linear_cross_entropy_backward", mutates_args=())
def _lce_bwd_op(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, stats: torch.Tensor, cap: Optional[float], ignore_index: int, n_valid: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db); db has shape (0,) without a bias."""
    return _lce_bwd_impl(grad, h, weight, bias, targets, stats, cap, ignore_index, n_valid, backend)


@_lce_bwd_op.register_fake
def _(grad, h, weight, bias, targets, stats, cap, ignore_index, n_valid, backend):
    return _grads_like(h, weight, bias)


def _grads_like(h, weight, bias):
    """(dh, dW, db) as the backward impls return them: contiguous (empty_like would keep a transposed input's
    strides, and inductor checks them)."""
    def like(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return like(h), like(weight), (like(bias) if bias is not None else weight.new_empty(0))


@torch.library.custom_op("fmlm::soft_linear_cross_entropy", mutates_args=())
def _soft_op(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], h1: torch.Tensor,
             h2: torch.Tensor, lam: torch.Tensor, cap: Optional[float], n_valid: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), stats (6, N) = (max, log l) of the h, h1, h2 streams); lam (N,) fp32."""
    return _soft_fwd_impl(h, weight, bias, h1, h2, lam, cap, n_valid, backend)


@_soft_op.register_fake
def _(h, weight, bias, h1, h2, lam, cap, n_valid, backend):
    acc = acc_dtype(h.dtype)
    return h.new_empty(h.shape[0], dtype=acc), h.new_empty(6, h.shape[0], dtype=acc)


@torch.library.custom_op("fmlm::soft_linear_cross_entropy_backward", mutates_args=())
def _soft_bwd_op(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 h1: torch.Tensor, h2: torch.Tensor, lam: torch.Tensor, stats: torch.Tensor, cap: Optional[float],
                 n_valid: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _soft_bwd_impl(grad, h, weight, bias, h1, h2, lam, stats, cap, n_valid, backend)


@_soft_bwd_op.register_fake
def _(grad, h, weight, bias, h1, h2, lam, stats, cap, n_valid, backend):
    return _grads_like(h, weight, bias)


# ---------------------------------------------------------------------------------------------
# Autograd: gradients w.r.t. h, weight, bias only (targets, h1, h2 and λ are data); the stats output is auxiliary.
# ---------------------------------------------------------------------------------------------
def _lce_setup_context(ctx, inputs, output):
    h, weight, bias, targets, cap, ignore_index, n_valid, backend = inputs
    ctx.save_for_backward(h, weight, bias, targets, output[1])
    ctx.args = (cap, ignore_index, n_valid, backend)
    ctx.mark_non_differentiable(output[1])


def _lce_backward(ctx, grad_loss, grad_stats):
    h, weight, bias, targets, stats = ctx.saved_tensors
    dh, dW, db = torch.ops.fmlm.linear_cross_entropy_backward(grad_loss, h, weight, bias, targets, stats, *ctx.args)
    return dh, dW, (db if bias is not None else None), None, None, None, None, None


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def _soft_setup_context(ctx, inputs, output):
    h, weight, bias, h1, h2, lam, cap, n_valid, backend = inputs
    ctx.save_for_backward(h, weight, bias, h1, h2, lam, output[1])
    ctx.args = (cap, n_valid, backend)
    ctx.mark_non_differentiable(output[1])


def _soft_backward(ctx, grad_loss, grad_stats):
    h, weight, bias, h1, h2, lam, stats = ctx.saved_tensors
    dh, dW, db = torch.ops.fmlm.soft_linear_cross_entropy_backward(grad_loss, h, weight, bias, h1, h2, lam, stats,
                                                                   *ctx.args)
    return dh, dW, (db if bias is not None else None), None, None, None, None, None, None


_soft_op.register_autograd(_soft_backward, setup_context=_soft_setup_context)


class LinearCrossEntropyFn(torch.autograd.Function):
    """The eager path of the same forward/backward: the registered ops cost ~0.1 ms of Python dispatch per
    call, so eager calls skip them; torch.compile traces the ops (see linear_cross_entropy)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, cap, ignore_index, n_valid, backend):
        loss, stats = _lce_fwd_impl(h, weight, bias, targets, cap, ignore_index, n_valid, backend)
        ctx.save_for_backward(h, weight, bias, targets, stats)
        ctx.args = (cap, ignore_index, n_valid, backend)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, targets, stats = ctx.saved_tensors
        dh, dW, db = _lce_bwd_impl(grad, h, weight, bias, targets, stats, *ctx.args)
        return dh, dW, (db if bias is not None else None), None, None, None, None, None


class SoftLinearCrossEntropyFn(torch.autograd.Function):
    """Eager path of the soft-target op (see LinearCrossEntropyFn)."""

    @staticmethod
    def forward(ctx, h, weight, bias, h1, h2, lam, cap, n_valid, backend):
        loss, stats = _soft_fwd_impl(h, weight, bias, h1, h2, lam, cap, n_valid, backend)
        ctx.save_for_backward(h, weight, bias, h1, h2, lam, stats)
        ctx.args = (cap, n_valid, backend)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, h1, h2, lam, stats = ctx.saved_tensors
        dh, dW, db = _soft_bwd_impl(grad, h, weight, bias, h1, h2, lam, stats, *ctx.args)
        return dh, dW, (db if bias is not None else None), None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
REDUCTIONS = ("none", "sum", "mean")


def _valid_vocab(h, weight, bias, n_valid) -> int:
    if weight.dim() != 2 or h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}")
    V = valid_rows(n_valid, weight.shape[0])
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return V


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                         cap: Optional[float] = 30.0, reduction: str = "none", ignore_index: int = -100,
                         n_valid: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Per-token −log softmax(cap(h·Wᵀ+b))[target] over the first n_valid rows of weight (rows past n_valid, e.g.
    padding to a multiple of 128, never reach the result, even inf or NaN ones; their gradient is zero).

    h (..., D), targets (...) int64; ignored targets give 0 and are excluded from 'mean'. The loss is fp32
    (fp64 for fp64 inputs, except with backend='reference': the published computation casts to fp32).
    Differentiable w.r.t. h, weight and bias; no (rows, V) tensor is formed except by backend='reference'."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    V = _valid_vocab(h, weight, bias, n_valid)
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(h.shape[:-1])}, got {tuple(targets.shape)}")
    check_indices(targets, V, "targets", ignore=int(ignore_index))
    cap = float(cap) if cap else None
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    t2 = targets.reshape(-1)
    be = resolve(backend, h.device)
    if be == "reference" or h2.shape[0] == 0:
        loss = ref.linear_cross_entropy_ref(h2, weight[:V], None if bias is None else bias[:V], t2, cap,
                                            ignore_index, "none")
    else:
        args = (h2, weight, bias, t2, cap, int(ignore_index), V, be)
        loss = (torch.ops.fmlm.linear_cross_entropy(*args)[0] if torch.compiler.is_compiling()
                else LinearCrossEntropyFn.apply(*args))
    loss = loss.reshape(lead)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)


def soft_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              h1: torch.Tensor, h2: torch.Tensor, lam, cap: Optional[float] = 30.0,
                              n_valid: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Per-row −Σ_v δ̄_v·log softmax(cap(h·Wᵀ+b))_v with
    δ̄ = λ·softmax(cap(h1·Wᵀ+b)) + (1−λ)·softmax(cap(h2·Wᵀ+b)).

    h, h1, h2 (..., D) of one dtype; lam broadcastable to h.shape[:-1] (one value per row). No gradient
    flows into the targets (h1, h2, λ); gradients w.r.t. h, weight, bias. The loss is fp32 (fp64 for fp64 inputs,
    except with backend='reference', the published fp32 computation)."""
    V = _valid_vocab(h, weight, bias, n_valid)
    if h1.shape != h.shape or h2.shape != h.shape:
        raise ValueError(f"h1 {tuple(h1.shape)} and h2 {tuple(h2.shape)} must match h {tuple(h.shape)}")
    cap = float(cap) if cap else None
    lead = h.shape[:-1]
    lam = torch.as_tensor(lam, device=h.device).expand(lead)
    D = h.shape[-1]
    be = resolve(backend, h.device)
    if be == "reference" or math.prod(lead) == 0:
        loss = ref.soft_linear_cross_entropy_ref(h.reshape(-1, D), weight[:V], None if bias is None else bias[:V],
                                                 h1.reshape(-1, D), h2.reshape(-1, D), lam.reshape(-1), cap)
    else:
        args = (h.reshape(-1, D), weight, bias, h1.reshape(-1, D).detach(), h2.reshape(-1, D).detach(),
                lam.reshape(-1).to(acc_dtype(h.dtype)).detach(), cap, V, be)
        loss = (torch.ops.fmlm.soft_linear_cross_entropy(*args)[0] if torch.compiler.is_compiling()
                else SoftLinearCrossEntropyFn.apply(*args))
    return loss.reshape(lead)


# ---------------------------------------------------------------------------------------------
# Compile-only specs (bench/compile_check.py): the real configs, bf16, D = 768, for sm_90a
# ---------------------------------------------------------------------------------------------
def _spec(name, fn, sig, const, cfg) -> dict:
    """One compile spec. attrs: the 16-divisibility the JIT infers at run time for pointers, strides, D and N
    (with it Triton pipelines the loads with cp.async; without it the K loop is not pipelined). Tensor
    descriptor arguments ("tensordesc<...>") get none: the JIT gives descriptors no divisibility attributes."""
    div = [k for k, ty in sig.items() if not ty.startswith("tensordesc")
           and (k.endswith("_ptr") or k.startswith("stride") or k in ("D", "N"))]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div}
    return dict(name=name, fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                attrs=attrs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))


def _db_flag(fn) -> dict:
    """The backward kernels' DB_PARTIALS constexpr as the launchers pass it by default (a compile spec, unlike a
    launch, gets no parameter defaults)."""
    return {"DB_PARTIALS": True} if fn in (_linear_cross_entropy_bwd_kernel, _soft_linear_cross_entropy_bwd_kernel) \
        else {}


def _tma_sig(sig: dict, cfg: dict, dtype: str, rows: tuple, store: bool) -> dict:
    """The signature of the TMA variant: a host TensorDescriptor argument is typed "tensordesc<dtype[box]>"
    (what triton.runtime.jit.mangle_type returns, the same spelling in triton 3.6 and 3.7.1)."""
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    out = {**sig, **{k: f"tensordesc<{dtype}[{BM}, {BK}]>" for k in rows}, "w_ptr": f"tensordesc<{dtype}[{BN}, {BK}]>"}
    if store:
        out["ds_ptr"] = f"tensordesc<{dtype}[{BM}, {BN}]>"
    return out


def compile_specs(dtype: str = "bf16", D: int = 768) -> list[dict]:
    """Kernels at the real configs for bench/compile_check.py: build each with
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
    options=dict(num_warps=..., num_stages=...)). The default (pointer) kernels, then the opt-in TMA variants
    (config "tma": True, and "tma_store": True for the backward's dS) at the configs the benchmark times."""
    if not HAS_TRITON:
        return []
    common = dict(HAS_BIAS=True, HAS_CAP=True, TANH={"bf16": 0, "fp16": 1, "fp32": 2}[dtype],
                  PREC="ieee" if dtype == "fp32" else "tf32")
    specs = []
    fwd_sig = {"N": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
               "tiles_per_split": "i32", "cap": "fp32", "inv_cap": "fp32"}
    bwd_sig = {"N": "i32", "V": "i32", "D": "i32", "col0": "i32", "n_cols": "i32", "stride_h": "i32",
               "stride_w": "i32", "stride_ds": "i32", "stride_dbp": "i32", "cap": "fp32", "inv_cap": "fp32"}
    fwd_cfg = {**FWD_CONFIG, **FWD_PREVIOUS} if dtype == "fp32" else FWD_CONFIG      # as _config picks it
    fwds = (("linear_cross_entropy_fwd", _linear_cross_entropy_fwd_kernel, fwd_cfg, ("h_ptr",),
             dict(h_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", tgt_ptr="*i64", part_ptr="*fp32")),
            ("soft_linear_cross_entropy_fwd", _soft_linear_cross_entropy_fwd_kernel, SOFT_FWD_CONFIG,
             ("h_ptr", "h1_ptr", "h2_ptr"),
             dict(h_ptr=f"*{dtype}", h1_ptr=f"*{dtype}", h2_ptr=f"*{dtype}", w_ptr=f"*{dtype}",
                  b_ptr=f"*{dtype}", part_ptr="*fp32")))
    bwds = (("linear_cross_entropy_bwd", _linear_cross_entropy_bwd_kernel, BWD_CONFIG, ("h_ptr",),
             dict(h_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", tgt_ptr="*i64", stats_ptr="*fp32",
                  g_ptr="*fp32", ds_ptr=f"*{dtype}", dbp_ptr="*fp32")),
            ("soft_linear_cross_entropy_bwd", _soft_linear_cross_entropy_bwd_kernel, SOFT_BWD_CONFIG,
             ("h_ptr", "h1_ptr", "h2_ptr"),
             dict(h_ptr=f"*{dtype}", h1_ptr=f"*{dtype}", h2_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}",
                  stats_ptr="*fp32", lam_ptr="*fp32", g_ptr="*fp32", ds_ptr=f"*{dtype}", dbp_ptr="*fp32")))
    for name, fn, cfg, _, ptrs in fwds:
        const = dict(common, EVEN_K=D % cfg["BLOCK_K"] == 0, FLATTEN=cfg["FLATTEN"], TMA=False,
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FIXED_SHIFT=True)
        specs.append(_spec(name, fn, {**ptrs, **fwd_sig}, const, cfg))
        if fn is _linear_cross_entropy_fwd_kernel:      # the opt-in two-CTA forward (FWD_TWO_CTAS)
            two = {**cfg, **FWD_TWO_CTAS}
            specs.append(_spec(f"{name}[2 CTAs/SM]", fn, {**ptrs, **fwd_sig}, dict(const, BLOCK_N=two["BLOCK_N"]),
                               two))
    for name, fn, cfg, _, ptrs in bwds:
        const = dict(common, EVEN_K=D % cfg["BLOCK_K"] == 0, GROUP_M=cfg["GROUP_M"], FLATTEN=cfg["FLATTEN"],
                     TMA=False, TMA_STORE=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                     BLOCK_K=cfg["BLOCK_K"], **_db_flag(fn))
        specs.append(_spec(name, fn, {**ptrs, **bwd_sig}, const, cfg))
        # the opt-in {"db_gemm": True}: no db partials in the kernel
        specs.append(_spec(f"{name}[db_gemm]", fn, {**ptrs, **bwd_sig}, dict(const, DB_PARTIALS=False), cfg))
        if fn is _linear_cross_entropy_bwd_kernel:      # the opt-in 128×256 tile (BWD_WIDE)
            wide = {**cfg, **BWD_WIDE}
            specs.append(_spec(f"{name}[128x256, 16 warps, db_gemm]", fn, {**ptrs, **bwd_sig},
                               dict(const, BLOCK_N=wide["BLOCK_N"], DB_PARTIALS=False), wide))
    # the "gemm" implementation's passes (config "impl": "gemm")
    pass_sig = {"z_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "tgt_ptr": "*i64", "N": "i32", "n_cols": "i32",
                "col0": "i32", "n_valid": "i32", "stride_z": "i32"}
    sc, dc = GEMM_STATS_CONFIG, GEMM_DS_CONFIG
    specs.append(_spec("lce_chunk_stats[gemm]", _lce_chunk_stats_kernel,
                       {**pass_sig, "l_ptr": "*fp32", "zt_ptr": "*fp32", "cap": "fp32", "inv_cap": "fp32"},
                       dict(HAS_BIAS=True, TANH=common["TANH"], BLOCK_R=sc["BLOCK_R"], BLOCK_C=sc["BLOCK_C"]),
                       dict(num_warps=sc["num_warps"], num_stages=1)))
    specs.append(_spec("lce_chunk_ds[gemm]", _lce_chunk_ds_kernel,
                       {**pass_sig, "stats_ptr": "*fp32", "g_ptr": "*fp32", "dbp_ptr": "*fp32", "stride_dbp": "i32",
                        "cap": "fp32", "inv_cap": "fp32"},
                       dict(HAS_BIAS=True, HAS_CAP=True, TANH=common["TANH"], BLOCK_M=BWD_CONFIG["BLOCK_M"],
                            SUB_M=dc["SUB_M"], BLOCK_N=dc["BLOCK_N"]),
                       dict(num_warps=dc["num_warps"], num_stages=1)))
    if dtype == "fp32" or TensorDescriptor is None:     # fp32 never takes the TMA variant (tma_usable)
        return specs
    seen = set()
    for label, (fcfg, bcfg) in TMA_CANDIDATES.items():
        for name, fn, base, rows, ptrs in fwds:
            if (name, tuple(sorted(fcfg.items()))) in seen:      # "tma+store" has the same forward as "tma"
                continue
            seen.add((name, tuple(sorted(fcfg.items()))))
            cfg = {**base, **fcfg}
            const = dict(common, EVEN_K=D % cfg["BLOCK_K"] == 0, FLATTEN=cfg["FLATTEN"], TMA=True,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FIXED_SHIFT=True)
            specs.append(_spec(f"{name}[{label}]", fn, _tma_sig({**ptrs, **fwd_sig}, cfg, dtype, rows, False),
                               const, cfg))
            if fn is _linear_cross_entropy_fwd_kernel and label == "tma":
                two = {**cfg, **FWD_TWO_CTAS}
                specs.append(_spec(f"{name}[tma, 2 CTAs/SM]", fn,
                                   _tma_sig({**ptrs, **fwd_sig}, two, dtype, rows, False),
                                   dict(const, BLOCK_N=two["BLOCK_N"]), two))
        for name, fn, base, rows, ptrs in bwds:
            cfg = {**base, **bcfg}
            store = bool(cfg.get("tma_store"))
            const = dict(common, EVEN_K=D % cfg["BLOCK_K"] == 0, GROUP_M=cfg["GROUP_M"], FLATTEN=cfg["FLATTEN"],
                         TMA=True, TMA_STORE=store, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_K=cfg["BLOCK_K"], **_db_flag(fn))
            specs.append(_spec(f"{name}[{label}]", fn, _tma_sig({**ptrs, **bwd_sig}, cfg, dtype, rows, store),
                               const, cfg))
    return specs
