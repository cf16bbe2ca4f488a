"""softcap_attention (flash forward with the tanh softcap, rotary) beside the reference in one process.

Shapes (H = 12, d = 64, bf16, softcap 50, rotary on; q, k, v strided views of one (B, L, 3, H, d) qkv GEMM
output, as engine/model.py `_fast_block` passes them; cos/sin (L, d/2) in bf16 as `_FastWeights.rope`):
OWT B=32 and B=1 at L=1024, LM1B B=1 and B=512 at L=128. Rows:
- triton, rotary on load: the default (measured 462 µs per layer at OWT B=32 on an H100, 223 TFLOP/s);
- the opt-in candidates 'prepass' (rotary_qk rotates q and k once, then the kernel without rotary),
  'prepass_k' (only k rotated ahead, q still on load) and 'prepass_tma' ('prepass' with the attention's
  Q/K/V tiles read through TMA descriptors: its row minus the 'prepass' row is what TMA changes, the
  rotary_qk part being the same), plus the prepass's two parts timed alone; the fixed-shift softmax
  (fixed_shift=True: no running max) with rotary on load, and without rotary beside the same kernel's online
  softmax; each fixed-shift row followed by the same with poly_exp2 (half the key columns' 2^x by a polynomial
  on the FMA pipes, kernels/attention.py POLY_COEFFS), compared with it (speedup_vs_fixed_shift); at OWT B=1 the
  fixed shift with the keys split over 4 and 8 programs per query tile (kv_split), also against the fixed shift;
- reference (apply_rotary_ref + attention_ref, materialized scores; skipped above 20 GB): bf16 inputs, but both
  bmm (q·kᵀ and p·v) and the softmax in fp32 (the spec); its dtype column says so, and speedup_vs_ref is
  against that fp32-matmul spec, not a bf16 implementation;
- FlexAttention with the tanh score_mod, torch.compile'd in a child process, started at once but idle until
  this one has timed its rows (then it compiles, checks and times: its compile and first calls never overlap a
  timed row; a cold inductor compile that outlasts the process limit loses only its own row), on pre-rotated
  q, k;
- SDPA WITHOUT the softcap on pre-rotated q, k: a different function, a ceiling, not a baseline.
Then a config sweep (BLOCK_M = 128; BLOCK_N 64/128 × num_stages 2/3/4 × num_warps 4/8) at OWT B=32 for the
default and the 'prepass' attention, as far as the time budget allows (each config is a fresh compile).
"best measured" is the fastest of the rows at OWT B=32 that compute the default's function (rotary included):
the default, the rotary candidates, the fixed shift with rotary on load and the sweep; not the rows without
rotary. speedup_vs_default is always the default row's time over the row's; the no-rotary fixed-shift row is
compared with the no-rotary online-softmax row instead (speedup_vs_no_rotary_online).

FLOPs: 4·B·H·L²·d (q·kᵀ and p·v). Napkin floor (unmeasured): tanh and exp2 are one MUFU op each per score,
2·B·H·L² = 806 M ops at OWT B=32 ≈ 0.2 ms at 16 MUFU/clk/SM × 132 SMs × 1.83 GHz.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from fmlm.bench.common import (ceilings, markdown_table, optional_budget, optional_rows, time_fn, time_left,
                               write_rows)

SHAPES = (("owt", 32, 1024), ("owt", 1, 1024), ("lm1b", 1, 128), ("lm1b", 512, 128))
H, HEAD_DIM, CAP = 12, 64, 50.0
DEVICE = "cuda"          # a CPU smoke run (TRITON_INTERPRET=1, tiny SHAPES/H/HEAD_DIM/SWEEP) sets "cpu"
# most informative first (each is a fresh compile and quick mode stops at SWEEP_UNTIL_S): 8 warps (two
# warpgroups of m64 wgmma for BLOCK_M = 128) before 4, the default's 3 stages before 2 and 4; after the first
# pair, one-warpgroup 64-row tiles (sm_90a: 139 registers, 72 KiB with rotary on load: 3 CTAs per SM, against 2
# of the default's 8-warp CTAs), whose CTAs run their softmax and their MMAs independently of each other
SWEEP = tuple(dict(BLOCK_M=128, BLOCK_N=bn, num_stages=st, num_warps=w)
              for w in (8, 4) for st in (3, 4, 2) for bn in (64, 128))
SWEEP = SWEEP[:2] + tuple(dict(BLOCK_M=64, BLOCK_N=bn, num_stages=3, num_warps=4) for bn in (64, 128)) + SWEEP[2:]
# batch-1 shapes (the open latency targets): the row-block size alone, rotary on load. The default picks the
# largest BLOCK_M that still gives ≥ 2 programs per SM (OWT B=1: 32; LM1B B=1: 16), i.e. mma.sync tiles below
# wgmma's 64 rows; bigger blocks trade programs for wgmma (unmeasured which wins)
SMALL_B_SWEEP = tuple(dict(BLOCK_M=bm, BLOCK_N=64, num_stages=3, num_warps=8 if bm == 128 else 4)
                      for bm in (64, 128, 32, 16))
REF_LIMIT_BYTES = 20e9   # the reference materializes ~4 fp32 (B, H, L, L) tensors
PROCESS_LIMIT_S = 56.0   # quick: gpu-check gives the whole process 75 s (imports, CUDA init, ceilings; its deadline,
#                          12 s before that, caps this too): the flex child compiles after the sweep, in what is left
SWEEP_UNTIL_S = 30.0     # quick: sweep configs start only before this; the flex child then compiles and times in
#                          what is left of PROCESS_LIMIT_S (a config started at 30 s ends by ~40 s)


def ref_dtype_label(dt_name: str) -> str:
    """The reference's dtype as it runs: softcap_attention_ref takes dt_name inputs, both bmm in fp32."""
    return f"{dt_name} in, fp32 matmuls (the spec)"


def _dtype():
    return torch.bfloat16 if DEVICE == "cuda" else torch.float32      # interpreter: no bf16 math


def _inputs(B: int, L: int, seed: int = 0):
    """q, k, v views of one (B, L, 3, H, d) buffer (std 2: scores of a few units, some near the cap's
    bend) and the engine's cos/sin tables in the compute dtype."""
    from fmlm.kernels import reference as ref

    dt = _dtype()
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = (2.0 * torch.randn(B, L, 3, H, HEAD_DIM, device=DEVICE, generator=g)).to(dt)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=DEVICE) / HEAD_DIM))
    cos, sin = (t.to(dt).contiguous() for t in ref.rotary_cos_sin(L, inv_freq))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], cos, sin


def _flops(B: int, L: int) -> float:
    return 4.0 * B * H * L * L * HEAD_DIM


def _maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run(quick: bool = False) -> list[dict]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return []
    import importlib

    A = importlib.import_module("fmlm.kernels.attention")
    F = torch.nn.functional

    t_start = time.time()
    sweep_until = optional_budget(t_start, SWEEP_UNTIL_S, PROCESS_LIMIT_S - SWEEP_UNTIL_S)
    child = _start_flex_child(quick) if DEVICE == "cuda" else None
    ceil = ceilings()
    iters = 10 if quick else 30
    dt_name = str(_dtype()).replace("torch.", "")
    rows: list[dict] = []

    def add(impl, name, B, L, fn, note="", flops=True, it=iters, nbytes=None, **extra):
        tm = time_fn(fn, warmup=2, iters=it, device=DEVICE)
        f = _flops(B, L) if flops else float("nan")
        r = {"op": "softcap_attention", "shape": name, "impl": impl, "B": B, "L": L, "H": H, "d": HEAD_DIM,
             "dtype": dt_name, "ms": tm["ms"], "p20_ms": tm["p20_ms"], "p80_ms": tm["p80_ms"],
             "tflops": f / tm["ms"] / 1e9, "pct_bf16_ceiling": 100 * f / tm["ms"] / 1e9 / ceil["bf16_tflops"],
             "gbs": nbytes / tm["ms"] / 1e6 if nbytes else float("nan"),
             "pct_copy_ceiling": 100 * nbytes / tm["ms"] / 1e6 / ceil["copy_gbs"] if nbytes else float("nan"),
             **extra, "note": note}
        rows.append(r)
        return r

    owt_inputs = None
    small_b = []
    same_fn = []     # OWT B=32 rows that compute the default's function (rotary included): "best measured" picks here
    for name, B, L in SHAPES:
        q, k, v, cos, sin = _inputs(B, L)
        if owt_inputs is None:
            owt_inputs = (name, B, L, q, k, v, cos, sin)
        if B == 1:
            small_b.append((name, B, L, q, k, v, cos, sin))
        ref_bytes = 4 * 4.0 * B * H * L * L
        ref_out = None
        if ref_bytes <= REF_LIMIT_BYTES:
            ref_out = A.softcap_attention_ref(q, k, v, CAP, cos, sin)
        diff = (lambda o: _maxdiff(o, ref_out)) if ref_out is not None else (lambda o: float("nan"))

        def tri(impl="load", q=q, k=k, v=v, cos=cos, sin=sin):
            return A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", rotary_impl=impl)

        out0 = tri()
        cfg = A._config(B, H, L, HEAD_DIM, q.device)
        main = add("triton: rotary on load (default)", name, B, L, tri, "default", max_abs_diff_vs_ref=diff(out0),
                   config=str(cfg))
        first = (name, B, L) == owt_inputs[:3]
        if first:
            same_fn.append(main)
        qr, kr = A.rotary_qk(q, k, cos, sin)      # pre-rotated: the candidates' inputs and SDPA's
        # the opt-in candidates beside the default (not in gpu_check's defaults-only mode)
        if optional_rows():
            tma_note = ("rotary_qk(q, k) + attention without rotary, Q/K/V tiles by TMA" if A.tma_usable(q, v)
                        else "fell back to 'prepass' (tma_usable is False here): not the TMA kernel")
            for impl, what in (("prepass", "rotary_qk(q, k) + attention without rotary"),
                               ("prepass_k", "rotary_qk(k) + attention with q rotated on load"),
                               ("prepass_tma", tma_note)):
                o = tri(impl)
                r = add(f"triton: {impl} (candidate)", name, B, L, lambda impl=impl: tri(impl), what,
                        max_abs_diff_vs_ref=diff(o), max_abs_diff_vs_default=_maxdiff(o, out0), config=str(cfg))
                r["speedup_vs_default"] = main["ms"] / r["ms"]
                if first:
                    same_fn.append(r)
            # the fixed-shift softmax (no running max, no rescale of the output tile); with rotary on load, and
            # without rotary (what the triton_small trunk runs: rotary already applied in the qkv GEMM)
            o = A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", fixed_shift=True)
            r = add("triton: fixed shift (candidate)", name, B, L,
                    lambda: A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", fixed_shift=True),
                    "softmax without a running max", max_abs_diff_vs_ref=diff(o),
                    max_abs_diff_vs_default=_maxdiff(o, out0), config=str(cfg))
            r["speedup_vs_default"] = main["ms"] / r["ms"]
            if first:
                same_fn.append(r)
            fixed = r
            o = A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", fixed_shift=True, poly_exp2=True)
            r = add("triton: fixed shift + poly exp2 (candidate)", name, B, L,
                    lambda: A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", fixed_shift=True,
                                                poly_exp2=True),
                    "half the key columns' 2^x by a polynomial (FMA pipes): vs the fixed shift "
                    "(speedup_vs_fixed_shift)", max_abs_diff_vs_ref=diff(o), max_abs_diff_vs_default=_maxdiff(o, out0),
                    config=str(cfg))
            r["speedup_vs_default"] = main["ms"] / r["ms"]
            r["speedup_vs_fixed_shift"] = fixed["ms"] / r["ms"]
            if first:
                same_fn.append(r)
            # 4 operand stages instead of 3 (the engine's kernel option attention_config): run5's online-softmax
            # sweep at OWT B=32 had m128 n64 w8 at 0.6145 ms with 4 stages against 0.6591 with 3 (rotary on load)
            # and 0.5201 against 0.6292 with the rotary prepass; here with the fixed shift, the engine's softmax
            for impl in ("load", "prepass") if B > 1 else ():
                kw = dict(backend="triton", fixed_shift=True, rotary_impl=impl, tile_config={"num_stages": 4})
                o = A.softcap_attention(q, k, v, CAP, cos, sin, **kw)
                r = add(f"triton: fixed shift{' + rotary prepass' if impl == 'prepass' else ''}, 4 stages "
                        "(candidate)", name, B, L, lambda kw=kw: A.softcap_attention(q, k, v, CAP, cos, sin, **kw),
                        "vs the fixed shift (speedup_vs_fixed_shift)" + (", rotary_qk included" if impl == "prepass"
                                                                         else ""),
                        max_abs_diff_vs_ref=diff(o), max_abs_diff_vs_default=_maxdiff(o, out0),
                        config=str({**cfg, "num_stages": 4}))
                r["speedup_vs_default"] = main["ms"] / r["ms"]
                r["speedup_vs_fixed_shift"] = fixed["ms"] / r["ms"]
                if first:
                    same_fn.append(r)
            # the key split at the batch-1 shapes with long key loops (OWT B=1: 16 key tiles per query tile)
            for S in (4, 8) if B == 1 and -(-L // cfg["BLOCK_N"]) > 2 else ():
                o = A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", fixed_shift=True, kv_split=S)
                r = add(f"triton: fixed shift + kv split {S} (candidate)", name, B, L,
                        lambda S=S: A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton", fixed_shift=True,
                                                        kv_split=S),
                        f"each query tile's keys in {S} ranges, partials summed by a second kernel: vs the fixed "
                        "shift (speedup_vs_fixed_shift)", max_abs_diff_vs_ref=diff(o),
                        max_abs_diff_vs_default=_maxdiff(o, out0),
                        config=str(A._config(B, H, L, HEAD_DIM, q.device, S)))
                r["speedup_vs_default"] = main["ms"] / r["ms"]
                r["speedup_vs_fixed_shift"] = fixed["ms"] / r["ms"]
            plain = add("  no rotary (pre-rotated q, k), online softmax", name, B, L,
                        lambda: A.softcap_attention(qr, kr, v, CAP, backend="triton"), "baseline of the next row")
            # computes less than the default (no rotary): compared with the row above only, not with the default
            # (so no speedup_vs_default, and never "best measured")
            r = add("triton: no rotary + fixed shift (candidate)", name, B, L,
                    lambda: A.softcap_attention(qr, kr, v, CAP, backend="triton", fixed_shift=True),
                    "no rotary: vs the row above (speedup_vs_no_rotary_online), the fixed shift alone; not vs default")
            r["speedup_vs_no_rotary_online"] = plain["ms"] / r["ms"]
            nr_fixed = r
            # the engine's "attention poly exp2 + rotary prepass" candidate's attention (its kernel without rotary)
            r = add("triton: no rotary + fixed shift + poly exp2 (candidate)", name, B, L,
                    lambda: A.softcap_attention(qr, kr, v, CAP, backend="triton", fixed_shift=True, poly_exp2=True),
                    "no rotary: vs the row above (speedup_vs_fixed_shift); not vs default")
            r["speedup_vs_fixed_shift"] = nr_fixed["ms"] / r["ms"]
            # the prepass's two parts alone: what the key loop gains vs what the extra pass costs
            rq_bytes = 2 * 2 * q.numel() * q.element_size() + 2 * cos.numel() * cos.element_size()
            add("  part: rotary_qk(q, k) alone", name, B, L, lambda: A.rotary_qk(q, k, cos, sin), "no attention FLOPs",
                flops=False, nbytes=rq_bytes)
            add("  part: attention on pre-rotated q, k (no rotary)", name, B, L,
                lambda: A.softcap_attention_fwd(qr, kr, v, CAP, k_rotated=True), "the prepass minus rotary_qk",
                max_abs_diff_vs_default=_maxdiff(A.softcap_attention_fwd(qr, kr, v, CAP, k_rotated=True), out0))
        if ref_out is not None:
            r = add("reference (apply_rotary_ref + attention_ref)", name, B, L,
                    lambda: A.softcap_attention_ref(q, k, v, CAP, cos, sin),
                    "materialized scores; q·kᵀ and p·v are fp32 matmuls in the spec: speedup_vs_ref is against "
                    "this fp32-matmul spec", it=max(3, iters // 3), max_abs_diff_vs_default=_maxdiff(ref_out, out0))
            r["dtype"] = ref_dtype_label(dt_name)
            main["speedup_vs_ref"] = r["ms"] / main["ms"]
        else:
            rows.append({"op": "softcap_attention", "shape": name, "impl": "reference", "B": B, "L": L,
                         "note": f"skipped: needs ~{ref_bytes / 1e9:.0f} GB > {REF_LIMIT_BYTES / 1e9:.0f} GB"})
        qt, kt, vt = qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2)
        add("SDPA, different function (no softcap): a ceiling, not a baseline", name, B, L,
            lambda: F.scaled_dot_product_attention(qt, kt, vt), "pre-rotated q, k; rotary not included")
        del qr, kr, qt, kt, vt, ref_out

    for name, B, L, q, k, v, cos, sin in small_b:
        out0 = A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton")
        default_cfg = A._config(B, H, L, HEAD_DIM, q.device)
        for c in SMALL_B_SWEEP:
            if c["BLOCK_M"] == default_cfg["BLOCK_M"] or c["BLOCK_M"] > max(16, 1 << (L - 1).bit_length()):
                continue
            label = f"sweep load m{c['BLOCK_M']} n{c['BLOCK_N']} s{c['num_stages']} w{c['num_warps']}"
            if quick and time.time() - t_start > sweep_until:
                rows.append({"op": "softcap_attention", "shape": name, "impl": label, "B": B, "L": L,
                             "note": "skipped: time budget"})
                continue
            fn = lambda c=c, q=q, k=k, v=v, cos=cos, sin=sin: A.softcap_attention_fwd(  # noqa: E731
                q, k, v, CAP, cos, sin, config=c)
            try:
                o = fn()
                r = add(label, name, B, L, fn, "batch-1 row-block size", max_abs_diff_vs_default=_maxdiff(o, out0),
                        config=str(c))
                base = next(x for x in rows if x["shape"] == name and x["B"] == B and "(default)" in x["impl"])
                r["speedup_vs_default"] = base["ms"] / r["ms"]
            except Exception as e:  # a config that fails to compile or launch is reported
                rows.append({"op": "softcap_attention", "shape": name, "impl": label, "B": B, "L": L,
                             "note": f"failed: {e!r}"[:200]})

    name, B, L, q, k, v, cos, sin = owt_inputs
    out0 = A.softcap_attention(q, k, v, CAP, cos, sin, backend="triton")
    tried = list(same_fn)
    default_cfg = A._config(B, H, L, HEAD_DIM, q.device)
    order = [(impl, c) for c in SWEEP if c != default_cfg for impl in ("load", "prepass")]
    for impl, c in order:
        label = f"sweep {impl} m{c['BLOCK_M']} n{c['BLOCK_N']} s{c['num_stages']} w{c['num_warps']}"
        if quick and time.time() - t_start > sweep_until:
            rows.append({"op": "softcap_attention", "shape": name, "impl": label, "B": B, "L": L,
                         "note": "skipped: time budget (run bench_attention.py alone for the full sweep)"})
            continue
        if impl == "load":
            fn = lambda c=c: A.softcap_attention_fwd(q, k, v, CAP, cos, sin, config=c)  # noqa: E731
        else:        # the whole candidate: rotary_qk + the attention under this config
            fn = lambda c=c: A.softcap_attention_prepass_fwd(q, k, v, CAP, cos, sin, config=c)  # noqa: E731
        try:
            o = fn()
            r = add(label, name, B, L, fn, "rotary_qk included" if impl == "prepass" else "",
                    max_abs_diff_vs_default=_maxdiff(o, out0), config=str(c))
            tried.append(r)
        except Exception as e:  # a config that fails to compile or launch (shared memory) is reported
            rows.append({"op": "softcap_attention", "shape": name, "impl": label, "B": B, "L": L,
                         "note": f"failed: {e!r}"[:200]})
    best = min(tried, key=lambda r: r["ms"])
    rows.append({**best, "impl": f"best measured at this shape: {best['impl'].strip()}",
                 "note": "min over the rows at this shape that compute the default's function, rotary included "
                         "(the no-rotary rows and the parts alone excluded)"})

    if child is not None:
        r = _finish_flex_child(child, time_left(t_start, PROCESS_LIMIT_S) if quick else 600.0)
        for fr in r:
            if "ms" in fr:
                fr["tflops"] = _flops(fr["B"], fr["L"]) / fr["ms"] / 1e9
                fr["pct_bf16_ceiling"] = 100 * fr["tflops"] / ceil["bf16_tflops"]
            rows.append({"op": "softcap_attention", "impl": "FlexAttention tanh score_mod (compiled)", **fr})
    else:
        rows.append({"op": "softcap_attention", "impl": "FlexAttention tanh score_mod (compiled)",
                     "note": "skipped on CPU"})
    for r in rows:
        r["bf16_ceiling_tflops"] = ceil["bf16_tflops"]
    return rows


# ---- FlexAttention in a child process ----------------------------------------------------------------
def _flex_shapes(quick: bool):
    return SHAPES[:1] if quick else SHAPES


def _start_flex_child(quick: bool):
    """Start the child now (its Python start and imports overlap the parent's rows); it waits for 'go' on stdin
    before it touches the GPU (inputs, compile, first calls, timing), so nothing it does overlaps a timed row."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "4", "PYTHONUNBUFFERED": "1"}
    err = tempfile.TemporaryFile(mode="w+")      # not a pipe: inductor's warnings must not fill it and block
    p = subprocess.Popen([sys.executable, "-m", "fmlm.bench.bench_attention", "--flex-child",
                          "quick" if quick else "full"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=err, text=True, env=env)
    p.err_file = err
    return p


def _finish_flex_child(p, timeout_s: float) -> list[dict]:
    if timeout_s < 3:
        p.kill()
        return [{"note": f"skipped: {timeout_s:.0f} s left"}]
    try:
        out, _ = p.communicate("go\n", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return [{"note": f"did not finish in the {timeout_s:.0f} s left"}]
    lines = [x for x in (out or "").splitlines() if x.startswith("[")]
    if lines:
        return json.loads(lines[-1])
    p.err_file.seek(0)
    return [{"note": f"failed: {p.err_file.read()[-300:]!r}"}]


def _flex_child(quick: bool) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    from fmlm.kernels import attention as A

    sys.stdin.readline()              # the parent's timing is done: from here on the GPU is ours
    compiled = torch.compile(flex_attention, dynamic=False)
    cap = CAP

    def score_mod(score, b, h, q_idx, kv_idx):     # score arrives already scaled by 1/√d
        return cap * torch.tanh(score / cap)

    cases = []
    for name, B, L in _flex_shapes(quick):
        q, k, v, cos, sin = _inputs(B, L)
        qr, kr = A.rotary_qk(q, k, cos, sin)
        qt, kt, vt = qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2)
        fn = lambda qt=qt, kt=kt, vt=vt: compiled(qt, kt, vt, score_mod=score_mod)  # noqa: E731
        t0 = time.time()
        o = fn()
        torch.cuda.synchronize()
        sub = slice(0, min(B, 2))     # reference on ≤ 2 batch rows (memory)
        diff = _maxdiff(o.transpose(1, 2).reshape(B, L, -1)[sub],
                        A.softcap_attention_ref(q[sub], k[sub], v[sub], CAP, cos, sin))
        cases.append((name, B, L, fn, time.time() - t0, diff))
    res = []
    for name, B, L, fn, compile_s, diff in cases:
        tm = time_fn(fn, warmup=2, iters=10 if quick else 30)
        res.append({"shape": name, "B": B, "L": L, "H": H, "d": HEAD_DIM, "dtype": "bfloat16", "ms": tm["ms"],
                    "p20_ms": tm["p20_ms"], "p80_ms": tm["p80_ms"], "max_abs_diff_vs_ref": diff,
                    "note": f"pre-rotated q, k; compile {compile_s:.0f} s (after the parent's rows); diff vs ref on "
                            "batch rows [0, 2)"})
    return res


def main() -> None:
    if "--flex-child" in sys.argv:
        print(json.dumps(_flex_child(sys.argv[-1] == "quick")))
        return
    rows = run(quick="--quick" in sys.argv)
    if not rows:
        print("bench_attention: needs CUDA, skipped")
        return
    print(markdown_table(rows))
    write_rows("bench_attention", rows)


if __name__ == "__main__":
    main()
