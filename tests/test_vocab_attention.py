"""vocab_attention and flow_map_step (Triton kernels and the chunked torch backend) against the reference.

Budget (DESIGN.md §6): every output is compared, with the reference run in the same dtype, against an fp64
ground truth on the same dtype-rounded inputs; the backend's max error may be at most 2x the reference's
plus a small floor. The 'triton' cases need TRITON_INTERPRET=1 before triton is imported, so on a CPU
machine one driver test re-runs them in a subprocess with the interpreter on.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from fmlm.kernels import reference as ref
from fmlm.kernels._backend import interpreting, triton_available
from kernel_test_utils import forbid, must_launch

VA = importlib.import_module("fmlm.kernels.vocab_attention")   # the module (the package re-exports the function)
vocab_attention, flow_map_step = VA.vocab_attention, VA.flow_map_step

ON_DEVICE = torch.cuda.is_available() and not interpreting()
IN_PROCESS = triton_available() and (interpreting() or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton on CPU needs TRITON_INTERPRET=1 (driver test)")
DEV = "cuda" if ON_DEVICE else "cpu"
# Floors relative to the largest |truth| (not clamped to 1: E·softmax outputs can be small): fp32 on an H100
# measured 1.15e-5 at scale 2.7 vs cuBLAS 3e-6 (blocked summation of 768-term logits, amplified by exp); a few units of
# fp32 rounding, of fp16 / bf16 rounding.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _budget(name, out, ref_out, truth, dtype):
    truth = truth.double()
    scale = truth.abs().max().item()
    e_k = (out.double().cpu() - truth.cpu()).abs().max().item()
    e_r = (ref_out.double().cpu() - truth.cpu()).abs().max().item()
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(truth.shape)}"
    assert e_k <= 2 * e_r + FLOOR[dtype] * scale, \
        f"{name}: error {e_k:.3e} > 2 x reference error {e_r:.3e} + floor (scale {scale:.3e})"


def _problem(M, V, Vp, D, De, dtype, bias=True, seed=0, device=DEV, scale=4.0):
    """Logits of a few units (so the cap matters) and padded rows that would dominate if not masked."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g)
    W = torch.randn(Vp, D, generator=g) * (scale / D ** 0.5)
    W[V:] = 5.0 * h.mean(0).sign()
    E = torch.randn(Vp, De, generator=g)
    E[V:] = 100.0
    b = torch.randn(Vp, generator=g) if bias else None
    if b is not None:
        b[V:] = 0.0
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(h), cast(W), cast(b), cast(E)


def _truth(h, W, b, E, cap):
    """fp64 end to end (the reference casts logits to fp32, so it is not a ground truth for fp64)."""
    s = ref.logits_ref(h.double(), W.double(), None if b is None else b.double())
    s = ref.cap_ref(s, cap)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ E.double(), lse


def _refs(h, W, b, E, cap, V):
    """(truth in fp64, reference in the inputs' dtype), each (out, lse)."""
    bb = None if b is None else b[:V]
    return _truth(h, W[:V], bb, E[:V], cap), ref.vocab_attention_ref(h, W[:V], bb, E[:V], cap)


def _check(name, out, lse, h, W, b, E, cap, V):
    truth, r = _refs(h, W, b, E, cap, V)
    assert out.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    _budget(f"{name} out", out, r[0], truth[0], h.dtype)
    _budget(f"{name} lse", lse, r[1], truth[1], h.dtype)


# ---- torch backend and validation ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_torch_backend(monkeypatch, dtype, cap, with_bias):
    """The chunked torch path: with a cap, the fixed shift exp(s − cap) (no running max); without, the online
    softmax."""
    monkeypatch.setattr(VA, "TORCH_V_CHUNK", 64)
    monkeypatch.setattr(VA, "TORCH_ROW_CHUNK", 16)
    h, W, b, E = _problem(37, 257, 320, 24, 40, dtype, device="cpu")
    b = b if with_bias else None
    out, lse = vocab_attention(h, W, b, E, cap, 257, backend="torch")
    _check("torch", out, lse, h, W, b, E, cap, 257)


def test_validation_and_leading_dims():
    h, W, b, E = _problem(6, 50, 64, 8, 12, torch.float32, device="cpu")
    out, lse = vocab_attention(h.view(2, 3, 8), W, b, E, 30.0, 50, backend="torch")
    assert out.shape == (2, 3, 12) and lse.shape == (2, 3)
    flat = vocab_attention(h, W, b, E, 30.0, 50, backend="torch")      # leading dims only reshape
    assert torch.equal(out.view(6, 12), flat[0]) and torch.equal(lse.view(6), flat[1])
    with pytest.raises(ValueError):
        vocab_attention(h, W, b, E, 30.0, 65, backend="torch")
    with pytest.raises(ValueError):
        vocab_attention(h, W, b, E[:40], 30.0, 50, backend="torch")
    hs = torch.zeros(2, 3, 12)
    coef = torch.ones(2)
    with pytest.raises(ValueError):      # c without noise
        flow_map_step(h.view(2, 3, 8), W, b, E, hs, coef, coef, c=coef, n_valid=50, backend="torch")
    with pytest.raises(ValueError):      # coefficients must be (B,)
        flow_map_step(h.view(2, 3, 8), W, b, E, hs, torch.ones(3), coef, n_valid=50, backend="torch")


def _flow_problem(B, L, V, Vp, D, De, dtype, noise=True, device=DEV, seed=1):
    h, W, b, E = _problem(B * L, V, Vp, D, De, dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    hs = torch.randn(B, L, De, generator=g).to(device, dtype)
    nz = torch.randn(B, L, De, generator=g).to(device, dtype) if noise else None
    a, bc, c = (torch.rand(B, generator=g).to(device) for _ in range(3))
    return h.view(B, L, D), W, b, E, hs, a, bc, (c if noise else None), nz


def _check_flow(name, got, u, W, b, E, hs, a, bc, c, nz, cap, V):
    """h_next in h_state's dtype; truth = fp64 composition of the two reference functions."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    de_t, _ = _truth(u, W[:V], b[:V], E[:V], cap)
    truth = ref.flow_map_update_ref(d(hs), de_t, d(a), d(bc), d(c), d(nz))
    de_r, _ = ref.vocab_attention_ref(u, W[:V], b[:V], E[:V], cap)
    r = ref.flow_map_update_ref(hs.float(), de_r, a.float(), bc.float(), None if c is None else c.float(),
                                None if nz is None else nz.float()).to(hs.dtype)
    assert got.dtype == hs.dtype and got.shape == hs.shape
    _budget(name, got, r, truth, u.dtype)


@pytest.mark.parametrize("noise", [True, False])
def test_flow_map_step_torch(noise):
    args = _flow_problem(3, 5, 257, 300, 24, 40, torch.float32, noise, device="cpu")
    for backend in ("torch", "reference"):
        got = flow_map_step(*args, cap=30.0, n_valid=257, backend=backend)
        _check_flow(f"flow {backend}", got, *args, 30.0, 257)


# ---- triton (CUDA, or CPU under the interpreter) ---------------------------------------------------
TRITON_CASES = [
    pytest.param(1, 257, 257, 64, 64, torch.float32, 30.0, None, id="rows1-V257"),
    pytest.param(37, 257, 384, 64, 64, torch.float32, 30.0,
                 dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DE=16, DE_CHUNKS=3, splits=3), id="rows37-pad-split3-n16-de48"),
    pytest.param(37, 257, 384, 64, 64, torch.float32, None, dict(BLOCK_N=64), id="rows37-nocap"),
    pytest.param(19, 257, 300, 64, 40, torch.float32, 30.0, dict(BLOCK_N=32, fixed_max=False),
                 id="rows19-lazy-rescale-fp32"),
    pytest.param(3, 257, 300, 96, 80, torch.float16, 30.0, dict(BLOCK_N=32, splits=2), id="rows3-fp16-D96"),
    pytest.param(3, 50258, 50304, 64, 64, torch.float32, 30.0, None, id="rows3-V50258"),
    pytest.param(5, 1000, 1024, 768, 768, torch.float16, 30.0, dict(BLOCK_N=256), id="rows5-D768-fp16"),
    pytest.param(2, 1000, 1024, 768, 768, torch.float32, 30.0, dict(BLOCK_N=512, BLOCK_DE=128), id="rows2-D768-de2"),
]


@needs_triton
@pytest.mark.parametrize("M,V,Vp,D,De,dtype,cap,cfg", TRITON_CASES)
def test_triton_matches_reference(M, V, Vp, D, De, dtype, cap, cfg):
    h, W, b, E = _problem(M, V, Vp, D, De, dtype)
    out, lse = VA.vocab_attention_fwd(h, W, b, E, cap, V, cfg)
    _check("triton", out, lse, h, W, b, E, cap, V)


@needs_triton
@pytest.mark.parametrize("cfg", [None, dict(BLOCK_N=16, splits=2, fixed_max=False)], ids=["default", "split-lazy"])
def test_triton_padded_columns_get_zero_probability(cfg):
    """Valid logits ≈ −20 before the cap: a padded column (zero weight and bias → cap(0) = 0) would take
    almost all the mass if it were not masked, and its E rows are 100."""
    h, W, b, E = _problem(5, 100, 128, 32, 48, torch.float32)
    b[:100] = -20.0
    out, lse = VA.vocab_attention_fwd(h, W, b, E, 30.0, 100, cfg)
    _check("padded", out, lse, h, W, b, E, 30.0, 100)


@needs_triton
@pytest.mark.parametrize("M,V,Vp,chunk", [pytest.param(37, 1000, 1024, 384, id="37x1000-chunks"),
                                          pytest.param(3, 50258, 50304, 8192, id="3x50258"),
                                          pytest.param(1, 257, 384, 128, id="1x257")])
def test_gemm_impl_matches_reference(M, V, Vp, chunk):
    """The cuBLAS + fused cap/exp implementation (the default for large bf16 row counts on CUDA), in fp32 here:
    several V chunks, a last chunk that ends inside the padding, padded columns that would win if unmasked."""
    h, W, b, E = _problem(M, V, Vp, 32, 48, torch.float32)
    W[V:], b[V:] = 1.0, 100.0
    out, lse = VA.vocab_attention_fwd(h, W, b, E, 30.0, V, dict(impl="gemm", v_chunk=chunk))
    _check("gemm", out, lse, h, W, b, E, 30.0, V)
    # another program shape of the cap/exp pass (config pass_block, the benchmark's sweep): rows not a multiple of
    # its row block, columns not a multiple of its step
    out2, lse2 = VA.vocab_attention_fwd(h, W, b, E, 30.0, V, dict(impl="gemm", v_chunk=chunk, pass_block=(8, 64, 4)))
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse2, lse, rtol=1e-6, atol=1e-6)
    # config row_chunk (opt-in): the same loop over blocks of rows (M not a multiple of the block), each row's result
    # the whole-M loop's up to the GEMMs' summation order (BLAS blocks a 5-row product differently)
    out3, lse3 = VA.vocab_attention_fwd(h, W, b, E, 30.0, V, dict(impl="gemm", v_chunk=chunk, row_chunk=5))
    _check("gemm row_chunk", out3, lse3, h, W, b, E, 30.0, V)
    torch.testing.assert_close(out3, out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse3, lse, rtol=2e-6, atol=2e-6)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="row_chunk"):
            VA.vocab_attention_fwd(h, W, b, E, 30.0, V, dict(impl="gemm", row_chunk=bad))
    with pytest.raises(ValueError, match="cap"):
        VA.vocab_attention_fwd(h, W, b, E, None, V, dict(impl="gemm"))
    with pytest.raises(ValueError, match="fp16"):
        VA.vocab_attention_fwd(h.half(), W.half(), b.half(), E.half(), 30.0, V, dict(impl="gemm"))


def _only(monkeypatch, tma):
    """gemm_fused: forbid the pointer kernel (tma=True) or the TMA kernel (tma=False)."""
    other = "_vocab_logits_cap_exp_kernel" if tma else "_vocab_logits_cap_exp_tma_kernel"
    forbid(monkeypatch, VA, other)


GEMM_FUSED_CASES = [
    # prime rows and V, V padded, D % BLOCK_K != 0, 200-column chunks: V tiles of 64 cross every chunk end, the
    # last chunk ends inside the padding; GROUP_M=2 over 3 row blocks leaves a partial last group
    *(pytest.param(37, 1009, 1024, 40, dict(v_chunk=200, BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=2, tma=tma),
                   id=f"37x1009-pad-chunk200-bn64-Ktail-{k}") for k, tma in (("pointer", False), ("tma", True))),
    # one row; the last chunk [256, 384) has V tiles that start past n_valid (TMA: boxes wholly out of bounds)
    *(pytest.param(1, 257, 384, 32, dict(v_chunk=128, BLOCK_N=32, tma=tma), id=f"1x257-chunk128-bn32-{k}")
      for k, tma in (("pointer", False), ("tma", True))),
    # the real V in 8192-column chunks, once: the TMA kernel differs only in its loads and store
    pytest.param(3, 50258, 50304, 32, dict(BLOCK_N=2048, tma=False), id="3x50258-pointer"),
]


@needs_triton
@pytest.mark.parametrize("M,V,Vp,D,cfg", GEMM_FUSED_CASES)
def test_triton_gemm_fused_matches_reference_and_gemm(monkeypatch, M, V, Vp, D, cfg):
    """impl "gemm_fused" (cap/exp/row-sum in the logits GEMM's epilogue) against the reference (error budget) and
    against impl "gemm" at the same chunking (a few fp32 ulps: only the logits' summation order differs).
    Padded columns carry W = 1 and b = 100: unmasked, they would take all the mass."""
    h, W, b, E = _problem(M, V, Vp, D, 48, torch.float32)
    W[V:], b[V:] = 1.0, 100.0
    gemm_out, gemm_lse = VA.vocab_attention_fwd(h, W, b, E, 30.0, V, dict(impl="gemm", v_chunk=cfg.get("v_chunk", 8192)))
    if ON_DEVICE:       # tile sizes chosen for the interpreter; CUDA runs its fp32 config
        cfg = {k: v for k, v in cfg.items() if k in ("v_chunk", "tma")}
    # the TMA kernel must run where it can (fp32 on CUDA takes the pointer kernel by design, see tma_usable)
    tma = cfg["tma"] and VA.tma_usable(h, W, 16)
    assert tma == cfg["tma"] or ON_DEVICE
    _only(monkeypatch, tma)
    out, lse = VA.vocab_attention_fwd(h, W, b, E, 30.0, V, dict(cfg, impl="gemm_fused"))
    _check("gemm_fused", out, lse, h, W, b, E, 30.0, V)
    # out is a weighted mean of E rows: a logit difference δ moves it by ~δ·|E|. The logits (|h·w| sums of ~20 here)
    # differ by a few of their ulps between the two summation orders: measured ≤ 7.2 ulps of max |E| on this CPU.
    ulp = torch.finfo(torch.float32).eps
    assert (out - gemm_out).abs().max().item() <= 32 * ulp * E[:V].abs().max().item()
    assert (lse - gemm_lse).abs().max().item() <= 16 * ulp * gemm_lse.abs().max().item()


@needs_triton
def test_triton_gemm_fused_no_bias_flow_map_step_and_fp16(monkeypatch):
    """Without a bias; flow_map_step_fwd routes "gemm_fused" like "gemm"; fp16 is refused (e^{−2·cap} underflows)."""
    h, W, _, E = _problem(19, 257, 300, 24, 40, torch.float32, bias=False)
    cfg = dict(impl="gemm_fused", v_chunk=96, BLOCK_N=64)
    out, lse = VA.vocab_attention_fwd(h, W, None, E, 30.0, 257, cfg)
    _check("gemm_fused no bias", out, lse, h, W, None, E, 30.0, 257)
    args = _flow_problem(2, 7, 257, 300, 24, 40, torch.float32, True)
    forbid(monkeypatch, VA, "_vocab_attention_launch")   # no fused-kernel path
    got = VA.flow_map_step_fwd(*args, 30.0, 257, cfg)
    _check_flow("flow gemm_fused", got, *args, 30.0, 257)
    with pytest.raises(ValueError, match="fp16"):
        VA.vocab_attention_fwd(h.half(), W.half(), None, E.half(), 30.0, 257, cfg)


@needs_triton
@pytest.mark.parametrize("dtype,cap", [(torch.float32, None), (torch.float16, 30.0)])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_growing_max_rescales(dtype, cap, splits):
    """Bias rising by 60 across V: the running max grows by > 8 every few tiles, so the lazily rescaled
    path (fp16, or no cap) must rescale O and the running sum several times per row."""
    h, W, b, E = _problem(7, 257, 272, 32, 48, dtype, scale=1.0)
    b[:257] = torch.linspace(-30.0, 30.0, 257).to(b)
    out, lse = VA.vocab_attention_fwd(h, W, b, E, cap, 257, dict(BLOCK_N=16, splits=splits, fixed_max=False))
    _check("rescale", out, lse, h, W, b, E, cap, 257)


@needs_triton
@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("B,L,cfg", [pytest.param(3, 1, None, id="B3-L1"),
                                     pytest.param(2, 13, dict(BLOCK_M=16, BLOCK_N=32, splits=3), id="B2-L13-split")])
def test_triton_flow_map_step(B, L, cfg, noise):
    args = _flow_problem(B, L, 257, 300, 64, 64, torch.float32, noise)
    got = VA.flow_map_step_fwd(*args, 30.0, 257, cfg)
    _check_flow("flow triton", got, *args, 30.0, 257)


@needs_triton
@pytest.mark.parametrize("noise", [True, False])
def test_triton_gemm_flow_map_step_fused_finish(noise):
    """The "gemm" implementation's flow-map epilogue (one Triton pass: normalization by the row sums, then the
    update) within the error budget, and equal up to fp32 rounding to the same sums followed by the torch update
    (config fused_finish False), at odd sizes (De = 48, three V chunks with a ragged one)."""
    args = _flow_problem(3, 5, 257, 300, 64, 48, torch.float32, noise)
    cfg = dict(impl="gemm", v_chunk=96)
    got = VA.flow_map_step_fwd(*args, 30.0, 257, cfg)
    _check_flow("flow gemm fused finish", got, *args, 30.0, 257)
    old = VA.flow_map_step_fwd(*args, 30.0, 257, dict(cfg, fused_finish=False))
    torch.testing.assert_close(got, old, rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_flow_map_step_fp16_functional():
    args = _flow_problem(2, 3, 257, 320, 64, 48, torch.float16, True)
    with must_launch(VA, "_vocab_attention_fwd_kernel"):          # the op, not a fallback to torch
        got = flow_map_step(*args, cap=30.0, n_valid=257, backend="triton")
    _check_flow("flow triton fp16", got, *args, 30.0, 257)


@needs_triton
def test_triton_functional_and_opcheck():
    """backend='triton' through the registered ops, leading dims, and torch.library.opcheck."""
    h, W, b, E = _problem(6, 100, 128, 32, 16, torch.float32)
    with must_launch(VA, "_vocab_attention_fwd_kernel"):          # the op, not a fallback to torch
        out, lse = vocab_attention(h.view(2, 3, 32), W, b, E, 30.0, 100, backend="triton")
    assert out.shape == (2, 3, 16) and lse.shape == (2, 3)
    _check("functional", out.view(6, 16), lse.view(6), h, W, b, E, 30.0, 100)
    torch.library.opcheck(torch.ops.fmlm.vocab_attention.default, (h, W, b[:100], E, 30.0, 100))
    u, W, b, E, hs, a, bc, c, nz = _flow_problem(2, 3, 100, 128, 32, 16, torch.float32)
    torch.library.opcheck(torch.ops.fmlm.flow_map_step.default, (u, W, b[:100], E, hs, a, bc, c, nz, 30.0, 100))


@needs_triton
@pytest.mark.skipif(ON_DEVICE, reason="the CPU smoke run of the benchmark; make gpu-check runs it for real")
def test_triton_bench_smoke(monkeypatch):
    """bench/bench_vocab_attention.py end to end at a tiny shape on the CPU, so the one GPU run cannot die on a bug."""
    from fmlm.bench import bench_vocab_attention as bench
    from fmlm.bench import common

    # BUDGET_S: every optional row, however slow the interpreter runs on a loaded machine
    for k, v in dict(DEVICE="cpu", V=250, VP=256, D=32, SHAPES=(32, 8, 3), BUDGET_S=1e4).items():
        monkeypatch.setattr(bench, k, v)
    monkeypatch.setattr(bench, "time_fn", lambda fn, warmup=2, iters=10, device="cpu": common.time_fn(fn, 1, 2, device))
    monkeypatch.setattr(bench, "peak_memory_bytes", lambda fn, device="cpu": 0)
    rows = bench.run(quick=True)
    impls = [r["impl"] for r in rows]
    assert impls[0] == "triton" and any(i.startswith("best measured") for i in impls)
    assert all("failed" not in str(r.get("note", "")) for r in rows), rows
    assert rows[0]["ms"] > 0 and rows[0]["rows"] == 32
    variants = [r for r in rows if r["impl"].startswith("triton [")]
    assert [r["impl"] for r in variants[:5]] == ["triton [gemm row_chunk 2048, v_chunk 4096]",
                                                 "triton [gemm row_chunk 1024, v_chunk 8192]",
                                                 "triton [gemm_fused bm128_bn256 (pointer)]",
                                                 "triton [gemm_fused bm128_bn256 TMA]",
                                                 "triton [gemm_fused bm128_bn128_w4 TMA (2 CTAs/SM)]"], variants
    assert all(r["speedup_vs_default"] > 0 and r["max_abs_diff_vs_default"] < 1e-3 for r in variants[:5]), variants
    # the reference's label says it runs P·E in fp32; the cuBLAS row's bytes count S written and P read
    refs = [r for r in rows if r["impl"] == "reference.vocab_attention_ref (eager)"]
    assert len(refs) == 3 and all("P·E fp32 (the spec)" in r["dtype"] and "fp32-matmul spec" in r["note"]
                                  for r in refs), refs
    cub = [r for r in rows if r["impl"].startswith("cuBLAS")]
    assert len(cub) == 1 and cub[0]["gbs"] * cub[0]["ms"] * 1e6 == pytest.approx(
        (32 * 32 + 256 * 32 + 32 * 256 + 32 * 256 + 256 * 32 + 32 * 32) * 4)     # fp32 on the CPU
    # past gpu_check's deadline (a shortened limit) the optional rows are skipped and the process still returns
    # its main rows, instead of being killed with none written
    monkeypatch.setenv("FMLM_BENCH_DEADLINE", "0")
    late = bench.run(quick=True)
    assert late[0]["impl"] == "triton" and late[0]["ms"] > 0
    assert not [r for r in late if r["impl"].startswith("triton [") or r["impl"].startswith("flow_map_step")], late


@pytest.mark.skipif(IN_PROCESS or not triton_available(), reason="driver for the interpreter run on CPU machines")
def test_triton_interpreter_subprocess():
    """Re-run this file's triton cases with TRITON_INTERPRET=1 (it must be set before triton is imported)."""
    # one BLAS / OpenMP thread: on a shared CPU, multi-threaded numpy matmuls in the interpreter ran ~1000x
    # slower (thread contention) than single-threaded ones
    env = {**os.environ, "TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-m", "not gpu",
                        "-k", "triton and not subprocess", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


# ---- GPU: bf16 at the OWT shape ------------------------------------------------------------------
def _owt(M=16384, V=50258, Vp=50304, D=768, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(M, D, device="cuda", generator=g).to(dtype)
    W = (torch.randn(Vp, D, device="cuda", generator=g) * (4.0 / D ** 0.5)).to(dtype)
    b = torch.randn(Vp, device="cuda", generator=g).to(dtype)
    E = (torch.randn(Vp, D, device="cuda", generator=g) * 0.05).to(dtype)
    W[V:], b[V:], E[V:] = 0, 0, 0
    return h, W, b, E


@pytest.mark.gpu
def test_gpu_bf16_owt():
    h, W, b, E = _owt()
    out, lse = vocab_attention(h, W, b, E, 30.0, 50258, backend="triton")
    rows = torch.arange(0, h.shape[0], 16, device="cuda")   # the budget check on 1024 rows (memory)
    _check("gpu owt", out[rows], lse[rows], h[rows], W, b, E, 30.0, 50258)
    small, small_lse = vocab_attention(h[:128], W, b, E, 30.0, 50258, backend="triton")   # B=1, L=128: V split
    _check("gpu 128 rows", small, small_lse, h[:128], W, b, E, 30.0, 50258)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(impl="gemm_fused"), dict(impl="gemm_fused", tma=True),
                                 dict(impl="gemm_fused", tma=True, **VA.GEMM_FUSED_CONFIGS["bm128_bn128_w4"])],
                         ids=["pointer", "tma", "tma-bm128_bn128_w4"])
def test_gpu_gemm_fused_bf16_owt(monkeypatch, cfg):
    """The opt-in "gemm_fused" impl at the OWT shape (bf16, 16384 rows, padded V) against the reference (the same
    budget as test_gpu_bf16_owt), and 300 rows (one partial row block per tile column)."""
    h, W, b, E = _owt()
    if cfg.get("tma"):
        assert VA.tma_usable(h, W, 64)
    _only(monkeypatch, bool(cfg.get("tma")))
    out, lse = VA.vocab_attention_fwd(h, W, b, E, 30.0, 50258, cfg)
    rows = torch.arange(0, h.shape[0], 16, device="cuda")
    _check("gpu owt gemm_fused", out[rows], lse[rows], h[rows], W, b, E, 30.0, 50258)
    out, lse = VA.vocab_attention_fwd(h[:300], W, b, E, 30.0, 50258, cfg)
    _check("gpu 300 rows gemm_fused", out, lse, h[:300], W, b, E, 30.0, 50258)


@pytest.mark.gpu
def test_gpu_flow_map_step_bf16():
    h, W, b, E = _owt(M=2 * 1024)
    g = torch.Generator(device="cuda").manual_seed(1)
    hs = torch.randn(2, 1024, 768, device="cuda", generator=g).to(torch.bfloat16)
    nz = torch.randn(2, 1024, 768, device="cuda", generator=g).to(torch.bfloat16)
    a, bc, c = (torch.rand(2, device="cuda", generator=g) for _ in range(3))
    got = flow_map_step(h.view(2, 1024, 768), W, b, E, hs, a, bc, c, nz, cap=30.0, n_valid=50258, backend="triton")
    _check_flow("gpu flow", got, h.view(2, 1024, 768), W, b, E, hs, a, bc, c, nz, 30.0, 50258)


@pytest.mark.gpu
def test_gpu_no_rows_by_v_buffer():
    h, W, b, E = _owt()
    for rows in (h.shape[0], 128):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        vocab_attention(h[:rows], W, b, E, 30.0, 50258, backend="triton")
        torch.cuda.synchronize()
        delta = torch.cuda.max_memory_allocated() - base
        # outputs (rows × 768 fp32) plus V-split partials (fused kernel) or one (rows × 8192) bf16 chunk (gemm):
        # a fraction of a (rows, V) bf16 buffer. Measured on an H100: 304 MiB at 16384 rows (4096-column chunks,
        # two chunks alive) against 1571 MiB for the full bf16 logits.
        assert delta < max(rows * 50258 * 2 / 4, 64 * 2**20), f"{rows} rows: peak extra {delta / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,cap", [(torch.float32, 30.0), (torch.float16, 30.0), (torch.bfloat16, None)])
def test_gpu_small_dtypes(dtype, cap):
    h, W, b, E = _problem(37, 1000, 1024, 768, 768, dtype, device="cuda")
    out, lse = vocab_attention(h, W, b, E, cap, 1000, backend="triton")
    _check(f"gpu {dtype}", out, lse, h, W, b, E, cap, 1000)


def test_empty_batch_and_bad_shapes():
    """Zero rows give empty outputs of the right shapes (a reshape to -1 could not infer them); a 2-D bias and a
    float n_valid are refused."""
    h, W, b, E = _problem(6, 50, 64, 8, 12, torch.float32, device="cpu")
    out, lse = vocab_attention(h[:0], W, b, E, 30.0, 50, backend="torch")
    assert out.shape == (0, 12) and lse.shape == (0,)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        vocab_attention(h, W, b.view(32, 2), E, 30.0, 50, backend="torch")
    with pytest.raises(TypeError, match="n_valid must be an int"):
        vocab_attention(h, W, b, E, 30.0, 50.0, backend="torch")


def test_flow_map_step_refuses_host_coefficients_and_integer_state():
    """Coefficients must be (B,) tensors (a float failed with an AttributeError inside), and the state a floating
    tensor (an integer state came back as zeros from the kernel)."""
    u, W, b, E, hs, a, bc, c, nz = _flow_problem(2, 3, 100, 128, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="a must be a"):
        flow_map_step(u, W, b, E, hs, 0.5, bc, c, nz, 30.0, 100, backend="torch")
    with pytest.raises(TypeError, match="h_state must be a floating tensor"):
        flow_map_step(u, W, b, E, hs.long(), a, bc, c, nz, 30.0, 100, backend="torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_uncapped_minus_inf_bias_columns(monkeypatch, backend):
    """No cap, −inf bias on the first chunk's columns: the torch path's online softmax gave NaN (found by review)."""
    monkeypatch.setattr(VA, "TORCH_V_CHUNK", 64)
    g = torch.Generator().manual_seed(3)
    h, W, b, E = (torch.randn(5, 16, generator=g), torch.randn(200, 16, generator=g) / 4,
                  torch.randn(200, generator=g), torch.randn(200, 8, generator=g))
    b[:96] = float("-inf")
    o, lse = VA.vocab_attention(h, W, b, E, None, backend=backend)
    ro, rlse = ref.vocab_attention_ref(h, W, b, E, None)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-4)


def test_torch_backend_cap_above_the_fixed_shift_range(monkeypatch):
    """A cap above 40 (no fixed shift): the online-softmax torch path applies cap·tanh(z/cap), across chunks."""
    monkeypatch.setattr(VA, "TORCH_V_CHUNK", 64)
    h, W, b, E = _problem(9, 257, 320, 24, 40, torch.float32, device="cpu", scale=30.0)
    out, lse = vocab_attention(h, W, b, E, 45.0, 257, backend="torch")
    _check("torch cap 45", out, lse, h, W, b, E, 45.0, 257)
    uncapped = vocab_attention(h, W, b, E, None, 257, backend="torch")
    assert (uncapped[1] - lse).abs().max() > 1.0


def test_reference_backend_and_shape_errors():
    """backend='reference' is reference.vocab_attention_ref on the first n_valid rows, in the leading shape;
    malformed weight/embed/h, u and h_state, or noise shapes: ValueErrors."""
    h, W, b, E = _problem(6, 50, 64, 8, 12, torch.float32, device="cpu")
    out, lse = vocab_attention(h.view(2, 3, 8), W, b, E, 30.0, 50, backend="reference")
    want = ref.vocab_attention_ref(h, W[:50], b[:50], E[:50], 30.0)
    assert out.shape == (2, 3, 12) and lse.shape == (2, 3)
    assert torch.equal(out.view(6, 12), want[0]) and torch.equal(lse.view(6), want[1])
    torch.testing.assert_close(out.view(6, 12), vocab_attention(h, W, b, E, 30.0, 50, backend="torch")[0])
    for args in ((h, W[0], b, E), (h, W, b, E[0]), (h[:, :7], W, b, E), (h[0, 0], W, b, E)):
        with pytest.raises(ValueError, match="shape mismatch"):
            vocab_attention(*args, 30.0, 50, backend="torch")
    u, hs, coef, nz = h.view(2, 3, 8), torch.zeros(2, 3, 12), torch.ones(2), torch.zeros(2, 3, 12)
    for uu, hh in ((h, hs), (u, hs[:, :2]), (u, hs[..., :6])):
        with pytest.raises(ValueError, match=r"u must be \(B, L, D\)"):
            flow_map_step(uu, W, b, E, hh, coef, coef, n_valid=50, backend="torch")
    with pytest.raises(ValueError, match="noise must have"):
        flow_map_step(u, W, b, E, hs, coef, coef, coef, nz[:, :2], n_valid=50, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)], ids=["B0", "L0"])
def test_flow_map_step_empty_batch(monkeypatch, backend, shape):
    """An empty batch (B = 0 or L = 0) gives an empty h_next of h_state's shape and dtype on every backend and
    implementation, without a kernel launch over V (the Triton path reshaped with −1, which reshape cannot infer
    from zero elements); vocab_attention's launchers likewise."""
    W, b, E = (torch.randn(64, 8), torch.randn(64), torch.randn(64, 12))
    u, hs, nz, a = torch.randn(*shape, 8), torch.randn(*shape, 12), torch.randn(*shape, 12), torch.ones(shape[0])
    if backend == "triton":
        for name in ("_vocab_attention_fwd_kernel", "_vocab_logits_cap_exp_kernel", "_vocab_logits_cap_exp_tma_kernel"):
            forbid(monkeypatch, VA, name)
    for c, n in ((None, None), (a, nz)):
        out = flow_map_step(u, W, b, E, hs, a, a, c, n, 30.0, 50, backend=backend)
        assert out.shape == hs.shape and out.dtype == hs.dtype
    if backend == "triton":
        for cfg in (None, dict(impl="gemm"), dict(impl="gemm", fused_finish=False), dict(impl="gemm_fused")):
            assert VA.flow_map_step_fwd(u, W, b, E, hs, a, a, a, nz, 30.0, 50, cfg).shape == hs.shape
            o, lse = VA.vocab_attention_fwd(u.reshape(-1, 8), W, b, E, 30.0, 50, cfg)
            assert o.shape == (0, 12) and lse.shape == (0,)


@needs_triton
def test_triton_launcher_input_checks():
    """fp64 is refused by the Triton launcher (TypeError naming the torch backend); a BLOCK_D needing more than 3
    chunks of D, or DE_CHUNKS outside 1..3: ValueErrors naming the key."""
    h, W, b, E = _problem(5, 50, 64, 64, 32, torch.float32)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        vocab_attention(h.double(), W.double(), b.double(), E.double(), 30.0, 50, backend="triton")
    with pytest.raises(ValueError, match="BLOCK_D=16 needs 4 chunks"):
        VA.vocab_attention_fwd(h, W, b, E, 30.0, 50, dict(BLOCK_D=16))
    for n in (0, 4):
        with pytest.raises(ValueError, match="DE_CHUNKS must be"):
            VA.vocab_attention_fwd(h, W, b, E, 30.0, 50, dict(DE_CHUNKS=n))
    ok = VA.vocab_attention_fwd(h, W, b, E, 30.0, 50, dict(BLOCK_D=32, DE_CHUNKS=2))       # 2 chunks of D, of De
    _check("triton D in 2 chunks", *ok, h, W, b, E, 30.0, 50)


@pytest.mark.parametrize("impl", [None, "gemm", "gemm_fused", "torch"])
def test_non_finite_padding_rows_do_not_leak(impl):
    """The op's contract: only the first n_valid rows of weight, bias and embed count. Padding rows of inf and NaN
    (torch.empty padding can hold anything) give the same output as zero padding in every implementation: the
    fused kernel, the cuBLAS "gemm" paths (whose logits GEMM spans the padded chunk end while p·E stops at
    n_valid: 0·inf would be NaN), and the torch backend; for vocab_attention and the flow-map step."""
    if impl != "torch" and not IN_PROCESS:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    V, Vp = 203, 256
    clean = _problem(9, V, Vp, 24, 40, torch.float32)
    h, W, b, E = (t.clone() for t in clean)
    W[V:], b[V:], E[V:] = float("inf"), float("nan"), float("inf")
    E[V + 1:V + 3] = float("nan")
    W[-1], E[-1] = float("-inf"), float("-inf")
    cfg = dict(v_chunk=96, impl=impl) if impl not in (None, "torch") else None

    def run(h, W, b, E):
        if impl == "torch":
            return VA._vocab_attention_torch(h, W, b[:V], E, 30.0, V)
        return VA.vocab_attention_fwd(h, W, b[:V], E, 30.0, V, cfg)

    out, lse = run(h, W, b, E)
    want, want_lse = run(*clean)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    rest = _flow_problem(3, 3, V, Vp, 24, 40, torch.float32, True)[4:]       # h_state, a, b, c, noise

    def step(h, W, b, E):
        if impl == "torch":
            return flow_map_step(h.view(3, 3, 24), W, b, E, *rest, cap=30.0, n_valid=V, backend="torch")
        return VA.flow_map_step_fwd(h.view(3, 3, 24), W, b[:V], E, *rest, 30.0, V, cfg)

    got = step(h, W, b, E)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, step(*clean), rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("impl", [None, "gemm", "gemm_fused"])
def test_negative_cap_is_the_same_function(impl):
    """cap·tanh(z/cap) is even in cap, and the reference computes it for any non-zero cap: a negative cap gives what
    its absolute value gives (the fused kernel returned NaN, exp(−2z/cap) overflowing; the gemm paths refused it)."""
    h, W, b, E = _problem(7, 101, 128, 16, 24, torch.float32, scale=30.0)
    cfg = None if impl is None else dict(impl=impl, v_chunk=64)
    out, lse = VA.vocab_attention_fwd(h, W, b, E, -3.0, 101, cfg)
    _check("negative cap", out, lse, h, W, b, E, -3.0, 101)
    want = VA.vocab_attention_fwd(h, W, b, E, 3.0, 101, cfg)
    torch.testing.assert_close((out, lse), want, rtol=0, atol=0)
    rest = _flow_problem(1, 7, 101, 128, 16, 24, torch.float32, True)[4:]
    got = VA.flow_map_step_fwd(h.view(1, 7, 16), W, b, E, *rest, -3.0, 101, cfg)
    assert torch.equal(got, VA.flow_map_step_fwd(h.view(1, 7, 16), W, b, E, *rest, 3.0, 101, cfg))


def test_unknown_impl_is_refused():
    """A misspelt impl ran the fused kernel without a word (linear_cross_entropy and logits_argmax refuse theirs)."""
    h, W, b, E = _problem(3, 50, 64, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        VA.vocab_attention_fwd(h, W, b, E, 30.0, 50, dict(impl="gem"))
