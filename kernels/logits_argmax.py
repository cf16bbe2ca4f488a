"""logits_argmax: argmax over V of h·Wᵀ+b without writing logits (ties → lowest index, as torch.argmax).

Reference: fmlm.kernels.reference.logits_argmax_ref. The final sampler step needs only argmax D, and
cap and softmax are monotone, so argmax D = argmax logits (DESIGN.md §2.3).

Triton design: a GEMM over (row block × V tiles) whose epilogue keeps a running (max, index) per row
instead of storing the tile. The V-tile loop and the K loop are flattened into one loop (as in Triton's
persistent-matmul tutorial) so the software pipeliner keeps loads in flight across V tiles; the argmax
epilogue runs under `if ki == last`. To fill the GPU at small row counts (B=1, L=128 → one row block),
the V tiles are split across programs (grid axis 1) and a second tiny kernel reduces the per-split
(max, index) pairs in split order, which keeps ties → lowest index (every comparison is strict `>`,
earlier tiles and splits win ties). Columns ≥ n_valid (the engine pads V to a multiple of 128) are
masked to −inf. NaN logits are not handled like torch.argmax (which returns the first NaN).

TMA variant (`config={"tma": True}`, `_logits_argmax_tma_fwd_kernel`; the default above 2048 rows on CUDA,
GPU_CONFIG_LARGE_M, opt-in below): the same loop and epilogue,
h and W read through host tensor descriptors (bulk tensor copies, zero fill out of bounds, no load masks);
the pointer kernel runs when a descriptor is impossible (tma_usable). No persistent-grid variant: at the
large row counts every program already walks all of V for its row block (128 programs for 132 SMs at 16384
rows, 256 at 32768), so a persistent loop over (row block, split) items would change nothing but the
launch; small row counts are already spread by the V split.

Napkin math (H100, bf16, h 16384×768, V = 50258): 2·16384·50258·768 = 1.26 TFLOP → 1.65 ms at the
measured 766 TFLOP/s GEMM ceiling; reads h once per V tile from L2 like any GEMM (tile 128×256:
85 FLOP/B), HBM traffic ~ W (77 MB) + h (25 MB): compute-bound. B=1, L=128: 9.9 GFLOP, HBM 77 MB
→ ~26 µs memory-bound, so the split over V is what matters there.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import reference as ref
from ._backend import (ChunkBufs, acc_dtype, chunk_logits, interpreting, no_autocast, pdl_active, pdl_launch_kwargs,
                       pdl_prefetch_active, resolve, tma_device_ok, tma_rows_ok, valid_rows, with_default_constexprs)
from ._prefetch import L2_LINE_BYTES

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without triton; backend='triton' then raises
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no host tensor descriptors, config={"tma": True} runs the pointer kernel
    TensorDescriptor = None

TORCH_V_CHUNK = 4096
TORCH_ROW_CHUNK = 8192

# Hopper defaults (bf16/fp16). Large row counts: Triton's known-good H100 GEMM tile (128×256×64, 8 warps,
# 3 stages). Small row counts are bound by streaming W (77 MB at V = 50304): a 128-wide V tile gives the
# split over V a finer grain (393 tiles to share among 132 SMs rather than 197).
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
GPU_CONFIG_SMALL_M = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
GPU_CONFIG_TINY_M = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
SMALL_M, TINY_M = 2048, 64
# Above SMALL_M rows the default is the TMA kernel at GPU_CONFIG's tile (the pointer kernel where tma_usable says
# no). Measured on one H100 (bench_logits_argmax, 2026-11-27 run5, bench/results/h100-2026-11-27-run5): 16384 rows
# 1.879 ms (673 TFLOP/s) against 2.555 for the pointer kernel (1.36x), 32768 rows 3.885 against 5.569 (1.43x),
# the same indices on every row; at the smaller row counts' tiles it did not win (1024 rows 1.02x, 128 rows 0.69x,
# but those rows timed the launched call, mostly host time at 128 rows: the benchmark now also times them as
# CUDA-graph replays), so they keep the pointer kernel.
GPU_CONFIG_LARGE_M = dict(GPU_CONFIG, tma=True)
# Opt-in candidate for the batch-1 row counts (bench rows "one V tile per program"; engine kernel option
# argmax_config): the 64-row tile with one 128-column V tile per program ("splits" above the tile count is clamped to
# it), 239 programs per row block at V = 30522, of which two fit an SM (167 registers × 128 threads, 97 KiB of
# shared memory), where the default splits V into ≤ 132 programs of 2 (LM1B B=1) to 25 (OWT B=1) tiles each. At
# 128 rows the run5 profile has the default at 23.7 µs for a 47 MB weight read (~16 µs at the copy ceiling).
GPU_CONFIG_ONE_TILE = dict(GPU_CONFIG_TINY_M, splits=1 << 20)
# fp32 inputs take the exact (non-tensor-core) dot: 4-byte tiles need a smaller footprint (16 KiB of shared
# memory, 128 registers, no spills on sm_90a). A correctness path: backend='auto' sends fp32 to 'torch'.
GPU_CONFIG_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
# Alternatives the benchmark times beside the default at the OWT shape.
# "bm128_bn128_w4_s3" (one warpgroup per CTA, 3 stages of 32 KiB: 96 KiB of shared memory) fits two CTAs per SM,
# so one CTA's argmax epilogue can run while the other's MMAs do: the 8-warp 128×256 tile holds the SM alone
# (255 registers, 144 KiB) and its tensor cores idle during every epilogue (napkin: ~10 % of a tile's time).
# "bm128_bn256_bk128_s2": the default tile with 128-deep K steps in 2 stages of 96 KiB (193 KiB): at D = 768 a tile
# is 6 K steps instead of 12, so half the per-step CTA barriers (two BAR.SYNC per step in the sm_90a SASS) and
# stage waits; 255 registers, no spills (triton 3.6 and 3.7.1). Pointer kernel only: a 128-element bf16 TMA box is 256 B
# wide, past the 128-byte swizzle's limit.
BENCH_CONFIGS = {"bm128_bn256_s3": GPU_CONFIG, "bm128_bn128_s4": GPU_CONFIG_SMALL_M,
                 "bm128_bn256_s4": dict(GPU_CONFIG, num_stages=4),
                 "bm128_bn128_w4_s3": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
                 "bm128_bn256_bk128_s2": dict(GPU_CONFIG, BLOCK_K=128, num_stages=2)}
# The TMA kernel (config key "tma": True): the default above SMALL_M rows since the H100 run of 2026-11-27 run5
# (GPU_CONFIG_LARGE_M: 466-499 → 673 TFLOP/s); the benchmark times these configs, and the pointer kernel as the
# previous default, beside it. Why it was tried (reasoning before the run): the pointer kernel computes
# per-element addresses and masks for its cp.async loads; TMA copies a whole box with one instruction, as in
# Triton's Hopper matmul tutorials. Compile-only evidence (sm_90a, bm128_bn256 w8 s3): the same 255 registers
# (triton 3.7.1; 233-246 on 3.6: the 128×256 fp32 accumulator and the argmax epilogue set the pressure, not the
# loads), static SASS 1896 instructions against 2192 (IMAD 181 vs 284, LEA 7 vs 67).
TMA_BENCH_CONFIGS = {"tma_bm128_bn256_s3": dict(GPU_CONFIG, tma=True),
                     "tma_bm128_bn256_s4": dict(GPU_CONFIG, num_stages=4, tma=True),
                     "tma_bm128_bn128_w4_s3": dict(BENCH_CONFIGS["bm128_bn128_w4_s3"], tma=True)}
# The per-tile epilogue: "two_pass" (row max, then the lowest column holding it; the default since the fifth
# session of 2026-11-27, unmeasured on a GPU) or "pairs" (tl.max with indices, the previous default, which the
# benchmark times beside it). Compile-only evidence in _argmax_tile_update's docstring.
EPILOGUES = ("two_pass", "pairs")
# The interpreter runs each program in numpy with a fixed Python cost per loop iteration: few, wide V tiles
# and a row block no taller than needed are fastest there.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=4096, BLOCK_K=256, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:
    from ._prefetch import prefetch_rows_l2

    @triton.jit
    def _bias_tile(b_ptr, cols, n_valid, HAS_BIAS: tl.constexpr, MASK_IN_BIAS: tl.constexpr):
        """The per-column term of one V tile's logits: the bias (0 without one), and with MASK_IN_BIAS −inf at the
        columns ≥ n_valid, so that adding it masks them (one add per logit instead of a compare and a select)."""
        ok = cols < n_valid
        if HAS_BIAS:
            if MASK_IN_BIAS:
                b = tl.load(b_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
            else:
                b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        elif MASK_IN_BIAS:
            b = tl.where(ok, 0.0, float("-inf"))
        else:
            b = tl.zeros(cols.shape, tl.float32)
        return b

    @triton.jit
    def _argmax_tile_update(acc, b_nx, best_val, best_idx, b_ptr, tile, n_valid,
                            HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, TWO_PASS: tl.constexpr):
        """Epilogue of one finished V tile (shared by both kernels): fold acc + bias into the running
        (max, index) per row, with columns ≥ n_valid at −inf; returns the bias of the next tile, prefetched.

        TWO_PASS (the default): b_nx carries −inf at the masked columns (_bias_tile), the row max is one max per
        logit and its lowest column one compare and one select (or min) per logit: ~4-5 operations per logit in
        all. The previous epilogue ("pairs"): a compare and a select for the mask, then tl.max with indices,
        whose combine step compares values and indices (==, <, >, and, or, two selects) per logit: ~10.
        Compile-only evidence (sm_90a, bf16, the default 128×256 tile, 8 warps, 128 logits per thread per tile):
        static SASS 2192 → 1672 instructions with triton 3.7.1 (2136 → 1632 with 3.6, the device's), FSEL
        260 → 2, FSETP 198 → 130, ISETP 198 → 68, SEL 231 → 181, plus 130 FMNMX; 255 registers (3.6: 246 →
        249), no spills with either. Napkin: ~520 fewer instructions per thread and tile, ~0.6 µs of a ~8.5 µs
        tile at the GEMM ceiling, i.e. a few per cent of the 5.0 ms OWT B=32 argmax, unmeasured."""
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if TWO_PASS:
            z = acc + b_nx[None, :]
            b_nx = _bias_tile(b_ptr, cols + BLOCK_N, n_valid, HAS_BIAS, True)
            t_max = tl.max(z, axis=1)
            # the lowest column holding the row max: ties → lowest index within the tile, as torch.argmax. Offsets
            # within the tile (compile-time constants per register), the tile's first column added per row: no
            # spills on sm_90a with triton 3.6 or 3.7.1 (absolute columns spilled 8 bytes at 128×256 on 3.7.1)
            t_arg = tl.min(tl.where(z == t_max[:, None], tl.arange(0, BLOCK_N)[None, :], BLOCK_N), axis=1)
            t_arg += tile * BLOCK_N
        else:
            z = tl.where((cols < n_valid)[None, :], acc + b_nx[None, :], float("-inf"))
            if HAS_BIAS:
                b_nx = _bias_tile(b_ptr, cols + BLOCK_N, n_valid, HAS_BIAS, False)
            t_max, t_arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
            t_arg += tile * BLOCK_N
        better = t_max > best_val          # strict: an equal value in a later tile keeps the lower index
        best_val = tl.where(better, t_max, best_val)
        best_idx = tl.where(better, t_arg, best_idx)
        return best_val, best_idx, b_nx

    @triton.jit
    def _store_best(best_val, best_idx, val_ptr, idx_ptr, out_ptr, rows, pid_s, M, SPLIT: tl.constexpr):
        row_ok = rows < M
        if SPLIT:
            tl.store(val_ptr + pid_s * M + rows, best_val, mask=row_ok)
            tl.store(idx_ptr + pid_s * M + rows, best_idx, mask=row_ok)
        else:
            tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=row_ok)

    @triton.jit
    def _logits_argmax_fwd_kernel(
        h_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, out_ptr,
        M, n_valid, D, stride_h, stride_w, tiles_per_split,
        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
        TWO_PASS: tl.constexpr = True, PREFETCH_W: tl.constexpr = False, PF_STEP: tl.constexpr = 64,
    ):
        """PREFETCH_W (with USE_PDL): before the wait, the row blocks ask L2 for the lines of this program's
        first V tile of W, every num_programs(0)-th line step each (kernels/_prefetch.py): at batch 1 the
        head's programs walk 2-15 tiles each, so the first tile's DRAM latency is the part a prefetch can
        hide under the predecessor (the final adaLN, ~3 µs at LM1B B=1)."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_tiles = tl.cdiv(n_valid, BLOCK_N)
        t_begin = pid_s * tiles_per_split
        if USE_PDL:          # programmatic dependent launch: the predecessor's writes first (_backend.pdl_launches)
            if PREFETCH_W:   # the weights do not depend on the predecessor
                first = t_begin * BLOCK_N + tl.arange(0, BLOCK_N)
                prefetch_rows_l2(w_ptr, first, first < n_valid, stride_w, pid_m * PF_STEP, D,
                                 PF_STEP * tl.num_programs(0))
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
        k_iters = tl.cdiv(D, BLOCK_K)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h

        best_val = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_M,), tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # Software prefetch of the bias one V tile ahead: the pipeliner prefetches only dot operands, and a
        # load inside the epilogue would stall every tile.
        b_nx = _bias_tile(b_ptr, t_begin * BLOCK_N + offs_n, n_valid, HAS_BIAS, TWO_PASS)
        # (tile, ki) from the induction variable, not carried state: the pipeliner can then compute the
        # addresses of loads several iterations ahead (carried counters left every load unpipelined).
        for it in range(0, (t_end - t_begin) * k_iters):
            tile = t_begin + it // k_iters
            ki = it % k_iters
            cols = tile * BLOCK_N + offs_n
            ks = ki * BLOCK_K + offs_k
            w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
            if EVEN_K:
                a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
                w = tl.load(w_rows + ks[None, :], mask=(cols < n_valid)[:, None], other=0.0)
            else:
                a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :], other=0.0)
                w = tl.load(w_rows + ks[None, :], mask=(cols < n_valid)[:, None] & (ks < D)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
            if ki == k_iters - 1:
                best_val, best_idx, b_nx = _argmax_tile_update(acc, b_nx, best_val, best_idx, b_ptr, tile, n_valid,
                                                               HAS_BIAS, BLOCK_N, TWO_PASS)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

        _store_best(best_val, best_idx, val_ptr, idx_ptr, out_ptr, rows, pid_s, M, SPLIT)

    @triton.jit
    def _logits_argmax_tma_fwd_kernel(
        h_desc, w_desc, b_ptr, val_ptr, idx_ptr, out_ptr,
        M, n_valid, D, tiles_per_split,
        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
        TWO_PASS: tl.constexpr = True,
    ):
        """The same GEMM + running argmax, h and W read through host tensor descriptors (Hopper TMA: bulk
        tensor copies into shared memory, no per-element address or mask math). The descriptors cover h
        (M, D) and W[:n_valid] (n_valid, D) with boxes [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]; TMA fills
        rows ≥ M, rows ≥ n_valid and the K tail ≥ D with zeros, so the loads need no masks and any D works.
        The −inf masking of columns ≥ n_valid stays in the epilogue (a zero-filled column scores 0 plus its bias
        term, −inf there)."""
        if USE_PDL:          # programmatic dependent launch: the predecessor's writes first (_backend.pdl_launches)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_tiles = tl.cdiv(n_valid, BLOCK_N)
        t_begin = pid_s * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
        k_iters = tl.cdiv(D, BLOCK_K)
        off_m = pid_m * BLOCK_M

        best_val = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_M,), tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        b_nx = _bias_tile(b_ptr, t_begin * BLOCK_N + tl.arange(0, BLOCK_N), n_valid, HAS_BIAS, TWO_PASS)
        # one flattened (V tile, K step) loop, as in the pointer kernel: the pipeliner issues the TMA copies
        # num_stages − 1 iterations ahead across V-tile boundaries
        for it in range(0, (t_end - t_begin) * k_iters):
            tile = t_begin + it // k_iters
            ki = it % k_iters
            a = h_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([tile * BLOCK_N, ki * BLOCK_K])
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
            if ki == k_iters - 1:
                best_val, best_idx, b_nx = _argmax_tile_update(acc, b_nx, best_val, best_idx, b_ptr, tile, n_valid,
                                                               HAS_BIAS, BLOCK_N, TWO_PASS)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

        _store_best(best_val, best_idx, val_ptr, idx_ptr, out_ptr, off_m + tl.arange(0, BLOCK_M), pid_s, M, SPLIT)

    @triton.jit
    def _logits_argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, M, n_split, BLOCK: tl.constexpr,
                                     USE_PDL: tl.constexpr = False, BLOCK_S: tl.constexpr = 1):
        """Per row, the partial of the first split holding the largest value (splits cover increasing column
        ranges: ties → lowest index). BLOCK_S splits at a time as one (BLOCK_S, BLOCK) tile, so that their loads
        are in flight together: one split per loop iteration waited on each load in turn (13 µs for 120 splits
        of 128 rows on an H100, 2026-11-27 run5 profile at LM1B B=1)."""
        if USE_PDL:          # programmatic dependent launch: the predecessor's writes first (_backend.pdl_launches)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < M
        best_val = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.load(idx_ptr + rows, mask=ok, other=0)          # split 0's, where every value is −inf
        for s0 in range(0, n_split, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m2 = (s < n_split)[:, None] & ok[None, :]
            off = s[:, None] * M + rows[None, :]
            v = tl.load(val_ptr + off, mask=m2, other=float("-inf"))
            i = tl.load(idx_ptr + off, mask=m2, other=0)
            top = tl.max(v, axis=0)
            first = tl.min(tl.where(v == top[None, :], s[:, None], n_split), axis=0)
            top_idx = tl.sum(tl.where(s[:, None] == first[None, :], i, 0), axis=0)
            better = top > best_val              # strict, chunks in split order: ties → lowest index
            best_val = tl.where(better, top, best_val)
            best_idx = tl.where(better, top_idx, best_idx)
        tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_config(M: int, device: torch.device, D: int = 768, V: int = 50304,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    if device.type != "cuda":
        # the interpreter's dot has no 16-row minimum: a row block no taller than M wastes nothing
        return dict(INTERPRET_CONFIG, BLOCK_M=min(INTERPRET_CONFIG["BLOCK_M"], _pow2(M)),
                    BLOCK_N=min(INTERPRET_CONFIG["BLOCK_N"], max(16, _pow2(V))),
                    BLOCK_K=min(INTERPRET_CONFIG["BLOCK_K"], max(16, _pow2(D))))
    if dtype == torch.float32:
        return dict(GPU_CONFIG_FP32)
    return dict(GPU_CONFIG_TINY_M if M <= TINY_M else GPU_CONFIG_SMALL_M if M <= SMALL_M else GPU_CONFIG_LARGE_M)


def tma_usable(h: torch.Tensor, weight: torch.Tensor, block_k: int) -> bool:
    """Whether the TMA kernel can read h and weight: host tensor descriptors need a 16-byte aligned base and
    16-byte aligned row strides (last stride 1, which _check_dtypes ensures), and a box row of a multiple of
    16 bytes; on CUDA, TMA needs sm_90+. D % BLOCK_K need not be 0: TMA zero-fills the K tail.
    fp32 on CUDA keeps the pointer kernel: the variant exists to feed wgmma (16-bit inputs), and with the exact
    FMA dot at GPU_CONFIG_FP32 the TMA kernel spilled ~3.5 KB on sm_90a (compile check) where the pointer
    kernel does not. The interpreter takes fp32 (its tests cannot use bf16)."""
    return tma_device_ok(h) and tma_rows_ok(block_k, h, weight)


def _check_dtypes(h, weight, bias):
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton logits_argmax takes fp16/bf16/fp32 inputs, got {h.dtype} (use backend='torch')")
    if weight.dtype != h.dtype:
        dt = torch.promote_types(h.dtype, weight.dtype)
        h, weight = h.to(dt), weight.to(dt)
    if h.stride(-1) != 1:
        h = h.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return h, weight, bias


def logits_argmax_fwd(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], n_valid: int,
                      config: Optional[dict] = None) -> torch.Tensor:
    """h (M, D), weight (Vp ≥ n_valid, D), bias (≥ n_valid,) or None → int64 (M,). config overrides the
    block sizes (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), `splits` (programs along V), `tma`
    (True: the TMA kernel where tma_usable, else the pointer kernel) and `epilogue` ("two_pass", the default,
    or "pairs", the previous one; see _argmax_tile_update); `impl` "cuda" runs logits_argmax_cuda instead (with
    `splits`, the other keys unused).

    CUDA-graph capture: both kernels allocate only the torch.empty outputs below (from the capture pool). The
    TMA path builds its descriptors on the host: the launcher encodes each CUtensorMap with a driver call
    that touches no stream and passes it by value as a kernel parameter, which the graph copies at capture.
    Replays therefore read the addresses h and weight had at capture, the usual static-buffer rule."""
    if (config or {}).get("impl", "triton") == "cuda":
        return logits_argmax_cuda(h, weight, bias, n_valid, (config or {}).get("splits"))
    if (config or {}).get("impl", "triton") != "triton":
        raise ValueError(f"logits_argmax config impl must be 'triton' or 'cuda', got {config['impl']!r}")
    if triton is None:
        raise RuntimeError("logits_argmax_fwd needs the triton package")
    h, weight, bias = _check_dtypes(h, weight, bias)
    M, D = h.shape
    cfg = {**default_config(M, h.device, D, n_valid, h.dtype), **(config or {})}
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    out = torch.empty(M, device=h.device, dtype=torch.long)
    if M == 0:
        return out
    row_blocks = triton.cdiv(M, BM)
    n_tiles = triton.cdiv(n_valid, BN)
    splits = cfg.get("splits")
    if splits is None:
        # One wave (the tiles take one CTA per SM): no split at 16384 rows (128 programs), a split over V
        # at small row counts so that every SM streams a share of W.
        dev = h.device
        n_sm = _num_sms(torch.cuda.current_device() if dev.index is None else dev.index) if dev.type == "cuda" else 1
        splits = max(1, min(n_tiles, n_sm // row_blocks))
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(int(splits), n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)
    split = splits > 1
    if split:
        vals = torch.empty(splits, M, device=h.device, dtype=torch.float32)
        idxs = torch.empty(splits, M, device=h.device, dtype=torch.int32)
    else:
        vals, idxs = out, out      # unused pointers
    b_arg = bias if bias is not None else h
    pdl = pdl_launch_kwargs(pdl_active(h))
    epilogue = cfg.get("epilogue", "two_pass")
    if epilogue not in EPILOGUES:
        raise ValueError(f"logits_argmax config epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    common = dict(HAS_BIAS=bias is not None, SPLIT=split, IEEE=h.dtype == torch.float32,
                  TWO_PASS=epilogue == "two_pass",
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl)
    if cfg.get("tma") and tma_usable(h, weight, BK):
        h_desc = TensorDescriptor.from_tensor(h, [BM, BK])
        w_desc = TensorDescriptor.from_tensor(weight[:n_valid], [BN, BK])
        _logits_argmax_tma_fwd_kernel[(row_blocks, splits)](
            h_desc, w_desc, b_arg, vals, idxs, out, M, n_valid, D, tiles_per_split, **common)
    else:
        pf = {"PREFETCH_W": True, "PF_STEP": L2_LINE_BYTES // weight.element_size()} if pdl_prefetch_active(h) else {}
        _logits_argmax_fwd_kernel[(row_blocks, splits)](
            h, weight, b_arg, vals, idxs, out, M, n_valid, D, h.stride(0), weight.stride(0), tiles_per_split,
            EVEN_K=D % BK == 0, **common, **pf)
    if split:
        reduce_splits(vals, idxs, out, pdl)
    return out


CUDA_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}     # csrc/fmlm_csrc.h enum fmlm_dtype
CUDA_CONFIG = {"impl": "cuda"}          # launcher config (and the engine's argmax_config) for the csrc/ kernel
CUDA_STATIC_SMEM = 4096                 # bound on the csrc/ kernel's static shared memory (ptxas: 2176 bytes)
_COUNTERS: dict = {}
_SPARE_COUNTERS: dict = {}      # device index → a zeroed buffer made outside capture (see _split_counters)
SPARE_COUNTERS = 1024           # its entries: 1024 row blocks of 128 rows


def _split_counters(device: torch.device, stream: int, n: int) -> torch.Tensor:
    """Zeroed int32 counters (one per row block) for the csrc/ kernel's split reduction, kept per (device, stream)
    and reused: each launch leaves them zero, so no memset runs before it, and under PDL the argmax's predecessor in
    the stream stays the trunk's last kernel (a memset in between would end the overlap). Launches on one stream
    are ordered, so they never share counters concurrently; a buffer is never freed (a captured graph may hold
    its address). The zeroing must happen outside any CUDA-graph capture (a memset captured into one graph runs
    only when that graph replays, and would leave the buffer unset for every other graph and eager call): a stream
    first seen while capturing (torch.cuda.graph's own capture stream, say) takes the device's spare buffer, made
    by the last eager call (torch.cuda.graph synchronizes the device before capturing, so its zeros are there)."""
    key = (device.index, stream)
    bufs = _COUNTERS.setdefault(key, [])
    for b in bufs:
        if b.numel() >= n:
            return b
    if torch.cuda.is_current_stream_capturing():
        spare = _SPARE_COUNTERS.get(device.index)
        if spare is None or spare.numel() < n:
            raise RuntimeError(
                "backend='cuda' logits_argmax: its split counters must be zeroed outside CUDA-graph capture; call it "
                f"once eagerly (any stream, {n} row blocks or more) before capturing on a new stream")
        bufs.append(_SPARE_COUNTERS.pop(device.index))
        return bufs[-1]
    bufs.append(torch.zeros(max(n, 64), device=device, dtype=torch.int32))
    spare = _SPARE_COUNTERS.get(device.index)
    if spare is None or spare.numel() < n:
        _SPARE_COUNTERS[device.index] = torch.zeros(max(n, SPARE_COUNTERS), device=device, dtype=torch.int32)
    return bufs[-1]


def logits_argmax_cuda(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], n_valid: int,
                       splits: Optional[int] = None) -> torch.Tensor:
    """The CUDA C++ kernel of csrc/logits_argmax.cu (built with nvcc on first use, kernels/_cuda.py): bf16 or fp16
    h (M, D) and weight (≥ n_valid, D) of one dtype, bias in bf16, fp16 or fp32; D a multiple of 8. One launch:
    the V split's partials are reduced by the last CTA of each 128-row block (written for the sampler's batch-1
    heads; the Triton kernels stay the default). splits: CTAs along V (default: one wave, as the Triton launcher).
    Inside _backend.pdl_launches it launches as a programmatic dependent (and with prefetch, asks L2 for its W rows
    before waiting), as the Triton launchers do. CUDA-graph capture: allocates only the output and the partials
    (the split counters are kept per stream and zeroed outside capture, _split_counters); the library must be
    loaded, and the kernel called once eagerly, before capture (the Sampler's warm-up does both). Written for sm_90
    (sm_80 or newer with ~146 KiB of shared memory per block would run it: untested); h or weight rows that are not
    16-byte aligned are copied first."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1] or not 1 <= n_valid <= weight.shape[0]:
        raise ValueError(f"backend='cuda' takes h (M, D) and weight (>= n_valid, D) with n_valid >= 1, got h "
                         f"{tuple(h.shape)}, weight {tuple(weight.shape)}, n_valid {n_valid}")
    if bias is not None and bias.numel() < n_valid:
        raise ValueError(f"backend='cuda': bias has {bias.numel()} entries for n_valid {n_valid}")
    if max(h.shape[0], n_valid) >= 2 ** 31:
        raise ValueError(f"backend='cuda' takes fewer than 2^31 rows (the C ABI's int), got h {tuple(h.shape)}, "
                         f"n_valid {n_valid}")
    if h.device.type != "cuda" or weight.device != h.device or (bias is not None and bias.device != h.device):
        raise RuntimeError(f"backend='cuda' (csrc/) needs CUDA tensors on one device, got h on {h.device}, "
                           f"weight on {weight.device}" + ("" if bias is None else f", bias on {bias.device}"))
    if h.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != h.dtype:
        raise TypeError(f"backend='cuda' takes bf16 or fp16 h and weight of one dtype, got {h.dtype} and "
                        f"{weight.dtype} (backend='triton' or 'torch' take the others)")
    if bias is not None and bias.dtype not in CUDA_DTYPES:
        raise TypeError(f"backend='cuda' takes a bf16, fp16 or fp32 bias, got {bias.dtype}")
    from . import _cuda

    lib = _cuda.library(_cuda.device_arch(h.device))
    props = torch.cuda.get_device_properties(h.device)
    need = lib.fmlm_logits_argmax_smem_bytes() + CUDA_STATIC_SMEM
    optin = getattr(props, "shared_memory_per_block_optin", need)
    if props.major < 8 or optin < need:
        raise RuntimeError(f"backend='cuda' logits_argmax needs sm_80 or newer with {need} bytes of shared memory per "
                           f"block, got sm_{props.major}{props.minor} with {optin}; backend='triton' runs there")

    def usable(t):      # 16-byte aligned rows of unit column stride (the kernel's cp.async chunks); else a copy
        return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0

    h = h if usable(h) else h.clone(memory_format=torch.contiguous_format)
    weight = weight if usable(weight) else weight.clone(memory_format=torch.contiguous_format)
    bias = None if bias is None else bias.contiguous()
    M, D = h.shape
    out = torch.empty(M, device=h.device, dtype=torch.long)
    if M == 0:
        return out
    n_tiles = -(-n_valid // 128)
    index = torch.cuda.current_device() if h.device.index is None else h.device.index
    if splits is None:
        splits = lib.fmlm_logits_argmax_default_splits(M, n_valid, _num_sms(index))
    splits = max(1, min(int(splits), n_tiles))
    part_val = part_idx = counters = None
    stream = torch.cuda.current_stream(h.device)
    if splits > 1:
        part_val = torch.empty(splits, M, device=h.device, dtype=torch.float32)
        part_idx = torch.empty(splits, M, device=h.device, dtype=torch.int32)
        counters = _split_counters(h.device, stream.cuda_stream, -(-M // lib.fmlm_logits_argmax_rows_per_block()))
    flags = (1 if pdl_active(h) else 0) | (2 if pdl_prefetch_active(h) else 0)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    with torch.cuda.device(h.device):
        rc = lib.fmlm_logits_argmax(
            CUDA_DTYPES[h.dtype], h.data_ptr(), h.stride(0), weight.data_ptr(), weight.stride(0), ptr(bias),
            CUDA_DTYPES[bias.dtype] if bias is not None else 0, M, n_valid, D, splits, ptr(part_val), ptr(part_idx),
            ptr(counters), out.data_ptr(), flags, index, stream.cuda_stream)
    if rc < 0:
        raise ValueError(f"backend='cuda' logits_argmax: {_cuda.error_string(lib, rc)} (M={M}, D={D}, "
                         f"strides {h.stride(0)} and {weight.stride(0)}, splits {splits})")
    if rc > 0:
        raise RuntimeError(f"backend='cuda' logits_argmax: CUDA error {rc}: {_cuda.error_string(lib, rc)}")
    return out


def reduce_splits(vals: torch.Tensor, idxs: torch.Tensor, out: torch.Tensor,
                  pdl: Optional[dict] = None) -> torch.Tensor:
    """The split launch's second kernel: vals (splits, M) fp32 and idxs (splits, M) int32, each split's best value
    and its index per row, splits in column order → out (M,) int64, the index of the first split holding the row's
    largest value (ties → lowest index, as torch.argmax; a row of −inf everywhere takes split 0's)."""
    splits, M = vals.shape
    # (BLOCK_S splits × RB rows) per step: 64 × 64 fp32 + int32 partials, 32 KB in flight per program
    on_gpu = vals.device.type == "cuda" and not interpreting()
    RB = 64 if on_gpu else 16
    BS = min(64 if on_gpu else 16, _pow2(splits))
    _logits_argmax_reduce_kernel[(triton.cdiv(M, RB),)](vals, idxs, out, M, splits, BLOCK=RB, BLOCK_S=BS,
                                                        num_warps=4, **(pdl or {}))
    return out


def compile_specs() -> list[dict]:
    """Real configs for the sm_90a compile check (bench/compile_check.py): bf16, D = 768."""
    if triton is None:
        return []
    sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "val_ptr": "*fp32", "idx_ptr": "*i32",
           "out_ptr": "*i64", "M": "i32", "n_valid": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
           "tiles_per_split": "i32"}
    # what the JIT sees at D = 768 with contiguous tensors: aligned pointers, strides and D ≡ 0 mod 16
    div16 = [n for n, t in sig.items() if t.startswith("*")] + ["D", "stride_h", "stride_w"]
    specs = []
    for label, cfg, split in (("bm128_bn256", GPU_CONFIG, False), ("bm128_bn128_s4_split", GPU_CONFIG_SMALL_M, True),
                              ("bm64_bn128_w4_split", GPU_CONFIG_TINY_M, True),
                              ("bm128_bn256_s4", BENCH_CONFIGS["bm128_bn256_s4"], False),
                              ("bm128_bn128_w4_s3", BENCH_CONFIGS["bm128_bn128_w4_s3"], False),
                              ("bm128_bn256_bk128_s2", BENCH_CONFIGS["bm128_bn256_bk128_s2"], False)):
        const = dict(HAS_BIAS=True, SPLIT=split, IEEE=False, EVEN_K=True,
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
        specs.append(dict(name=f"_logits_argmax_fwd_kernel[{label}]", fn=_logits_argmax_fwd_kernel,
                          signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          divisible_by_16=div16))
    # The TMA kernel: a host TensorDescriptor argument is typed "tensordesc<dtype[box]>" (what
    # triton.runtime.jit.mangle_type returns, the same spelling in triton 3.6 and 3.7.1); the JIT gives
    # descriptors no divisibility attributes, so only the pointers and D are listed.
    for label, cfg, split in (("bm128_bn256_s3", GPU_CONFIG, False),
                              ("bm128_bn256_s4", TMA_BENCH_CONFIGS["tma_bm128_bn256_s4"], False),
                              ("bm128_bn128_s4_split", GPU_CONFIG_SMALL_M, True),
                              ("bm128_bn128_w4_s3", TMA_BENCH_CONFIGS["tma_bm128_bn128_w4_s3"], False)):
        BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        tsig = {"h_desc": f"tensordesc<bf16[{BM}, {BK}]>", "w_desc": f"tensordesc<bf16[{BN}, {BK}]>",
                **{k: sig[k] for k in ("b_ptr", "val_ptr", "idx_ptr", "out_ptr", "M", "n_valid", "D",
                                       "tiles_per_split")}}
        const = dict(HAS_BIAS=True, SPLIT=split, IEEE=False, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
        specs.append(dict(name=f"_logits_argmax_tma_fwd_kernel[{label}]", fn=_logits_argmax_tma_fwd_kernel,
                          signature={**tsig, **{k: "constexpr" for k in const}}, constexprs=const,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          divisible_by_16=["b_ptr", "val_ptr", "idx_ptr", "out_ptr", "D"]))
    sig32 = {**sig, "h_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32"}
    cfg = GPU_CONFIG_FP32
    const = dict(HAS_BIAS=True, SPLIT=True, IEEE=True, EVEN_K=True,
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    specs.append(dict(name="_logits_argmax_fwd_kernel[fp32]", fn=_logits_argmax_fwd_kernel,
                      signature={**sig32, **{k: "constexpr" for k in const}}, constexprs=const,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                      divisible_by_16=div16))
    specs.append(dict(name="_logits_argmax_reduce_kernel", fn=_logits_argmax_reduce_kernel,
                      signature={"val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "M": "i32",
                                 "n_split": "i32", "BLOCK": "constexpr", "BLOCK_S": "constexpr"},
                      constexprs={"BLOCK": 64, "BLOCK_S": 64}, num_warps=4, num_stages=1))
    big = next(s for s in specs if s["name"] == "_logits_argmax_fwd_kernel[bm128_bn256]")
    specs.append(dict(big, name="_logits_argmax_fwd_kernel[bm128_bn256_pairs]",     # config epilogue="pairs"
                      signature={**big["signature"], "TWO_PASS": "constexpr"},
                      constexprs={**big["constexprs"], "TWO_PASS": False}))
    tiny = next(s for s in specs if s["name"] == "_logits_argmax_fwd_kernel[bm64_bn128_w4_split]")
    specs.append(dict(tiny, name="_logits_argmax_fwd_kernel[bm64_bn128_w4_split_pdl]",     # the 'pdl' option
                      signature={**tiny["signature"], "USE_PDL": "constexpr"},
                      constexprs={**tiny["constexprs"], "USE_PDL": True}))
    specs.append(dict(tiny, name="_logits_argmax_fwd_kernel[bm64_bn128_w4_split_pdl_prefetch]",  # 'pdl_prefetch'
                      signature={**tiny["signature"], "USE_PDL": "constexpr", "PREFETCH_W": "constexpr",
                                 "PF_STEP": "constexpr"},
                      constexprs={**tiny["constexprs"], "USE_PDL": True, "PREFETCH_W": True, "PF_STEP": 64}))
    return with_default_constexprs(specs)


# ---------------------------------------------------------------------------------------------
# torch.library op (inference only: no autograd, argmax has no gradient)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fmlm::logits_argmax", mutates_args=())
def _logits_argmax_op(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      n_valid: int) -> torch.Tensor:
    return logits_argmax_fwd(h, weight, bias, n_valid)


@_logits_argmax_op.register_fake
def _(h, weight, bias, n_valid):
    return h.new_empty(h.shape[0], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch chunked backend and the functional
# ---------------------------------------------------------------------------------------------
@no_autocast
def _logits_argmax_torch(h, weight, bias, n_valid):
    acc = acc_dtype(h.dtype)
    N = h.shape[0]
    out = torch.empty(N, device=h.device, dtype=torch.long)
    # one logits buffer for every chunk: a fresh 16 MB tensor per chunk cost the CPU a page-faulting mmap each
    # time (1024 rows × V = 30522, 2 cores: 225–248 → 173–178 ms per call with the buffer)
    bufs = ChunkBufs(min(N, TORCH_ROW_CHUNK), min(n_valid, TORCH_V_CHUNK), h.device, acc)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        hr = h[r0:r0 + TORCH_ROW_CHUNK].to(acc)
        best = torch.full((hr.shape[0],), float("-inf"), device=h.device, dtype=acc)
        idx = torch.zeros(hr.shape[0], device=h.device, dtype=torch.long)
        for v0 in range(0, n_valid, TORCH_V_CHUNK):
            v1 = min(n_valid, v0 + TORCH_V_CHUNK)
            z = chunk_logits(hr, weight, bias, v0, v1, out=bufs.get(0, hr.shape[0], v1 - v0))
            val, i = z.max(-1)
            better = val > best            # strict: an equal value in a later chunk keeps the lower index
            best = torch.where(better, val, best)
            idx = torch.where(better, i + v0, idx)
        out[r0:r0 + hr.shape[0]] = idx
    return out


def logits_argmax(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  n_valid: Optional[int] = None, backend: str = "auto", config: Optional[dict] = None) -> torch.Tensor:
    """h (..., D) → LongTensor (...): argmax over the first n_valid rows of weight of h·Wᵀ+b.

    backend='auto' runs the Triton kernel for fp16 / bf16 CUDA tensors and the chunked torch path otherwise;
    backend='cuda' the CUDA C++ kernel of csrc/ (logits_argmax_cuda; bf16/fp16 on CUDA, eager only).
    config: launcher overrides for the Triton kernel (see logits_argmax_fwd, e.g. {"tma": True}; {"impl": "cuda"}
    runs the csrc/ kernel from there, as the engine's argmax_config can); eager calls then go to the launcher
    directly, while torch.compile traces the registered op with the default config."""
    if weight.dim() != 2 or h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}")
    V = valid_rows(n_valid, weight.shape[0])
    if bias is not None and (bias.dim() != 1 or bias.shape[0] < V):
        raise ValueError(f"bias must be 1-D with at least n_valid = {V} entries, got {tuple(bias.shape)}")
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    b = None if bias is None else bias[:V]
    if backend == "cuda":
        return logits_argmax_cuda(h2, weight, b, V, (config or {}).get("splits")).reshape(lead)
    be = resolve(backend, h.device)
    if be == "triton" and backend == "auto" and h.dtype in (torch.float32, torch.float64):
        be = "torch"       # fp64 is torch/reference-only; fp32 runs faster as chunked cuBLAS GEMMs
    if be == "reference":
        out = ref.logits_argmax_ref(h2.to(acc_dtype(h.dtype)), weight[:V].to(acc_dtype(h.dtype)),
                                    None if b is None else b.to(acc_dtype(h.dtype)))
    elif be == "triton":
        if config and not torch.compiler.is_compiling():
            out = logits_argmax_fwd(h2, weight, b, V, config)
        else:
            out = torch.ops.fmlm.logits_argmax(h2, weight, b, V)
    else:
        out = _logits_argmax_torch(h2, weight, b, V)
    return out.reshape(lead)
