"""linear / linear_partials: a Triton GEMM for the DiT trunk at small row counts, with its epilogue fused.

Reference (the published DiT's nn.Linear layers, reference.py):
    linear(a, w, b, activation)   = act(a·wᵀ + b) in a.dtype, act ∈ {None, "gelu_tanh"}
    linear_partials(a, w, split)  = P of shape (S, *a.shape[:-1], N), fp32, with Σ_s P[s] = a·wᵀ
                                    (fp32 accumulation; each P[s] is the product over one slice of K)
The partials are consumed by adaln.gate_residual(x, gate, P, ..., y_bias=b), which sums them in a fixed order
while it reads them anyway: split-K with no atomics, no memset and no extra reduction kernel, so the result is
deterministic (graph replay == eager, bit for bit).

Why (napkin, H100, not yet measured: the engine uses it only with Sampler(kernel_options={"gemm_impl":
"triton_small"})): at batch 1 the trunk's GEMMs have 128 (LM1B) or 1024 (OWT) rows. With 128×128 tiles the
attention output projection (N = K = 768) and the MLP's second GEMM (N = 768, K = 3072) run on 6 programs at
LM1B B=1, 6 of 132 SMs streaming 1.2–4.7 MB of weights each at one SM's load rate, and cuBLAS adds one device
memset per GEMM (a graph node each; the H100 profile shows 49 per call). Here those two GEMMs split K so that
about one wave of programs shares each weight matrix (LM1B B=1: 24 tiles × 3 splits and 12 × 8; OWT B=1:
48 × 3), and the small-tile configs give the qkv and first MLP GEMMs 72–96 programs at LM1B B=1. The qkv GEMM
also applies rotary to q and k in its epilogue (attention then rotates nothing). The block runs the same 7
kernels as the cuBLAS path, with no memsets and every GEMM spread over the GPU. Above SMALL_ROWS rows cuBLAS
tiles fill the GPU and the engine keeps cuBLAS.

Numerics: fp32 accumulation; the partials skip the bf16 rounding of the GEMM output that F.linear does before
the residual add (so the candidate's trunk is slightly closer to the fp64 truth than the reference's).
GELU(tanh) is evaluated on the fp32 accumulator + bias (as cuBLASLt's GELU epilogue in the default path), with
the MUFU tanh.approx on CUDA for 16-bit outputs (relative error 2^-11, below the output's bf16 rounding).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference as ref
from ._backend import (deep_pipelines_active, interpreting, pdl_active, pdl_launch_kwargs, pdl_prefetch_active,
                       resolve, sm_count, triton_available, with_default_constexprs)
from ._prefetch import L2_LINE_BYTES

ACTIVATIONS = (None, "gelu_tanh")
SMALL_ROWS = 4096        # the engine's "triton_small" GEMMs: rows (B·L) up to here, cuBLAS above
WAVE = 132               # programs to aim for (H100 SXM: 132 SMs)
MIN_K_PER_SPLIT = 256    # a split keeps ≥ 4 K steps of 64 to pipeline
MAX_SPLIT = 8
# _backend.deep_pipelines (kernel option gemm_deep_pipeline, opt-in, unmeasured): operand stages up to this much
# shared memory per program, one per K step. Why (napkin): at LM1B B=1 the qkv and first MLP GEMMs are 72-96
# programs (fewer than the 132 SMs, so one CTA per SM costs nothing) of 12 K steps; with 4 stages a program waits
# for ~4 rounds of DRAM latency (~1 µs each at batch 1, where the weights are cold) one after the other, with 12
# one round. 192 KiB: 12 stages of the 64×64 tile, 8 of 64×128, 6 of 128×128 (sm_90a: 64-114 registers, no
# spills; compile_specs "deep" rows). That leaves one CTA per SM, so only grids of at most one program per SM
# deepen: at OWT B=1 the qkv GEMM's 144 programs of 128×128 fit two per SM at 3 stages, in one wave, and keep them.
DEEP_PIPELINE_SMEM = 192 * 1024

if triton_available():
    import triton
    import triton.language as tl

    from ._prefetch import prefetch_rows_l2

    @triton.jit
    def _gelu_tanh(z, FAST_TANH: tl.constexpr):
        """0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³))), z fp32. FAST_TANH: MUFU tanh.approx (CUDA only); else
        tanh(u) = sign(u)·(1 − e)/(1 + e), e = exp(−2|u|), whose cancellation near 0 costs absolute error
        ≤ ~1e-7·|z|: below fp32's rounding of the product 0.5·z·(1 + t) at the scales that matter."""
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        if FAST_TANH:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            e = tl.exp(-2.0 * tl.abs(u))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(u < 0, -t, t)
        return 0.5 * z * (1.0 + t)

    @triton.jit
    def _rotary_tile(y, rows, row_ok, COS, SIN, stride_cl, seq_len, out_dtype: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Rotate-half rotary on every HEAD_DIM-column head of an output tile whose columns start on a head
        boundary, at position l = row mod seq_len: (y1·c − y2·s, y2·c + y1·s) with c, s = cos/sin[l]. The
        same arithmetic as the attention kernel's on-load rotation and the rotary prepass: y rounded to the
        output dtype first (as stored qkv would be), fp32 from tables in that dtype, one rounding after."""
        HALF: tl.constexpr = HEAD_DIM // 2
        NH: tl.constexpr = BLOCK_N // HEAD_DIM
        y = y.to(out_dtype).to(tl.float32)
        y1, y2 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, NH, 2, HALF)), (0, 1, 3, 2)))   # (BM, NH, HALF)
        tab = (rows % seq_len).to(tl.int64)[:, None] * stride_cl + tl.arange(0, HALF)[None, :]
        c = tl.load(COS + tab, mask=row_ok[:, None], other=0.0).to(tl.float32)[:, None, :]
        s = tl.load(SIN + tab, mask=row_ok[:, None], other=0.0).to(tl.float32)[:, None, :]
        rot = tl.join(y1 * c - y2 * s, y2 * c + y1 * s)                                       # (BM, NH, HALF, 2)
        return tl.reshape(tl.permute(rot, (0, 1, 3, 2)), (BLOCK_M, BLOCK_N))

    @triton.jit
    def pdl_wait(W, cols, col_ok, stride_wn, k_begin, k_end, USE_PDL: tl.constexpr, PREFETCH_W: tl.constexpr,
                 PF_STEP: tl.constexpr):
        """USE_PDL (programmatic dependent launch, _backend.pdl_launches): wait for the predecessor's writes, then
        release the dependents; PREFETCH_W first asks L2 for this program's weight rows `cols` over K in
        [k_begin, k_end) (they do not depend on the predecessor), the row blocks (axis 0) sharing them
        every num_programs(0)-th line step each (PF_STEP: elements per L2 line; kernels/_prefetch.py)."""
        if USE_PDL:
            if PREFETCH_W:
                prefetch_rows_l2(W, cols, col_ok, stride_wn, k_begin + tl.program_id(0) * PF_STEP, k_end,
                                 PF_STEP * tl.num_programs(0))
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def slice_dot(A, W, rows, cols, row_ok, col_ok, k_begin, k_end, stride_am, stride_wn, IEEE: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Σ_k A[rows, k]·W[cols, k] over k in [k_begin, k_end), fp32 (BLOCK_M, BLOCK_N); EVEN_K: the range is
        whole BLOCK_K steps (no K mask). IEEE: the exact fp32 dot (fp32 inputs)."""
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = A + rows.to(tl.int64)[:, None] * stride_am
        w_rows = W + cols.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            ks = k + offs_k
            if EVEN_K:
                a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
                w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0.0)
            else:
                a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & (ks < k_end)[None, :], other=0.0)
                w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < k_end)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        return acc

    @triton.jit
    def finish_tile(acc, rows, row_ok, cols, col_ok, BIAS, COS, SIN, stride_cl, seq_len, rot_cols,
                    out_dtype: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr,
                    ROTARY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The epilogue of a finished fp32 tile (column block program_id(1)): + bias, GELU(tanh) for ACT 1, and
        with ROTARY the tiles of columns < rot_cols rotated (_rotary_tile)."""
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            acc = _gelu_tanh(acc, FAST_TANH)
        if ROTARY:
            if tl.program_id(1) * BLOCK_N < rot_cols:
                acc = _rotary_tile(acc, rows, row_ok, COS, SIN, stride_cl, seq_len, out_dtype, BLOCK_M, BLOCK_N,
                                   HEAD_DIM)
        return acc

    @triton.jit
    def split_tile_dot(A, W, M, N, K, k_per_split, stride_am, stride_wn, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
                       PREFETCH_W: tl.constexpr, PF_STEP: tl.constexpr):
        """This program's (BLOCK_M × BLOCK_N) tile of A·Wᵀ over its split's K slice [pid_s·k_per_split,
        +k_per_split) ∩ [0, K) (program ids: row block, column block, split), after pdl_wait:
        (rows, cols, row_ok, col_ok, fp32 acc)."""
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k_begin = tl.program_id(2) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        pdl_wait(W, cols, col_ok, stride_wn, k_begin, k_end, USE_PDL, PREFETCH_W, PF_STEP)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        acc = slice_dot(A, W, rows, cols, row_ok, col_ok, k_begin, k_end, stride_am, stride_wn, IEEE, EVEN_K,
                        BLOCK_M, BLOCK_N, BLOCK_K)
        return rows, cols, row_ok, col_ok, acc

    @triton.jit
    def _linear_kernel(
        A, W, BIAS, OUT, COS, SIN,
        M, N, K, k_per_split, seq_len, rot_cols,
        stride_am, stride_wn, stride_os, stride_om, stride_cl,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr, PARTIAL: tl.constexpr,
        IEEE: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ROTARY: tl.constexpr = False, HEAD_DIM: tl.constexpr = 64, USE_PDL: tl.constexpr = False,
        PREFETCH_W: tl.constexpr = False, PF_STEP: tl.constexpr = 64,
    ):
        """One (BLOCK_M × BLOCK_N) output tile over the K slice [pid_s·k_per_split, +k_per_split) ∩ [0, K).
        PARTIAL: store the fp32 tile into OUT[pid_s] (no bias, no activation); else act(acc + bias) in OUT's
        dtype, and with ROTARY the tiles of columns < rot_cols (q and k of a qkv projection; rot_cols is a
        multiple of BLOCK_N, BLOCK_N of HEAD_DIM) are rotated by _rotary_tile. Program axis 0 walks the row
        blocks, so the programs that share a weight tile run side by side (at small M the weights are the
        traffic: each W tile is read from HBM once and from L2 after). PREFETCH_W (with USE_PDL): before the
        wait, the row blocks that share this W slice ask L2 for its lines, every num_programs(0)-th line step
        each (PF_STEP: elements per L2 line; kernels/_prefetch.py)."""
        pid_s = tl.program_id(2)
        rows, cols, row_ok, col_ok, acc = split_tile_dot(A, W, M, N, K, k_per_split, stride_am, stride_wn, IEEE,
                                                         EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL, PREFETCH_W,
                                                         PF_STEP)
        mask = row_ok[:, None] & col_ok[None, :]
        out = OUT + pid_s.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        if PARTIAL:
            tl.store(out, acc, mask=mask)
        else:
            acc = finish_tile(acc, rows, row_ok, cols, col_ok, BIAS, COS, SIN, stride_cl, seq_len, rot_cols,
                              OUT.dtype.element_ty, HAS_BIAS, ACT, FAST_TANH, ROTARY, BLOCK_M, BLOCK_N, HEAD_DIM)
            tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs and launcher
# ---------------------------------------------------------------------------------------------
# Hopper, 16-bit operands: 64×64 tiles (one warpgroup's wgmma m64) when the 128-wide tiles would leave most
# SMs idle, 128×128 otherwise; K steps of 64 with 4 stages (32 KiB of shared memory per 64×64 stage pair).
GPU_CONFIG_SMALL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
GPU_CONFIG_MID = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
GPU_CONFIG_LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
# fp32 on CUDA: the exact (ieee) dot, a smaller footprint (a correctness path: the engine runs bf16)
GPU_CONFIG_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
# the interpreter: few programs, each a few numpy dots
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _auto_split(tiles: int, K: int) -> int:
    """Splits that bring tiles × splits to about a wave, each split ≥ MIN_K_PER_SPLIT deep, at most MAX_SPLIT."""
    return max(1, min(MAX_SPLIT, _cdiv(WAVE, max(tiles, 1)), K // MIN_K_PER_SPLIT))     # no rows: no tiles


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, split_k: Optional[int] = None,
                config: Optional[dict] = None) -> dict:
    """Tile config and split count. split_k None: 1 (linear) — linear_partials passes 0 for "choose"
    (_auto_split). On CUDA (16-bit) the widest tiles whose programs (tiles × splits) reach half a wave win, else
    the smallest: wide tiles read each operand fewer times (at OWT B=1, 64×64 tiles would pull ~150 MB through
    L2 for the 1024×3072 by 3072×768 GEMM, 128×128 tiles split 3 ways ~75 MB), and splitting K is cheaper
    than narrowing tiles while the splits stay deep. Returns BLOCK_*, num_warps, num_stages, SPLIT and
    K_PER_SPLIT (a multiple of BLOCK_K)."""
    if config is not None:
        cfg = dict(config)
    elif device.type != "cuda":
        cfg = dict(INTERPRET_CONFIG)
    elif dtype == torch.float32:
        cfg = dict(GPU_CONFIG_FP32)
    else:
        for c in (GPU_CONFIG_LARGE, GPU_CONFIG_MID, GPU_CONFIG_SMALL):
            cfg = dict(c)
            tiles = _cdiv(M, c["BLOCK_M"]) * _cdiv(N, c["BLOCK_N"])
            if tiles * (_auto_split(tiles, K) if split_k == 0 else 1) >= WAVE // 2:
                break
    bk = cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(K)))
    for key in ("BLOCK_M", "BLOCK_N"):
        if device.type != "cuda":     # the interpreter: no wider than needed
            cfg[key] = max(16, min(cfg[key], triton.next_power_of_2(M if key == "BLOCK_M" else N)))
    tiles = _cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"])
    if split_k is None:
        split = 1
    elif split_k == 0:
        split = _auto_split(tiles, K)
    else:
        split = int(split_k)
    k_per = max(1, _cdiv(_cdiv(K, split), bk)) * bk     # K = 0: one (empty) split, not a division by zero
    cfg["SPLIT"] = max(1, _cdiv(K, k_per))  # a requested split may shrink so that no split is empty
    cfg["K_PER_SPLIT"] = k_per
    return cfg


def deep_stages(cfg: dict, esize: int, per_stage: Optional[int] = None) -> int:
    """num_stages under deep_pipelines: one per K step of a split (at least the config's), as many as
    DEEP_PIPELINE_SMEM holds; per_stage: a stage's bytes (default: an A and a W tile of esize-byte elements)."""
    per_stage = per_stage or (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * esize
    steps = _cdiv(cfg["K_PER_SPLIT"], cfg["BLOCK_K"])
    return max(cfg["num_stages"], min(steps, DEEP_PIPELINE_SMEM // per_stage))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])      # not -1: ambiguous for K = 0
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    if a.dim() < 1 or weight.dim() != 2 or a.shape[-1] != weight.shape[1]:
        raise ValueError(f"a (..., K) and weight (N, K) must agree on K: {tuple(a.shape)}, {tuple(weight.shape)}")
    if a.dtype != weight.dtype:
        raise ValueError(f"a and weight must share a dtype, got {a.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if a.device != weight.device or (bias is not None and bias.device != a.device):
        raise ValueError("a, weight and bias must be on one device")


def _check_rotary(a: torch.Tensor, N: int, rotary) -> tuple:
    """(cos, sin, rot_cols, head_dim) of a rotary=(cos, sin, rot_cols) argument, validated against a (B, L, K)."""
    cos, sin, rot_cols = rotary
    if a.dim() != 3 or cos.dim() != 2 or cos.shape[0] != a.shape[1] or sin.shape != cos.shape:
        raise ValueError(f"rotary needs a (B, L, K) and cos/sin (L, d/2); got a {tuple(a.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    d = 2 * cos.shape[1]
    if rot_cols % d or rot_cols > N or rot_cols < 0:
        raise ValueError(f"rotary columns ({rot_cols}) must be whole heads of {d} within N = {N}")
    return cos, sin, int(rot_cols), d


def linear_fwd(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None, split_k: Optional[int] = None, config: Optional[dict] = None,
               rotary=None):
    """Triton launcher. split_k None: act(a·wᵀ + b) of shape (*a.shape[:-1], N) in a.dtype, rotary as in
    linear(). Otherwise (0 = choose by shape): fp32 partials (S, *a.shape[:-1], N), no bias or activation."""
    a2 = _rows(a)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    M, K = a2.shape
    N = w.shape[0]
    cfg = pick_config(M, N, K, a.dtype, a.device, split_k, config)
    partial = split_k is not None
    if rotary is not None and partial:
        raise ValueError("rotary applies to finished outputs, not to split-K partials")
    rot = None
    if rotary is not None:
        cos, sin, rot_cols, d = _check_rotary(a, N, rotary)
        if rot_cols:
            if d < 16 or d & (d - 1):
                raise ValueError(f"the rotary epilogue needs a power-of-two head dim ≥ 16, got {d}")
            # a tile holds whole heads and lies wholly inside or outside the rotated columns
            bn = cfg["BLOCK_N"]
            while bn > d and (bn % d or rot_cols % bn):
                bn //= 2
            cfg["BLOCK_N"] = max(bn, d)
            if cfg["BLOCK_N"] % d or rot_cols % cfg["BLOCK_N"]:
                raise ValueError(f"no tile width fits heads of {d} and {rot_cols} rotated columns")
            rot = (cos.to(a.dtype).contiguous(), sin.to(a.dtype).contiguous(), rot_cols, d, a.shape[1])
    S = cfg["SPLIT"] if partial else 1
    if partial:
        out = torch.empty(S, M, N, device=a.device, dtype=torch.float32)
        shape = (S, *a.shape[:-1], N)
    else:
        out = torch.empty(1, M, N, device=a.device, dtype=a.dtype)
        shape = (*a.shape[:-1], N)
    if M == 0 or N == 0:
        return out.view(shape)
    if K == 0:      # an empty product: the bias alone (fp32 zeros for partials), activated and rotated as the spec
        out.zero_()
        if not partial:
            out[0].copy_(linear_ref(a, weight, bias, activation, rotary).reshape(M, N))
        return out.view(shape)
    bk = cfg["BLOCK_K"]
    b = bias.contiguous() if bias is not None else w
    grid = (_cdiv(M, cfg["BLOCK_M"]), _cdiv(N, cfg["BLOCK_N"]), S)
    if deep_pipelines_active(a) and math.prod(grid) <= sm_count(a.device):
        cfg["num_stages"] = deep_stages(cfg, a.element_size())
    cos_t, sin_t, rot_cols, head_dim, seq_len = rot if rot is not None else (w, w, 0, 64, 1)
    _linear_kernel[grid](
        a2, w, b, out, cos_t, sin_t, M, N, K, cfg["K_PER_SPLIT"], seq_len, rot_cols,
        a2.stride(0), w.stride(0), out.stride(0), out.stride(1), cos_t.stride(0) if rot is not None else 0,
        HAS_BIAS=bias is not None and not partial, ACT=int(activation == "gelu_tanh" and not partial),
        ROTARY=rot is not None, HEAD_DIM=head_dim,
        FAST_TANH=a.device.type == "cuda" and not interpreting() and a.dtype != torch.float32,
        PARTIAL=partial, IEEE=a.dtype == torch.float32,
        EVEN_K=K % bk == 0 and cfg["K_PER_SPLIT"] % bk == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch_kwargs(pdl_active(a)),
        **({"PREFETCH_W": True, "PF_STEP": L2_LINE_BYTES // w.element_size()} if pdl_prefetch_active(a) else {}))
    return out.view(shape)


# ---------------------------------------------------------------------------------------------
# The reference (F.linear, as the published layers) and the functional API
# ---------------------------------------------------------------------------------------------
def linear_ref(a, weight, bias=None, activation=None, rotary=None):
    """nn.Linear (+ GELU(tanh)) in a's dtype, as the published DiT computes it; rotary=(cos, sin, rot_cols): then
    reference.apply_rotary_ref on the first rot_cols output columns, heads of 2·cos.shape[1] (the DiT's q, k)."""
    y = torch.nn.functional.linear(a, weight, bias)
    y = torch.nn.functional.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y
    if rotary is not None:
        cos, sin, rot_cols, d = _check_rotary(a, weight.shape[0], rotary)
        if rot_cols:
            B, L = a.shape[:2]
            qk = ref.apply_rotary_ref(y[..., :rot_cols].reshape(B, L, rot_cols // d, d), cos, sin)
            y = torch.cat([qk.reshape(B, L, rot_cols), y[..., rot_cols:]], dim=-1)
    return y


# ---------------------------------------------------------------------------------------------
# Op registration (opaque to torch.compile: used when compiling the block)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fmlm::linear", mutates_args=())
def _linear_op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
               cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], rot_cols: int) -> torch.Tensor:
    return linear_fwd(a, weight, bias, activation or None, None, None,
                      (cos, sin, rot_cols) if cos is not None else None)


@_linear_op.register_fake
def _(a, weight, bias, activation, cos, sin, rot_cols):
    return a.new_empty(*a.shape[:-1], weight.shape[0])


@torch.library.custom_op("fmlm::linear_partials", mutates_args=())
def _linear_partials_op(a: torch.Tensor, weight: torch.Tensor, split_k: int) -> torch.Tensor:
    return linear_fwd(a, weight, None, None, split_k)


@_linear_partials_op.register_fake
def _(a, weight, split_k):
    M = a.numel() // a.shape[-1] if a.shape[-1] else 0
    S = pick_config(M, weight.shape[0], a.shape[-1], a.dtype, a.device, split_k)["SPLIT"]
    return a.new_empty(S, *a.shape[:-1], weight.shape[0], dtype=torch.float32)


def linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, backend: str = "auto", config: Optional[dict] = None,
           rotary=None) -> torch.Tensor:
    """act(a·wᵀ + b): a (..., K), weight (N, K), bias (N,) → (..., N) in a.dtype, activation None | 'gelu_tanh'.
    rotary=(cos, sin, rot_cols), with a (B, L, K) and cos/sin (L, d/2): the first rot_cols output columns are
    heads of d columns rotated rotate-half at their row's position (the DiT's q and k in a qkv projection:
    rot_cols = 2·D), the rest left as they are; the Triton kernel does it in its epilogue. backend 'triton'
    runs the small-row-count Triton GEMM; 'reference'/'torch' run F.linear (+ reference.apply_rotary_ref)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check(a, weight, bias)
    if resolve(backend, a.device) != "triton":
        return linear_ref(a, weight, bias, activation, rotary)
    if torch.compiler.is_compiling() and config is None:
        cos, sin, rot_cols = rotary if rotary is not None else (None, None, 0)
        return _linear_op(a, weight, bias, activation or "", cos, sin, int(rot_cols))
    return linear_fwd(a, weight, bias, activation, None, config, rotary)


def linear_partials(a: torch.Tensor, weight: torch.Tensor, split_k: int = 0, backend: str = "auto",
                    config: Optional[dict] = None) -> torch.Tensor:
    """Split-K partial products of a·wᵀ: (S, ..., N) fp32 with Σ_s P[s] = a·wᵀ. split_k 0 chooses S by shape
    (pick_config); a requested S may shrink so that every split holds K. 'reference'/'torch': S = 1, the
    product in fp32 (fp64 for fp64 inputs)."""
    _check(a, weight, None)
    if split_k < 0:
        raise ValueError(f"split_k must be ≥ 0 (0 = by shape), got {split_k}")
    if resolve(backend, a.device) != "triton":
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        return torch.nn.functional.linear(a.to(acc), weight.to(acc))[None]
    if a.dtype == torch.float64:
        raise ValueError("backend='triton' takes 16-bit or fp32 inputs")
    if torch.compiler.is_compiling() and config is None:
        return _linear_partials_op(a, weight, int(split_k))
    return linear_fwd(a, weight, None, None, split_k, config)


def compile_specs() -> list[dict]:
    """The sm_90a compile check: the engine's configs at D = 768 (bf16 operands)."""
    if not triton_available():
        return []
    specs = []
    for tag, cfg in (("small", GPU_CONFIG_SMALL), ("mid", GPU_CONFIG_MID), ("large", GPU_CONFIG_LARGE)):
        for partial, act in ((False, 0), (False, 1), (True, 0)):
            out = "*fp32" if partial else "*bf16"
            sig = {"A": "*bf16", "W": "*bf16", "BIAS": "*bf16", "OUT": out, "COS": "*bf16", "SIN": "*bf16",
                   "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "seq_len": "i32", "rot_cols": "i32",
                   "stride_am": "i32", "stride_wn": "i32", "stride_os": "i32", "stride_om": "i32",
                   "stride_cl": "i32"}
            const = dict(HAS_BIAS=not partial, ACT=act, FAST_TANH=True, PARTIAL=partial, IEEE=False, EVEN_K=True,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
            sig.update({k: "constexpr" for k in const})
            kind = "partial" if partial else ("gelu" if act else "bias")
            specs.append(dict(name=f"_linear_kernel[{tag},{kind}]", fn=_linear_kernel, signature=sig,
                              constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                              divisible_by_16=["A", "W", "BIAS", "OUT", "COS", "SIN", "N", "K", "k_per_split",
                                               "rot_cols", "stride_am", "stride_wn", "stride_os", "stride_om",
                                               "stride_cl"]))
    # the qkv projection with the rotary epilogue, at the batch-1 tiles (small: LM1B B=1; large: OWT B=1)
    for i, tag in ((0, "small"), (6, "large")):
        specs.append(dict(specs[i], name=f"_linear_kernel[{tag},rotary]",
                          signature={**specs[i]["signature"], "ROTARY": "constexpr", "HEAD_DIM": "constexpr"},
                          constexprs={**specs[i]["constexprs"], "HAS_BIAS": False, "ROTARY": True, "HEAD_DIM": 64}))
    # bench_logits_argmax's diagnostic: the plain GEMM at the argmax's 128×256 tile (8 warps, 3 stages)
    specs.append(dict(specs[6], name="_linear_kernel[bm128_bn256,logits]",
                      constexprs={**specs[6]["constexprs"], "HAS_BIAS": False, "BLOCK_N": 256}))
    # the 'pdl' kernel option's launch (griddepcontrol.wait / launch_dependents at the top)
    specs.append(dict(specs[2], name="_linear_kernel[small,partial,pdl]",
                      signature={**specs[2]["signature"], "USE_PDL": "constexpr"},
                      constexprs={**specs[2]["constexprs"], "USE_PDL": True}))
    # the 'gemm_deep_pipeline' kernel option's launches at LM1B B=1 (small: 12 K steps of the qkv / mlp1 GEMMs) and
    # OWT B=1 (large, 6 stages: what DEEP_PIPELINE_SMEM holds)
    for i, tag, stages in ((0, "small,bias", 12), (1, "small,gelu", 12), (7, "large,gelu", 6),
                           (8, "large,partial", 6)):
        specs.append(dict(specs[i], name=f"_linear_kernel[{tag},deep]", num_stages=stages))
    # the 'pdl_prefetch' kernel option's launch: the weight slice's L2 prefetch before the wait (bf16: 64 per line)
    for i, tag in ((2, "small,partial"), (7, "large,gelu")):
        specs.append(dict(specs[i], name=f"_linear_kernel[{tag},pdl_prefetch]",
                          signature={**specs[i]["signature"], "USE_PDL": "constexpr", "PREFETCH_W": "constexpr",
                                     "PF_STEP": "constexpr"},
                          constexprs={**specs[i]["constexprs"], "USE_PDL": True, "PREFETCH_W": True, "PF_STEP": 64}))
    return with_default_constexprs(specs)
