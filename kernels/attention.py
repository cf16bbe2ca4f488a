"""softcap_attention: non-causal multi-head attention with the tanh softcap on the scaled scores, rotary on load.

Reference: fmlm.kernels.reference.attention_ref (after reference.apply_rotary_ref on q and k), i.e.
    s = cap·tanh((q_rot·k_rotᵀ/√d)/cap),  o = softmax(s)·v
as flash_attn(softcap=50) in the published DiT. Plain SDPA has no softcap: it is a different function and
is never used here as if it were this one.

Backends:
- 'triton': a flash-attention forward (online softmax over key tiles, fp32 accumulators) that rotates q and
  k as it loads them (rotate-half, cos/sin tables rounded to q's dtype as in the reference), so the qkv
  projection output is read once and no rotated copy is written. Opt-in candidates (rotary_impl, not yet
  timed; bench/bench_attention.py times them beside the default): 'prepass' / 'prepass_k' rotate q and k
  (or k only) once in a separate pass (rotary_qk) so the key loop reads pre-rotated keys. On CUDA the
  tanh is the sm_75+ `tanh.approx.f32` (max rel. error 2^-11, below the bf16 rounding of q and k that
  precedes it); under TRITON_INTERPRET=1 an exact exp2 form. 'prepass_tma': 'prepass' with the attention
  kernel's Q, K, V tiles read through Hopper TMA host descriptors (_softcap_attention_tma_fwd_kernel, sm_90+,
  16-bit inputs; the 'prepass' pointer kernel where a descriptor is impossible, see tma_usable).
- 'flex': torch FlexAttention with a tanh score_mod (compiled on CUDA). DESIGN.md §3 measured it at 0.94 ms
  per layer at B=32, L=1024 on an H100; the fallback when triton is missing.
- 'reference': attention_ref, materializes (B, H, L, L) scores.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import reference as ref
from ._backend import (interpreting, pdl_active, pdl_launch_kwargs, tma_device_ok, triton_available,
                       with_default_constexprs)

BACKENDS = ("auto", "reference", "triton", "flex")
LOG2E = 1.4426950408889634

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no triton, or triton < 3.4 (no host tensor descriptors): 'prepass_tma' runs 'prepass'
    TensorDescriptor = None

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap_scores_log2(s, n_ok, qk_scale, softcap, HAS_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
                             EVEN_N: tl.constexpr):
        """Raw q·kᵀ tile → capped scores in log2 units (cap·tanh(s·scale/cap)·log2 e), key columns ≥ L at
        −inf: shared by the pointer and the TMA kernels so both run the same arithmetic."""
        if HAS_CAP:
            y = s * (qk_scale / softcap)
            if FAST_TANH:
                t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [y], dtype=tl.float32,
                                              is_pure=True, pack=1)
            else:
                # tanh(y) = 1 − 2/(e^{2y}+1) (exact limits ±1 where exp2 over/underflows) loses ~1e-7
                # absolutely to cancellation near 0; there the Taylor series to y^13 (error < 3e-11 for
                # |y| < 0.3) keeps fp32 scores within a few ulps of torch.tanh.
                y2 = y * y
                t_small = y * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
                    -0.05396825396825397 + y2 * (0.021869488536155203 + y2 * (
                        -0.008863235529902197 + y2 * 0.003592128036572481))))))
                t_big = 1.0 - 2.0 / (tl.exp2(y * (2.0 * 1.4426950408889634)) + 1.0)
                t = tl.where(tl.abs(y) < 0.3, t_small, t_big)
            s = t * (softcap * 1.4426950408889634)
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        return s

    @triton.jit
    def _exp2_poly(x, DEG: tl.constexpr):
        """2^x on the FMA/ALU pipes instead of the MUFU unit (the poly_exp2 candidate, see POLY_COEFFS): x = j + f
        with j = round(x) (the 1.5·2^23 trick leaves j in the low mantissa bits of x + 1.5·2^23), f in [−½, ½],
        2^f by a minimax polynomial in f (POLY_COEFFS[DEG]), 2^j added to the result's exponent field as the
        integer j·2^23. Valid where 2^x is a normal fp32 number (x in [−125, 127]): the fixed-shift softmax keeps
        its exponents in (40 − 2c, 40], c = cap·log2 e (fixed_shift_log2)."""
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        if DEG == 3:
            p = 0.9999281167984009 + f * (0.6932609677314758 + f * (0.24261033535003662 + f * 0.05517134442925453))
        else:
            p = 1.0000001192092896 + f * (0.6931469440460205 + f * (0.24022120237350464 + f * (
                0.05550713092088699 + f * (0.009675533510744572 + f * 0.0013276446843519807))))
        bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _exp2_poly_kernel(X, Y, n, DEG: tl.constexpr, BLOCK: tl.constexpr):
        """exp2_poly's elementwise kernel (the polynomial's own tests)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(Y + offs, _exp2_poly(tl.load(X + offs, mask=ok, other=0.0), DEG), mask=ok)

    @triton.jit
    def _kv_split_combine_kernel(PACC, PL, O, stride_ob, stride_ol, stride_oh, L, H, split_rows,
                                 N_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False):
        """o = Σ_s acc_s / Σ_s l_s over the key splits of _softcap_attention_fwd_kernel(KV_SPLIT), in split order,
        for BLOCK_R rows of (b, position, head), stored in O's dtype."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < split_rows
        offs_d = tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        r64 = rows.to(tl.int64)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        l = tl.zeros([BLOCK_R], dtype=tl.float32)
        for s in tl.static_range(N_SPLIT):
            acc += tl.load(PACC + (r64 + s * split_rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
            l += tl.load(PL + r64 + s * split_rows, mask=r_ok, other=1.0)
        h = rows % H
        bm = rows // H
        o_off = (bm // L).to(tl.int64) * stride_ob + (bm % L) * stride_ol + h * stride_oh
        tl.store(O + o_off[:, None] + offs_d[None, :], (acc / l[:, None]).to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _softcap_attention_fwd_kernel(
        Q, K, V, O, COS, SIN,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh,
        stride_cl,
        L, H, qk_scale, softcap, shift_log2,
        WO, P, stride_won, stride_ph, stride_pb, stride_pl, DM,
        PACC, PL, kv_chunk, split_rows,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROTARY_Q: tl.constexpr, ROTARY_K: tl.constexpr, HAS_CAP: tl.constexpr, FAST_TANH: tl.constexpr, EVEN_N: tl.constexpr,
        IEEE: tl.constexpr, USE_PDL: tl.constexpr = False, FIXED_SHIFT: tl.constexpr = False,
        OUT_PROJ: tl.constexpr = False, BLOCK_O: tl.constexpr = 64, POLY_EXP2: tl.constexpr = 0,
        KV_SPLIT: tl.constexpr = False,
    ):
        """One (query block, batch·head) program. OUT_PROJ: instead of storing its o tile, the program applies
        its head's share of the output projection, o_h·W_O[:, h·d:(h+1)·d]ᵀ (W_O (DM, H·d), DM columns in
        BLOCK_O chunks), and stores that fp32 (BLOCK_M, DM) tile as partial h of a (H, B, L, DM) buffer: a
        split-K over heads that gate_residual sums in head order (softcap_attention_out_proj_fwd).
        KV_SPLIT (with FIXED_SHIFT): program (·, ·, s) runs the keys [s·kv_chunk, (s+1)·kv_chunk) only and stores
        its unnormalized fp32 acc and l_i as split s of PACC (S, B·L·H, d) and PL (S, B·L·H) (split_rows = B·L·H);
        with a constant shift the splits add up without rescaling (_kv_split_combine_kernel)."""
        if USE_PDL:          # programmatic dependent launch: the predecessor's writes first (_backend.pdl_launches)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
        # Rotary (rotate-half) splits the head dim into halves x1, x2: (x1·c − x2·s, x2·c + x1·s). With halves
        # of ≥ 16 columns the kernel keeps them apart (contiguous, vectorized, pipelined loads) and takes
        # q·kᵀ as q1·k1ᵀ + q2·k2ᵀ; narrower heads (tests) rotate one full tile through a partner gather.
        # ROTARY_Q/ROTARY_K: rotate q/k on load; the measured default rotates both. ROTARY_K=False with
        # ROTARY_Q=True is the 'prepass_k' candidate (K rotated once by _rotary_qk_fwd_kernel, read as-is).
        HALF: tl.constexpr = HEAD_DIM // 2
        SPLIT: tl.constexpr = ROTARY_Q and (HALF >= 16) and (HEAD_DIM == BLOCK_D)
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        offs_h = tl.arange(0, HALF if SPLIT else 16)
        if SPLIT:
            qp = q_base + offs_m[:, None] * stride_ql + offs_h[None, :]
            cp = offs_m[:, None] * stride_cl + offs_h[None, :]
            q1 = tl.load(qp, mask=m_ok[:, None], other=0.0).to(tl.float32)
            q2 = tl.load(qp + HALF, mask=m_ok[:, None], other=0.0).to(tl.float32)
            cq = tl.load(COS + cp, mask=m_ok[:, None], other=0.0).to(tl.float32)
            sq = tl.load(SIN + cp, mask=m_ok[:, None], other=0.0).to(tl.float32)
            qa = (q1 * cq - q2 * sq).to(Q.dtype.element_ty)
            qb = (q2 * cq + q1 * sq).to(Q.dtype.element_ty)
        else:
            q_mask = m_ok[:, None] & d_ok[None, :]
            qa = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_mask, other=0.0)
            if ROTARY_Q or ROTARY_K:
                first = offs_d < HALF
                partner = tl.where(first, offs_d + HALF, offs_d - HALF)
                freq = tl.where(first, offs_d, offs_d - HALF)
                sign = tl.where(first, -1.0, 1.0)
            if ROTARY_Q:
                q_p = tl.load(q_base + offs_m[:, None] * stride_ql + partner[None, :], mask=q_mask, other=0.0)
                cq = tl.load(COS + offs_m[:, None] * stride_cl + freq[None, :], mask=q_mask, other=0.0)
                sq = tl.load(SIN + offs_m[:, None] * stride_cl + freq[None, :], mask=q_mask, other=0.0)
                qa = (qa.to(tl.float32) * cq.to(tl.float32)
                      + sign[None, :] * q_p.to(tl.float32) * sq.to(tl.float32)).to(Q.dtype.element_ty)
            qb = qa          # unused

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if KV_SPLIT:
            n_lo = tl.program_id(2) * kv_chunk
            n_hi = tl.minimum(n_lo + kv_chunk, L)
        else:
            n_lo = 0
            n_hi = L
        for start_n in range(n_lo, n_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < L
            row_mask = n_ok[:, None]     # masked loads still pipeline (cp.async with zero fill)
            if SPLIT:
                kp = k_base + offs_n[:, None] * stride_kl + offs_h[None, :]
                kcp = offs_n[:, None] * stride_cl + offs_h[None, :]
                if ROTARY_K:
                    k1 = tl.load(kp, mask=row_mask, other=0.0).to(tl.float32)
                    k2 = tl.load(kp + HALF, mask=row_mask, other=0.0).to(tl.float32)
                    ck = tl.load(COS + kcp, mask=row_mask, other=0.0).to(tl.float32)
                    sk = tl.load(SIN + kcp, mask=row_mask, other=0.0).to(tl.float32)
                    ka = (k1 * ck - k2 * sk).to(K.dtype.element_ty)
                    kb = (k2 * ck + k1 * sk).to(K.dtype.element_ty)
                else:       # already rotated: the halves go straight to the dots
                    ka = tl.load(kp, mask=row_mask, other=0.0)
                    kb = tl.load(kp + HALF, mask=row_mask, other=0.0)
                if IEEE:
                    s = tl.dot(qa, tl.trans(ka), input_precision="ieee")
                    s = tl.dot(qb, tl.trans(kb), s, input_precision="ieee")
                else:
                    s = tl.dot(qa, tl.trans(ka))
                    s = tl.dot(qb, tl.trans(kb), s)
            else:
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
                if ROTARY_K:
                    k_p = tl.load(k_base + offs_n[:, None] * stride_kl + partner[None, :], mask=kv_mask, other=0.0)
                    ck = tl.load(COS + offs_n[:, None] * stride_cl + freq[None, :], mask=kv_mask, other=0.0)
                    sk = tl.load(SIN + offs_n[:, None] * stride_cl + freq[None, :], mask=kv_mask, other=0.0)
                    k = (k.to(tl.float32) * ck.to(tl.float32)
                         + sign[None, :] * k_p.to(tl.float32) * sk.to(tl.float32)).to(K.dtype.element_ty)
                if IEEE:
                    s = tl.dot(qa, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(qa, tl.trans(k))
            s = _softcap_scores_log2(s, n_ok, qk_scale, softcap, HAS_CAP, FAST_TANH, EVEN_N)
            if FIXED_SHIFT:
                # capped scores lie in (−cap, cap)·log2 e: a constant shift keeps 2^(s − shift) normal and finite
                # (launcher: fixed_shift_log2), so no running max, no rescale of acc and l_i
                if POLY_EXP2:
                    # the odd key columns' 2^x by the degree-POLY_EXP2 polynomial on the FMA pipes (_exp2_poly), the
                    # even ones on the MUFU unit: the split follows the MMA layout's register pairs (no shuffle)
                    x = s - shift_log2
                    if not EVEN_N:   # key columns ≥ L are −inf: kept in the polynomial's range, then zeroed
                        x = tl.maximum(x, -125.0)
                    xe, xo = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_N // 2, 2)))
                    p = tl.reshape(tl.join(tl.exp2(xe), _exp2_poly(xo, POLY_EXP2)), (BLOCK_M, BLOCK_N))
                    if not EVEN_N:
                        p = tl.where(n_ok[None, :], p, 0.0)
                else:
                    p = tl.exp2(s - shift_log2)
                l_i += tl.sum(p, 1)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                m_i = m_new
            v_ptr = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
            if EVEN_N and EVEN_D:
                v = tl.load(v_ptr)
            else:
                v = tl.load(v_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(V.dtype.element_ty), v, acc)
        if KV_SPLIT:
            r = (b.to(tl.int64) * L + offs_m) * H + h + tl.program_id(2).to(tl.int64) * split_rows
            tl.store(PL + r, l_i, mask=m_ok)
            tl.store(PACC + r[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
            return
        o = acc / l_i[:, None]
        if OUT_PROJ:
            # rounded to W_O's dtype as the unfused path's stored attention output is, then this head's partial
            # of att·W_Oᵀ with an fp32 accumulator
            ob = o.to(WO.dtype.element_ty)
            p_base = P + h.to(tl.int64) * stride_ph + b.to(tl.int64) * stride_pb + offs_m[:, None] * stride_pl
            w_base = WO + h * HEAD_DIM + offs_d[None, :]
            for n0 in range(0, DM, BLOCK_O):
                offs_o = n0 + tl.arange(0, BLOCK_O)
                o_ok = offs_o < DM
                w = tl.load(w_base + offs_o[:, None] * stride_won, mask=o_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    part = tl.dot(ob, tl.trans(w), input_precision="ieee")
                else:
                    part = tl.dot(ob, tl.trans(w))
                tl.store(p_base + offs_o[None, :], part, mask=m_ok[:, None] & o_ok[None, :])
        else:
            o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
            tl.store(o_ptr, o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _softcap_attention_tma_fwd_kernel(
        q_desc, k_desc, v_desc, O,
        stride_ob, stride_ol, stride_oh,
        L, H, qk_scale, softcap,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_CAP: tl.constexpr, FAST_TANH: tl.constexpr, EVEN_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        """The 'prepass_tma' candidate: the no-rotary path of _softcap_attention_fwd_kernel (q, k already rotated
        by rotary_qk) with the Q, K and V tiles read through host tensor descriptors (Hopper TMA: one bulk
        tensor copy per tile into shared memory, which wgmma reads; no per-element address or mask math).
        3-D descriptors so a tile never crosses into the next head: q_desc/k_desc cover the rotary_qk buffer
        as (B·H, L, d) with boxes [1, BLOCK_M | BLOCK_N, d] at (b·H + h, row, 0); v_desc covers the strided v
        view of the qkv buffer as (B, L, H·d) (row stride 3·H·d) with box [1, BLOCK_N, d] at (b, row, h·d).
        Rows ≥ L are zero-filled, as the pointer kernel's masked loads (other=0) do, so the dots, their order
        and the −inf masking of key columns ≥ L are the pointer kernel's (a zero K row scores 0, not −inf)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = q_desc.load([pid_bh, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            n_ok = start_n + tl.arange(0, BLOCK_N) < L
            k = k_desc.load([pid_bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = _softcap_scores_log2(s, n_ok, qk_scale, softcap, HAS_CAP, FAST_TANH, EVEN_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = v_desc.load([b, start_n, h * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        o = acc / l_i[:, None]
        o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
        tl.store(o_ptr, o.to(O.dtype.element_ty), mask=(offs_m < L)[:, None])

    @triton.jit
    def _rotary_qk_fwd_kernel(
        Q, K, QO, KO, COS, SIN,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_ob, stride_ol, stride_oh,
        stride_cl,
        L, H,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_L: tl.constexpr, ROTATE_Q: tl.constexpr,
    ):
        """The 'prepass' candidate: rotate-half rotary on BLOCK_L positions of one (batch, head) of k (and q
        when ROTATE_Q), read from the strided qkv views, written to QO/KO (same strides, e.g. (B, H, L, d)
        buffers). Same arithmetic as the attention kernel's on-load rotation: fp32 from tables in x's dtype,
        one rounding to the output dtype."""
        pid_l = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_c = tl.arange(0, BLOCK_HALF)
        mask = (offs_l < L)[:, None] & (offs_c < HALF)[None, :]
        cp = offs_l[:, None] * stride_cl + offs_c[None, :]
        c = tl.load(COS + cp, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + cp, mask=mask, other=0.0).to(tl.float32)
        o_off = b * stride_ob + h * stride_oh + offs_l[:, None] * stride_ol + offs_c[None, :]
        kp = K + b * stride_kb + h * stride_kh + offs_l[:, None] * stride_kl + offs_c[None, :]
        k1 = tl.load(kp, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(KO + o_off, (k1 * c - k2 * s).to(KO.dtype.element_ty), mask=mask)
        tl.store(KO + o_off + HALF, (k2 * c + k1 * s).to(KO.dtype.element_ty), mask=mask)
        if ROTATE_Q:
            qp = Q + b * stride_qb + h * stride_qh + offs_l[:, None] * stride_ql + offs_c[None, :]
            q1 = tl.load(qp, mask=mask, other=0.0).to(tl.float32)
            q2 = tl.load(qp + HALF, mask=mask, other=0.0).to(tl.float32)
            tl.store(QO + o_off, (q1 * c - q2 * s).to(QO.dtype.element_ty), mask=mask)
            tl.store(QO + o_off + HALF, (q2 * c + q1 * s).to(QO.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(B: int, H: int, L: int, d: int, device: torch.device, kv_split: int = 1) -> dict:
    """Fixed configs (no autotuning): the largest query tile that still fills the GPU twice over, so B=1
    shapes (12 heads × 1 tile at L=128) do not leave most SMs idle; kv_split programs per query tile count."""
    if device.type != "cuda":          # interpreter: few, small programs
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    cap_m = max(16, triton.next_power_of_2(L))
    block_m = 16
    for bm in (128, 64, 32):
        if bm <= cap_m and B * H * triton.cdiv(L, bm) * kv_split >= 2 * n_sm:
            block_m = bm
            break
    block_n = 64 if L > 32 else max(16, triton.next_power_of_2(L))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m == 128 else 4,
                num_stages=3 if d <= 64 else 2)


def _check(q, k, v, cos, sin):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, L, H, d) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    if cos is not None:
        L, d = q.shape[1], q.shape[3]
        if d % 2 or cos.shape != (L, d // 2) or sin.shape != cos.shape:
            raise ValueError(f"cos/sin must be (L, d/2) = ({L}, {d // 2}), got {tuple(cos.shape)}")


def fixed_shift_log2(softcap: Optional[float]) -> Optional[float]:
    """The constant of the fixed-shift softmax (config {"fixed_shift": True}), or None where it cannot
    apply. Capped scores in log2 units lie in (−c, c), c = cap·log2 e; with p = 2^(s − (c − 40)) every p lies
    in (2^(40 − 2c), 2^40]: for cap ≤ 57 that is above 2^−126 (fp32 and bf16 stay normal) and a sum over 2^20
    keys stays below 2^60, so the online softmax's running max and its rescaling of acc and l_i (one max
    reduction, one exp2 and a multiply of the output tile per key tile) can go. Relative precision is the
    same as with the max subtracted. bf16 and fp32 only: p is cast to V's dtype for the P·V dot, and fp16's
    range cannot hold it (the launcher keeps the online softmax for fp16). Compile-only evidence (sm_90a, m128
    tile, rotary on load): PTX max.f32 36 → 0, shfl 8 → 4, mul.f32 145 → 81, ex2 34 → 32, 1809 → 1659 lines.
    Measured on one H100 (bench_attention, 2026-11-27 run5): 1.14x the online softmax at OWT B=32, 1.07x at
    OWT B=1, 1.06x at LM1B B=1, 1.01x at LM1B B=512; the engine's trunk uses it by default
    (engine/model.py _fast_block attn_fixed_shift), this op's own default stays the online softmax."""
    if not softcap or softcap > 57.0:
        return None
    return softcap * 1.4426950408889634 - 40.0


# 2^f ≈ Σ c_i f^i on f in [−½, ½], minimax in relative error (Lawson-weighted least squares, coefficients rounded to
# fp32): degree 3, max rel. error 7.5e-5 (for 16-bit inputs, whose p is rounded to 2^-9 for the P·V dot anyway);
# degree 5, 2.4e-7 evaluated in fp32 (fp32 inputs). _exp2_poly spells the same numbers (a test holds them equal).
# Why (the opt-in poly_exp2 candidate, unmeasured): at d = 64 a score costs 256 tensor-core FLOPs (~0.06 SM clock at
# the bf16 peak) but two MUFU ops, tanh and exp2, at 16 per SM clock (0.125 clock): by napkin the MUFU unit bounds
# the kernel at ~0.22 ms per layer at OWT B=32 (0.45 measured in the 2026-11-27 run5 profile). The polynomial costs
# ~7 issue slots per score (3 FADD, 3 FFMA, 1 LEA in the sm_90a SASS), a MUFU op 8 clocks of its SM sub-partition's
# pipe per warp, so the polynomial takes half the columns. Main-loop SASS per warp and key tile at the m128 tile
# (32 scores per thread; triton 3.7.1), instructions issued / MUFU pipe clocks (64 MUFU × 8 before):
#   rotary on load:           389 / 512  ->  half by polynomial 492 / 384  (all by polynomial 579 / 256)
#   no rotary ('prepass'):    281 / 512  ->  half by polynomial 388 / 384  (all by polynomial 474 / 256)
# i.e. the bound per tile falls ~4 % with rotary on load and ~24 % with the 'prepass' kernel; at the m64 batch-1
# tile (rotary on load: 506 / 512) the polynomial adds issue slots and cannot help. Whether the kernel sits at that
# bound (the profile says it runs at twice it) is for the benchmark to say.
POLY_COEFFS = {3: (0.9999281167984009, 0.6932609677314758, 0.24261033535003662, 0.05517134442925453),
               5: (1.0000001192092896, 0.6931469440460205, 0.24022120237350464, 0.05550713092088699,
                   0.009675533510744572, 0.0013276446843519807)}


def poly_degree(dtype: torch.dtype) -> int:
    """The polynomial degree the poly_exp2 softmax uses for inputs of this dtype."""
    return 5 if dtype == torch.float32 else 3


def exp2_poly(x: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """2^x for an fp32 tensor x in [−125, 127] by the poly_exp2 softmax's arithmetic (_exp2_poly), one Triton
    launch: the polynomial on its own, for tests."""
    if degree not in POLY_COEFFS:
        raise ValueError(f"degree must be one of {tuple(POLY_COEFFS)}, got {degree}")
    if x.dtype != torch.float32:
        raise TypeError(f"exp2_poly takes fp32, got {x.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    block = 1024
    _exp2_poly_kernel[(triton.cdiv(n, block),)](x, y, n, DEG=degree, BLOCK=block, num_warps=4)
    return y


def softcap_attention_fwd(q, k, v, softcap: Optional[float], cos=None, sin=None, out=None,
                          block_m: Optional[int] = None, block_n: Optional[int] = None,
                          k_rotated: bool = False, config: Optional[dict] = None) -> torch.Tensor:
    """Triton launcher. q, k, v (B, L, H, d) with unit stride on d (views into a (B, L, 3, H, d) qkv buffer
    are fine); cos/sin (L, d/2), used in q's dtype. Returns (B, L, H·d) in q's dtype. k_rotated: k was
    already rotated (rotary_qk) and only q is rotated on load. config: overrides of _config's BLOCK_M,
    BLOCK_N, num_warps, num_stages (the benchmark's sweep), and "fixed_shift": True for the opt-in softmax
    without a running max (fixed_shift_log2; ignored where the cap does not allow it), with "poly_exp2": True
    its 2^x on the FMA pipes (POLY_COEFFS) and "kv_split": S the keys in up to S ranges (KV_SPLIT; both ignored
    without the fixed shift; the split also where the query tiles alone give KV_SPLIT_MAX_WAVES programs per SM,
    whose fp32 partials would cost S times the output for nothing: 805 MB per layer at OWT B=32, S = 8)."""
    B, L, H, d = q.shape
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("q, k, v need unit stride on the head dim")
    if out is None:
        out = torch.empty(B, L, H, d, device=q.device, dtype=q.dtype)
    _launch_fwd(q, k, v, softcap, cos, sin, out.view(B, L, H, d), block_m, block_n, k_rotated, config, None)
    return out.view(B, L, H * d)


# rows (B·L) up to which the engine's "attention_out_proj" kernel option fuses the output projection into the
# attention kernel (H fp32 partials of rows × D: 4.7 MB at LM1B B=1, 38 MB at OWT B=1, where it would no longer pay)
OUT_PROJ_MAX_ROWS = 512
# "kv_split" is ignored where B·H·(query tiles) reaches this many programs per SM without it (_launch_fwd)
KV_SPLIT_MAX_WAVES = 4


def softcap_attention_out_proj_fwd(q, k, v, softcap: Optional[float], w_out: torch.Tensor, cos=None, sin=None,
                                   config: Optional[dict] = None) -> torch.Tensor:
    """Triton launcher of the attention with its output projection fused (opt-in, unmeasured): q, k, v (B, L, H,
    d) as softcap_attention_fwd, w_out (DM, H·d) the projection's weight (nn.Linear layout, no bias) → (H, B, L,
    DM) fp32 partials, partial h = o_h·w_out[:, h·d:(h+1)·d]ᵀ with o_h the attention output of head h rounded to
    w_out's dtype; their sum in head order is att·w_outᵀ (gate_residual sums such split-K partials). Why: at batch
    1 every kernel of the ~90 in a sampler step costs a few µs of launch and ramp however little it computes; this
    drops the projection's GEMM launch and the (B, L, H·d) attention output round trip, for H·DM·4 bytes of
    partials per row (the reason for OUT_PROJ_MAX_ROWS)."""
    B, L, H, d = q.shape
    if w_out.dim() != 2 or w_out.shape[1] != H * d or w_out.stride(-1) != 1:
        raise ValueError(f"w_out must be (DM, H·d) = (·, {H * d}) with unit stride on its last dim, "
                         f"got {tuple(w_out.shape)}")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("q, k, v need unit stride on the head dim")
    parts = torch.empty(H, B, L, w_out.shape[0], device=q.device, dtype=torch.float32)
    _launch_fwd(q, k, v, softcap, cos, sin, None, None, None, False, config, (w_out.to(q.dtype), parts))
    return parts


def _launch_fwd(q, k, v, softcap, cos, sin, o4, block_m, block_n, k_rotated, config, out_proj):
    """_softcap_attention_fwd_kernel over (query blocks, B·H): o4 (B, L, H, d) receives the output, or with
    out_proj = (w_out (DM, H·d), parts (H, B, L, DM) fp32) the kernel writes the projection's per-head partials."""
    B, L, H, d = q.shape
    rotary = cos is not None
    softcap = abs(softcap) if softcap else softcap    # cap·tanh(s/cap) is even in cap (the kernels assume cap > 0)
    if rotary:
        # the reference rounds the tables to x's dtype (apply_rotary_ref: cos.to(x.dtype)); so does the
        # kernel, which also halves their loads in the key loop
        cos = cos.to(q.dtype).contiguous()
        sin = sin.to(q.dtype).contiguous()
    else:
        cos = sin = q      # never read (ROTARY_Q = ROTARY_K = False)
    config = config or {}
    # fp16's range (2^−24 … 2^15) cannot hold p over the capped range: the online softmax there
    fixed = bool(config.get("fixed_shift")) and q.dtype != torch.float16 and fixed_shift_log2(softcap) is not None
    n_split = int(config.get("kv_split") or 1) if fixed and out_proj is None else 1
    cfg = _config(B, H, L, d, q.device, n_split)
    cfg.update(config)
    if block_m:
        cfg["BLOCK_M"] = block_m
    if block_n:
        cfg["BLOCK_N"] = block_n
    shift = fixed_shift_log2(softcap) if fixed else 0.0
    poly = poly_degree(q.dtype) if fixed and cfg.get("poly_exp2") else 0
    key_tiles = triton.cdiv(L, cfg["BLOCK_N"])
    n_split = max(1, min(n_split, key_tiles))
    if n_split > 1 and q.device.type == "cuda":
        n_sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
        if B * H * triton.cdiv(L, cfg["BLOCK_M"]) >= KV_SPLIT_MAX_WAVES * n_sm:
            n_split = 1                                  # the GPU is full without it
    kv_chunk = triton.cdiv(key_tiles, n_split) * cfg["BLOCK_N"]
    n_split = triton.cdiv(L, kv_chunk)                   # no empty split
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H) + ((n_split,) if n_split > 1 else ())
    if n_split > 1:
        pacc = torch.empty(n_split, B * L * H, d, device=q.device, dtype=torch.float32)
        pl = torch.empty(n_split, B * L * H, device=q.device, dtype=torch.float32)
        s_args, kv = (pacc, pl, kv_chunk, B * L * H), {"KV_SPLIT": True}
    else:
        s_args, kv = (q, q, 0, 0), {}             # never touched (KV_SPLIT = False)
    if out_proj is None:
        o_args = (o4, o4.stride(0), o4.stride(1), o4.stride(2))
        p_args = (q, q, 0, 0, 0, 0, 0)            # never read (OUT_PROJ = False)
        proj = {}
    else:
        w_out, parts = out_proj
        o_args = (q, 0, 0, 0)                     # never written (OUT_PROJ = True)
        p_args = (w_out, parts, w_out.stride(0), parts.stride(0), parts.stride(1), parts.stride(2), w_out.shape[0])
        # the (BLOCK_M, BLOCK_O) fp32 partial tile lives in registers beside the attention's accumulators; at least
        # 16 wide (tl.dot's minimum on a GPU; the interpreter takes less, so a test checks it), masked past DM
        block_o = cfg.get("BLOCK_O") or (max(16, min(256, triton.next_power_of_2(w_out.shape[0])))
                                         if cfg["BLOCK_M"] <= 32 else 64)
        proj = dict(OUT_PROJ=True, BLOCK_O=block_o)
    _softcap_attention_fwd_kernel[grid](
        q, k, v, o_args[0], cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *o_args[1:],
        cos.stride(0) if rotary else 0,
        L, H, 1.0 / math.sqrt(d), float(softcap or 1.0), shift,
        *p_args, *s_args,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        ROTARY_Q=rotary, ROTARY_K=rotary and not k_rotated, HAS_CAP=bool(softcap),
        FAST_TANH=q.device.type == "cuda" and not interpreting(),
        EVEN_N=L % cfg["BLOCK_N"] == 0, IEEE=q.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        FIXED_SHIFT=fixed, POLY_EXP2=poly, **proj, **kv, **pdl_launch_kwargs(pdl_active(q)))
    if n_split > 1:
        rows = B * L * H
        block_r = 64 if q.device.type == "cuda" and not interpreting() else 16
        _kv_split_combine_kernel[(triton.cdiv(rows, block_r),)](
            pacc, pl, o4, o4.stride(0), o4.stride(1), o4.stride(2), L, H, rows,
            N_SPLIT=n_split, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_R=block_r, num_warps=4,
            **pdl_launch_kwargs(pdl_active(q)))


def rotary_qk(q, k, cos, sin, rotate_q: bool = True, out: Optional[torch.Tensor] = None):
    """Rotated copies of k (and q when rotate_q) in q's dtype: one Triton pass over the strided qkv views.

    Returns (q_rot, k_rot) as (B, L, H, d) views of a (2, B, H, L, d) buffer (q_rot is q itself when not
    rotate_q). Why (B, H, L, d): the attention's key loop then reads each BLOCK_N×d key tile of a head as
    one contiguous block (8 KiB at 64×64 bf16) instead of 64 rows of 128 B at a 1536 B stride, and one 2-D
    view (B·H·L, d) covers every head, which a later TMA-descriptor version could use. Both layouts read
    whole 128 B lines; which loads faster is unmeasured. out: a (2, B, H, L, d) buffer to write into."""
    B, L, H, d = q.shape
    if k.shape != q.shape or d % 2 or cos is None or sin is None or cos.shape != (L, d // 2):
        raise ValueError(f"rotary_qk needs q, k (B, L, H, even d) and cos/sin (L, d/2), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {None if cos is None else tuple(cos.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q, k need unit stride on the head dim")
    if out is None:
        out = torch.empty(2, B, H, L, d, device=q.device, dtype=q.dtype)
    if out.shape != (2, B, H, L, d) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous (2, B, H, L, d) = {(2, B, H, L, d)} {q.dtype} tensor")
    qo, ko = out[0], out[1]
    cos = cos.to(q.dtype).contiguous()      # rounded as reference.apply_rotary_ref and the on-load path do
    sin = sin.to(q.dtype).contiguous()
    on_gpu = q.device.type == "cuda" and not interpreting()
    block_l = 64 if on_gpu else 32
    grid = (triton.cdiv(L, block_l), B * H)
    _rotary_qk_fwd_kernel[grid](
        q, k, qo, ko, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        ko.stride(0), ko.stride(2), ko.stride(1),
        cos.stride(0), L, H,
        HALF=d // 2, BLOCK_HALF=max(2, triton.next_power_of_2(d // 2)), BLOCK_L=block_l, ROTATE_Q=rotate_q,
        num_warps=4, num_stages=1)
    return (qo.transpose(1, 2) if rotate_q else q), ko.transpose(1, 2)


def softcap_attention_prepass_fwd(q, k, v, softcap: Optional[float], cos, sin, rotate_q: bool = True,
                                  out=None, config: Optional[dict] = None) -> torch.Tensor:
    """The opt-in candidates (unmeasured): rotary_qk once, then the attention kernel without k's on-load
    rotation ('prepass': q and k rotated ahead, ROTARY_Q = ROTARY_K = False; 'prepass_k': only k, q still
    rotated on load, as q is read once per program). Why: on load, every key tile is rotated again by each
    of the L/BLOCK_M query tiles (8× at L=1024) and goes register → shared memory; pre-rotated, it is an
    async copy straight to shared memory. Cost: one extra read + write of k (and q), ~100 MB (~67 µs at
    3 TB/s, napkin) for both at B=32, L=1024, bf16. Same numbers as the default up to fp32 summation order
    ('prepass' takes q·kᵀ as one K=d dot instead of two K=d/2 dots)."""
    qr, kr = rotary_qk(q, k, cos, sin, rotate_q)
    return softcap_attention_fwd(qr, kr, v, softcap, None if rotate_q else cos, None if rotate_q else sin,
                                 out=out, k_rotated=True, config=config)


def tma_usable(q, v) -> bool:
    """Whether the 'prepass_tma' kernel can read these inputs (else the launcher runs 'prepass'): host tensor
    descriptors (triton ≥ 3.4); on CUDA sm_90+ and 16-bit inputs (fp32 keeps the pointer kernel, as in
    logits_argmax: the variant exists to feed wgmma; the interpreter takes fp32, its tests cannot use bf16);
    a power-of-two head dim of 16..256 (the box is exactly one head wide, so no column of the next head is
    read); v mergeable into a (B, L, H·d) view with a 16-byte aligned base and 16-byte multiple strides
    (true for the DiT's qkv views: row stride 3·H·d). The rotary_qk buffer is a fresh contiguous
    allocation, aligned whenever d is."""
    if v.dtype != q.dtype or not tma_device_ok(q):
        return False
    d, es = q.shape[-1], q.element_size()
    if d < 16 or d > 256 or d & (d - 1):
        return False
    return (v.stride(3) == 1 and v.stride(2) == d and v.data_ptr() % 16 == 0
            and (v.stride(0) * es) % 16 == 0 and (v.stride(1) * es) % 16 == 0)


def softcap_attention_prepass_tma_fwd(q, k, v, softcap: Optional[float], cos, sin, out=None,
                                      config: Optional[dict] = None) -> torch.Tensor:
    """The opt-in 'prepass_tma' candidate (unmeasured): rotary_qk, then _softcap_attention_tma_fwd_kernel,
    whose Q, K, V tiles arrive by TMA. Same numbers as 'prepass' (same tiles, dots and order; bit-equal under
    the interpreter). Why try it (unmeasured reasoning): in the pointer kernel each key/value tile is a
    cp.async gather with per-element addresses and masks (64 rows × 8 16-byte vectors at BLOCK_N = 64,
    d = 64); TMA moves the whole 8 KiB box with one instruction issued by one thread, leaving the issue slots
    to the tanh/exp2 work that bounds this kernel (napkin floor in bench_attention.py). Compile-only evidence
    (sm_90a, bf16, d = 64, BN = 64, 3 stages; vs the 'prepass' pointer kernel at the same tile): BLOCK_M 128
    w8: 114 vs 112 registers, 0 spills, 65592 vs 65536 B shared memory (the mbarriers), the TMA box lands in
    the shared buffer wgmma reads (no reshape copy), static SASS 952 vs 904 instructions (IMAD 39 vs 53, LEA
    12 vs 57, the mbarrier waits add ISETP/branches); m64: 108 vs 127 registers, m32: 80 vs 96, m16: 64 vs 66
    (triton 3.7.1; the TMA kernel's registers are the same on 3.6). Whether it moves the time is for the
    benchmark to say.
    Falls back to softcap_attention_prepass_fwd where tma_usable is False.

    CUDA graphs: the descriptors are encoded on the host at each call and passed by value, so a captured graph
    replays with the addresses of capture time: rotary_qk's buffer comes from the capture pool, v must be
    the same static buffer (the usual rule)."""
    _check(q, k, v, cos, sin)
    if cos is None:
        raise ValueError("prepass_tma needs cos/sin")
    if not tma_usable(q, v):
        return softcap_attention_prepass_fwd(q, k, v, softcap, cos, sin, out=out, config=config)
    B, L, H, d = q.shape
    buf = torch.empty(2, B, H, L, d, device=q.device, dtype=q.dtype)
    rotary_qk(q, k, cos, sin, out=buf)
    if out is None:
        out = torch.empty(B, L, H, d, device=q.device, dtype=q.dtype)
    o4 = out.view(B, L, H, d)
    cfg = _config(B, H, L, d, q.device)
    cfg.update(config or {})
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    q_desc = TensorDescriptor.from_tensor(buf[0].view(B * H, L, d), [1, BM, d])
    k_desc = TensorDescriptor.from_tensor(buf[1].view(B * H, L, d), [1, BN, d])
    v_desc = TensorDescriptor.from_tensor(v.view(B, L, H * d), [1, BN, d])
    _softcap_attention_tma_fwd_kernel[(triton.cdiv(L, BM), B * H)](
        q_desc, k_desc, v_desc, o4,
        o4.stride(0), o4.stride(1), o4.stride(2),
        L, H, 1.0 / math.sqrt(d), abs(float(softcap or 1.0)),
        HEAD_DIM=d, BLOCK_M=BM, BLOCK_N=BN, HAS_CAP=bool(softcap),
        FAST_TANH=q.device.type == "cuda" and not interpreting(),
        EVEN_N=L % BN == 0, IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(B, L, H * d)

def compile_specs() -> list[dict]:
    """Real configs for the sm_90a compile check (bench/compile_check.py): bf16, d = 64, each query tile
    _config can pick, with rotary on load, without it (also the 'prepass' candidate's attention) and with
    only q rotated on load ('prepass_k'); the 'prepass_tma' kernel; the rotary_qk prepass kernel."""
    if not triton_available():
        return []
    # the launcher casts cos/sin to q's dtype
    sig = {n: "*bf16" for n in ("Q", "K", "V", "O", "COS", "SIN", "WO")}
    sig.update({"P": "*fp32", "PACC": "*fp32", "PL": "*fp32", "qk_scale": "fp32", "softcap": "fp32",
                "shift_log2": "fp32"})
    sig.update({n: "i32" for n in _softcap_attention_fwd_kernel.arg_names if n not in sig})  # strides, L, H
    # what the JIT specializes at run time for the DiT's qkv views (pointers 16-byte aligned, strides of
    # 3·D, d, d/2 elements divisible by 16): without it the compiler cannot vectorize or pipeline the loads
    names = _softcap_attention_fwd_kernel.arg_names
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if sig[n].startswith("*") or n.startswith("stride_")}
    specs = []
    variants = (("_rope", True, True), ("", False, False), ("_rope_q", True, False))
    # every variant with the fixed-shift softmax, the engine's default (engine/model.py _fast_block), except
    # "_rope_online": the online softmax (the previous default, the kernel's own default) at the B=32 tile.
    # "_pdl": the 'pdl' kernel option's launch (griddepcontrol at the top), at a batch-1 tile; "_outproj_pdl": the
    # 'attention_out_proj' candidate as the engine runs it at LM1B B=1 (rotary done by the qkv GEMM, DM = 768 in
    # chunks of 256, PDL on)
    # "_rope_poly" / "_poly": the poly_exp2 candidate (degree 3, the bf16 inputs' polynomial) with rotary on load and
    # without it (the 'prepass' kernel), at the B=32 and a batch-1 tile; "_rope_kvsplit": the kv_split candidate at
    # the tile it gets at OWT B=1 (m128: 8 query tiles × 12 heads × 4 or 8 key ranges)
    variants += (("_rope_pdl", True, True), ("_rope_online", True, True), ("_outproj_pdl", False, False),
                 ("_rope_poly", True, True), ("_poly", False, False), ("_rope_kvsplit", True, True))
    for block_m, warps in ((128, 8), (64, 4), (32, 4), (16, 4)):
        for suffix, rq, rk in variants:
            if ((suffix in ("_rope_q", "_rope_online") and block_m != 128) or ("_poly" in suffix and block_m < 64)
                    or (suffix == "_rope_kvsplit" and block_m != 128)
                    or (suffix == "_rope_pdl" and block_m != 64) or (suffix == "_outproj_pdl" and block_m > 32)):
                continue         # the candidates at one tile each (the fused projection at the batch-1 tiles)
            const = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=block_m, BLOCK_N=64, ROTARY_Q=rq, ROTARY_K=rk,
                         HAS_CAP=True, FAST_TANH=True, EVEN_N=True, IEEE=False, USE_PDL=suffix.endswith("_pdl"),
                         FIXED_SHIFT=suffix != "_rope_online", OUT_PROJ=suffix == "_outproj_pdl", BLOCK_O=256,
                         POLY_EXP2=3 if "_poly" in suffix else 0, KV_SPLIT=suffix == "_rope_kvsplit")
            specs.append(dict(name=f"_softcap_attention_fwd_kernel[m{block_m}{suffix}]",
                              fn=_softcap_attention_fwd_kernel, signature={**sig, **{k: "constexpr" for k in const}},
                              constexprs=const, attrs=aligned, num_warps=warps, num_stages=3))
    # the engine's 4-stage candidates (kernel option attention_config {"num_stages": 4}) at the m128 tile
    for name in ("m128_rope", "m128"):
        base = next(s for s in specs if s["name"] == f"_softcap_attention_fwd_kernel[{name}]")
        specs.append(dict(base, name=f"_softcap_attention_fwd_kernel[{name}_s4]", num_stages=4))
    # The 'prepass_tma' kernel at the same tiles: a host descriptor argument is typed "tensordesc<dtype[box]>"
    # (triton.runtime.jit.mangle_type's spelling in triton 3.6 and 3.7.1); the JIT gives descriptors no
    # divisibility attributes, so only O and the output strides (d, H·d, L·H·d) are marked.
    tnames = _softcap_attention_tma_fwd_kernel.arg_names
    for block_m, warps in ((128, 8), (64, 4), (32, 4), (16, 4)):
        tsig = {"q_desc": f"tensordesc<bf16[1, {block_m}, 64]>", "k_desc": "tensordesc<bf16[1, 64, 64]>",
                "v_desc": "tensordesc<bf16[1, 64, 64]>", "O": "*bf16", "qk_scale": "fp32", "softcap": "fp32"}
        tsig.update({n: "i32" for n in tnames if n not in tsig})
        const = dict(HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=64, HAS_CAP=True, FAST_TANH=True, EVEN_N=True,
                     IEEE=False)
        tsig.update({k: "constexpr" for k in const})
        specs.append(dict(name=f"_softcap_attention_tma_fwd_kernel[m{block_m}]", fn=_softcap_attention_tma_fwd_kernel,
                          signature=tsig, constexprs=const, num_warps=warps, num_stages=3,
                          attrs={(tnames.index(n),): [["tt.divisibility", 16]]
                                 for n in ("O", "stride_ob", "stride_ol", "stride_oh")}))
    # the kv_split candidate's combine kernel at d = 64, 8 splits (OWT B=1: 1024 keys in 128-key ranges)
    cnames = _kv_split_combine_kernel.arg_names
    csig = {n: ("*fp32" if n in ("PACC", "PL") else "*bf16" if n == "O" else "i32") for n in cnames}
    cconst = dict(N_SPLIT=8, HEAD_DIM=64, BLOCK_D=64, BLOCK_R=64, USE_PDL=False)
    specs.append(dict(name="_kv_split_combine_kernel[s8_d64]", fn=_kv_split_combine_kernel,
                      signature={**csig, **{k: "constexpr" for k in cconst}}, constexprs=cconst, num_warps=4,
                      num_stages=1, attrs={(cnames.index(n),): [["tt.divisibility", 16]]
                                           for n in ("PACC", "PL", "O", "stride_ob", "stride_ol", "stride_oh")}))
    rnames = _rotary_qk_fwd_kernel.arg_names
    rsig = {n: ("*bf16" if n in ("Q", "K", "QO", "KO", "COS", "SIN") else "i32") for n in rnames}
    raligned = {(rnames.index(n),): [["tt.divisibility", 16]] for n in rnames
                if rsig[n].startswith("*") or n.startswith("stride_")}
    for rotate_q in (True, False):
        const = dict(HALF=32, BLOCK_HALF=32, BLOCK_L=64, ROTATE_Q=rotate_q)
        specs.append(dict(name=f"_rotary_qk_fwd_kernel[l64{'' if rotate_q else '_k_only'}]", fn=_rotary_qk_fwd_kernel,
                          signature={**rsig, **{k: "constexpr" for k in const}}, constexprs=const,
                          attrs=raligned, num_warps=4, num_stages=1))
    return with_default_constexprs(specs)


# ---------------------------------------------------------------------------------------------
# FlexAttention fallback
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _attention_flex(q, k, v, softcap, cos, sin):
    B, L, H, d = q.shape
    if cos is not None:
        q, k = _rotate_like_kernel(q, cos, sin), _rotate_like_kernel(k, cos, sin)
    cap = float(softcap) if softcap else None

    def score_mod(score, b, h, q_idx, kv_idx):     # score arrives already scaled by 1/√d
        return cap * torch.tanh(score / cap)

    fn = _flex_fn(q.device.type == "cuda")
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod if cap else None)
    return o.transpose(1, 2).reshape(B, L, H * d)


def _rotate_like_kernel(x, cos, sin):
    """Rotary in fp32 from tables rounded to x's dtype, rounded once to x's dtype (the Triton kernels'
    numerics: on load and rotary_qk)."""
    return ref.apply_rotary_ref(x.to(torch.float32), cos.to(x.dtype).float(), sin.to(x.dtype).float()).to(x.dtype)


def softcap_attention_ref(q, k, v, softcap: Optional[float], cos=None, sin=None) -> torch.Tensor:
    """The spec composed from reference.py: rotary (apply_rotary_ref) then attention_ref."""
    if cos is not None:
        q, k = ref.apply_rotary_ref(q, cos, sin), ref.apply_rotary_ref(k, cos, sin)
    return ref.attention_ref(q, k, v, softcap)


# ---------------------------------------------------------------------------------------------
# Op registration (opaque to torch.compile; used when compiling the block) and the functional API
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fmlm::softcap_attention", mutates_args=())
def _softcap_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
                          cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                          fixed_shift: bool = False, poly_exp2: bool = False, kv_split: int = 1) -> torch.Tensor:
    return softcap_attention_fwd(q, k, v, softcap or None, cos, sin,
                                 config=_softmax_config(fixed_shift, poly_exp2, kv_split))


@_softcap_attention_op.register_fake
def _(q, k, v, softcap, cos, sin, fixed_shift=False, poly_exp2=False, kv_split=1):
    B, L, H, d = q.shape
    return q.new_empty(B, L, H * d)


@torch.library.custom_op("fmlm::softcap_attention_prepass", mutates_args=())
def _softcap_attention_prepass_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
                                  cos: torch.Tensor, sin: torch.Tensor, rotate_q: bool,
                                  fixed_shift: bool = False, poly_exp2: bool = False,
                                  kv_split: int = 1) -> torch.Tensor:
    return softcap_attention_prepass_fwd(q, k, v, softcap or None, cos, sin, rotate_q,
                                         config=_softmax_config(fixed_shift, poly_exp2, kv_split))


@_softcap_attention_prepass_op.register_fake
def _(q, k, v, softcap, cos, sin, rotate_q, fixed_shift=False, poly_exp2=False, kv_split=1):
    B, L, H, d = q.shape
    return q.new_empty(B, L, H * d)


@torch.library.custom_op("fmlm::softcap_attention_prepass_tma", mutates_args=())
def _softcap_attention_prepass_tma_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
                                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return softcap_attention_prepass_tma_fwd(q, k, v, softcap or None, cos, sin)


@_softcap_attention_prepass_tma_op.register_fake
def _(q, k, v, softcap, cos, sin):
    B, L, H, d = q.shape
    return q.new_empty(B, L, H * d)


@torch.library.custom_op("fmlm::softcap_attention_out_proj", mutates_args=())
def _softcap_attention_out_proj_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
                                   w_out: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                                   fixed_shift: bool = False) -> torch.Tensor:
    return softcap_attention_out_proj_fwd(q, k, v, softcap or None, w_out, cos, sin,
                                          config={"fixed_shift": True} if fixed_shift else None)


@_softcap_attention_out_proj_op.register_fake
def _(q, k, v, softcap, w_out, cos, sin, fixed_shift=False):
    B, L, H, d = q.shape
    return q.new_empty(H, B, L, w_out.shape[0], dtype=torch.float32)


ROTARY_IMPLS = ("load", "prepass", "prepass_k", "prepass_tma")


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def check_tile_config(tile_config: Optional[dict]) -> dict:
    """A tile_config as a dict of TILE_KEYS → positive ints ({} for None): BLOCK_M/BLOCK_N powers of two ≥ 16,
    num_warps a power of two (1-16), num_stages ≥ 1; anything else is refused by name."""
    if tile_config is None:
        return {}
    if not isinstance(tile_config, dict):
        raise TypeError(f"tile_config must be a dict, got {type(tile_config).__name__}")
    out = {}
    for key, val in tile_config.items():
        if key not in TILE_KEYS:
            raise ValueError(f"tile_config key {key!r} is not one of {TILE_KEYS}")
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"tile_config[{key!r}] must be a positive int, got {val!r}")
        pow2 = val & (val - 1) == 0
        if (key in ("BLOCK_M", "BLOCK_N") and (val < 16 or not pow2)) or (key == "num_warps" and
                                                                        (val > 16 or not pow2)):
            raise ValueError(f"tile_config[{key!r}] = {val} is not a valid {key}")
        out[key] = val
    return out


def _softmax_config(fixed_shift: bool, poly_exp2: bool = False, kv_split: int = 1) -> Optional[dict]:
    if not fixed_shift:
        return None
    cfg = {"fixed_shift": True}
    if poly_exp2:
        cfg["poly_exp2"] = True
    if kv_split > 1:
        cfg["kv_split"] = int(kv_split)
    return cfg


def resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "flex"
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return backend


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: Optional[float] = 50.0,
                      cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                      backend: str = "auto", rotary_impl: str = "load", fixed_shift: bool = False,
                      poly_exp2: bool = False, kv_split: int = 1, tile_config: Optional[dict] = None) -> torch.Tensor:
    """q, k, v (B, L, H, d) → (B, L, H·d): softmax(cap·tanh(q_r·k_rᵀ/(√d·cap)))·v, q_r/k_r rotated by
    cos/sin (L, d/2) when given (rotate-half). softcap None/0: plain scaled-dot-product attention.
    rotary_impl (triton backend with cos/sin only): 'load' (default, the measured kernel: q and k rotated
    as they are loaded), or the opt-in, not yet timed candidates 'prepass' (q and k rotated once by
    rotary_qk, then the kernel without rotary), 'prepass_k' (only k rotated ahead; q on load) and
    'prepass_tma' ('prepass' with the Q, K, V tiles read through TMA descriptors; 'prepass' where it cannot).
    fixed_shift (off here, the engine trunk's default; triton backend: the 'load', 'prepass' and 'prepass_k'
    kernels and the kernel without rotary, not 'prepass_tma', whose kernel keeps the online softmax): the softmax
    without a running max (fixed_shift_log2), where the cap allows it. poly_exp2 (opt-in candidate, with
    fixed_shift, not with 'prepass_tma'): that softmax's 2^x for half the key columns by a polynomial on the FMA
    pipes (POLY_COEFFS), so that the MUFU unit has 1.5 ops per score to do instead of 2; where the fixed shift does
    not apply, nothing. kv_split (opt-in candidate, with fixed_shift, not with 'prepass_tma'): the keys of each
    query tile in up to kv_split ranges run by separate programs, whose fp32 partials a second kernel adds in order
    (KV_SPLIT): at batch 1 the grid is B·H·L/BLOCK_M programs of L/BLOCK_N dependent key steps each.
    tile_config (triton backend, eager only): overrides of the launcher's tile config, keys among TILE_KEYS
    (e.g. {"num_stages": 4}: what bench_attention's sweep and the engine's kernel option attention_config time)."""
    _check(q, k, v, cos, sin)
    tile = check_tile_config(tile_config)
    if rotary_impl not in ROTARY_IMPLS:
        raise ValueError(f"rotary_impl must be one of {ROTARY_IMPLS}, got {rotary_impl!r}")
    if isinstance(kv_split, bool) or not isinstance(kv_split, int) or kv_split < 1:
        raise ValueError(f"kv_split must be a positive int, got {kv_split!r}")
    if (poly_exp2 or kv_split > 1) and (not fixed_shift or (rotary_impl == "prepass_tma" and cos is not None)):
        raise ValueError("poly_exp2 and kv_split are the fixed-shift softmax's: they need fixed_shift=True and the "
                         f"pointer kernel (not rotary_impl 'prepass_tma'); got fixed_shift={fixed_shift}, "
                         f"rotary_impl={rotary_impl!r}")
    be = resolve(backend, q.device)
    if be == "reference":
        return softcap_attention_ref(q, k, v, softcap, cos, sin)
    if be == "flex":
        return _attention_flex(q, k, v, softcap, cos, sin)
    if tile and torch.compiler.is_compiling():
        raise ValueError("tile_config is an eager-launch override; the compiled custom ops take the default tiles")
    config = {**(_softmax_config(fixed_shift, poly_exp2, kv_split) or {}), **tile} or None
    if rotary_impl == "prepass_tma" and cos is not None:
        if torch.compiler.is_compiling():
            return _softcap_attention_prepass_tma_op(q, k, v, float(softcap or 0.0), cos, sin)
        return softcap_attention_prepass_tma_fwd(q, k, v, softcap, cos, sin, config=tile or None)
    if rotary_impl != "load" and cos is not None:
        if torch.compiler.is_compiling():
            return _softcap_attention_prepass_op(q, k, v, float(softcap or 0.0), cos, sin, rotary_impl == "prepass",
                                                 fixed_shift, poly_exp2, kv_split)
        return softcap_attention_prepass_fwd(q, k, v, softcap, cos, sin, rotate_q=rotary_impl == "prepass",
                                             config=config)
    if torch.compiler.is_compiling():
        return _softcap_attention_op(q, k, v, float(softcap or 0.0), cos, sin, fixed_shift, poly_exp2, kv_split)
    return softcap_attention_fwd(q, k, v, softcap, cos, sin, config=config)


def head_partials(att: torch.Tensor, w_out: torch.Tensor, H: int) -> torch.Tensor:
    """(H, B, L, DM) fp32 partials of att·w_outᵀ split by heads: partial h = att[..., h·d:(h+1)·d] ·
    w_out[:, h·d:(h+1)·d]ᵀ, att (B, L, H·d) and w_out (DM, H·d) taken as they are (their values, products in fp32)."""
    B, L, HD = att.shape
    a = att.reshape(B, L, H, HD // H).float()
    w = w_out.float().reshape(w_out.shape[0], H, HD // H)
    return torch.einsum("blhd,nhd->hbln", a, w)


def softcap_attention_out_proj(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_out: torch.Tensor,
                               softcap: Optional[float] = 50.0, cos: Optional[torch.Tensor] = None,
                               sin: Optional[torch.Tensor] = None, backend: str = "auto",
                               fixed_shift: bool = False) -> torch.Tensor:
    """The attention followed by its output projection (nn.Linear weight w_out (DM, H·d), no bias), returned as
    (H, B, L, DM) fp32 per-head partials whose sum over heads is softcap_attention(q, k, v, ...)·w_outᵀ with the
    attention output rounded to q's dtype (gate_residual takes them as split-K partials). 'triton' runs one
    kernel (softcap_attention_out_proj_fwd; rotary on load when cos/sin are given, fixed_shift as in
    softcap_attention); other backends compute the attention with that backend, then head_partials."""
    _check(q, k, v, cos, sin)
    be = resolve(backend, q.device)
    if be != "triton":
        att = softcap_attention(q, k, v, softcap, cos, sin, backend=be).to(q.dtype)
        return head_partials(att, w_out.to(q.dtype), q.shape[2])
    if torch.compiler.is_compiling():
        return _softcap_attention_out_proj_op(q, k, v, float(softcap or 0.0), w_out, cos, sin, fixed_shift)
    return softcap_attention_out_proj_fwd(q, k, v, softcap, w_out, cos, sin,
                                          config={"fixed_shift": True} if fixed_shift else None)
