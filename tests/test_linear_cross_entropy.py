"""linear_cross_entropy / soft_linear_cross_entropy against the reference with the error budget (DESIGN.md §6).

Every backend output and gradient is compared, in the same dtype as the reference, against an fp64 ground
truth on the same (dtype-rounded) inputs: the backend's max error may be at most 2x the reference's plus a
small floor. The 'triton' cases run under TRITON_INTERPRET=1 on a CPU machine (tests/conftest.py sets it).
"""
from __future__ import annotations

import contextlib
import importlib

import os
import subprocess

import pytest
import torch

lce_mod = importlib.import_module("fmlm.kernels.linear_cross_entropy")   # the module, not the re-exported op
from fmlm.kernels import reference as ref
from fmlm.kernels.linear_cross_entropy import linear_cross_entropy, soft_linear_cross_entropy
from kernel_test_utils import LaunchArgs, LaunchSpy, must_launch

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Floors relative to the largest |truth|: a few units of fp32 rounding, and of fp16 logit rounding.
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}

needs_interp = pytest.mark.skipif(not INTERP, reason="triton on CPU needs TRITON_INTERPRET=1 (tests/conftest.py)")


def _budget(name, out, ref_out, truth, dtype):
    truth = truth.double()
    scale = truth.abs().max().item()
    e_k = (out.double() - truth).abs().max().item()
    e_r = (ref_out.double() - truth).abs().max().item()
    assert e_k <= 2 * e_r + FLOOR[dtype] * max(scale, 1.0), \
        f"{name}: error {e_k:.3e} > 2 x reference error {e_r:.3e} + floor (scale {scale:.3e})"


def _problem(N, V, D, Vp, dtype, bias=True, seed=0, ignore=0, scale=4.0):
    """Inputs rounded to dtype; logits of std ≈ scale (some rows 3x larger so the cap bends them)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    h[::3] *= 3.0
    W = torch.randn(Vp, D, generator=g) * (scale / D ** 0.5)
    b = torch.randn(Vp, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[torch.randperm(N, generator=g)[:ignore]] = -100
    up = torch.randn(N, generator=g)          # upstream gradient per row (not all ones: g enters dS)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(W), cast(b), t, up


def _truth(h, W, b, t, cap, V, up, ignore_index=-100):
    """fp64 loss and (dh, dW, db) of Σ up·loss."""
    h, W = h.double().requires_grad_(), W.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    z = h @ W[:V].T + (0 if b is None else b[:V])
    s = cap * torch.tanh(z / cap) if cap else z
    valid = t != ignore_index
    loss = -s.log_softmax(-1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0] * valid
    (loss * up.double()).sum().backward()
    return loss.detach(), h.grad, W.grad, (None if b is None else b.grad)


def _run(fn, h, W, b, up, **kw):
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(h, W, b, **kw)
    (loss.float() * up).sum().backward()
    return loss.detach(), h.grad, W.grad, (None if b is None else b.grad)


FUSED = ("_linear_cross_entropy_fwd_kernel", "_linear_cross_entropy_bwd_kernel")


def _check_hard(backend, N, V, D, Vp, dtype, bias, cap, ignore=0, seed=0, kernels=FUSED):
    h, W, b, t, up = _problem(N, V, D, Vp, dtype, bias, seed, ignore)
    n_valid = V if Vp != V else None
    truth = _truth(h, W, b, t, cap, V, up)
    # with backend="triton" the kernels ran (a fallback to torch would meet the budget as well)
    with must_launch(lce_mod, *kernels) if backend == "triton" else contextlib.nullcontext():
        out = _run(linear_cross_entropy, h, W, b, up, targets=t, cap=cap, n_valid=n_valid, backend=backend)
    rf = _run(lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], None if b is None else b[:V], **kw),
              h, W, b, up, targets=t, cap=cap)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].shape == W.shape
    for name, o, r, tr in zip(("loss", "dh", "dW", "db"), out, rf, truth):
        if tr is not None:
            _budget(f"{backend} {name}", o, r, tr, dtype)
    if Vp != V:
        assert out[2][V:].abs().max() == 0 and (b is None or out[3][V:].abs().max() == 0), "padded rows got gradient"
    if ignore:
        assert (out[0][t == -100] == 0).all() and out[1][t == -100].abs().max() == 0


HARD_CASES = [
    pytest.param(1, 37, 64, 37, True, 30.0, 0, id="rows1-V37"),
    pytest.param(3, 101, 64, 101, False, 30.0, 0, id="rows3-Vprime-nobias"),
    pytest.param(37, 257, 64, 300, True, 30.0, 5, id="rows37-padded-ignore"),
    pytest.param(8, 61, 24, 61, True, None, 1, id="D24-nocap"),
]


@pytest.fixture
def small_torch_chunks(monkeypatch):
    """Chunks smaller than the test shapes, so the torch backend's chunk seams are exercised."""
    monkeypatch.setattr(lce_mod, "TORCH_V_CHUNK", 64)
    monkeypatch.setattr(lce_mod, "TORCH_ROW_CHUNK", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V,D,Vp,bias,cap,ignore", HARD_CASES)
def test_lce_torch(small_torch_chunks, N, V, D, Vp, bias, cap, ignore, dtype):
    _check_hard("torch", N, V, D, Vp, dtype, bias, cap, ignore)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V,D,Vp,bias,cap,ignore", HARD_CASES)
def test_lce_triton(N, V, D, Vp, bias, cap, ignore, dtype):
    _check_hard("triton", N, V, D, Vp, dtype, bias, cap, ignore)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V,D,Vp,bias,cap,ignore", HARD_CASES)
def test_lce_triton_gemm_impl(monkeypatch, N, V, D, Vp, bias, cap, ignore, dtype):
    """The opt-in "gemm" implementation (logits from torch.mm per chunk, then the Triton passes) through the op,
    forward and backward, within the reference's budget; its passes are the kernels that run (with a cap in
    (0, 40]; without one the fused kernels run: the backward must see the logits the forward summed)."""
    monkeypatch.setattr(lce_mod, "INTERPRET_CONFIG", {**lce_mod.INTERPRET_CONFIG, "impl": "gemm"})
    stats, ds = LaunchSpy(lce_mod._lce_chunk_stats_kernel), LaunchSpy(lce_mod._lce_chunk_ds_kernel)
    monkeypatch.setattr(lce_mod, "_lce_chunk_stats_kernel", stats)
    monkeypatch.setattr(lce_mod, "_lce_chunk_ds_kernel", ds)
    _check_hard("triton", N, V, D, Vp, dtype, bias, cap, ignore, kernels=() if cap else FUSED)
    assert (stats.launches >= 1) == bool(cap) and (ds.launches >= 1) == bool(cap), (stats.launches, ds.launches)


@needs_interp
def test_lce_gemm_impl_equals_fused():
    """The "gemm" launchers against the fused ones on the same fp32 inputs (several chunks, a ragged last one):
    the same loss, statistics and gradients to fp32 rounding; an unknown impl is refused."""
    g = torch.Generator().manual_seed(5)
    N, V, Vp, D = 21, 203, 256, 48
    h, W, b = torch.randn(N, D, generator=g), torch.randn(Vp, D, generator=g) / 3, torch.randn(Vp, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = -100
    up = torch.randn(N, generator=g) * (t != -100)
    cfg = {"impl": "gemm", "v_chunk": 64}
    loss0, st0 = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V)
    loss1, st1 = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config=cfg)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st1, st0, rtol=1e-5, atol=1e-5)
    grads0 = lce_mod.linear_cross_entropy_bwd(up, h, W, b, t, st0, 30.0, -100, V)
    grads1 = lce_mod.linear_cross_entropy_bwd(up, h, W, b, t, st0, 30.0, -100, V, config=cfg)
    for a, c in zip(grads1, grads0):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert grads1[1][V:].abs().max() == 0 and grads1[2][V:].abs().max() == 0
    with pytest.raises(ValueError, match="impl"):
        lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config={"impl": "cublas"})


@needs_interp
def test_lce_triton_owt_vocab(monkeypatch):
    """V = 50258 (OWT), few rows: vocabulary splits and chunks, one ragged tail tile (wide tiles: interpreter time)."""
    monkeypatch.setattr(lce_mod, "INTERPRET_CONFIG", {**lce_mod.INTERPRET_CONFIG, "BLOCK_N": 512, "v_chunk": 8192})
    _check_hard("triton", 3, 50258, 32, 50258, torch.float32, True, 30.0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lce_reductions(backend, reduction):
    h, W, b, t, _ = _problem(19, 53, 32, 53, torch.float32, True, 3, ignore=4)
    grads = []
    for be in (backend, "reference"):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, b, t, reduction=reduction, backend=be)
        loss.backward()
        grads.append((loss.detach(), hh.grad, WW.grad))
    valid = (t != -100).sum()
    per = ref.linear_cross_entropy_ref(h, W, b, t)
    expect = per.sum() if reduction == "sum" else per.sum() / valid
    torch.testing.assert_close(grads[0][0], expect, rtol=2e-6, atol=2e-6)
    for a, r in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_lce_leading_dims_and_validation():
    h, W, b, t, _ = _problem(12, 40, 16, 40, torch.float32)
    out = linear_cross_entropy(h.view(3, 4, 16), W, b, t.view(3, 4), backend="torch")
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.reshape(-1), linear_cross_entropy(h, W, b, t, backend="reference"))
    with pytest.raises(ValueError):
        linear_cross_entropy(h, W, b, t, reduction="max")
    with pytest.raises(ValueError):
        linear_cross_entropy(h, W, b, t, n_valid=41)
    with pytest.raises(ValueError):
        linear_cross_entropy(h, W[:, :8], b, t)


# ---- soft targets ----------------------------------------------------------------------------
def _soft_problem(N, V, D, Vp, dtype, bias=True, seed=0):
    h, W, b, _, up = _problem(N, V, D, Vp, dtype, bias, seed)
    g = torch.Generator().manual_seed(seed + 100)
    h1 = (torch.randn(N, D, generator=g) * 2).to(dtype)
    h2 = (torch.randn(N, D, generator=g) * 2).to(dtype)
    lam = torch.rand(N, generator=g)
    return h, W, b, h1, h2, lam, up


def _soft_truth(h, W, b, h1, h2, lam, cap, V, up):
    h, W = h.double().requires_grad_(), W.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    bb = 0 if b is None else b[:V]

    def s(x):
        z = x @ W[:V].T + bb
        return cap * torch.tanh(z / cap) if cap else z
    with torch.no_grad():
        lam = lam.double()[:, None]
        tgt = lam * s(h1.double()).softmax(-1) + (1 - lam) * s(h2.double()).softmax(-1)
    loss = -(tgt * s(h).log_softmax(-1)).sum(-1)
    (loss * up.double()).sum().backward()
    return loss.detach(), h.grad, W.grad, (None if b is None else b.grad)


def _check_soft(backend, N, V, D, Vp, dtype, bias, cap, seed=0):
    h, W, b, h1, h2, lam, up = _soft_problem(N, V, D, Vp, dtype, bias, seed)
    truth = _soft_truth(h, W, b, h1, h2, lam, cap, V, up)
    names = ("_soft_linear_cross_entropy_fwd_kernel", "_soft_linear_cross_entropy_bwd_kernel")
    with must_launch(lce_mod, *names) if backend == "triton" else contextlib.nullcontext():
        out = _run(soft_linear_cross_entropy, h, W, b, up, h1=h1, h2=h2, lam=lam, cap=cap,
                   n_valid=V if Vp != V else None, backend=backend)
    rf = _run(lambda h, W, b, **kw: ref.soft_linear_cross_entropy_ref(h, W[:V], None if b is None else b[:V], **kw),
              h, W, b, up, h1=h1, h2=h2, lam=lam, cap=cap)
    for name, o, r, tr in zip(("loss", "dh", "dW", "db"), out, rf, truth):
        if tr is not None:
            _budget(f"soft {backend} {name}", o, r, tr, dtype)
    if Vp != V:
        assert out[2][V:].abs().max() == 0


SOFT_CASES = [
    pytest.param(1, 37, 64, 37, True, 30.0, id="rows1"),
    pytest.param(37, 211, 64, 256, True, 30.0, id="rows37-padded"),
    pytest.param(5, 97, 24, 97, False, None, id="D24-nocap-nobias"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V,D,Vp,bias,cap", SOFT_CASES)
def test_soft_torch(small_torch_chunks, N, V, D, Vp, bias, cap, dtype):
    _check_soft("torch", N, V, D, Vp, dtype, bias, cap)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V,D,Vp,bias,cap", SOFT_CASES)
def test_soft_triton(N, V, D, Vp, bias, cap, dtype):
    _check_soft("triton", N, V, D, Vp, dtype, bias, cap)


def test_soft_no_grad_to_targets_and_lam_broadcast():
    h, W, b, h1, h2, lam, _ = _soft_problem(6, 29, 16, 29, torch.float32)
    h1 = h1.clone().requires_grad_()
    h = h.clone().requires_grad_()
    lam_b = torch.tensor([[0.25], [0.75]])                       # per-batch λ broadcast over L = 3
    out = soft_linear_cross_entropy(h.view(2, 3, 16), W, b, h1.view(2, 3, 16), h2.view(2, 3, 16), lam_b,
                                    backend="torch")
    out.sum().backward()
    assert h1.grad is None
    assert h.grad is not None
    expect = ref.soft_linear_cross_entropy_ref(h.detach(), W, b, h1.detach(), h2, lam_b.expand(2, 3).reshape(-1))
    torch.testing.assert_close(out.reshape(-1), expect, rtol=1e-5, atol=1e-5)


# ---- the opt-in TMA variant (config {"tma": True}, "tma_store": True) --------------------------------
KERNELS = ("_linear_cross_entropy_fwd_kernel", "_linear_cross_entropy_bwd_kernel",
           "_soft_linear_cross_entropy_fwd_kernel", "_soft_linear_cross_entropy_bwd_kernel")


class _Spy:
    """Stands in for a kernel: records (kernel, TMA, TMA_STORE, positions of descriptor arguments) per launch,
    then launches it. One kernel per pass serves both variants (the JIT specializes on pointer vs descriptor
    arguments), so the flags and the argument types prove which variant ran."""

    def __init__(self, name, kernel, seen):
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            descs = tuple(i for i, a in enumerate(args) if type(a).__name__ == "TensorDescriptor")
            self.seen.append((self.name, kw["TMA"], kw.get("TMA_STORE", False), descs))
            return self.kernel[grid](*args, **kw)
        return launch


def _spy(monkeypatch):
    seen = []
    for name in KERNELS:
        monkeypatch.setattr(lce_mod, name, _Spy(name, getattr(lce_mod, name), seen))
    return seen


def _launchers(h, W, b, t, up, cap, V, fcfg, bcfg):
    """(loss, dh, dW, db) of Σ up·loss through the Triton launchers with explicit configs."""
    loss, stats = lce_mod.linear_cross_entropy_fwd(h, W, b, t, cap, -100, V, fcfg)
    dh, dW, db = lce_mod.linear_cross_entropy_bwd(up, h, W, b, t, stats, cap, -100, V, bcfg)
    return loss, dh, dW, (db if b is not None else None)


TMA_CASES = [
    # V prime and padded, rows not a multiple of BLOCK_M (16), ignored rows, vocabulary splits (fwd) and several
    # chunks and a persistent grid (bwd); the loops flattened as FWD_CONFIG / BWD_CONFIG run them on the GPU
    pytest.param(29, 257, 300, 64, torch.float32, True, 30.0, 5, dict(FLATTEN=True),
                 dict(FLATTEN=True, persistent=True), id="fp32-rows29-Vprime-pad-ignore-flat-persistent"),
    pytest.param(29, 257, 300, 64, torch.float16, True, 30.0, 5, dict(FLATTEN=True),
                 dict(FLATTEN=True, persistent=True, tma_store=True), id="fp16-rows29-Vprime-pad-ignore-store"),
    # D % BLOCK_K != 0 (TMA zero-fills the K tail), no bias, one program per tile, dS through the descriptor
    pytest.param(23, 101, 128, 72, torch.float16, False, 30.0, 1, dict(FLATTEN=False),
                 dict(FLATTEN=False, persistent=False, tma_store=True), id="fp16-rows23-Ktail-nobias-grid-store"),
    pytest.param(1, 37, 40, 24, torch.float32, True, None, 0, dict(FLATTEN=True),
                 dict(FLATTEN=True, persistent=True, tma_store=True), id="fp32-rows1-D24-nocap-store"),
]


@needs_interp
@pytest.mark.parametrize("N,V,Vp,D,dtype,cap,ignore", [
    pytest.param(29, 257, 300, 64, torch.float32, 30.0, 5, id="fp32-rows29-Vprime-pad-ignore"),
    pytest.param(23, 101, 128, 72, torch.float16, 30.0, 1, id="fp16-rows23-Ktail"),
    pytest.param(17, 37, 40, 24, torch.float32, None, 0, id="fp32-rows17-nocap")])
def test_lce_backward_db_from_the_dw_gemm(monkeypatch, N, V, Vp, D, dtype, cap, ignore):
    """Backward config {"db_gemm": True}: the kernel runs without its db partials (DB_PARTIALS=False at every
    chunk's launch) and db is the ones column of dSᵀ·[h, 1]; dh is the default's bit for bit (the same dS, the
    same dh GEMM), dW and db within the budget against the fp64 truth, padded vocabulary rows exactly zero."""
    h, W, b, t, up = _problem(N, V, D, Vp, dtype, True, seed=2, ignore=ignore)
    spy = LaunchArgs(lce_mod._linear_cross_entropy_bwd_kernel)
    monkeypatch.setattr(lce_mod, "_linear_cross_entropy_bwd_kernel", spy)
    default = _launchers(h, W, b, t, up, cap, V, None, None)
    n_default = len(spy.launches)
    out = _launchers(h, W, b, t, up, cap, V, None, {"db_gemm": True})
    flags = [launch["DB_PARTIALS"] for launch in spy.launches]
    assert n_default >= 1 and flags == [True] * n_default + [False] * n_default, flags
    assert torch.equal(out[0], default[0]) and torch.equal(out[1], default[1])
    assert out[2][V:].abs().max() == 0 and out[3][V:].abs().max() == 0
    truth = _truth(h, W, b, t, cap, V, up)
    rf = _run(lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up, targets=t,
              cap=cap)
    for i, name in ((2, "dW"), (3, "db")):
        _budget(f"db_gemm {name}", out[i], rf[i], truth[i], dtype)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_soft_backward_db_from_the_dw_gemm(monkeypatch, dtype):
    """The soft-target backward with {"db_gemm": True}: no db partials in its kernel (DB_PARTIALS=False at every
    launch), dh the default's bit for bit, dW and db within the budget against the fp64 truth, padding zero."""
    N, V, Vp, D = 19, 97, 128, 32
    h, W, b, h1, h2, lam, up = _soft_problem(N, V, D, Vp, dtype, True, seed=3)
    spy = LaunchArgs(lce_mod._soft_linear_cross_entropy_bwd_kernel)
    monkeypatch.setattr(lce_mod, "_soft_linear_cross_entropy_bwd_kernel", spy)
    loss, stats = lce_mod.soft_linear_cross_entropy_fwd(h, W, b, h1, h2, lam, 30.0, V)
    default = lce_mod.soft_linear_cross_entropy_bwd(up, h, W, b, h1, h2, lam, stats, 30.0, V)
    n_default = len(spy.launches)
    out = lce_mod.soft_linear_cross_entropy_bwd(up, h, W, b, h1, h2, lam, stats, 30.0, V, {"db_gemm": True})
    flags = [launch["DB_PARTIALS"] for launch in spy.launches]
    assert n_default >= 1 and flags == [True] * n_default + [False] * n_default, flags
    assert torch.equal(out[0], default[0])
    assert out[1][V:].abs().max() == 0 and out[2][V:].abs().max() == 0
    truth = _soft_truth(h, W, b, h1, h2, lam, 30.0, V, up)
    rf = _run(lambda h, W, b, **kw: ref.soft_linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up,
              h1=h1, h2=h2, lam=lam, cap=30.0)
    for i, name in ((1, "dW"), (2, "db")):
        _budget(f"soft db_gemm {name}", out[i], rf[i + 1], truth[i + 1], dtype)


@needs_interp
@pytest.mark.parametrize("N,V,Vp,D,dtype,bias,cap,ignore,fcfg,bcfg", TMA_CASES)
def test_lce_triton_tma(monkeypatch, N, V, Vp, D, dtype, bias, cap, ignore, fcfg, bcfg):
    """The TMA variant against the fp64 truth with the error budget (loss, dh, dW, db), padded vocabulary rows
    and ignored rows with exactly zero gradient; and, as the interpreter runs the same numpy ops on the same
    tiles either way, bitwise equal to the pointer kernels (zero fill ≡ clamped loads under the masks)."""
    h, W, b, t, up = _problem(N, V, D, Vp, dtype, bias, seed=1, ignore=ignore)
    seen = _spy(monkeypatch)
    out = _launchers(h, W, b, t, up, cap, V, dict(fcfg, tma=True), dict(bcfg, tma=True))
    store = bool(bcfg.get("tma_store"))
    # descriptors: h and W (arguments 0, 1), and ds (argument 6) in the backward with tma_store
    assert set(seen) == {(KERNELS[0], True, False, (0, 1)), (KERNELS[1], True, store, (0, 1, 6) if store else (0, 1))}
    assert lce_mod.tma_usable(h, W, 16)
    truth = _truth(h, W, b, t, cap, V, up)
    rf = _run(lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], None if b is None else b[:V], **kw),
              h, W, b, up, targets=t, cap=cap)
    for name, o, r, tr in zip(("loss", "dh", "dW", "db"), out, rf, truth):
        if tr is not None:
            _budget(f"tma {name}", o, r, tr, dtype)
    assert out[2][V:].abs().max() == 0 and (b is None or out[3][V:].abs().max() == 0), "padded rows got gradient"
    if ignore:
        assert (out[0][t == -100] == 0).all() and out[1][t == -100].abs().max() == 0
    seen.clear()
    ptr = _launchers(h, W, b, t, up, cap, V, fcfg, bcfg)
    assert {s[1] for s in seen} == {False}
    for name, o, p in zip(("loss", "dh", "dW", "db"), out, ptr):
        if p is not None:
            assert torch.equal(o, p), f"{name}: TMA != pointer kernel in the interpreter"


@needs_interp
def test_soft_triton_tma(monkeypatch):
    """The soft-target kernels take the same TMA operands (three row descriptors h, h1, h2)."""
    N, V, Vp, D, dtype = 19, 97, 128, 32, torch.float32
    h, W, b, h1, h2, lam, up = _soft_problem(N, V, D, Vp, dtype, True, seed=2)
    seen = _spy(monkeypatch)
    fcfg, bcfg = dict(tma=True, FLATTEN=True), dict(tma=True, tma_store=True, FLATTEN=True)
    loss, stats = lce_mod.soft_linear_cross_entropy_fwd(h, W, b, h1, h2, lam, 30.0, V, fcfg)
    out = (loss, *lce_mod.soft_linear_cross_entropy_bwd(up, h, W, b, h1, h2, lam, stats, 30.0, V, bcfg))
    assert set(seen) == {(KERNELS[2], True, False, (0, 1, 2, 3)), (KERNELS[3], True, True, (0, 1, 2, 3, 8))}, seen
    truth = _soft_truth(h, W, b, h1, h2, lam, 30.0, V, up)
    rf = _run(lambda h, W, b, **kw: ref.soft_linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up,
              h1=h1, h2=h2, lam=lam, cap=30.0)
    for name, o, r, tr in zip(("loss", "dh", "dW", "db"), out, rf, truth):
        _budget(f"soft tma {name}", o, r, tr, dtype)
    assert out[2][V:].abs().max() == 0 and out[3][V:].abs().max() == 0


@needs_interp
@pytest.mark.parametrize("layout", ["offset-base", "weight-row-stride"])
def test_lce_triton_tma_falls_back_to_pointer_kernels(monkeypatch, layout):
    """A base not 16-byte aligned or a row stride not a multiple of 16 bytes cannot be a TMA descriptor:
    config {"tma": True} must then run the pointer kernels (and still be right)."""
    N, V, Vp, D, dtype = 9, 50, 64, 32, torch.float16
    h, W, b, t, up = _problem(N, V, D, Vp, dtype, True, seed=3, ignore=1)
    assert lce_mod.tma_usable(h, W, 16)                   # the same data, aligned
    if layout == "offset-base":                           # data_ptr ≡ 2 mod 16
        h = torch.cat([torch.zeros(1, dtype=dtype), h.reshape(-1)])[1:].view(N, D)
    else:                                                 # weight rows 33 halves = 66 bytes apart
        W = torch.cat([W, torch.zeros(Vp, 1, dtype=dtype)], 1)[:, :D]
    assert not lce_mod.tma_usable(h, W, 16)
    seen = _spy(monkeypatch)
    tma = dict(tma=True, tma_store=True)
    out = _launchers(h, W, b, t, up, 30.0, V, tma, tma)
    assert {s[1:] for s in seen} == {(False, False, ())}, seen
    truth = _truth(h, W, b, t, 30.0, V, up)
    rf = _run(lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up,
              targets=t, cap=30.0)
    for name, o, r, tr in zip(("loss", "dh", "dW", "db"), out, rf, truth):
        _budget(f"fallback {name}", o, r, tr, dtype)


@needs_interp
def test_bench_smoke_tma_candidates(monkeypatch):
    """bench/bench_linear_cross_entropy.py end to end at a tiny shape on the CPU (fp16: the interpreter's bf16
    is wrong), so the one GPU run cannot die on a bug: the default-via-launchers row, then each TMA candidate
    (fwd+bwd, and the forward alone) with the TMA kernels launched and results equal to the default's."""
    from fmlm.bench import bench_linear_cross_entropy as bench
    from fmlm.bench import common

    # BUDGET_S: every optional row, however slow the interpreter runs on a loaded machine (the GPU's is 26 s)
    for k, v in dict(DEVICE="cpu", N=20, V=50, D=32, VP=64, VARIANTS=[], BUDGET_S=1e4).items():
        monkeypatch.setattr(bench, k, v)
    inputs = bench._inputs
    monkeypatch.setattr(bench, "_inputs", lambda: inputs(torch.float16))
    monkeypatch.setattr(bench, "time_fn", lambda fn, warmup=2, iters=10, device="cpu": common.time_fn(fn, 1, 2, device))
    monkeypatch.setattr(bench, "peak_memory_bytes", lambda fn, device="cpu": 0)
    soft = lce_mod.soft_linear_cross_entropy      # its Triton kernels have their own tests: spare the interpreter
    monkeypatch.setattr(lce_mod, "soft_linear_cross_entropy", lambda *a, **k: soft(*a, **{**k, "backend": "torch"}))
    seen = _spy(monkeypatch)
    rows = bench.run(quick=True)
    assert not [r for r in rows if str(r.get("note", "")).startswith(("failed", "skipped: TMA"))], rows
    cand = [r for r in rows if r["impl"].startswith("triton [TMA candidate")]
    # the TMA forward at the default tile is timed alone once, by the first row that runs it
    assert [(r["impl"], r["pass"]) for r in cand] == [("triton [TMA candidate: tma]", "fwd+bwd"),
                                                      ("triton [TMA candidate: tma+store]", "fwd+bwd")], cand
    assert all(r["max_loss_diff_vs_default"] == 0 and r["max_dh_diff_vs_default"] == 0 for r in cand), cand
    assert all(r["speedup_vs_default"] > 0 for r in cand)
    fwd_tma = [r for r in rows if r["impl"].startswith("triton [fwd TMA at")]
    assert [(r["impl"], r["pass"]) for r in fwd_tma] == [
        ("triton [fwd TMA at the default 128x256 tile]", "fwd+bwd"), ("triton [fwd TMA at the default 128x256 tile]",
                                                                    "fwd"),
        ("triton [fwd TMA at 128x256 + bwd 128x256, 16 warps, 2 stages, db from the dW GEMM]", "fwd+bwd")], fwd_tma
    assert all(r["speedup_vs_default"] > 0 for r in fwd_tma), fwd_tma
    assert all(r["max_loss_diff_vs_default"] == 0 for r in fwd_tma if r["pass"] == "fwd+bwd"), fwd_tma
    assert {x[1:3] for x in seen if x[0] == KERNELS[1]} == {(False, False), (True, False), (True, True)}
    assert any(r["impl"].startswith("best measured") for r in rows)
    # (the "best measured" row may repeat any of them: startswith, not in)
    online = [r for r in rows if r["impl"].startswith("triton [online-softmax forward")]
    assert [r["pass"] for r in online] == ["fwd+bwd", "fwd"] and all(r["speedup_vs_default"] > 0 for r in online)
    gemm = [r for r in rows if r["impl"].startswith("triton [gemm: cuBLAS logits")]
    assert [r["pass"] for r in gemm] == ["fwd+bwd", "fwd"] and all(r["speedup_vs_default"] > 0 for r in gemm)
    assert gemm[0]["max_loss_diff_vs_default"] < 1e-2       # fp16 logits here, fp32 in the fused kernels
    two = [r for r in rows if r["impl"].startswith(("triton [fwd 2 CTAs/SM", "triton [fwd TMA, 2 CTAs/SM"))]
    assert [r["pass"] for r in two] == ["fwd+bwd", "fwd"] * 2 and all(r["speedup_vs_default"] > 0 for r in two)
    assert all(r["max_loss_diff_vs_default"] < 1e-5 for r in two[::2]), two
    partials = [r for r in rows if r["impl"].startswith("triton [bf16 dS·W partials")]
    assert [r["pass"] for r in partials] == ["fwd+bwd"] and partials[0]["speedup_vs_default"] > 0
    assert partials[0]["max_dh_diff_vs_default"] == 0        # the CPU takes the same (non-addmm) path either way
    dbg = [r for r in rows if r["impl"].startswith("triton [bwd db from the dW GEMM")]
    assert [r["pass"] for r in dbg] == ["fwd+bwd"] * 2 and all(r["speedup_vs_default"] > 0 for r in dbg)
    assert all(r["max_dh_diff_vs_default"] == 0 and r["max_db_diff_vs_default"] < 1e-2 for r in dbg), dbg
    soft_dbg = [r for r in rows if r["impl"].startswith("triton [soft launchers")]
    assert [(r["impl"], r["pass"]) for r in soft_dbg] == [("triton [soft launchers, default]", "soft fwd+bwd"),
                                                          ("triton [soft launchers, bwd db from the dW GEMM]",
                                                           "soft fwd+bwd")], soft_dbg
    assert soft_dbg[1]["speedup_vs_default"] > 0 and soft_dbg[1]["max_db_diff_vs_default"] < 1e-2, soft_dbg
    # each row's FLOPs are the work it executes, its bytes the traffic of its own pass
    N, V, D, VP = 20, 50, 32, 64
    flops = {r["impl"] + "/" + r["pass"]: r["eff_tflops"] * r["ms"] * 1e9 for r in rows if "ms" in r}
    nbytes = {r["impl"] + "/" + r["pass"]: r["gbs"] * r["ms"] * 1e6 for r in rows if "ms" in r}
    assert flops["triton/fwd+bwd"] == pytest.approx(8 * N * V * D)
    assert flops["triton/fwd"] == pytest.approx(2 * N * V * D)
    for ref_impl in ("reference head (published: one-hot product)", "reference.linear_cross_entropy_ref (gather)"):
        assert flops[ref_impl + "/fwd+bwd"] == pytest.approx(6 * N * V * D), ref_impl
        assert next(r for r in rows if r["impl"] == ref_impl)["note"].find("6·N·V·D") >= 0
    assert nbytes["triton/fwd+bwd"] == pytest.approx(2 * (N * D + VP * D) * 2 + VP * 4)
    assert nbytes["triton/fwd"] == pytest.approx((N * D + VP * D) * 2 + N * 4)
    assert nbytes["cuBLAS h·Wᵀ (padded V, no epilogue)/fwd"] == pytest.approx((N * D + VP * D + N * VP) * 2)


def test_bench_compiled_reference_child_waits_before_gpu_work(monkeypatch):
    """The torch.compile(reference) child makes no input, compile or first call before the parent's go line: its
    GPU work must not overlap the rows the parent times."""
    import io

    from fmlm.bench import bench_linear_cross_entropy as bench

    order = []

    class Stdin(io.StringIO):
        def readline(self, *a):
            order.append("go")
            return "go\n"

    def inputs(*a, **k):
        order.append("inputs")
        raise RuntimeError("stop")
    monkeypatch.setattr(bench.sys, "stdin", Stdin())
    monkeypatch.setattr(bench, "_inputs", inputs)
    monkeypatch.setattr(bench.torch, "compile", lambda *a, **k: order.append("compile"))
    with pytest.raises(RuntimeError, match="stop"):
        bench._compiled_reference()
    assert order == ["go", "inputs"]


# ---- torch.library registration ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_opcheck(backend):
    h, W, b, t, _ = _problem(5, 23, 16, 32, torch.float32, ignore=1)
    h.requires_grad_()
    W.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(torch.ops.fmlm.linear_cross_entropy.default, (h, W, b, t, 30.0, -100, 23, backend))
    _, _, _, h1, h2, lam, _ = _soft_problem(5, 23, 16, 32, torch.float32)
    torch.library.opcheck(torch.ops.fmlm.soft_linear_cross_entropy.default,
                          (h, W, b, h1, h2, lam, 30.0, 23, backend))
    # the registered op (the torch.compile path) and the eager autograd.Function give the same values and grads
    up = torch.randn(5)
    via_op = _run(lambda h, W, b: torch.ops.fmlm.linear_cross_entropy(h, W, b, t, 30.0, -100, 23, backend)[0],
                  h, W, b, up)
    eager = _run(lambda h, W, b: linear_cross_entropy(h, W, b, t, n_valid=23, backend=backend), h, W, b, up)
    for a, e in zip(via_op, eager):
        assert a is not None
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    g = torch.randn(5)
    lse = torch.ops.fmlm.linear_cross_entropy(h, W, b, t, 30.0, -100, 23, backend)[1]
    torch.library.opcheck(torch.ops.fmlm.linear_cross_entropy_backward.default,
                          (g, h.detach(), W.detach(), b.detach(), t, lse, 30.0, -100, 23, backend))
    # transposed views: the backward ops' fake impls must give the contiguous strides the impls return (they gave
    # the views' strides, and inductor asserted on them; found by review)
    hT, WT = h.detach().t().contiguous().t(), W.detach().t().contiguous().t()
    torch.library.opcheck(torch.ops.fmlm.linear_cross_entropy_backward.default,
                          (g, hT, WT, b.detach(), t, lse, 30.0, -100, 23, backend))
    stats = torch.ops.fmlm.soft_linear_cross_entropy(h, W, b, h1, h2, lam, 30.0, 23, backend)[1]
    torch.library.opcheck(torch.ops.fmlm.soft_linear_cross_entropy_backward.default,
                          (g, hT, WT, b.detach(), h1, h2, lam, stats, 30.0, 23, backend))


def test_compile_specs_build():
    """The real configs compile for sm_90a without spills (bench/compile_check.py reports registers)."""
    triton = pytest.importorskip("triton")
    mod = lce_mod
    if not mod.HAS_TRITON or INTERP:
        pytest.skip("needs the triton compiler (TRITON_INTERPRET is set: make compile-check covers it)")
    specs = mod.compile_specs()
    base = {"linear_cross_entropy_fwd", "linear_cross_entropy_bwd", "soft_linear_cross_entropy_fwd",
            "soft_linear_cross_entropy_bwd"}
    tma = {f"{n}[{label}]" for label in mod.TMA_CANDIDATES for n in base
           if not (label == "tma+store" and n.endswith("_fwd"))}        # the same forward as "tma"
    two = {"linear_cross_entropy_fwd[2 CTAs/SM]"} | ({"linear_cross_entropy_fwd[tma, 2 CTAs/SM]"}
                                                     if mod.TensorDescriptor is not None else set())
    gemm = {"lce_chunk_stats[gemm]", "lce_chunk_ds[gemm]", "linear_cross_entropy_bwd[db_gemm]",
            "soft_linear_cross_entropy_bwd[db_gemm]", "linear_cross_entropy_bwd[128x256, 16 warps, db_gemm]"}
    assert {s["name"] for s in specs} == base | two | gemm | (tma if mod.TensorDescriptor is not None else set())
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    # the default forward, and the opt-in wide backward whose 16-warp shape was chosen for having no spills
    for name in ("linear_cross_entropy_fwd", "linear_cross_entropy_bwd[128x256, 16 warps, db_gemm]"):
        s = next(s for s in specs if s["name"] == name)
        k = triton.compile(ASTSource(s["fn"], s["signature"], s["constexprs"], s["attrs"]),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
        assert "ttng.warp_group_dot" in k.asm["ttgir"], f"{name}: no wgmma on sm_90a"
        assert "async_copy_global_to_local" in k.asm["ttgir"], f"{name}: loads not pipelined"
        res = _ptxas_spills(k.asm["ptx"])
        assert res is None or res[1] == 0, f"{name}: {res[1]} bytes of spills"


def _ptxas_spills(ptx: str):
    """(registers, spill bytes) from the bundled ptxas -v, or None when triton ships no ptxas."""
    import re
    import tempfile

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "-arch=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


# ---- GPU (bf16, OWT shape) -------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fp32_matmul_highest():
    """fp32 truths must not run as TF32 if another test changed the global matmul precision."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


OWT_V = 50258


def _owt(dtype=torch.bfloat16, N=16384, V=OWT_V, D=768, Vp=50304, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=g).to(dtype)
    W = (torch.randn(Vp, D, device="cuda", generator=g) * (4.0 / D ** 0.5)).to(dtype)
    W[V:] = 0
    b = torch.randn(Vp, device="cuda", generator=g).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    return h, W, b, t


@pytest.mark.gpu
def test_lce_gpu_gemm_impl_bf16_owt(monkeypatch):
    """The opt-in "gemm" implementation (cuBLAS logits in bf16 + the Triton passes) at the OWT shape, within
    the same budgets as the default; its passes are the kernels that ran."""
    monkeypatch.setattr(lce_mod, "FWD_CONFIG", {**lce_mod.FWD_CONFIG, "impl": "gemm"})
    monkeypatch.setattr(lce_mod, "BWD_CONFIG", {**lce_mod.BWD_CONFIG, "impl": "gemm"})
    stats, ds = LaunchSpy(lce_mod._lce_chunk_stats_kernel), LaunchSpy(lce_mod._lce_chunk_ds_kernel)
    monkeypatch.setattr(lce_mod, "_lce_chunk_stats_kernel", stats)
    monkeypatch.setattr(lce_mod, "_lce_chunk_ds_kernel", ds)
    test_lce_gpu_bf16_owt()
    assert stats.launches >= 1 and ds.launches >= 1, (stats.launches, ds.launches)


@pytest.mark.gpu
def test_lce_gpu_bf16_owt():
    """bf16 at the OWT shape (padded weight) against the bf16 reference. Truth: fp64 on 2048 rows for the
    row-local loss and dh; the torch backend on fp32 copies (fp32 math) over all rows for dW and db."""
    h, W, b, t = _owt()
    V = 50258
    up = torch.randn(h.shape[0], device="cuda")
    out = _run(linear_cross_entropy, h, W, b, up, targets=t, n_valid=V, backend="triton")
    assert out[2].dtype == torch.bfloat16 and out[2][V:].abs().max() == 0
    rows = slice(0, 2048)
    hs, us, ts = h[rows], up[rows], t[rows]
    spec = lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], b[:V], **kw)  # noqa: E731
    rf = _run(spec, hs, W, b, us, targets=ts)
    tr = _truth(hs, W, b, ts, 30.0, V, us)
    _budget("gpu loss", out[0][rows], rf[0], tr[0], torch.bfloat16)
    _budget("gpu dh", out[1][rows], rf[1], tr[1], torch.bfloat16)
    full_r = _run(spec, h, W, b, up, targets=t)
    full_t = _run(linear_cross_entropy, h.float(), W.float(), b.float(), up, targets=t, n_valid=V, backend="torch")
    for i, name in ((2, "dW"), (3, "db")):
        _budget(f"gpu {name}", out[i], full_r[i], full_t[i], torch.bfloat16)


@pytest.mark.gpu
def test_lce_gpu_two_cta_forward_bf16_owt():
    """The opt-in two-CTA forward (register cap 128, two vocabulary splits per row block) against the default
    forward at the OWT shape: the same loss and log-sum-exp up to the split combine's fp32 rounding."""
    h, W, b, t = _owt()
    V = 50258
    loss0, st0 = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V)
    loss2, st2 = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config=lce_mod.FWD_TWO_CTAS)
    torch.testing.assert_close(loss2, loss0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(st2[0] + st2[1], st0[0] + st0[1], rtol=1e-6, atol=1e-4)


def _needs_tma():
    if torch.cuda.get_device_capability()[0] < 9 or lce_mod.TensorDescriptor is None:
        pytest.skip("the TMA variant needs sm_90+ and triton host tensor descriptors")


@needs_interp
@pytest.mark.parametrize("N,V,Vp,D,dtype,ignore", [
    pytest.param(29, 557, 600, 64, torch.float32, 5, id="fp32-rows29-Vprime-pad-3tiles-ignore"),
    pytest.param(23, 101, 128, 72, torch.float16, 1, id="fp16-rows23-Ktail-1tile")])
def test_lce_backward_wide_tile(monkeypatch, N, V, Vp, D, dtype, ignore):
    """The opt-in 128×256 backward (lce.BWD_WIDE, the tile the benchmark times): its launches run at BLOCK_N 256
    without db partials, dS chunks of whole 256-wide tiles; dh, dW, db within the budget against the fp64 truth,
    padded vocabulary rows exactly zero."""
    h, W, b, t, up = _problem(N, V, D, Vp, dtype, True, seed=3, ignore=ignore)
    spy = LaunchArgs(lce_mod._linear_cross_entropy_bwd_kernel)
    monkeypatch.setattr(lce_mod, "_linear_cross_entropy_bwd_kernel", spy)
    out = _launchers(h, W, b, t, up, 30.0, V, None, dict(lce_mod.BWD_WIDE))
    assert spy.launches and all(x["BLOCK_N"] == 256 and x["DB_PARTIALS"] is False for x in spy.launches)
    assert out[2][V:].abs().max() == 0 and out[3][V:].abs().max() == 0
    truth = _truth(h, W, b, t, 30.0, V, up)
    rf = _run(lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up, targets=t,
              cap=30.0)
    for i, name in ((0, "loss"), (1, "dh"), (2, "dW"), (3, "db")):
        _budget(f"wide {name}", out[i], rf[i], truth[i], dtype)


@pytest.mark.gpu
def test_lce_gpu_wide_backward_bf16_owt():
    """The opt-in 128×256 backward (lce.BWD_WIDE) at the OWT shape in bf16: within the budget against the bf16
    reference and against the default backward (the fp32 torch backend's gradients as the truth); 4096 rows keep
    the reference's materialized logits and the test's time small."""
    h, W, b, t = _owt(N=4096)
    V = OWT_V
    up = torch.randn(h.shape[0], device=h.device)
    default = _launchers(h, W, b, t, up, 30.0, V, None, None)
    out = _launchers(h, W, b, t, up, 30.0, V, None, dict(lce_mod.BWD_WIDE))
    assert out[2][V:].abs().max() == 0 and out[3][V:].abs().max() == 0
    assert torch.equal(out[0], default[0])           # the same forward
    full_r = _run(lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up, targets=t)
    full_t = _run(linear_cross_entropy, h.float(), W.float(), b.float(), up, targets=t, n_valid=V, backend="torch")
    for i, name in ((1, "dh"), (2, "dW"), (3, "db")):
        _budget(f"wide {name}", out[i], full_r[i], full_t[i], torch.bfloat16)
        _budget(f"wide {name} vs default", out[i], default[i], full_t[i], torch.bfloat16)


@pytest.mark.gpu
def test_lce_gpu_tma_bf16_owt(monkeypatch):
    """Each TMA candidate (TMA_CANDIDATES, what the benchmark times) at the OWT shape, bf16, through the
    launchers: the TMA variant ran (spy), padded rows get zero gradient, and every output is within the budget
    both against the bf16 reference (the spec rule, truths as in test_lce_gpu_bf16_owt) and against the default
    pointer kernels (error at most 2x the default's plus the floor: TMA == default within budget)."""
    _needs_tma()
    h, W, b, t = _owt()
    V = OWT_V
    up = torch.randn(h.shape[0], device=h.device)
    seen = _spy(monkeypatch)
    default = _launchers(h, W, b, t, up, 30.0, V, None, None)
    assert {s[1] for s in seen} == {False}
    rows = slice(0, 2048)
    spec = lambda h, W, b, **kw: ref.linear_cross_entropy_ref(h, W[:V], b[:V], **kw)  # noqa: E731
    rf = _run(spec, h[rows], W, b, up[rows], targets=t[rows])
    tr = _truth(h[rows], W, b, t[rows], 30.0, V, up[rows])
    full_r = _run(spec, h, W, b, up, targets=t)
    full_t = _run(linear_cross_entropy, h.float(), W.float(), b.float(), up, targets=t, n_valid=V, backend="torch")
    for label, (fcfg, bcfg) in lce_mod.TMA_CANDIDATES.items():
        seen.clear()
        out = _launchers(h, W, b, t, up, 30.0, V, fcfg, bcfg)
        store = bool(bcfg.get("tma_store"))
        assert {x[:3] for x in seen} == {(KERNELS[0], True, False), (KERNELS[1], True, store)}, (label, seen)
        assert out[2][V:].abs().max() == 0 and out[3][V:].abs().max() == 0, label
        for i, name in ((0, "loss"), (1, "dh")):
            _budget(f"{label} {name}", out[i][rows], rf[i], tr[i], torch.bfloat16)
            _budget(f"{label} {name} vs default", out[i][rows], default[i][rows], tr[i], torch.bfloat16)
        for i, name in ((2, "dW"), (3, "db")):
            _budget(f"{label} {name}", out[i], full_r[i], full_t[i], torch.bfloat16)
            _budget(f"{label} {name} vs default", out[i], default[i], full_t[i], torch.bfloat16)


@pytest.mark.gpu
def test_lce_gpu_soft_tma_bf16(monkeypatch):
    """The soft-target kernels with the TMA candidates' configs: within the budget of the torch fp32 truth."""
    _needs_tma()
    h, W, b, _ = _owt(N=4096)
    V = OWT_V
    g = torch.Generator(device=h.device).manual_seed(1)
    h1 = torch.randn(h.shape, device=h.device, generator=g).to(h.dtype)
    h2 = torch.randn(h.shape, device=h.device, generator=g).to(h.dtype)
    lam = torch.rand(h.shape[0], device=h.device, generator=g)
    up = torch.randn(h.shape[0], device=h.device, generator=g)
    tr = _run(soft_linear_cross_entropy, h.float(), W.float(), b.float(), up, h1=h1.float(), h2=h2.float(),
              lam=lam, n_valid=V, backend="torch")
    rf = _run(lambda h, W, b, **kw: ref.soft_linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up,
              h1=h1, h2=h2, lam=lam)
    seen = _spy(monkeypatch)
    for label, (fcfg, bcfg) in lce_mod.TMA_CANDIDATES.items():
        seen.clear()
        loss, stats = lce_mod.soft_linear_cross_entropy_fwd(h, W, b, h1, h2, lam, 30.0, V, fcfg)
        out = (loss, *lce_mod.soft_linear_cross_entropy_bwd(up, h, W, b, h1, h2, lam, stats, 30.0, V, bcfg))
        assert {x[1] for x in seen} == {True}, (label, seen)
        assert out[2][V:].abs().max() == 0, label
        for name, o, r, x in zip(("loss", "dh", "dW", "db"), out, rf, tr):
            _budget(f"gpu soft {label} {name}", o, r, x, torch.bfloat16)


@pytest.mark.gpu
def test_lce_gpu_soft_bf16():
    h, W, b, t = _owt(N=4096)
    V = 50258
    g = torch.Generator(device="cuda").manual_seed(1)
    h1 = torch.randn(h.shape, device="cuda", generator=g).to(h.dtype)
    h2 = torch.randn(h.shape, device="cuda", generator=g).to(h.dtype)
    lam = torch.rand(h.shape[0], device="cuda", generator=g)
    up = torch.randn(h.shape[0], device="cuda", generator=g)
    kw = dict(lam=lam, n_valid=V)
    out = _run(soft_linear_cross_entropy, h, W, b, up, h1=h1, h2=h2, backend="triton", **kw)
    tr = _run(soft_linear_cross_entropy, h.float(), W.float(), b.float(), up, h1=h1.float(), h2=h2.float(),
              backend="torch", **kw)
    rf = _run(lambda h, W, b, **kw: ref.soft_linear_cross_entropy_ref(h, W[:V], b[:V], **kw), h, W, b, up,
              h1=h1, h2=h2, lam=lam)
    for name, o, r, x in zip(("loss", "dh", "dW", "db"), out, rf, tr):
        _budget(f"gpu soft {name}", o, r, x, torch.bfloat16)


@pytest.mark.gpu
def test_lce_gpu_no_vocab_sized_buffer():
    """Peak extra memory of fwd+bwd stays far below one (rows, V) bf16 logits tensor (1.65 GB here)."""
    h, W, b, t = _owt()
    h.requires_grad_()
    W.requires_grad_()
    b.requires_grad_()
    linear_cross_entropy(h, W, b, t, n_valid=50258, reduction="mean", backend="triton").backward()   # warm-up
    h.grad = W.grad = b.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(h, W, b, t, n_valid=50258, reduction="mean", backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = h.shape[0] * 50258 * 2
    assert extra < logits_bytes / 2, f"peak extra {extra / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"


@pytest.mark.skipif(not lce_mod.HAS_TRITON, reason="needs the triton package")
def test_forward_tile_follows_dtype_and_shared_memory(monkeypatch):
    """The 128×256 four-stage forward tile (192 KiB of operand stages) where the GPU lets one block have that much
    shared memory (an H100: 227 KiB); fp32 inputs and GPUs with less (an A100: 163 KiB) keep the previous 128×128
    three-stage tile (a launch at 192 KiB would fail there); an explicit config still wins; the backward's tile
    does not depend on it."""
    monkeypatch.setattr(lce_mod, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    for smem, dtype, want in ((232448, torch.bfloat16, (256, 4)), (232448, torch.float16, (256, 4)),
                              (166912, torch.bfloat16, (128, 3)), (232448, torch.float32, (128, 3)),
                              (101376, torch.float16, (128, 3))):
        monkeypatch.setattr(lce_mod, "_smem_optin", lambda device, smem=smem: smem)
        cfg = lce_mod._config("fwd", dtype, 768, None, cuda)
        assert (cfg["BLOCK_N"], cfg["num_stages"]) == want, (smem, dtype, cfg)
        assert lce_mod._config("fwd", dtype, 768, {"BLOCK_N": 64, "num_stages": 2}, cuda)["BLOCK_N"] == 64
        assert lce_mod._config("bwd", dtype, 768, None, cuda)["BLOCK_N"] == lce_mod.BWD_CONFIG["BLOCK_N"]
    assert lce_mod._config("fwd", torch.bfloat16, 768, None)["BLOCK_N"] == 256     # no device given: the default


def test_launch_opts_register_cap(monkeypatch):
    """A launcher config's maxnreg reaches the launch (ptxas .maxnreg), except under the interpreter."""
    from fmlm.kernels import _backend

    cfg = dict(dict(num_warps=8, num_stages=3), **lce_mod.FWD_TWO_CTAS)
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    assert _backend.launch_opts(cfg) == {"num_warps": 8, "num_stages": 3, "maxnreg": 128}
    assert _backend.launch_opts(dict(num_warps=4, num_stages=2)) == {"num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(_backend, "interpreting", lambda: True)
    assert _backend.launch_opts(cfg) == {"num_warps": 8, "num_stages": 3}


def test_addmm_fp32_probe_under_autocast(monkeypatch):
    """The once-per-device probe of addmm(out_dtype=float32) gives the same answer inside a bf16 autocast region
    (the FMLM trainer's first vocab_attention call) as outside: its fp32 reference product must not be autocast
    to bf16, else the cached False turns the fp32 accumulation off for the whole process. Driven on the CPU with
    a stand-in for the CUDA-only addmm(out_dtype=...): an exact fp32 accumulate into out."""
    from fmlm.kernels import _backend

    def addmm_fp32(c, a, b, out_dtype=None, out=None):
        with torch.autocast("cpu", enabled=False):      # a call with out= is not autocast
            out.add_(a.float() @ b.float())
        return out

    monkeypatch.setattr(_backend.torch, "addmm", addmm_fp32)
    cpu = torch.device("cpu")
    assert _backend._probe_addmm_fp32(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _backend._probe_addmm_fp32(cpu)


@needs_interp
def test_two_cta_forward_config_runs():
    """The opt-in two-CTA forward config through the launcher (the register cap dropped by the interpreter):
    the default's loss and statistics."""
    g = torch.Generator().manual_seed(3)
    N, V, D = 37, 257, 64
    h, W, b = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 4, torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    loss0, st0 = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V)
    loss2, st2 = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config=lce_mod.FWD_TWO_CTAS)
    torch.testing.assert_close(loss2, loss0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st2, st0, rtol=1e-6, atol=1e-6)


@needs_interp
def test_fixed_shift_forward_equals_online_forward():
    """With a cap in (0, 40] the forward kernels sum exp(S − cap) (stats' max column is cap); config
    {"fixed_shift": False} runs the online softmax. Both give the same loss and log-sum-exp (m + log l) to fp32
    rounding, hard and soft."""
    g = torch.Generator().manual_seed(7)
    N, V, D = 37, 257, 64
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g) / 4
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    loss_f, st_f = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V)
    loss_o, st_o = lce_mod.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config={"fixed_shift": False})
    assert torch.all(st_f[0] == 30.0) and not torch.all(st_o[0] == 30.0)
    torch.testing.assert_close(loss_f, loss_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_f[0] + st_f[1], st_o[0] + st_o[1], rtol=1e-6, atol=1e-5)
    h1, h2 = torch.randn(2, N, D, generator=g)
    lam = torch.rand(N, generator=g)
    sl_f, ss_f = lce_mod.soft_linear_cross_entropy_fwd(h, W, b, h1, h2, lam, 30.0, V)
    sl_o, ss_o = lce_mod.soft_linear_cross_entropy_fwd(h, W, b, h1, h2, lam, 30.0, V, config={"fixed_shift": False})
    torch.testing.assert_close(sl_f, sl_o, rtol=1e-5, atol=1e-5)
    for k in range(3):
        torch.testing.assert_close(ss_f[2 * k] + ss_f[2 * k + 1], ss_o[2 * k] + ss_o[2 * k + 1], rtol=1e-6, atol=1e-5)


@needs_interp
def test_backward_ds_chunk_fits_int32():
    """The backward's (N, chunk) dS buffer, indexed with int32 in the kernels: v_chunk rounded up to BLOCK_N and
    cut to the valid width as before, and at a row count where N·v_chunk would pass 2^31, narrowed so that it
    does not; a row count no chunk can serve is refused."""
    assert lce_mod._ds_chunk(16384, 8192, 128, 50304) == 8192
    assert lce_mod._ds_chunk(16384, 8000, 128, 50304) == 8064
    assert lce_mod._ds_chunk(16384, 8192, 128, 384) == 384
    for N in (262144, 300000, 2 ** 21):
        c = lce_mod._ds_chunk(N, 8192, 128, 50304)
        assert c % 128 == 0 and N * c < 2 ** 31 <= N * (c + 128), (N, c)     # the widest that fits
    with pytest.raises(ValueError, match="int32"):
        lce_mod._ds_chunk(2 ** 25, 8192, 128, 50304)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_bad_targets_are_refused(backend):
    """Targets outside [0, n_valid) that are not ignore_index would give the log-sum-exp (or inf) as a loss with no
    error; float targets would be truncated: both are refused, ignore_index still passes."""
    h, W, b, t, _ = _problem(5, 20, 8, 24, torch.float32, True, 0, 0)
    for bad in (20, 23, -1):
        tb = t.clone()
        tb[3] = bad
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 20\) or be -100"):
            linear_cross_entropy(h, W, b, tb, n_valid=20, backend=backend)
    with pytest.raises(TypeError, match="int32/int64"):
        linear_cross_entropy(h, W, b, t.float(), n_valid=20, backend=backend)
    tb = t.clone()
    tb[3] = -100
    assert linear_cross_entropy(h, W, b, tb, n_valid=20, backend=backend)[3] == 0


def test_triton_launchers_refuse_mixed_dtypes():
    """h and weight of different dtypes: a TypeError up front, not a compile error inside the kernel's dot."""
    h, W, b, t, _ = _problem(5, 20, 8, 24, torch.float32, True, 0, 0)
    with pytest.raises(TypeError, match="one dtype"):
        lce_mod._check_triton_inputs(h.half(), W)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_uncapped_minus_inf_bias_columns(monkeypatch, backend):
    """No cap and a bias of −inf on a block of columns (how a padded vocabulary can be masked, DESIGN.md §2.5): a
    chunk or tile whose logits are all −inf made the online softmax's exp(−inf − −inf) NaN (found by review)."""
    monkeypatch.setattr(lce_mod, "TORCH_V_CHUNK", 64)
    h, W, b, t, _ = _problem(7, 200, 16, 200, torch.float32)
    b[:96] = float("-inf")                   # the first chunk (torch) and the first tiles (triton) all −inf
    t = 96 + t % 104                          # targets among the finite columns
    got = linear_cross_entropy(h, W, b, t, cap=None, backend=backend)
    want = ref.linear_cross_entropy_ref(h, W, b, t, cap=None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shape_validation_and_the_soft_reference_backend():
    """Wrong bias, targets, h1/h2 shapes: ValueErrors up front. soft_linear_cross_entropy's 'reference' backend (and
    the no-rows path, which takes it on every backend) gives the loss of the chunked torch backend, per row, in the
    leading shape; λ weighs h1's distribution, 1 − λ h2's."""
    h, W, b, h1, h2, lam, _ = _soft_problem(6, 29, 16, 32, torch.float32, seed=2)
    t = torch.randint(0, 29, (6,))
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(h, W, b[:29], t, n_valid=29)
    with pytest.raises(ValueError, match="bias must have shape"):
        soft_linear_cross_entropy(h, W, b[:29], h1, h2, lam, n_valid=29)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h.view(2, 3, 16), W, b, t, n_valid=29)
    with pytest.raises(ValueError, match="must match h"):
        soft_linear_cross_entropy(h, W, b, h1[:5], h2, lam, n_valid=29)
    with pytest.raises(ValueError, match="must match h"):
        soft_linear_cross_entropy(h, W, b, h1, h2.view(2, 3, 16), lam, n_valid=29)
    lam = torch.tensor([[0.2], [0.9]]).expand(2, 3)
    args = (h.view(2, 3, 16), W, b, h1.view(2, 3, 16), h2.view(2, 3, 16), lam)
    r = soft_linear_cross_entropy(*args, n_valid=29, backend="reference")
    assert r.shape == (2, 3) and r.dtype == torch.float32
    torch.testing.assert_close(r, soft_linear_cross_entropy(*args, n_valid=29, backend="torch"), rtol=1e-5, atol=1e-5)
    swapped = soft_linear_cross_entropy(h.view(2, 3, 16), W, b, h2.view(2, 3, 16), h1.view(2, 3, 16), lam,
                                        n_valid=29, backend="reference")
    assert (swapped - r).abs().max() > 1e-2
    for backend in ("torch", "reference") + (("triton",) if INTERP else ()):
        empty = soft_linear_cross_entropy(h[:0].view(0, 2, 16), W, b, h1[:0].view(0, 2, 16), h2[:0].view(0, 2, 16),
                                          0.5, n_valid=29, backend=backend)
        assert empty.shape == (0, 2)


@needs_interp
def test_triton_refuses_fp64_and_int32_overflowing_operands():
    """backend='triton' takes fp32/fp16/bf16 (TypeError for fp64, both losses) and tensors of < 2^31 elements (the
    kernels index with int32): a 2^31-element weight (a stride-0 view, no memory) is a ValueError, not a launch."""
    h, W, b, h1, h2, lam, _ = _soft_problem(6, 29, 16, 32, torch.float32, seed=2)
    t = torch.randint(0, 29, (6,))
    d = lambda x: x.double()  # noqa: E731
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        linear_cross_entropy(d(h), d(W), d(b), t, backend="triton")
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        soft_linear_cross_entropy(d(h), d(W), d(b), d(h1), d(h2), lam, backend="triton")
    big = torch.zeros(1, 16).expand(2 ** 27, 16)
    assert big.numel() == 2 ** 31
    with pytest.raises(ValueError, match="int32"):
        lce_mod.linear_cross_entropy_fwd(h, big, None, t, 30.0, -100, 29)
    with pytest.raises(ValueError, match="int32"):
        lce_mod.soft_linear_cross_entropy_fwd(h, big, None, h1, h2, lam, 30.0, 29)


@pytest.mark.parametrize("impl", ["torch", "fused", "gemm"])
def test_non_finite_padding_rows_do_not_leak(monkeypatch, impl):
    """Only the first n_valid rows of weight and bias count: padding rows of inf and NaN give the loss and the
    gradients that zero padding gives (dW and db zero past n_valid), hard and soft targets, through every
    implementation (the backward's dh += dS·W[chunk] stops at n_valid: 0·inf would be NaN there)."""
    if impl != "torch" and not INTERP:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (tests/conftest.py)")
    if impl == "gemm":
        monkeypatch.setattr(lce_mod, "INTERPRET_CONFIG", {**lce_mod.INTERPRET_CONFIG, "impl": "gemm", "v_chunk": 64})
    backend = "torch" if impl == "torch" else "triton"
    g = torch.Generator().manual_seed(11)
    N, V, Vp, D = 13, 190, 256, 32          # chunks of 64: the last (192..255) lies wholly in the padding
    h = torch.randn(N, D, generator=g)
    h1, h2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    lam = torch.rand(N, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    W0, b0 = torch.randn(Vp, D, generator=g) / 3, torch.randn(Vp, generator=g)
    W0[V:], b0[V:] = 0.0, 0.0
    W1, b1 = W0.clone(), b0.clone()
    W1[V:], b1[V:] = float("inf"), float("nan")
    W1[-3:] = float("nan")

    def run(W, b, soft):
        x, w, bb = (z.clone().requires_grad_() for z in (h, W, b))
        if soft:
            loss = soft_linear_cross_entropy(x, w, bb, h1, h2, lam, 30.0, n_valid=V, backend=backend)
        else:
            loss = linear_cross_entropy(x, w, bb, t, 30.0, n_valid=V, backend=backend)
        (loss * torch.linspace(0.5, 1.5, N)).sum().backward()
        return loss.detach(), x.grad, w.grad, bb.grad

    for soft in (False, True):
        got, want = run(W1, b1, soft), run(W0, b0, soft)
        for name, a, c in zip(("loss", "dh", "dW", "db"), got, want):
            assert torch.isfinite(a).all(), (soft, name)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=f"soft={soft} {name}")
        assert got[2][V:].abs().max() == 0 and got[3][V:].abs().max() == 0
