"""interp_embed: the FLM training input h = x_γ·E = (1−γ)·ε·E + γ·E[y], without a (B, L, V) tensor.

Reference: fmlm.kernels.reference.interp_embed_ref (V-space noise, dense one-hot + noise times E) and
interp_embed_hidden_ref (hidden-space noise ξ·C). DESIGN.md §2.1 and §2.4.

Two noise models:
- "vocab": ε ~ N(0, I_V) per token, counter-based (Philox4x32-10 keyed by the seed; counter (v//4, l, b, 0),
  Box–Muller, lane v%4), regenerated tile by tile inside the forward GEMM (ε·E) and inside the backward GEMM
  (dE = εᵀ·((1−γ)·dh)), never stored. `vocab_noise` materializes the same numbers for tests and parity.
- "hidden": ε·E ~ N(0, EᵀE) drawn as ξ·C, C = chol(EᵀE)ᵀ (D×D), ξ ~ N(0, I_D) (Philox counter
  (d//4, l, b, 1), or given as `xi`): O(L·D²) instead of O(L·V·D). C is given (`chol`, e.g. computed once
  per weight set for sampling) or computed inside from E with autograd (`embed_cholesky`), so dE flows
  through the Cholesky factor as well as through the gather E[y].

Gradient estimator note (DESIGN.md §2.4): ξ·C(E) and ε·E have the same law N(0, EᵀE) for every E, so
E_ξ[∇_E f(ξ·C(E) …)] = E_ε[∇_E f(ε·E …)] = ∇_E E[f]: both are unbiased pathwise estimators of the same
expected-loss gradient, with different per-sample values and variance. A `chol` given without grad drops
the noise path of dE (biased; fine for sampling). tests/test_interp_embed.py checks the expected gradient of
both modes against the closed form for a quadratic loss.

Noise streams: the Triton and torch backends run the same Philox counters (bit-identical uint32), and the
same Box–Muller formula in fp32; the normals differ only by the last-ulp differences of log/cos/sin
between numpy/libm (CPU) or the GPU's fast math and torch's implementations.

Backends: 'reference', 'torch' (chunked plain PyTorch, any device), 'triton' (CUDA, or CPU under
TRITON_INTERPRET=1). No gradient w.r.t. gamma, tokens, xi (they are sampled data). The ops
fmlm::interp_embed_vocab / fmlm::interp_embed_hidden (fake impls, registered autograd) are what
torch.compile traces; eager calls use InterpEmbedVocabFn / InterpEmbedHiddenFn, the same impls without
the custom-op dispatch (~0.1 ms per call, as much as the whole hidden-mode step on an H100).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._backend import acc_dtype, addmm_fp32_ok, check_indices, interpreting, resolve, valid_rows
from ._rng import fast_math

try:
    import triton
    import triton.language as tl
    from ._rng import box_muller
    HAS_TRITON = True
except ImportError:  # the package imports without triton; backend='triton' then raises in resolve()
    HAS_TRITON = False

NOISES = ("hidden", "vocab")
STREAM_VOCAB, STREAM_HIDDEN = 0, 1

# Hopper defaults (bf16, D = 768). vocab mode: the RNG (Philox + Box–Muller, ~40 integer/MUFU ops per
# normal) is regenerated D/BLOCK_D times, so BLOCK_D = 256 with 64-row tiles; hidden mode is a
# (rows × D) · (D × D) GEMM with a gather epilogue.
VOCAB_FWD_CONFIG = dict(BLOCK_R=64, BLOCK_V=64, BLOCK_D=256, num_warps=8, num_stages=3)
VOCAB_BWD_CONFIG = dict(BLOCK_R=64, BLOCK_V=64, BLOCK_D=256, num_warps=8, num_stages=3)
# fp32 embeddings (IEEE dots on the FMA pipes): the tiles above spill on sm_90a (forward 472 B, backward 4.2 KB a
# thread); these do not (compile check, triton 3.7.1 / 3.6: forward 128 / 116 registers, backward 195 / 198).
# Unmeasured on a GPU; vocab noise is the parity and toy-vocabulary path.
VOCAB_FWD_CONFIG_FP32 = dict(BLOCK_R=64, BLOCK_V=64, BLOCK_D=128, num_warps=8, num_stages=3)
VOCAB_BWD_CONFIG_FP32 = dict(BLOCK_R=32, BLOCK_V=32, BLOCK_D=128, num_warps=8, num_stages=2)
HIDDEN_FWD_CONFIG = dict(BLOCK_R=64, BLOCK_K=64, BLOCK_D=256, num_warps=8, num_stages=3)
# The default hidden forward draws each ξ tile once per column block of D (3× at D = 768). Alternatives the
# benchmark times beside it (unmeasured): wider column blocks draw ξ fewer times, at the price of masked columns
# (D = 768 padded to 512 + 512 or to 1024, so 25 % of the MMA work is wasted). Compile check (sm_90a, bf16): 255 /
# 239 registers, no spills, 66 / 136 KiB of shared memory (the default: 148 registers, 104 KiB).
HIDDEN_FWD_VARIANTS = {"xi once: r32 k32 d1024": dict(BLOCK_R=32, BLOCK_K=32, BLOCK_D=1024, num_warps=8, num_stages=2),
                       "xi twice: r64 k64 d512": dict(BLOCK_R=64, BLOCK_K=64, BLOCK_D=512, num_warps=8, num_stages=2)}
NOISE_CONFIG = dict(BLOCK_R=16, BLOCK_J=256, num_warps=4)
# The hidden backward's dE: chunks of 32 sorted positions × 128 columns (a 32×128 fp32 tile, 16 values a thread);
# pass 2 reads 16 chunk partials a step, so a run of 16384 equal tokens (padding) takes 32 steps. Unmeasured.
# Compile check (sm_90a, bf16): pass 1 uses 69 registers on triton 3.7.1, 101 on 3.6 (4 warps: 150 / 178), no spills.
EMBED_GRAD_CONFIG = dict(BLOCK_C=32, BLOCK_K=16, BLOCK_D=128, num_warps=8)
INTERPRET_EMBED_GRAD_CONFIG = dict(BLOCK_C=8, BLOCK_K=2, BLOCK_D=32, num_warps=4)  # small: runs cross chunks
INTERPRET_CONFIG = dict(BLOCK_R=16, BLOCK_V=64, BLOCK_K=32, BLOCK_D=32, BLOCK_J=512, num_warps=4, num_stages=1)

TORCH_ROW_CHUNK = 1024
TORCH_V_CHUNK = 4096

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_TWO_PI = 6.283185307179586

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _normal_tile(seed, b, l, j0, STREAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                     FAST: tl.constexpr):
        """(BLOCK_R, BLOCK_J) normals for rows (b, l) and columns j0 + [0, BLOCK_J), j0 % 4 == 0: Philox on the
        counter (j//4, l, b, STREAM) gives four uint32 → normals for columns 4·(j//4) + 0..3."""
        q = (j0 // 4 + tl.arange(0, BLOCK_J // 4)).to(tl.uint32)
        zero = tl.zeros((BLOCK_R, BLOCK_J // 4), dtype=tl.uint32)
        c0 = zero + q[None, :]
        c1 = zero + l.to(tl.uint32)[:, None]
        c2 = zero + b.to(tl.uint32)[:, None]
        c3 = zero + STREAM
        x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
        n0, n1 = box_muller(x0, x1, FAST)
        n2, n3 = box_muller(x2, x3, FAST)
        # join(join(n0, n2), join(n1, n3))[r, q, i, k] = n_{2i+k}: row-major reshape puts it at column 4q + 2i + k
        return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK_R, BLOCK_J))

    @triton.jit
    def _philox_normal_kernel(out_ptr, seed, R, L, J, stride_o,
                              STREAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, FAST: tl.constexpr):
        """Materialize the noise stream: out[r, j] for r = b·L + l < R, j < J."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_c = tl.minimum(rows, R - 1)
        j0 = tl.program_id(1) * BLOCK_J
        x = _normal_tile(seed, rows_c // L, rows_c % L, j0, STREAM, BLOCK_R, BLOCK_J, FAST)
        cols = j0 + tl.arange(0, BLOCK_J)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], x.to(out_ptr.dtype.element_ty),
                 mask=(rows < R)[:, None] & (cols < J)[None, :])

    @triton.jit
    def _gather_epilogue(acc, tok_ptr, gamma_ptr, e_ptr, out_ptr, rows, rows_c, b, dcols, R, D, stride_e, stride_o):
        """out[r, d] = (1 − γ_b)·acc + γ_b·E[y_r, d]."""
        g = tl.load(gamma_ptr + b).to(tl.float32)
        y = tl.load(tok_ptr + rows_c)
        dmask = dcols < D
        ey = tl.load(e_ptr + y[:, None] * stride_e + dcols[None, :], mask=dmask[None, :], other=0.0).to(tl.float32)
        h = (1.0 - g)[:, None] * acc + g[:, None] * ey
        tl.store(out_ptr + rows[:, None] * stride_o + dcols[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=(rows < R)[:, None] & dmask[None, :])

    @triton.jit
    def _segmented_add(start_a, sum_a, start_b, sum_b):
        """The combine of a segmented inclusive scan: a new segment starts at b, or the sums add up."""
        return start_a | start_b, tl.where(start_b, sum_b, sum_a + sum_b)

    @triton.jit
    def _embed_grad_pieces_kernel(order_ptr, stok_ptr, gamma_ptr, dh_ptr, de_ptr, head_ptr, tail_ptr, R, L, D,
                                  stride_dh, stride_de, stride_p, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """dE[y] = Σ_{r: y_r = y} γ_b(r)·dh[r], pass 1 of 2, one program per (chunk of BLOCK_C sorted positions,
        column block). Equal tokens are adjacent, so within a chunk each token's positions form one piece; a
        segmented scan sums every piece in fp32. A piece that is its token's whole run is stored to dE[y] (rounded
        once). A run that crosses chunk boundaries leaves its first piece in tail[chunk] and each later piece in
        head[chunk]; pass 2 adds them up. Deterministic, no atomics, and no program's work grows with a token's
        frequency (padding or a frequent token would otherwise serialize)."""
        c = tl.program_id(0)
        c0 = c * BLOCK_C
        pos = c0 + tl.arange(0, BLOCK_C)
        inb = pos < R
        posc = tl.minimum(pos, R - 1)
        tok = tl.load(stok_ptr + posc)
        run_start = tl.load(stok_ptr + tl.maximum(posc - 1, 0)) != tok     # false at position 0: see the scan
        run_end = (pos >= R - 1) | (tl.load(stok_ptr + tl.minimum(posc + 1, R - 1)) != tok)
        piece_end = inb & (run_end | (pos == c0 + BLOCK_C - 1))
        # the chunk's first piece continues a run from the chunk before iff that run started there
        first_tok = tl.load(stok_ptr + c0)
        cont_in = (tok == first_tok) & (c0 > 0) & (tl.load(stok_ptr + tl.maximum(c0 - 1, 0)) == first_tok)
        r = tl.load(order_ptr + posc)
        g = tl.load(gamma_ptr + r // L, mask=inb, other=0.0).to(tl.float32)
        dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        x = tl.load(dh_ptr + r[:, None] * stride_dh + dcols[None, :], mask=inb[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32) * g[:, None]
        # the scan restarts at each run start (and at the chunk's first position, where it begins)
        _, s = tl.associative_scan((tl.broadcast_to(run_start[:, None], (BLOCK_C, BLOCK_D)), x), 0,
                                   _segmented_add)
        whole = piece_end & run_end & (cont_in == 0)
        tl.store(de_ptr + tok[:, None] * stride_de + dcols[None, :], s.to(de_ptr.dtype.element_ty),
                 mask=whole[:, None] & dmask[None, :])
        part = tl.where(cont_in, head_ptr, tail_ptr) + c * stride_p
        tl.store(part[:, None] + dcols[None, :], s, mask=(piece_end & (whole == 0))[:, None] & dmask[None, :])

    @triton.jit
    def _embed_grad_carry_kernel(stok_ptr, de_ptr, head_ptr, tail_ptr, R, D, stride_de, stride_p,
                                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Pass 2: the run that starts in chunk c and goes on past its end gets dE[y] = tail[c] + Σ head[k] over
        the later chunks k that start with y, BLOCK_K chunks a step (a run of n positions takes n/(BLOCK_C·BLOCK_K)
        steps)."""
        c = tl.program_id(0)
        c0 = c * BLOCK_C
        last = tl.minimum(c0 + BLOCK_C - 1, R - 1)
        t = tl.load(stok_ptr + last)
        goes_on = (last + 1 < R) & (tl.load(stok_ptr + tl.minimum(last + 1, R - 1)) == t)
        owner = goes_on & ((c0 == 0) | (tl.load(stok_ptr + tl.maximum(c0 - 1, 0)) != t))
        dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        acc = tl.load(tail_ptr + c * stride_p + dcols, mask=dmask & owner, other=0.0)
        k = c + 1
        go = owner
        while go:
            ks = k + tl.arange(0, BLOCK_K)
            k0 = ks * BLOCK_C
            in_run = (k0 < R) & (tl.load(stok_ptr + tl.minimum(k0, R - 1)) == t)
            acc += tl.sum(tl.load(head_ptr + ks[:, None] * stride_p + dcols[None, :],
                                  mask=in_run[:, None] & dmask[None, :], other=0.0), axis=0)
            k += BLOCK_K
            go = tl.sum(in_run.to(tl.int32)) == BLOCK_K
        tl.store(de_ptr + t * stride_de + dcols, acc.to(de_ptr.dtype.element_ty), mask=dmask & owner)

    @triton.jit
    def _interp_embed_vocab_fwd_kernel(tok_ptr, gamma_ptr, e_ptr, out_ptr, seed, R, L, V, D, stride_e, stride_o,
                                       PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                                       BLOCK_D: tl.constexpr, FAST: tl.constexpr):
        """h[rows, dblock] = (1−γ)·Σ_v ε[r, v]·E[v, dblock] + γ·E[y, dblock], ε regenerated per V tile."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_c = tl.minimum(rows, R - 1)
        b = rows_c // L
        l = rows_c % L
        dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            eps = _normal_tile(seed, b, l, v0, 0, BLOCK_R, BLOCK_V, FAST)
            vr = v0 + tl.arange(0, BLOCK_V)
            e = tl.load(e_ptr + vr[:, None] * stride_e + dcols[None, :], mask=(vr < V)[:, None] & dmask[None, :],
                        other=0.0)
            acc = tl.dot(eps.to(e.dtype), e, acc, input_precision=PREC)
        _gather_epilogue(acc, tok_ptr, gamma_ptr, e_ptr, out_ptr, rows, rows_c, b, dcols, R, D, stride_e, stride_o)

    @triton.jit
    def _interp_embed_vocab_bwd_kernel(gamma_ptr, dh_ptr, de_ptr, seed, R, L, V, D, stride_dh, stride_de,
                                       PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                                       BLOCK_D: tl.constexpr, FAST: tl.constexpr):
        """dE_noise[vblock, dblock] = Σ_r ε[r, v]·(1−γ_b)·dh[r, dblock] (fp32), ε regenerated per row tile."""
        v0 = tl.program_id(0) * BLOCK_V
        vr = v0 + tl.arange(0, BLOCK_V)
        dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < R
            rows_c = tl.minimum(rows, R - 1)
            b = rows_c // L
            eps = _normal_tile(seed, b, rows_c % L, v0, 0, BLOCK_R, BLOCK_V, FAST)
            g = tl.load(gamma_ptr + b).to(tl.float32)
            dh = tl.load(dh_ptr + rows[:, None] * stride_dh + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                         other=0.0)
            gd = (dh.to(tl.float32) * (1.0 - g)[:, None]).to(dh.dtype)
            acc = tl.dot(tl.trans(eps.to(dh.dtype)), gd, acc, input_precision=PREC)
        tl.store(de_ptr + vr[:, None] * stride_de + dcols[None, :], acc, mask=(vr < V)[:, None] & dmask[None, :])

    @triton.jit
    def _interp_embed_hidden_fwd_kernel(tok_ptr, gamma_ptr, e_ptr, c_ptr, xi_ptr, out_ptr, seed, R, L, D,
                                        stride_e, stride_c, stride_xi, stride_o, XI_GIVEN: tl.constexpr,
                                        PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                                        BLOCK_D: tl.constexpr, FAST: tl.constexpr):
        """h[rows, dblock] = (1−γ)·(ξ·C)[rows, dblock] + γ·E[y, dblock]; ξ loaded (XI_GIVEN) or drawn here."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_c = tl.minimum(rows, R - 1)
        b = rows_c // L
        l = rows_c % L
        dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kr = k0 + tl.arange(0, BLOCK_K)
            kmask = kr < D
            c = tl.load(c_ptr + kr[:, None] * stride_c + dcols[None, :], mask=kmask[:, None] & dmask[None, :],
                        other=0.0)
            if XI_GIVEN:
                xi = tl.load(xi_ptr + rows_c[:, None] * stride_xi + kr[None, :], mask=kmask[None, :], other=0.0)
            else:
                xi = _normal_tile(seed, b, l, k0, 1, BLOCK_R, BLOCK_K, FAST)
            acc = tl.dot(xi.to(c.dtype), c, acc, input_precision=PREC)
        _gather_epilogue(acc, tok_ptr, gamma_ptr, e_ptr, out_ptr, rows, rows_c, b, dcols, R, D, stride_e, stride_o)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _cfg(base: dict, D: int, config: Optional[dict]) -> dict:
    cfg = {**(INTERPRET_CONFIG if interpreting() else base), **(config or {})}
    for k in ("BLOCK_D", "BLOCK_K"):
        if k in cfg:
            cfg[k] = max(16, min(cfg[k], triton.next_power_of_2(D)))
    return cfg


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"     # fp32 inputs: IEEE fp32 dots, no TF32


def _check_triton(*tensors):
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"backend='triton' supports fp32/fp16/bf16, got {t.dtype}")
        if t.numel() >= 2 ** 31:
            raise ValueError("backend='triton' indexes with int32: tensors must have < 2^31 elements")


def philox_normal_fwd(out: torch.Tensor, seed: int, L: int, stream: int) -> torch.Tensor:
    """Triton: fill out (R, J) with the noise stream `stream` for rows r = b·L + l."""
    R, J = out.shape
    cfg = {**(INTERPRET_CONFIG if interpreting() else NOISE_CONFIG)}
    if R and J:
        _philox_normal_kernel[(triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(J, cfg["BLOCK_J"]))](
            out, seed, R, L, J, out.stride(0), STREAM=stream, BLOCK_R=cfg["BLOCK_R"], BLOCK_J=cfg["BLOCK_J"],
            FAST=fast_math(), num_warps=cfg["num_warps"])
    return out


def interp_embed_vocab_fwd(tokens, gamma, embed, seed, n_valid, config=None):
    """Triton forward, vocab noise: tokens (B, L), gamma (B,) → h (B·L, D) in embed's dtype."""
    _check_triton(embed)
    L = tokens.shape[1]
    tok = tokens.reshape(-1)
    D = embed.shape[1]
    cfg = _cfg(VOCAB_FWD_CONFIG_FP32 if embed.dtype == torch.float32 else VOCAB_FWD_CONFIG, D, config)
    out = torch.empty(tok.shape[0], D, device=embed.device, dtype=embed.dtype)
    _interp_embed_vocab_fwd_kernel[(triton.cdiv(tok.shape[0], cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))](
        tok, gamma, embed, out, seed, tok.shape[0], L, n_valid, D, embed.stride(0), out.stride(0),
        PREC=_prec(embed.dtype), BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        FAST=fast_math(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def interp_embed_vocab_bwd(grad, tokens, gamma, embed, seed, n_valid, config=None):
    """Triton backward, vocab noise: dE = εᵀ·((1−γ)·dh) (regenerated ε) + scatter of γ·dh into rows y."""
    _check_triton(embed)
    L = tokens.shape[1]
    tok = tokens.reshape(-1)
    D = embed.shape[1]
    dh = grad.reshape(-1, D).to(embed.dtype).contiguous()
    cfg = _cfg(VOCAB_BWD_CONFIG_FP32 if embed.dtype == torch.float32 else VOCAB_BWD_CONFIG, D, config)
    dE = torch.zeros(embed.shape, device=embed.device, dtype=torch.float32)
    _interp_embed_vocab_bwd_kernel[(triton.cdiv(n_valid, cfg["BLOCK_V"]), triton.cdiv(D, cfg["BLOCK_D"]))](
        gamma, dh, dE, seed, tok.shape[0], L, n_valid, D, dh.stride(0), dE.stride(0),
        PREC=_prec(embed.dtype), BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        FAST=fast_math(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _scatter_gather_grad(dE, grad, tokens, gamma).to(embed.dtype)


def interp_embed_hidden_fwd(tokens, gamma, embed, chol, xi, seed, config=None):
    """Triton forward, hidden noise: h = (1−γ)·ξ·C + γ·E[y]; chol (D, D) in embed's dtype; xi (R, D) or None."""
    _check_triton(embed, chol)
    L = tokens.shape[1]
    tok = tokens.reshape(-1)
    D = embed.shape[1]
    cfg = _cfg(HIDDEN_FWD_CONFIG, D, config)
    out = torch.empty(tok.shape[0], D, device=embed.device, dtype=embed.dtype)
    _interp_embed_hidden_fwd_kernel[(triton.cdiv(tok.shape[0], cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))](
        tok, gamma, embed, chol, chol if xi is None else xi, out, seed, tok.shape[0], L, D,
        embed.stride(0), chol.stride(0), 0 if xi is None else xi.stride(0), out.stride(0), XI_GIVEN=xi is not None,
        PREC=_prec(embed.dtype), BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        FAST=fast_math(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def embed_grad_rows_fwd(grad, tokens, gamma, embed, config=None):
    """Triton: dE (embed's shape and dtype) = scatter of γ·dh into rows y, fp32 sums per token rounded once.
    Sorting the B·L tokens is sync-free; untouched rows are zero. Two passes over chunks of the sorted tokens
    (`_embed_grad_pieces_kernel`, `_embed_grad_carry_kernel`)."""
    D = embed.shape[1]
    L = tokens.shape[1]
    tok = tokens.reshape(-1)
    R = tok.shape[0]
    stok, order = torch.sort(tok, stable=True)
    dh = grad.reshape(-1, D).contiguous()
    dE = torch.zeros(embed.shape, device=embed.device, dtype=embed.dtype)     # contiguous: the kernels index rows
    cfg = {**(INTERPRET_EMBED_GRAD_CONFIG if interpreting() else EMBED_GRAD_CONFIG), **(config or {})}
    n_chunks = triton.cdiv(R, cfg["BLOCK_C"])
    head = torch.empty(n_chunks, D, device=embed.device, dtype=torch.float32)
    tail = torch.empty_like(head)
    grid = (n_chunks, triton.cdiv(D, cfg["BLOCK_D"]))
    _embed_grad_pieces_kernel[grid](
        order, stok, gamma, dh, dE, head, tail, R, L, D, dh.stride(0), dE.stride(0), head.stride(0),
        BLOCK_C=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    _embed_grad_carry_kernel[grid](
        stok, dE, head, tail, R, D, dE.stride(0), head.stride(0),
        BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return dE


def _scatter_gather_grad(dE32: torch.Tensor, grad: torch.Tensor, tokens: torch.Tensor, gamma: torch.Tensor):
    """dE += scatter-add of γ_b·dh[b, l] into rows y[b, l], accumulated in fp32."""
    D = dE32.shape[1]
    g = gamma.to(dE32.dtype).view(-1, 1, 1)
    dE32.index_add_(0, tokens.reshape(-1), (grad.reshape(tokens.shape[0], -1, D).to(dE32.dtype) * g).reshape(-1, D))
    return dE32


# ---- the 'torch' backend: the same Philox stream in int64 arithmetic, chunked -------------------
def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of a·m for uint32 values held in int64 (16-bit split: no int64 overflow)."""
    t = (a & 0xFFFF) * m
    mid = (a >> 16) * m + (t >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t & 0xFFFF)


def _philox_torch(c0, c1, c2, c3, seed: int):
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_a, lo_a = _mulhilo(c0, _PHILOX_ROUND_A)
        hi_b, lo_b = _mulhilo(c2, _PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _box_muller_torch(x, y):
    u1 = ((x >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07
    u2 = ((y >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07
    r = torch.sqrt(-2.0 * torch.log(u1))
    th = _TWO_PI * u2
    return r * torch.cos(th), r * torch.sin(th)


def _philox_normal_torch(seed: int, b: torch.Tensor, l: torch.Tensor, j0: int, j1: int, stream: int) -> torch.Tensor:
    """fp32 normals (len(b), j1 − j0) for rows (b, l) and columns [j0, j1), j0 % 4 == 0 (same stream as Triton)."""
    q = torch.arange(j0 // 4, (j1 + 3) // 4, device=b.device, dtype=torch.int64)
    c0 = q[None, :].expand(b.shape[0], -1)
    c1 = (l[:, None] & _M32).expand_as(c0)
    c2 = (b[:, None] & _M32).expand_as(c0)
    c3 = torch.full_like(c0, stream)
    x0, x1, x2, x3 = _philox_torch(c0, c1, c2, c3, seed)
    n0, n1 = _box_muller_torch(x0, x1)
    n2, n3 = _box_muller_torch(x2, x3)
    return torch.stack([n0, n1, n2, n3], -1).reshape(b.shape[0], -1)[:, :j1 - j0]


def _rows_bl(r0: int, r1: int, L: int, device):
    r = torch.arange(r0, r1, device=device, dtype=torch.int64)
    return r // L, r % L


def _vocab_fwd_torch(tokens, gamma, embed, seed, V):
    acc = acc_dtype(embed.dtype)
    B, L = tokens.shape
    R, D = B * L, embed.shape[1]
    tok = tokens.reshape(-1)
    g = gamma.to(acc).repeat_interleave(L)
    out = torch.empty(R, D, device=embed.device, dtype=embed.dtype)
    for r0 in range(0, R, TORCH_ROW_CHUNK):
        r1 = min(R, r0 + TORCH_ROW_CHUNK)
        b, l = _rows_bl(r0, r1, L, embed.device)
        h = torch.zeros(r1 - r0, D, device=embed.device, dtype=acc)
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            eps = _philox_normal_torch(seed, b, l, v0, v1, STREAM_VOCAB).to(embed.dtype).to(acc)
            h += eps @ embed[v0:v1].to(acc)
        gr = g[r0:r1, None]
        out[r0:r1] = ((1 - gr) * h + gr * embed[tok[r0:r1]].to(acc)).to(embed.dtype)
    return out


def _vocab_bwd_torch(grad, tokens, gamma, embed, seed, V):
    acc = acc_dtype(embed.dtype)
    B, L = tokens.shape
    R, D = B * L, embed.shape[1]
    dh = grad.reshape(R, D).to(acc) * (1 - gamma.to(acc).repeat_interleave(L))[:, None]
    dE = torch.zeros(embed.shape, device=embed.device, dtype=acc)
    for r0 in range(0, R, TORCH_ROW_CHUNK):
        r1 = min(R, r0 + TORCH_ROW_CHUNK)
        b, l = _rows_bl(r0, r1, L, embed.device)
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            eps = _philox_normal_torch(seed, b, l, v0, v1, STREAM_VOCAB).to(embed.dtype).to(acc)
            dE[v0:v1] += eps.T @ dh[r0:r1]
    return _scatter_gather_grad(dE, grad, tokens, gamma).to(embed.dtype)


def _hidden_noise_torch(seed, B, L, D, device):
    out = torch.empty(B * L, D, device=device, dtype=torch.float32)
    for r0 in range(0, B * L, TORCH_ROW_CHUNK):
        r1 = min(B * L, r0 + TORCH_ROW_CHUNK)
        b, l = _rows_bl(r0, r1, L, device)
        out[r0:r1] = _philox_normal_torch(seed, b, l, 0, D, STREAM_HIDDEN)
    return out


def _xi(xi, seed, B, L, D, device, dtype, backend):
    """ξ (R, D) in dtype: the given one, or the seed's hidden-noise stream."""
    if xi is not None:
        return xi.reshape(-1, D).to(dtype)
    return hidden_noise(seed, B, L, D, device, dtype, backend).reshape(-1, D)


def _hidden_fwd_torch(tokens, gamma, embed, chol, xi, seed):
    acc = acc_dtype(embed.dtype)
    B, L = tokens.shape
    D = embed.shape[1]
    x = _xi(xi, seed, B, L, D, embed.device, embed.dtype, "torch").to(acc)
    g = gamma.to(acc).repeat_interleave(L)[:, None]
    h = (1 - g) * (x @ chol.to(acc)) + g * embed[tokens.reshape(-1)].to(acc)
    return h.to(embed.dtype)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------
def _vocab_fwd_impl(tokens, gamma, embed, seed, n_valid, backend):
    tokens, gamma, embed = tokens.contiguous(), gamma.contiguous(), embed.contiguous()
    if backend == "triton":
        return interp_embed_vocab_fwd(tokens, gamma, embed, seed, n_valid)
    return _vocab_fwd_torch(tokens, gamma, embed, seed, n_valid)


def _vocab_bwd_impl(grad, tokens, gamma, embed, seed, n_valid, backend):
    grad, tokens, gamma, embed = grad.contiguous(), tokens.contiguous(), gamma.contiguous(), embed.contiguous()
    if backend == "triton":
        return interp_embed_vocab_bwd(grad, tokens, gamma, embed, seed, n_valid)
    return _vocab_bwd_torch(grad, tokens, gamma, embed, seed, n_valid)


def _hidden_fwd_impl(tokens, gamma, embed, chol, xi, seed, backend):
    tokens, gamma, embed, chol = tokens.contiguous(), gamma.contiguous(), embed.contiguous(), chol.contiguous()
    if backend == "triton":
        x = None if xi is None else xi.reshape(-1, embed.shape[1]).contiguous()
        return interp_embed_hidden_fwd(tokens, gamma, embed, chol, x, seed)
    return _hidden_fwd_torch(tokens, gamma, embed, chol, xi, seed)


def _hidden_bwd_impl(grad, tokens, gamma, embed, chol, xi, seed, need_chol_grad, backend):
    B, L = tokens.shape
    D = embed.shape[1]
    if backend == "triton":
        dE = embed_grad_rows_fwd(grad, tokens.contiguous(), gamma.contiguous(), embed)
    else:
        dE = _scatter_gather_grad(torch.zeros(embed.shape, device=embed.device, dtype=acc_dtype(embed.dtype)), grad,
                                  tokens, gamma).to(embed.dtype)
    if not need_chol_grad:
        return dE, torch.zeros(chol.shape, device=chol.device, dtype=chol.dtype)
    x = _xi(xi, seed, B, L, D, embed.device, chol.dtype, backend)
    gd = (grad.reshape(-1, D).to(acc_dtype(chol.dtype))
          * (1 - gamma.to(acc_dtype(chol.dtype)).repeat_interleave(L))[:, None]).to(chol.dtype)
    return dE, torch.mm(x.t(), gd)


@torch.library.custom_op("fmlm::interp_embed_vocab", mutates_args=())
def _vocab_op(tokens: torch.Tensor, gamma: torch.Tensor, embed: torch.Tensor, seed: int, n_valid: int,
              backend: str) -> torch.Tensor:
    """tokens (B, L) int64, gamma (B,), embed (Vp, D) → h (B·L, D) in embed's dtype (vocab noise from seed)."""
    return _vocab_fwd_impl(tokens, gamma, embed, seed, n_valid, backend)


@_vocab_op.register_fake
def _(tokens, gamma, embed, seed, n_valid, backend):
    return embed.new_empty(tokens.numel(), embed.shape[1])


@torch.library.custom_op("fmlm::interp_embed_vocab_backward", mutates_args=())
def _vocab_bwd_op(grad: torch.Tensor, tokens: torch.Tensor, gamma: torch.Tensor, embed: torch.Tensor, seed: int,
                  n_valid: int, backend: str) -> torch.Tensor:
    return _vocab_bwd_impl(grad, tokens, gamma, embed, seed, n_valid, backend)


@_vocab_bwd_op.register_fake
def _(grad, tokens, gamma, embed, seed, n_valid, backend):
    return _contiguous_like(embed)


@torch.library.custom_op("fmlm::interp_embed_hidden", mutates_args=())
def _hidden_op(tokens: torch.Tensor, gamma: torch.Tensor, embed: torch.Tensor, chol: torch.Tensor,
               xi: Optional[torch.Tensor], seed: int, backend: str) -> torch.Tensor:
    """h (B·L, D) = (1−γ)·ξ·C + γ·E[y]; chol (D, D) in embed's dtype; xi (B, L, D) or None (from seed)."""
    return _hidden_fwd_impl(tokens, gamma, embed, chol, xi, seed, backend)


@_hidden_op.register_fake
def _(tokens, gamma, embed, chol, xi, seed, backend):
    return embed.new_empty(tokens.numel(), embed.shape[1])


@torch.library.custom_op("fmlm::interp_embed_hidden_backward", mutates_args=())
def _hidden_bwd_op(grad: torch.Tensor, tokens: torch.Tensor, gamma: torch.Tensor, embed: torch.Tensor,
                   chol: torch.Tensor, xi: Optional[torch.Tensor], seed: int, need_chol_grad: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dE, dC): dE = per-token sum of γ·dh into rows y; dC = ξᵀ·((1−γ)·dh) (zeros when not needed)."""
    return _hidden_bwd_impl(grad, tokens, gamma, embed, chol, xi, seed, need_chol_grad, backend)


@_hidden_bwd_op.register_fake
def _(grad, tokens, gamma, embed, chol, xi, seed, need_chol_grad, backend):
    return _contiguous_like(embed), _contiguous_like(chol)


def _contiguous_like(x: torch.Tensor) -> torch.Tensor:
    """What the backward impls return: contiguous (empty_like would keep a transposed input's strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------
# Autograd: dE (and dC for the hidden op); tokens, gamma, xi and the seed are data.
# ---------------------------------------------------------------------------------------------
def _vocab_setup_context(ctx, inputs, output):
    tokens, gamma, embed, seed, n_valid, backend = inputs
    ctx.save_for_backward(tokens, gamma, embed)
    ctx.args = (seed, n_valid, backend)


def _vocab_backward(ctx, grad):
    tokens, gamma, embed = ctx.saved_tensors
    dE = torch.ops.fmlm.interp_embed_vocab_backward(grad, tokens, gamma, embed, *ctx.args)
    return None, None, dE, None, None, None


_vocab_op.register_autograd(_vocab_backward, setup_context=_vocab_setup_context)


def _hidden_setup_context(ctx, inputs, output):
    tokens, gamma, embed, chol, xi, seed, backend = inputs
    ctx.save_for_backward(tokens, gamma, embed, chol, xi)
    ctx.args = (seed, backend)


def _hidden_backward(ctx, grad):
    tokens, gamma, embed, chol, xi = ctx.saved_tensors
    seed, backend = ctx.args
    dE, dC = torch.ops.fmlm.interp_embed_hidden_backward(grad, tokens, gamma, embed, chol, xi, seed,
                                                         ctx.needs_input_grad[3], backend)
    return None, None, dE, (dC if ctx.needs_input_grad[3] else None), None, None, None


_hidden_op.register_autograd(_hidden_backward, setup_context=_hidden_setup_context)


class InterpEmbedVocabFn(torch.autograd.Function):
    """The eager path of fmlm::interp_embed_vocab: the registered ops cost ~0.1 ms of Python dispatch per call,
    comparable to the whole hidden-mode step, so eager calls skip them; torch.compile traces the ops."""

    @staticmethod
    def forward(ctx, tokens, gamma, embed, seed, n_valid, backend):
        ctx.save_for_backward(tokens, gamma, embed)
        ctx.args = (seed, n_valid, backend)
        return _vocab_fwd_impl(tokens, gamma, embed, seed, n_valid, backend)

    @staticmethod
    def backward(ctx, grad):
        tokens, gamma, embed = ctx.saved_tensors
        return None, None, _vocab_bwd_impl(grad, tokens, gamma, embed, *ctx.args), None, None, None


class InterpEmbedHiddenFn(torch.autograd.Function):
    """The eager path of fmlm::interp_embed_hidden (see InterpEmbedVocabFn)."""

    @staticmethod
    def forward(ctx, tokens, gamma, embed, chol, xi, seed, backend):
        ctx.save_for_backward(tokens, gamma, embed, chol, xi)
        ctx.args = (seed, backend)
        return _hidden_fwd_impl(tokens, gamma, embed, chol, xi, seed, backend)

    @staticmethod
    def backward(ctx, grad):
        tokens, gamma, embed, chol, xi = ctx.saved_tensors
        seed, backend = ctx.args
        dE, dC = _hidden_bwd_impl(grad, tokens, gamma, embed, chol, xi, seed, ctx.needs_input_grad[3], backend)
        return None, None, dE, (dC if ctx.needs_input_grad[3] else None), None, None, None


class _GramFn(torch.autograd.Function):
    """EᵀE with fp32 accumulation and output: on CUDA, 16-bit E goes through cuBLAS with an fp32 output
    (torch.mm(..., out_dtype=float32)) rather than an fp32 GEMM on upcast copies; dE = E·(dG + dGᵀ).

    The backward keeps S = dG + dGᵀ in fp32 precision: through the Cholesky factor dG grows with EᵀE's condition
    number while dE stays of E's size, so rounding S to E's 16-bit dtype cost up to 6× the error budget at
    V ≈ D (fuzzing, fp16). On CUDA S = S_hi + S_lo, both 16-bit, in two cuBLAS GEMMs with fp32 outputs (twice
    the backward's V·D² flops, ~0.1 ms at V = 50258, D = 768; no upcast copy of E); elsewhere one GEMM in E's
    accumulation dtype."""

    @staticmethod
    def forward(ctx, E):
        ctx.save_for_backward(E)
        if E.is_cuda and E.dtype in (torch.float16, torch.bfloat16):
            try:
                return torch.mm(E.t(), E, out_dtype=torch.float32)
            except (TypeError, RuntimeError):      # torch without mm(out_dtype=)
                pass
        acc = acc_dtype(E.dtype)
        return E.t().to(acc) @ E.to(acc)

    @staticmethod
    def backward(ctx, dG):
        (E,) = ctx.saved_tensors
        S = dG + dG.t()
        if E.is_cuda and E.dtype in (torch.float16, torch.bfloat16) and addmm_fp32_ok(E.device):
            hi = S.to(E.dtype)
            lo = (S - hi.to(S.dtype)).to(E.dtype)
            try:
                out = torch.mm(E, hi, out_dtype=torch.float32)
                return torch.addmm(out, E, lo, out_dtype=torch.float32, out=out).to(E.dtype)
            except (TypeError, RuntimeError):      # torch without mm(out_dtype=)
                pass
        acc = acc_dtype(E.dtype)
        return (E.to(acc) @ S.to(acc)).to(E.dtype)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
def embed_cholesky(embed: torch.Tensor, n_valid: Optional[int] = None) -> torch.Tensor:
    """C = chol(EᵀE)ᵀ (D×D upper triangular, fp32; fp64 for fp64 E) over the first n_valid rows, differentiable
    w.r.t. embed. Sync-free (cholesky_ex): a singular EᵀE (n_valid < D) gives NaN; pass `chol` then
    (engine.sampling.hidden_noise_factor has a symmetric-square-root fallback)."""
    E = embed if n_valid is None else embed[:n_valid]
    L, _ = torch.linalg.cholesky_ex(_GramFn.apply(E))
    return L.mT


def vocab_noise(seed: int, B: int, L: int, V: int, device=None, dtype: torch.dtype = torch.float32,
                backend: str = "auto") -> torch.Tensor:
    """The V-space noise ε (B, L, V) that interp_embed(noise='vocab', seed=seed) uses, materialized (tests,
    parity with the reference). Element (b, l, v) depends only on (seed, b, l, v), not on B, L or V."""
    device = torch.device(device or "cpu")
    _check_seed(seed)
    be = resolve(backend, device)
    if be == "triton":
        out = torch.empty(B * L, V, device=device, dtype=dtype)
        return philox_normal_fwd(out, seed, L, STREAM_VOCAB).view(B, L, V)
    out = torch.empty(B * L, V, device=device, dtype=dtype)
    for r0 in range(0, B * L, TORCH_ROW_CHUNK):
        r1 = min(B * L, r0 + TORCH_ROW_CHUNK)
        b, l = _rows_bl(r0, r1, L, device)
        out[r0:r1] = _philox_normal_torch(seed, b, l, 0, V, STREAM_VOCAB)
    return out.view(B, L, V)


def hidden_noise(seed: int, B: int, L: int, D: int, device=None, dtype: torch.dtype = torch.float32,
                 backend: str = "auto") -> torch.Tensor:
    """ξ (B, L, D) ~ N(0, I) that interp_embed(noise='hidden', seed=seed) draws (Philox stream 1)."""
    device = torch.device(device or "cpu")
    _check_seed(seed)
    be = resolve(backend, device)
    if be == "triton":
        out = torch.empty(B * L, D, device=device, dtype=dtype)
        return philox_normal_fwd(out, seed, L, STREAM_HIDDEN).view(B, L, D)
    return _hidden_noise_torch(seed, B, L, D, device).to(dtype).view(B, L, D)


def _check_seed(seed):
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")


def interp_embed(tokens: torch.Tensor, gamma: torch.Tensor, embed: torch.Tensor, noise: str = "hidden",
                 seed: int = 0, chol: Optional[torch.Tensor] = None, xi: Optional[torch.Tensor] = None,
                 n_valid: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """h = (1−γ)·ε·E + γ·E[y] of shape (B, L, D) in embed's dtype; tokens (B, L) int64, gamma (B,).

    noise="vocab": ε ~ N(0, I_V) from `seed` (see vocab_noise), over the first n_valid rows of embed.
    noise="hidden": ε·E drawn as ξ·C; ξ = xi (B, L, D) or hidden_noise(seed); C = chol (D, D) or
    embed_cholesky(embed, n_valid) (then differentiable through the factor). Gradient w.r.t. embed (and chol)."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if tokens.dim() != 2 or gamma.shape != (tokens.shape[0],) or embed.dim() != 2:
        raise ValueError(f"expected tokens (B, L), gamma (B,), embed (V, D); got {tuple(tokens.shape)}, "
                         f"{tuple(gamma.shape)}, {tuple(embed.shape)}")
    V = valid_rows(n_valid, embed.shape[0])
    _check_seed(seed)
    B, L = tokens.shape
    D = embed.shape[1]
    if xi is not None and (noise != "hidden" or xi.shape != (B, L, D)):
        raise ValueError(f"xi must have shape {(B, L, D)} and needs noise='hidden'")
    if chol is not None and chol.shape != (D, D):
        raise ValueError(f"chol must be ({D}, {D}), got {tuple(chol.shape)}")
    check_indices(tokens, V, "tokens")
    be = resolve(backend, embed.device)
    if noise == "vocab":
        if be == "reference":
            eps = vocab_noise(seed, B, L, V, embed.device, embed.dtype, "torch")
            return ref.interp_embed_ref(tokens, gamma, embed[:V], eps)
        args = (tokens, gamma, embed, seed, V, be)
        h = (torch.ops.fmlm.interp_embed_vocab(*args) if torch.compiler.is_compiling()
             else InterpEmbedVocabFn.apply(*args))
        return h.view(B, L, D)
    C = embed_cholesky(embed, V) if chol is None else chol
    if be == "reference":
        x = xi if xi is not None else hidden_noise(seed, B, L, D, embed.device, embed.dtype, "torch")
        return ref.interp_embed_hidden_ref(tokens, gamma, embed, x, C.to(embed.dtype))
    args = (tokens, gamma, embed, C.to(embed.dtype), None if xi is None else xi.detach(), seed, be)
    h = (torch.ops.fmlm.interp_embed_hidden(*args) if torch.compiler.is_compiling()
         else InterpEmbedHiddenFn.apply(*args))
    return h.view(B, L, D)


# ---------------------------------------------------------------------------------------------
# Compile-only specs (bench/compile_check.py): the real configs, bf16, D = 768, for sm_90a
# ---------------------------------------------------------------------------------------------
def _spec(name, fn, sig, const, cfg) -> dict:
    """attrs: the 16-divisibility the JIT infers at run time for pointers, strides and D."""
    div = [k for k in sig if k.endswith("_ptr") or k.startswith("stride") or k == "D"]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div}
    return dict(name=name, fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                attrs=attrs, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))


def compile_specs(dtype: str = "bf16", D: int = 768) -> list[dict]:
    """Kernels at the real configs: triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget("cuda", 90, 32), options=dict(num_warps=..., num_stages=...)). The bf16 list ends with the
    fp32 forms of the GEMM kernels (the trainer passes the model's fp32 embedding), named '…[fp32]'."""
    if not HAS_TRITON:
        return []
    specs = _specs(dtype, D)
    if dtype == "bf16":
        gemms = ("interp_embed_vocab_fwd", "interp_embed_vocab_bwd", "interp_embed_hidden_fwd")
        specs += [{**sp, "name": f"{sp['name']}[fp32]"} for sp in _specs("fp32", D) if sp["name"] in gemms]
    return specs


def _specs(dtype: str, D: int) -> list[dict]:
    prec = "ieee" if dtype == "fp32" else "tf32"
    c = VOCAB_FWD_CONFIG_FP32 if dtype == "fp32" else VOCAB_FWD_CONFIG
    specs = [_spec("interp_embed_vocab_fwd", _interp_embed_vocab_fwd_kernel,
                   dict(tok_ptr="*i64", gamma_ptr="*fp32", e_ptr=f"*{dtype}", out_ptr=f"*{dtype}", seed="i64",
                        R="i32", L="i32", V="i32", D="i32", stride_e="i32", stride_o="i32"),
                   dict(PREC=prec, BLOCK_R=c["BLOCK_R"], BLOCK_V=c["BLOCK_V"], BLOCK_D=c["BLOCK_D"], FAST=True), c)]
    c = VOCAB_BWD_CONFIG_FP32 if dtype == "fp32" else VOCAB_BWD_CONFIG
    specs.append(_spec("interp_embed_vocab_bwd", _interp_embed_vocab_bwd_kernel,
                       dict(gamma_ptr="*fp32", dh_ptr=f"*{dtype}", de_ptr="*fp32", seed="i64", R="i32", L="i32",
                            V="i32", D="i32", stride_dh="i32", stride_de="i32"),
                       dict(PREC=prec, BLOCK_R=c["BLOCK_R"], BLOCK_V=c["BLOCK_V"], BLOCK_D=c["BLOCK_D"], FAST=True), c))
    hsig = dict(tok_ptr="*i64", gamma_ptr="*fp32", e_ptr=f"*{dtype}", c_ptr=f"*{dtype}", xi_ptr=f"*{dtype}",
                out_ptr=f"*{dtype}", seed="i64", R="i32", L="i32", D="i32", stride_e="i32", stride_c="i32",
                stride_xi="i32", stride_o="i32")
    c = HIDDEN_FWD_CONFIG
    for xi_given in (False, True):
        specs.append(_spec(f"interp_embed_hidden_fwd{'_xi' if xi_given else ''}", _interp_embed_hidden_fwd_kernel,
                           hsig, dict(XI_GIVEN=xi_given, PREC=prec, BLOCK_R=c["BLOCK_R"], BLOCK_K=c["BLOCK_K"],
                                      BLOCK_D=c["BLOCK_D"], FAST=True), c))
    for label, c in HIDDEN_FWD_VARIANTS.items():
        bd = max(16, min(c["BLOCK_D"], 1 << (D - 1).bit_length()))       # as _cfg clamps it
        specs.append(_spec(f"interp_embed_hidden_fwd[{label.split(': ')[1]}]", _interp_embed_hidden_fwd_kernel,
                           hsig, dict(XI_GIVEN=False, PREC=prec, BLOCK_R=c["BLOCK_R"], BLOCK_K=c["BLOCK_K"],
                                      BLOCK_D=bd, FAST=True), c))
    c = EMBED_GRAD_CONFIG
    specs.append(_spec("embed_grad_pieces", _embed_grad_pieces_kernel,
                       dict(order_ptr="*i64", stok_ptr="*i64", gamma_ptr="*fp32", dh_ptr=f"*{dtype}",
                            de_ptr=f"*{dtype}", head_ptr="*fp32", tail_ptr="*fp32", R="i32", L="i32", D="i32",
                            stride_dh="i32", stride_de="i32", stride_p="i32"),
                       dict(BLOCK_C=c["BLOCK_C"], BLOCK_D=c["BLOCK_D"]), c))
    specs.append(_spec("embed_grad_carry", _embed_grad_carry_kernel,
                       dict(stok_ptr="*i64", de_ptr=f"*{dtype}", head_ptr="*fp32", tail_ptr="*fp32", R="i32",
                            D="i32", stride_de="i32", stride_p="i32"),
                       dict(BLOCK_C=c["BLOCK_C"], BLOCK_K=c["BLOCK_K"], BLOCK_D=c["BLOCK_D"]), c))
    c = NOISE_CONFIG
    specs.append(_spec("philox_normal", _philox_normal_kernel,
                       dict(out_ptr=f"*{dtype}", seed="i64", R="i32", L="i32", J="i32", stride_o="i32"),
                       dict(STREAM=STREAM_VOCAB, BLOCK_R=c["BLOCK_R"], BLOCK_J=c["BLOCK_J"], FAST=True), c))
    return specs
