"""residual_linear / norm_linear: the DiT block's GEMMs with the gate-residual and the adaLN LayerNorm folded in,
so that a block at batch 1 runs 5 kernels instead of 7 (engine gemm_impl 'triton_fused', opt-in, unmeasured).

Reference (composed from the published block's ops, reference.py):
    residual_linear(a, w, b, x, gate) = (x' = x + gate·(a·wᵀ + b),  stats of x' per row and column tile)
    norm_linear(x', stats, nw, shift, scale, w2, b2, act, rotary)
                                      = linear(adaln_modulate(x', nw, shift, scale), w2, b2, act, rotary)
gate, shift, scale are per batch row (B, D) and broadcast over L, as in adaln.gate_residual; the GEMM
products accumulate in fp32, the residual stream x is fp32, the LayerNorm (no affine, eps 1e-5, times nw) is
fp32 and its output is rounded to w2's dtype before the product, where the unfused path stores it.

How: residual_linear is linear_partials' split-K GEMM whose last split to finish a tile (a per-tile counter,
atomically incremented after the partial is stored) sums the tile's partials in split order (deterministic:
the same bits whichever split finishes last), adds the bias, applies the gate and the residual, stores x' and
the tile's per-row statistics over its columns (x0, Σ(x' − x0), M2: sums of deviations, _residual_tail).
norm_linear sums a row's tile statistics in tile order about the row's first value (a parallel-axis merge of
deviations: no E[x²] − E[x]² cancellation, no rounded mean subtracted), then normalizes and modulates each A tile
of x' as it loads it, ahead of the dot. The gate_residual kernels (and their launches) disappear; the price: the
GEMM programs read x' in fp32 (twice the bytes of the bf16 adaLN output they read before), and the last split
of each tile does the residual epilogue.

Why (napkin, H100, not measured): run5's LM1B B=1 profile with the Triton GEMMs and PDL has 25 gate_residual
launches of ~4 µs in a 0.51 ms call of 91 launches (plus a launch gap each); at batch 1 each launch costs its
ramp and latency whatever it computes. Counters: one int32 per output tile, zero before the launch (the
caller passes a zeroed buffer, `sem`, shared by all the trunk's calls — one memset per trunk — or the launcher
allocates one), back to zero after it (the last split resets its tile), so a buffer can be reused.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._backend import (deep_pipelines_active, interpreting, pdl_active, pdl_launch_kwargs, pdl_prefetch_active,
                       resolve, sm_count, triton_available, with_default_constexprs)
from ._prefetch import L2_LINE_BYTES
from .linear import GPU_CONFIG_SMALL, _cdiv, _check_rotary, deep_stages, linear_ref, pick_config

EPS = 1e-5

if triton_available():
    import triton
    import triton.language as tl

    from .linear import finish_tile, pdl_wait, split_tile_dot

    @triton.jit
    def _residual_tail(y, rows, cols, row_ok, col_ok, pid_n, BIAS, X, GATE, XOUT, STATS, M, N, L,
                       stride_xm, stride_gb, stride_xo, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                       ONE_BATCH: tl.constexpr):
        """x' = x + gate·(y + b) for one output tile, stored, and the tile's per-row statistics over its valid
        columns into STATS[pid_n] ((n_tiles_n, 3, M) fp32): (x0, s1, m2) with x0 the row's first value in the
        tile, s1 = Σ(x' − x0), m2 = Σ(x' − mean)². Sums of deviations from a value of the row, not of x' itself,
        and norm_linear subtracts (x − c) − d rather than a rounded mean: a row far off zero (x' ≈ 300 ± 2, where
        one fp32 ulp is 3e-5) keeps fp32's accuracy for its spread (test at offset 300)."""
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            y += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        rows64 = rows.to(tl.int64)
        if ONE_BATCH:        # the tile's rows lie in one batch row (L a multiple of BLOCK_M): one gate vector
            g = tl.load(GATE + (tl.min(rows64, 0) // L) * stride_gb + cols, mask=col_ok, other=0.0)
            g = g.to(tl.float32)[None, :]
        else:
            g = tl.load(GATE + (rows64 // L)[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x + g * y
        tl.store(XOUT + rows64[:, None] * stride_xo + cols[None, :], x.to(XOUT.dtype.element_ty), mask=mask)
        nc = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
        x0 = tl.sum(tl.where(cols[None, :] == pid_n * BLOCK_N, x, 0.0), 1)     # exact: one term, zeros
        dev = tl.where(mask, x - x0[:, None], 0.0)
        s1 = tl.sum(dev, 1)
        d = tl.where(mask, dev - (s1 / nc)[:, None], 0.0)
        base = STATS + pid_n.to(tl.int64) * 3 * M
        tl.store(base + rows, x0, mask=row_ok)
        tl.store(base + M + rows, s1, mask=row_ok)
        tl.store(base + 2 * M + rows, tl.sum(d * d, 1), mask=row_ok)

    @triton.jit
    def _residual_linear_kernel(
        A, W, BIAS, P, X, GATE, XOUT, STATS, SEM,
        M, N, K, L, k_per_split, n_split,
        stride_am, stride_wn, stride_ps, stride_xm, stride_gb, stride_xo,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_BATCH: tl.constexpr = False,
        USE_PDL: tl.constexpr = False, PREFETCH_W: tl.constexpr = False, PF_STEP: tl.constexpr = 64,
    ):
        """One (BLOCK_M × BLOCK_N) tile over the K slice of split pid_s, as linear's PARTIAL launch; with
        n_split > 1 the partial goes to P[pid_s] and the split that finds the tile's counter at n_split − 1 sums
        P[0..n_split) in order and runs _residual_tail (then resets the counter); with one split, the tail at once.
        USE_PDL / PREFETCH_W as in linear's kernel."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        rows, cols, row_ok, col_ok, acc = split_tile_dot(A, W, M, N, K, k_per_split, stride_am, stride_wn, IEEE,
                                                         EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL, PREFETCH_W,
                                                         PF_STEP)
        if n_split == 1:
            _residual_tail(acc, rows, cols, row_ok, col_ok, pid_n, BIAS, X, GATE, XOUT, STATS, M, N, L,
                           stride_xm, stride_gb, stride_xo, HAS_BIAS, BLOCK_N, ONE_BATCH)
        else:
            mask = row_ok[:, None] & col_ok[None, :]
            tile = rows.to(tl.int64)[:, None] * N + cols[None, :]
            tl.store(P + pid_s.to(tl.int64) * stride_ps + tile, acc, mask=mask)
            sem = SEM + pid_m * tl.num_programs(1) + pid_n
            # every thread's part of the partial is stored before the one increment (a CTA barrier), which
            # releases them at GPU scope (acq_rel); the split that reads n_split − 1 acquires every other's
            tl.debug_barrier()
            done = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
            if done == n_split - 1:
                y = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                p_s = P + tile
                for s in range(0, n_split):          # split order: the same sum whichever split came last
                    y += tl.load(p_s, mask=mask, other=0.0, cache_modifier=".cg")
                    p_s += stride_ps                 # pointer steps: 64-bit address math at any S·M·N
                _residual_tail(y, rows, cols, row_ok, col_ok, pid_n, BIAS, X, GATE, XOUT, STATS, M, N, L,
                               stride_xm, stride_gb, stride_xo, HAS_BIAS, BLOCK_N, ONE_BATCH)
                tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _norm_linear_kernel(
        X, STATS, NW, SHIFT, SCALE, W, BIAS, OUT, COS, SIN,
        M, N, K, L, n_tiles, tile_w, seq_len, rot_cols, eps,
        stride_xm, stride_mb, stride_wn, stride_om, stride_cl,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_BATCH: tl.constexpr = False,
        ROTARY: tl.constexpr = False, HEAD_DIM: tl.constexpr = 64,
        USE_PDL: tl.constexpr = False, PREFETCH_W: tl.constexpr = False, PF_STEP: tl.constexpr = 64,
    ):
        """act(adaln(x)·wᵀ + b) for one output tile: each row's mean and variance from the n_tiles column-tile
        statistics STATS ((n_tiles, 3, M): (x0, s1, m2) over tile_w columns each, _residual_tail), summed in tile
        order about c = the first tile's x0: d = mean − c = Σ(s1 + nb·(x0 − c))/K, and Σ(x − c)² − K·d² for the
        M2 (deviations of about the row's spread on both sides); each A tile ((x − c) − d)·rstd·nw·(1 + scale) +
        shift in fp32 (x − c exact for values near c), rounded to W's dtype, then the dot. Epilogue (bias, GELU,
        rotary) as linear's kernel."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        pdl_wait(W, cols, col_ok, stride_wn, 0, K, USE_PDL, PREFETCH_W, PF_STEP)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        c = tl.load(STATS + rows, mask=row_ok, other=0.0)
        s1 = tl.zeros((BLOCK_M,), tl.float32)
        q = tl.zeros((BLOCK_M,), tl.float32)
        base = STATS
        for t in range(0, n_tiles):
            nb = tl.minimum(K - t * tile_w, tile_w).to(tl.float32)
            off = tl.load(base + rows, mask=row_ok, other=0.0) - c
            st = tl.load(base + M + rows, mask=row_ok, other=0.0)
            mt = tl.load(base + 2 * M + rows, mask=row_ok, other=0.0)
            base += 3 * M            # pointer steps: 64-bit address math at any tile count × rows
            s1 += st + nb * off
            dm = off + st / nb       # the tile's mean − c
            q += mt + nb * dm * dm
        d = s1 / K
        rstd = 1.0 / tl.sqrt(tl.maximum(q / K - d * d, 0.0) + eps)
        mod_row = (pid_m * BLOCK_M // L).to(tl.int64) * stride_mb       # ONE_BATCH: the tile's batch row
        mod_rows = (rows64 // L)[:, None] * stride_mb
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = X + rows64[:, None] * stride_xm
        w_rows = W + cols.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, K, BLOCK_K):
            ks = k + offs_k
            k_ok = ks < K
            amask = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows + ks[None, :], mask=amask, other=0.0).to(tl.float32)
            nw = tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)
            if ONE_BATCH:    # one shift / scale vector for the tile (L a multiple of BLOCK_M)
                sh = tl.load(SHIFT + mod_row + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                sc = tl.load(SCALE + mod_row + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            else:
                sh = tl.load(SHIFT + mod_rows + ks[None, :], mask=amask, other=0.0).to(tl.float32)
                sc = tl.load(SCALE + mod_rows + ks[None, :], mask=amask, other=0.0).to(tl.float32)
            a = (((x - c[:, None]) - d[:, None]) * rstd[:, None] * nw[None, :] * (1.0 + sc) + sh)
            a = a.to(W.dtype.element_ty)
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        acc = finish_tile(acc, rows, row_ok, cols, col_ok, BIAS, COS, SIN, stride_cl, seq_len, rot_cols,
                          OUT.dtype.element_ty, HAS_BIAS, ACT, FAST_TANH, ROTARY, BLOCK_M, BLOCK_N, HEAD_DIM)
        tl.store(OUT + rows64[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
class RowStats:
    """norm_linear's input: the residual stream x (B, L, D) fp32 and its rows' statistics by column tile,
    stats (n_tiles, 3, B·L) fp32, (x0, s1, m2) over tile_w columns each (kernel _residual_tail), as
    residual_linear leaves them."""

    def __init__(self, x: torch.Tensor, stats: torch.Tensor, tile_w: int):
        self.x, self.stats, self.tile_w = x, stats, int(tile_w)

    @classmethod
    def of(cls, x: torch.Tensor, tile_w: int = 64) -> "RowStats":
        """The statistics computed here in torch (the trunk's first block, whose x no residual_linear wrote)."""
        D = x.shape[-1]
        xt = x.reshape(-1, D).float()
        n = _cdiv(D, tile_w)
        stats = torch.empty(n, 3, xt.shape[0], device=x.device, dtype=torch.float32)
        for t in range(n):
            dev = xt[:, t * tile_w:(t + 1) * tile_w] - xt[:, t * tile_w, None]
            stats[t, 0] = xt[:, t * tile_w]
            stats[t, 1] = dev.sum(1)
            stats[t, 2] = (dev - dev.mean(1, keepdim=True)).square().sum(1)
        return cls(x, stats, tile_w)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) per row, from the tiles as the kernel sums them (fp32)."""
        D = self.x.shape[-1]
        c = self.stats[0, 0]
        s1 = q = torch.zeros_like(c)
        for t in range(self.stats.shape[0]):
            nb = float(min(D - t * self.tile_w, self.tile_w))
            off = self.stats[t, 0] - c
            s1 = s1 + self.stats[t, 1] + nb * off
            dm = off + self.stats[t, 1] / nb
            q = q + self.stats[t, 2] + nb * dm * dm
        d = s1 / D
        return c + d, (q / D - d * d).clamp_min(0)


def _mods(t: torch.Tensor, B: int, D: int, name: str) -> torch.Tensor:
    if t.shape != (B, D):
        raise ValueError(f"{name} must be (B, D) = ({B}, {D}), got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def one_wave_split(cfg: dict, M: int, N: int, n_sm: int) -> int:
    """The residual GEMM's split count: linear_partials' (cfg["SPLIT"]), but with 8-warp tiles (128×128: the
    residual tail's fp32 x, gate and partial sums take ~254 registers a thread, one CTA per SM) no more programs
    than SMs (OWT B=1's output projection: 48 tiles × 3 splits would run in two waves, × 2 in one)."""
    tiles = _cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"])
    if cfg["num_warps"] < 8 or tiles * cfg["SPLIT"] <= n_sm:
        return cfg["SPLIT"]
    return max(1, min(cfg["SPLIT"], n_sm // tiles))


TWO_CTA_STAGE_BYTES = 100 * 1024


def two_cta_stages(stages: int, per_stage: int, programs: int, n_sm: int) -> int:
    """The LayerNorm GEMM's stages: its fp32 x tile makes a stage ~1.5× linear's (49 KB at 128×128×64 bf16), so
    linear's 3 stages there would leave one CTA per SM (115 KB; OWT B=1's qkv GEMM: 144 programs, two waves);
    a grid of more programs than SMs keeps ≥ 2 stages within TWO_CTA_STAGE_BYTES, two CTAs per SM (sm_90a: 98 KB
    at 128×128 with 2 stages)."""
    if programs <= n_sm:
        return stages
    return max(2, min(stages, TWO_CTA_STAGE_BYTES // per_stage))


def _launch_opts(a: torch.Tensor, w: torch.Tensor, cfg: dict, grid: tuple, per_stage: Optional[int] = None) -> dict:
    """Launch keywords: the config's warps and stages (deep_pipelines: more, within DEEP_PIPELINE_SMEM at
    per_stage bytes a stage), PDL, the weights' L2 prefetch."""
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch_kwargs(pdl_active(a)))
    if deep_pipelines_active(a) and grid[0] * grid[1] * grid[2] <= sm_count(a.device):
        opts["num_stages"] = deep_stages(cfg, w.element_size(), per_stage)
    if pdl_prefetch_active(a):
        opts.update(PREFETCH_W=True, PF_STEP=L2_LINE_BYTES // w.element_size())
    return opts


def residual_linear_fwd(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor,
                        gate: torch.Tensor, x_out: Optional[torch.Tensor] = None, sem: Optional[torch.Tensor] = None,
                        split_k: int = 0, config: Optional[dict] = None) -> RowStats:
    """Triton launcher: a (B, L, K), weight (N = D, K), bias (D,) or None, x (B, L, D) fp32, gate (B, D) →
    RowStats(x', stats). x_out: where x' goes (may be x); sem: int32 zeros, at least one per output tile (returned
    to zero); split_k 0 chooses as linear_partials."""
    B, L, K = a.shape
    N = weight.shape[0]
    if x.shape != (B, L, N) or x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError(f"x must be ({B}, {L}, {N}) fp32 with unit column stride, got {tuple(x.shape)} {x.dtype}")
    gate = _mods(gate, B, N, "gate")
    x_out = x if x_out is None else x_out
    if x_out.shape != x.shape or x_out.dtype != torch.float32 or not x_out.is_contiguous():
        raise ValueError("x_out must be a contiguous fp32 tensor shaped like x")
    a2 = a.reshape(B * L, K) if a.is_contiguous() else a.contiguous().view(B * L, K)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = B * L
    cfg = pick_config(M, N, K, a.dtype, a.device, split_k, config)
    if split_k == 0 and config is None and a.device.type == "cuda" and not interpreting():
        split = one_wave_split(cfg, M, N, sm_count(a.device))
        if split != cfg["SPLIT"]:
            tile = {k: v for k, v in cfg.items() if k not in ("SPLIT", "K_PER_SPLIT")}
            cfg = pick_config(M, N, K, a.dtype, a.device, split, tile)
    S, BM, BN = cfg["SPLIT"], cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (_cdiv(M, BM), _cdiv(N, BN), S)
    stats = torch.empty(grid[1], 3, M, device=a.device, dtype=torch.float32)
    if M == 0:
        return RowStats(x_out, stats, BN)
    if sem is None:
        sem = torch.zeros(grid[0] * grid[1], device=a.device, dtype=torch.int32)
    elif sem.dtype != torch.int32 or sem.numel() < grid[0] * grid[1]:
        raise ValueError(f"sem must be int32 with ≥ {grid[0] * grid[1]} entries")
    P = torch.empty(S, M, N, device=a.device, dtype=torch.float32) if S > 1 else x_out
    x2, xo2 = x.reshape(M, N), x_out.view(M, N)
    _residual_linear_kernel[grid](
        a2, w, bias.contiguous() if bias is not None else w, P, x2, gate, xo2, stats, sem,
        M, N, K, L, cfg["K_PER_SPLIT"], S,
        a2.stride(0), w.stride(0), P.stride(0) if S > 1 else 0, x2.stride(0), gate.stride(0), xo2.stride(0),
        HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
        EVEN_K=K % cfg["BLOCK_K"] == 0 and cfg["K_PER_SPLIT"] % cfg["BLOCK_K"] == 0,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], ONE_BATCH=L % BM == 0, **_launch_opts(a, w, cfg, grid))
    return RowStats(x_out, stats, BN)


def norm_linear_fwd(rs: RowStats, norm_w: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                    rotary=None, eps: float = EPS, config: Optional[dict] = None) -> torch.Tensor:
    """Triton launcher: act(adaln(rs.x)·wᵀ + b) in weight's dtype, (B, L, N); rotary as linear's."""
    x = rs.x
    B, L, K = x.shape
    N = weight.shape[0]
    shift, scale = _mods(shift, B, K, "shift"), _mods(scale, B, K, "scale")
    if shift.stride(0) != scale.stride(0):
        shift, scale = shift.contiguous(), scale.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = B * L
    cfg = pick_config(M, N, K, w.dtype, x.device, None, config)
    out = torch.empty(B, L, N, device=x.device, dtype=w.dtype)
    rot = None
    if rotary is not None:
        cos, sin, rot_cols, d = _check_rotary(x, N, rotary)
        if rot_cols:
            bn = cfg["BLOCK_N"]
            while bn > d and (bn % d or rot_cols % bn):
                bn //= 2
            cfg["BLOCK_N"] = max(bn, d)
            if cfg["BLOCK_N"] % d or rot_cols % cfg["BLOCK_N"] or d < 16 or d & (d - 1):
                raise ValueError(f"no tile width fits heads of {d} and {rot_cols} rotated columns")
            rot = (cos.to(w.dtype).contiguous(), sin.to(w.dtype).contiguous(), rot_cols, d)
    if M == 0 or N == 0:
        return out
    grid = (_cdiv(M, cfg["BLOCK_M"]), _cdiv(N, cfg["BLOCK_N"]), 1)
    x2, o2 = x.reshape(M, K), out.view(M, N)
    cos_t, sin_t, rot_cols, head_dim = rot if rot is not None else (w, w, 0, 64)
    one_batch = L % cfg["BLOCK_M"] == 0
    # a stage: the fp32 x tile, the W tile, shift and scale (vectors, or tiles when a tile spans batch rows), nw
    # (sm_90a at 64×64: 83 KB for 4 stages, 158 KB for 7; 12 would need 283 KB)
    bm, bn, bk, es = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], w.element_size()
    per_stage = bm * bk * 4 + bn * bk * es + (2 * bk if one_batch else 2 * bm * bk) * shift.element_size() + bk * es
    if x.device.type == "cuda" and not interpreting():
        cfg["num_stages"] = two_cta_stages(cfg["num_stages"], per_stage, grid[0] * grid[1], sm_count(x.device))
    _norm_linear_kernel[grid[:2]](
        x2, rs.stats, norm_w.contiguous(), shift, scale, w, bias.contiguous() if bias is not None else w, o2, cos_t,
        sin_t,
        M, N, K, L, rs.stats.shape[0], rs.tile_w, L, rot_cols, float(eps),
        x2.stride(0), shift.stride(0), w.stride(0), o2.stride(0), cos_t.stride(0) if rot is not None else 0,
        HAS_BIAS=bias is not None, ACT=int(activation == "gelu_tanh"),
        FAST_TANH=x.device.type == "cuda" and not interpreting() and w.dtype != torch.float32,
        IEEE=w.dtype == torch.float32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        ONE_BATCH=one_batch, ROTARY=rot is not None, HEAD_DIM=head_dim,
        **_launch_opts(x, w, {**cfg, "K_PER_SPLIT": K}, grid, per_stage))
    return out


# ---------------------------------------------------------------------------------------------
# References (composed of the published ops) and the functional API
# ---------------------------------------------------------------------------------------------
def residual_linear_ref(a, weight, bias, x, gate) -> torch.Tensor:
    """x + gate·(a·wᵀ + b) in fp32 (fp64 for fp64 inputs), the product from a's values in that precision (the
    split-K partials' arithmetic)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.nn.functional.linear(a.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return x + gate[:, None, :].to(acc) * y


def norm_linear_ref(x, norm_w, shift, scale, weight, bias=None, activation=None, rotary=None, eps: float = EPS):
    """linear_ref(adaln_modulate(x) in weight's dtype, ...): the published LayerNorm + modulate (fp32, fp64 for
    fp64 inputs), then the layer."""
    acc = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = torch.nn.functional.layer_norm(x.to(acc), [x.shape[-1]], eps=eps) * norm_w.to(acc)
    y = ref.modulate(y, shift[:, None, :].to(acc), scale[:, None, :].to(acc)).to(weight.dtype)
    return linear_ref(y, weight, bias, activation, rotary)


def residual_linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor,
                    gate: torch.Tensor, x_out: Optional[torch.Tensor] = None, sem: Optional[torch.Tensor] = None,
                    backend: str = "auto", config: Optional[dict] = None) -> RowStats:
    """x' = x + gate·(a·wᵀ + b) (a (B, L, K), weight (D, K), x (B, L, D) fp32, gate (B, D)) and its row
    statistics by column tile, as a RowStats for norm_linear. 'triton': one split-K kernel (module docstring);
    other backends: torch (tile width 64)."""
    if resolve(backend, a.device) != "triton":
        xn = residual_linear_ref(a, weight, bias, x, gate)
        if x_out is not None:
            x_out.copy_(xn)
            xn = x_out
        return RowStats.of(xn)
    return residual_linear_fwd(a, weight, bias, x, gate, x_out, sem, config=config)


def norm_linear(rs: RowStats, norm_w: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                rotary=None, eps: float = EPS, backend: str = "auto", config: Optional[dict] = None) -> torch.Tensor:
    """act(adaln_modulate(rs.x, norm_w, shift, scale)·wᵀ + b) in weight's dtype (rotary as linear's): 'triton'
    normalizes with rs's tile statistics inside the GEMM; other backends: norm_linear_ref."""
    if resolve(backend, rs.x.device) != "triton":
        return norm_linear_ref(rs.x, norm_w, shift, scale, weight, bias, activation, rotary, eps)
    return norm_linear_fwd(rs, norm_w, shift, scale, weight, bias, activation, rotary, eps, config)


def compile_specs() -> list[dict]:
    """The sm_90a compile check at the engine's batch-1 tile (64×64, bf16, D = 768)."""
    if not triton_available():
        return []
    cfg = GPU_CONFIG_SMALL
    tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    div = ("N", "K", "k_per_split", "stride_am", "stride_wn", "stride_ps", "stride_xm", "stride_gb", "stride_xo")
    rsig = {"A": "*bf16", "W": "*bf16", "BIAS": "*bf16", "P": "*fp32", "X": "*fp32", "GATE": "*bf16",
            "XOUT": "*fp32", "STATS": "*fp32", "SEM": "*i32", "M": "i32", "N": "i32", "K": "i32", "L": "i32",
            "k_per_split": "i32", "n_split": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_ps": "i32",
            "stride_xm": "i32", "stride_gb": "i32", "stride_xo": "i32"}
    rconst = dict(HAS_BIAS=True, IEEE=False, EVEN_K=True, ONE_BATCH=True, **tiles)
    rnames = _residual_linear_kernel.arg_names
    specs = [dict(name="_residual_linear_kernel[small]", fn=_residual_linear_kernel,
                  signature={**rsig, **{k: "constexpr" for k in rconst}}, constexprs=rconst,
                  attrs={(rnames.index(n),): [["tt.divisibility", 16]] for n in (*rsig.keys(),)
                         if n in div or rsig[n].startswith("*")},
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])]
    nsig = {"X": "*fp32", "STATS": "*fp32", "NW": "*bf16", "SHIFT": "*bf16", "SCALE": "*bf16", "W": "*bf16",
            "BIAS": "*bf16", "OUT": "*bf16", "COS": "*bf16", "SIN": "*bf16", "M": "i32", "N": "i32", "K": "i32",
            "L": "i32", "n_tiles": "i32", "tile_w": "i32", "seq_len": "i32", "rot_cols": "i32", "eps": "fp32",
            "stride_xm": "i32", "stride_mb": "i32", "stride_wn": "i32", "stride_om": "i32", "stride_cl": "i32"}
    ndiv = ("N", "K", "rot_cols", "stride_xm", "stride_mb", "stride_wn", "stride_om", "stride_cl")
    nnames = _norm_linear_kernel.arg_names
    nattrs = {(nnames.index(n),): [["tt.divisibility", 16]] for n in nsig if n in ndiv or nsig[n].startswith("*")}
    for tag, act, rotary in (("gelu", 1, False), ("rotary", 0, True)):
        const = dict(HAS_BIAS=act == 1, ACT=act, FAST_TANH=True, IEEE=False, ONE_BATCH=True, ROTARY=rotary,
                     HEAD_DIM=64, **tiles)
        specs.append(dict(name=f"_norm_linear_kernel[small,{tag}]", fn=_norm_linear_kernel,
                          signature={**nsig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=nattrs,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    # the gemm_deep_pipeline launches at LM1B B=1: 7 stages of the LayerNorm GEMM (its fp32 x tile counted),
    # 12 of the residual GEMM
    specs.append(dict(specs[1], name="_norm_linear_kernel[small,gelu,deep]", num_stages=7))
    specs.append(dict(specs[0], name="_residual_linear_kernel[small,deep]", num_stages=12))
    # with pdl and pdl_prefetch: the weights' L2 prefetch before griddepcontrol.wait
    for i in (0, 1):
        specs.append(dict(specs[i], name=specs[i]["name"][:-1] + ",pdl_prefetch]",
                          signature={**specs[i]["signature"], "USE_PDL": "constexpr", "PREFETCH_W": "constexpr",
                                     "PF_STEP": "constexpr"},
                          constexprs={**specs[i]["constexprs"], "USE_PDL": True, "PREFETCH_W": True, "PF_STEP": 64}))
    return with_default_constexprs(specs)
