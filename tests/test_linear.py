"""kernels/linear.py (the Triton GEMM of the 'triton_small' trunk path) against F.linear (+ GELU(tanh)), the
published layers, with an fp64 ground truth and the DESIGN.md §6 error budget; split-K partials against the
fp64 product; gate_residual's consumption of the partials."""
import importlib

import pytest
import torch

from fmlm.kernels import adaln
from fmlm.kernels._backend import interpreting, triton_available
from kernel_test_utils import forbid, must_launch, record_calls

lin = importlib.import_module("fmlm.kernels.linear")

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _dev():
    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _inputs(M, N, K, dtype, device="cpu", seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    b = (0.5 * torch.randn(N, generator=g)).to(device, dtype)
    return a, w, b


def _budget(out, reference, truth, dtype, floor_eps=4):
    err = (out.double() - truth).abs().max().item()
    ref_err = (reference.double() - truth).abs().max().item()
    floor = floor_eps * torch.finfo(dtype).eps * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2·{ref_err:.3g} + {floor:.3g}"


CASES = [
    pytest.param(1, 17, 5, torch.float32, id="M1-K5"),
    pytest.param(7, 33, 40, torch.float32, id="odd"),
    pytest.param(37, 96, 256, torch.float16, id="fp16"),
    pytest.param(3, 64, 768, torch.float16, id="K768-fp16"),
]


@needs_triton
@pytest.mark.parametrize("M,N,K,dtype", CASES)
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_linear_matches_reference(M, N, K, dtype, act):
    """The Triton GEMM (it must launch: F.linear would meet the budget too), with and without bias, vs fp64."""
    a, w, b = _inputs(M, N, K, dtype, _dev(), lead=(2,))          # (2, M, K): leading dims flatten into rows
    with must_launch(lin, "_linear_kernel"):
        out = lin.linear(a, w, b, act, backend="triton")
    assert out.shape == (2, M, N) and out.dtype == dtype
    truth = lin.linear_ref(a.double(), w.double(), b.double(), act)
    _budget(out, lin.linear_ref(a, w, b, act), truth, dtype)
    with must_launch(lin, "_linear_kernel"):
        nob = lin.linear(a, w, None, act, backend="triton")        # no bias
    _budget(nob, lin.linear_ref(a, w, None, act), lin.linear_ref(a.double(), w.double(), None, act), dtype)


def _rope(L, d, dtype, device="cpu"):
    from fmlm.kernels import reference as ref
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = ref.rotary_cos_sin(L, inv_freq)
    return cos.to(device, dtype), sin.to(device, dtype)


ROTARY_CASES = [
    pytest.param(2, 7, 2, 32, torch.float32, id="L7-d32"),
    pytest.param(1, 5, 3, 16, torch.float32, id="H3-d16"),      # 96 rotated columns: 32-wide tiles
    pytest.param(3, 1, 2, 64, torch.float16, id="L1-B3-fp16"),
    pytest.param(1, 33, 2, 32, torch.float16, id="L33-fp16"),
]


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", ROTARY_CASES)
def test_rotary_epilogue_matches_reference(B, L, H, d, dtype):
    """The qkv projection with rotary fused into its epilogue: q and k (the first 2·D columns) rotated at each
    row's position, v untouched; against F.linear + reference.apply_rotary_ref, fp64 truth, error budget."""
    D = H * d
    a, w, _ = _inputs(L, 3 * D, D, dtype, _dev(), seed=4, lead=(B,))
    cos, sin = _rope(L, d, dtype, _dev())
    with must_launch(lin, "_linear_kernel"):
        out = lin.linear(a, w, rotary=(cos, sin, 2 * D), backend="triton")
    assert out.shape == (B, L, 3 * D) and out.dtype == dtype
    truth = lin.linear_ref(a.double(), w.double(), rotary=(cos.double(), sin.double(), 2 * D))
    _budget(out, lin.linear_ref(a, w, rotary=(cos, sin, 2 * D)), truth, dtype)
    # v (the last D columns) is the plain product (up to the summation order of another tile width); the
    # rotation really happened on q and k
    plain = lin.linear(a, w, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[..., 2 * D:], plain[..., 2 * D:], rtol=tol, atol=tol)
    if L > 1:
        assert not torch.allclose(out[:, 1:, :2 * D], plain[:, 1:, :2 * D])


def test_rotary_argument_errors():
    a, w, _ = _inputs(5, 96, 32, torch.float32, lead=(2,))
    cos, sin = _rope(5, 16, torch.float32)
    with pytest.raises(ValueError, match="whole heads"):
        lin.linear(a, w, rotary=(cos, sin, 40), backend="torch")
    with pytest.raises(ValueError, match=r"\(B, L, K\)"):
        lin.linear(a[0], w, rotary=(cos, sin, 64), backend="torch")
    with pytest.raises(ValueError, match=r"\(B, L, K\)"):
        lin.linear(a, w, rotary=(cos[:4], sin[:4], 64), backend="torch")
    if triton_available() and (interpreting() or torch.cuda.is_available()):
        with pytest.raises(ValueError, match="partials"):
            lin.linear_fwd(a.to(_dev()), w.to(_dev()), split_k=0, rotary=(cos, sin, 64))
        c6, s6 = _rope(5, 12, torch.float32)          # head dim 12: not a power of two
        with pytest.raises(ValueError, match="power-of-two"):
            lin.linear(a.to(_dev()), w.to(_dev()), rotary=(c6.to(_dev()), s6.to(_dev()), 24), backend="triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_partials_sum_to_the_product(dtype):
    """Forced splits (BLOCK_K 16, so a 100-deep K holds up to 7 splits): every split count sums to a·wᵀ within
    the fp32-accumulation budget; a requested count shrinks so that no split is empty."""
    a, w, _ = _inputs(19, 40, 100, dtype, _dev(), seed=2)
    truth = a.double() @ w.double().T
    reference = torch.nn.functional.linear(a.float(), w.float())
    cfg = dict(lin.INTERPRET_CONFIG, BLOCK_K=16) if _dev() == "cpu" else dict(lin.GPU_CONFIG_SMALL, BLOCK_K=16)
    for split, want_s in ((1, 1), (2, 2), (3, 3), (7, 7), (8, 7), (50, 7)):
        p = lin.linear_partials(a, w, split, backend="triton", config=cfg)
        assert p.shape == (want_s, 19, 40) and p.dtype == torch.float32, (split, p.shape)
        _budget(p.sum(0), reference, truth, torch.float32)
        assert p[-1].abs().sum() > 0                        # the last split did hold K
    # the split chosen by shape: a wave of programs, each split ≥ MIN_K_PER_SPLIT deep
    cfg = lin.pick_config(128, 768, 3072, torch.bfloat16, torch.device("cuda"), split_k=0)
    tiles = (128 // cfg["BLOCK_M"]) * (768 // cfg["BLOCK_N"])
    assert cfg["SPLIT"] > 1 and tiles * cfg["SPLIT"] >= lin.WAVE // 2
    assert cfg["K_PER_SPLIT"] >= lin.MIN_K_PER_SPLIT and cfg["K_PER_SPLIT"] % cfg["BLOCK_K"] == 0


@needs_triton
def test_deep_pipelines_reach_the_launch(monkeypatch):
    """Under _backend.deep_pipelines (kernel option gemm_deep_pipeline; active on CUDA only, forced on here) each
    launch of at most one program per SM gets one operand stage per K step of its split (deep_stages), a larger
    grid keeps its stages (one CTA per SM would cost it a second wave), and the results are the default's bit for
    bit: the same tiles, dots and order, only the loads issued earlier."""
    from kernel_test_utils import LaunchArgs

    a, w, b = _inputs(19, 40, 256, torch.float32, _dev(), seed=4)
    cfg = dict(lin.INTERPRET_CONFIG, BLOCK_K=32) if _dev() == "cpu" else dict(lin.GPU_CONFIG_FP32)
    want = (lin.linear(a, w, b, "gelu_tanh", backend="triton", config=cfg),
            lin.linear_partials(a, w, 2, backend="triton", config=cfg))
    spy = LaunchArgs(lin._linear_kernel)
    monkeypatch.setattr(lin, "_linear_kernel", spy)
    monkeypatch.setattr(lin, "deep_pipelines_active", lambda t: True)
    monkeypatch.setattr(lin, "sm_count", lambda device: 2)      # the partials' grid: 2 programs
    got = (lin.linear(a, w, b, "gelu_tanh", backend="triton", config=cfg),
           lin.linear_partials(a, w, 2, backend="triton", config=cfg))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    steps = 256 // cfg["BLOCK_K"]
    assert [x["num_stages"] for x in spy.launches] == [max(cfg["num_stages"], steps),
                                                       max(cfg["num_stages"], steps // 2)]
    monkeypatch.setattr(lin, "sm_count", lambda device: 1)      # more programs than SMs: the config's stages
    assert torch.equal(lin.linear_partials(a, w, 2, backend="triton", config=cfg), want[1])
    assert spy.launches[-1]["num_stages"] == cfg["num_stages"]


def test_pick_config_spreads_small_row_counts():
    """At batch 1 (LM1B: 128 rows; OWT: 1024) each engine GEMM gets ≥ half a wave of programs; the many-row
    shapes take the 128×128 tiles."""
    dev = torch.device("cuda")
    for M in (128, 1024):
        for N, K, split in ((2304, 768, None), (768, 768, 0), (3072, 768, None), (768, 3072, 0)):
            c = lin.pick_config(M, N, K, torch.bfloat16, dev, split)
            programs = -(-M // c["BLOCK_M"]) * -(-N // c["BLOCK_N"]) * c["SPLIT"]
            assert programs >= lin.WAVE // 2, (M, N, K, c)
    assert lin.pick_config(4096, 2304, 768, torch.bfloat16, dev)["BLOCK_M"] == 128


def test_torch_backend_and_errors():
    a, w, b = _inputs(5, 6, 7, torch.float32)
    assert torch.equal(lin.linear(a, w, b, backend="torch"), torch.nn.functional.linear(a, w, b))
    p = lin.linear_partials(a, w, backend="torch")
    assert p.shape == (1, 5, 6) and torch.allclose(p[0], a @ w.T)
    assert lin.linear_partials(a.double(), w.double(), backend="torch").dtype == torch.float64
    with pytest.raises(ValueError, match="activation"):
        lin.linear(a, w, b, "relu")
    with pytest.raises(ValueError, match="agree on K"):
        lin.linear(a, w[:, :3], b)
    with pytest.raises(ValueError, match="bias"):
        lin.linear(a, w, b[:2])
    with pytest.raises(ValueError, match="dtype"):
        lin.linear(a.half(), w, b)
    with pytest.raises(ValueError, match="split_k"):
        lin.linear_partials(a, w, -1)


@needs_triton
@pytest.mark.parametrize("n_split", [1, 3])
def test_gate_residual_sums_partials(n_split):
    """gate_residual(x, gate, P, ..., y_bias=b) = x + gate·(Σ_s P[s] + b), then the next adaLN input."""
    dev = _dev()
    g = torch.Generator().manual_seed(3)
    B, L, D = 2, 5, 48
    x = (3 * torch.randn(B, L, D, generator=g)).to(dev)
    P = torch.randn(n_split, B, L, D, generator=g).to(dev)
    yb = torch.randn(D, generator=g).to(dev)
    gate, sh, sc = (0.5 * torch.randn(3, B, D, generator=g)).to(dev).unbind(0)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dev)
    with must_launch(adaln, "_gate_residual_adaln_kernel"):      # the reference sums partials too
        xn, out = adaln.gate_residual(x, gate, P, w, sh, sc, out_dtype=torch.float32, backend="triton", y_bias=yb)
    xt = x.double() + gate.double()[:, None] * (P.double().sum(0) + yb.double())
    xr, outr = adaln.gate_residual(x, gate, P, w, sh, sc, out_dtype=torch.float32, backend="reference", y_bias=yb)
    _budget(xn, xr, xt, torch.float32)
    _budget(out, outr, adaln.adaln_modulate_ref(xt, w.double(), sh.double(), sc.double()), torch.float32)
    x_keep = x.clone()
    with must_launch(adaln, "_gate_residual_adaln_kernel"):
        plain = adaln.gate_residual(x, gate, P, backend="triton", y_bias=yb)      # no norm, not in place
    assert torch.equal(x, x_keep)
    _budget(plain, xr, xt, torch.float32)
    with pytest.raises(ValueError, match="partials"):
        adaln.gate_residual(x, gate, P[:, :, :2], backend="triton")
    with pytest.raises(ValueError, match="y_bias"):
        adaln.gate_residual(x, gate, P, backend="triton", y_bias=yb[:3])


@pytest.mark.gpu
@pytest.mark.parametrize("M", [128, 1024, 77])
def test_bf16_engine_shapes_on_gpu(M):
    """The four GEMMs of a released-small block at batch 1 (LM1B 128 rows, OWT 1024) and an odd row count, bf16,
    against F.linear in bf16; the split-K pair through gate_residual against the bf16 GEMM + residual."""
    for N, K, act in ((2304, 768, None), (3072, 768, "gelu_tanh")):
        a, w, b = _inputs(M, N, K, torch.bfloat16, "cuda")
        out = lin.linear(a, w, b if act else None, act)
        truth = lin.linear_ref(a.double(), w.double(), b.double() if act else None, act)
        _budget(out, lin.linear_ref(a, w, b if act else None, act), truth, torch.bfloat16)
    # the qkv projection with the rotary epilogue (12 heads of 64), 128 positions per sequence
    a, w, _ = _inputs(M, 2304, 768, torch.bfloat16, "cuda", seed=2, lead=(1,))
    cos, sin = _rope(M, 64, torch.bfloat16, "cuda")
    out = lin.linear(a, w, rotary=(cos, sin, 1536))
    truth = lin.linear_ref(a.double(), w.double(), rotary=(cos.double(), sin.double(), 1536))
    _budget(out, lin.linear_ref(a, w, rotary=(cos, sin, 1536)), truth, torch.bfloat16)
    for N, K in ((768, 768), (768, 3072)):
        a, w, b = _inputs(M, N, K, torch.bfloat16, "cuda", seed=1)
        p = lin.linear_partials(a, w)
        assert p.shape[0] >= 1 and p.dtype == torch.float32
        truth = a.double() @ w.double().T
        _budget(p.sum(0), torch.nn.functional.linear(a, w), truth, torch.bfloat16)
        x = torch.randn(1, M, N, device="cuda")
        gate = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
        xn = adaln.gate_residual(x, gate, p.view(-1, 1, M, N), y_bias=b)
        xt = x.double() + gate.double()[:, None] * (truth + b.double())[None]
        xr = adaln.gate_residual(x, gate, torch.nn.functional.linear(a, w, b)[None])
        _budget(xn, xr, xt, torch.float32)


def test_bench_linear_cpu_smoke(monkeypatch):
    """bench/bench_linear.py's row logic on the CPU (tiny row count, the ops' CPU paths), so the one GPU run cannot
    die on a bug in it: every (pass, impl) row has a time, each candidate row a speedup over its cublas row."""
    from fmlm.bench import bench_linear as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "ROWS", (16,))
    monkeypatch.setattr(bench, "SWEEP_CONFIGS", {"interp": lin.INTERPRET_CONFIG})
    monkeypatch.setattr(bench, "SWEEP_SPLITS", (1, 2))
    rows = bench.run(quick=True)
    assert all("note" not in r and r["ms"] > 0 for r in rows), [r for r in rows if "note" in r]
    main = [r for r in rows if r["op"] == "trunk GEMM"]
    assert {(r["pass"], r["impl"]) for r in main} == {(p, i) for p in ("qkv", "mlp1 (gelu)", "out + resid",
                                                                       "mlp2 + resid", "block")
                                                      for i in ("cublas", "triton_small")}
    cand = [r for r in main if r["impl"] == "triton_small"]
    assert all(r["speedup_vs_default"] > 0 for r in cand)
    sweep = {(r["pass"], r["impl"]) for r in rows if r["op"] == "trunk GEMM sweep"}
    assert ("mlp2", "triton interp split 2") in sweep and ("qkv", "triton interp") in sweep
    assert ("out", "cublas (bare)") in sweep
    assert all(r["vs cublas"] > 0 for r in rows if r["op"] == "trunk GEMM sweep" and r["impl"] != "cublas (bare)")
    # "vs cublas" divides by the bare GEMM: each sweep row states the work it does beside it
    work = {(r["pass"], r["impl"]): r["work"] for r in rows if r["op"] == "trunk GEMM sweep"}
    assert work[("qkv", "triton interp")].startswith("bare GEMM") and "same work" in work[("qkv", "triton interp")]
    assert "bias + GELU" in work[("mlp1 (gelu)", "triton interp")]
    assert work[("mlp2", "triton interp split 2")].startswith("GEMM, 2 fp32 split-K partials")
    assert work[("out", "cublas (bare)")] == "bare GEMM, bf16 out (no bias, no epilogue)"
    # gate_residual alone, its default rows per program beside 4 (the previous default), on each input it gets
    gr = [(r["pass"], r["impl"]) for r in rows if r["op"] == "gate_residual"]
    assert gr == [(p, i) for p in ("bf16 y", "3 partials", "8 partials")
                  for i in ("default", "4 rows per program (the previous default)")]
    assert all(r["speedup_vs_default"] > 0 for r in rows if r["op"] == "gate_residual" and r["impl"] != "default")


@needs_triton
def test_registered_ops_opcheck():
    """fmlm::linear, fmlm::linear_partials and gate_residual_adaln with partials (what torch.compile of the block
    calls) pass torch.library.opcheck: schema, fake (meta) shapes against the real kernels."""
    dev = _dev()
    a, w, b = _inputs(6, 96, 64, torch.float32, dev, seed=5, lead=(2,))
    cos, sin = _rope(6, 32, torch.float32, dev)
    torch.library.opcheck(torch.ops.fmlm.linear.default, (a, w, b, "gelu_tanh", None, None, 0))
    torch.library.opcheck(torch.ops.fmlm.linear.default, (a, w, None, "", cos, sin, 64))
    torch.library.opcheck(torch.ops.fmlm.linear_partials.default, (a, w, 0))
    p = torch.ops.fmlm.linear_partials.default(a, w[:32], 2)
    x = torch.randn(2, 6, 32, device=dev)
    gate, sh, sc = torch.randn(3, 2, 32, device=dev).unbind(0)
    torch.library.opcheck(torch.ops.fmlm.gate_residual_adaln.default,
                          (x, gate, p, torch.ones(32, device=dev), sh, sc, 1e-5, torch.float32, b[:32]))


@needs_triton
def test_no_rows_and_an_empty_product(monkeypatch):
    """No rows: empty outputs and no launch (a split chosen by shape divided by zero tiles); K = 0, an empty
    product: act(bias) per row as F.linear gives, rotated as the spec where rotary asks for it, zero partials, no
    launch (the launcher divided by a zero-deep split, and reshape(-1, 0) refused the rows). The fake (meta)
    shapes agree with the real ones (opcheck)."""
    dev = _dev()
    forbid(monkeypatch, lin, "_linear_kernel")
    a, w, b = _inputs(0, 24, 16, torch.float32, dev, lead=(2,))
    assert lin.linear(a, w, b, "gelu_tanh", backend="triton").shape == (2, 0, 24)
    for split in (0, 3):
        assert lin.linear_partials(a, w, split, backend="triton").shape == (1, 2, 0, 24)
    a0, w0 = torch.randn(2, 3, 0, device=dev), torch.randn(24, 0, device=dev)
    for act in (None, "gelu_tanh"):
        torch.testing.assert_close(lin.linear(a0, w0, b, act, backend="triton"), lin.linear_ref(a0, w0, b, act))
    assert torch.equal(lin.linear(a0, w0, None, backend="triton"), torch.zeros(2, 3, 24, device=dev))
    cos, sin = _rope(3, 16, torch.float32, dev)              # q, k of heads of 16 (rotated bias), then 8 plain columns
    got = lin.linear(a0, w0, b, rotary=(cos, sin, 16), backend="triton")
    torch.testing.assert_close(got, lin.linear_ref(a0, w0, b, rotary=(cos, sin, 16)))
    assert not torch.allclose(got[:, 1:, :16], b[:16].expand(2, 2, 16))
    for split in (0, 1, 3):
        p = lin.linear_partials(a0, w0, split, backend="triton")
        assert p.shape == (1, 2, 3, 24) and p.dtype == torch.float32 and torch.equal(p, torch.zeros_like(p))
    monkeypatch.undo()
    torch.library.opcheck(torch.ops.fmlm.linear_partials.default, (a0, w0, 0))
    torch.library.opcheck(torch.ops.fmlm.linear_partials.default, (a, w, 0))
    torch.library.opcheck(torch.ops.fmlm.linear.default, (a0, w0, b, "gelu_tanh", None, None, 0))


def test_device_and_dtype_errors():
    """Operands on two devices, and fp64 on the Triton backend (its dots take 16-bit or fp32): clear errors."""
    a, w, b = _inputs(5, 6, 7, torch.float32)
    with pytest.raises(ValueError, match="one device"):
        lin.linear(a, w.to("meta"), b, backend="torch")
    with pytest.raises(ValueError, match="one device"):
        lin.linear(a, w, b.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="one device"):
        lin.linear_partials(a, w.to("meta"), backend="torch")
    if triton_available() and (interpreting() or torch.cuda.is_available()):
        with pytest.raises(ValueError, match="16-bit or fp32"):
            lin.linear_partials(a.double().to(_dev()), w.double().to(_dev()), backend="triton")


@needs_triton
def test_compiling_routes_through_the_registered_ops(monkeypatch):
    """While torch.compile traces (is_compiling), linear and linear_partials call the registered ops with the
    launcher's arguments (activation, rotary, split): the same numbers as the eager launcher, bit for bit. With
    a config (the benchmark's sweeps) the launcher runs even then."""
    dev = _dev()
    a, w, b = _inputs(6, 96, 64, torch.float32, dev, seed=6, lead=(2,))
    cos, sin = _rope(6, 32, torch.float32, dev)
    a2, w2, _ = _inputs(6, 32, 128, torch.float32, dev, seed=7)      # K = 128: 2 splits asked, 1 chosen by shape
    want = [lin.linear(a, w, b, "gelu_tanh", backend="triton"),
            lin.linear(a, w, rotary=(cos, sin, 64), backend="triton"),
            lin.linear_partials(a2, w2, 2, backend="triton")]
    assert want[2].shape[0] == 2 and lin.linear_partials(a2, w2, 0, backend="triton").shape[0] == 1
    calls = []
    record_calls(monkeypatch, lin, calls, _linear_op="linear", _linear_partials_op="partials")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = [lin.linear(a, w, b, "gelu_tanh", backend="triton"),
           lin.linear(a, w, rotary=(cos, sin, 64), backend="triton"),
           lin.linear_partials(a2, w2, 2, backend="triton")]
    assert calls == ["linear", "linear", "partials"]
    for g, x in zip(got, want):
        assert g.shape == x.shape and torch.equal(g, x)
    lin.linear(a, w, b, backend="triton", config=dict(lin.INTERPRET_CONFIG))
    lin.linear_partials(a, w, 2, backend="triton", config=dict(lin.INTERPRET_CONFIG))
    assert len(calls) == 3
