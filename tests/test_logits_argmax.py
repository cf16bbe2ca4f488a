"""logits_argmax (Triton GEMM + running argmax, and the chunked torch backend) against the reference.

Budget (DESIGN.md §6) for an argmax: on the same dtype-rounded inputs, the fp64 logit of the chosen index
may fall short of the fp64 maximum by at most 2x what the same-dtype reference's choice falls short, plus a
small floor; rows whose fp64 winner leads by a clear margin must match exactly. Ties are built exactly
(integer-valued inputs) and must resolve to the lowest index, as torch.argmax does. The 'triton' cases
need TRITON_INTERPRET=1 before triton is imported, so on a CPU machine one driver test re-runs them in a
subprocess with the interpreter on.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fmlm.kernels import reference as ref
from fmlm.kernels._backend import interpreting, triton_available
from kernel_test_utils import capture, forbid, must_launch

LA = importlib.import_module("fmlm.kernels.logits_argmax")   # the module (the package re-exports the function)
logits_argmax = LA.logits_argmax

ON_DEVICE = torch.cuda.is_available() and not interpreting()
IN_PROCESS = triton_available() and (interpreting() or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton on CPU needs TRITON_INTERPRET=1 (driver test)")
DEV = "cuda" if ON_DEVICE else "cpu"
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _problem(M, V, Vp, D, dtype, bias=True, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g)
    W = torch.randn(Vp, D, generator=g) * (3.0 / D ** 0.5)
    # padded rows (≥ V) would win every argmax if they were not masked
    W[V:] = 10.0 * h.mean(0).sign()
    b = torch.randn(Vp, generator=g) if bias else None
    if b is not None:
        b[V:] = 0.0
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(h), cast(W), cast(b)


def _check(idx, h, W, b, V):
    """Budget on the logit gap to the fp64 maximum, plus exact agreement on clear winners."""
    truth = ref.logits_ref(h.double(), W[:V].double(), None if b is None else b[:V].double())
    r = ref.logits_argmax_ref(h, W[:V], None if b is None else b[:V])
    top2 = truth.topk(min(2, V), dim=-1).values
    best = top2[:, 0]
    gap_k = best - truth.gather(1, idx.view(-1, 1).to(truth.device))[:, 0]
    gap_r = best - truth.gather(1, r.view(-1, 1))[:, 0]
    scale = truth.abs().max().item()
    floor = FLOOR[h.dtype] * max(scale, 1.0)
    assert idx.dtype == torch.long and idx.shape == (h.shape[0],)
    assert bool(((idx >= 0) & (idx < V)).all())
    assert (gap_k <= 2 * gap_r + floor).all(), f"logit gap {gap_k.max():.3e} vs reference {gap_r.max():.3e}"
    if V > 1:
        clear = (top2[:, 0] - top2[:, 1]) > 4 * floor
        assert torch.equal(idx.cpu()[clear.cpu()], truth.argmax(-1).cpu()[clear.cpu()])


def _int_problem(M, V, Vp, D, dtype, seed=0, device=DEV):
    """Integer-valued h, W, b: every logit is exact in fp16/fp32 whatever the summation order, so ties are
    exact. For row 0 of h, columns 5, 40 and V−3 all reach the largest possible logit: 5 and 40 share a
    split but not a tile at BLOCK_N=32, V−3 sits in another split."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (M, D), generator=g).float()
    W = torch.randint(-2, 3, (Vp, D), generator=g).float()
    b = torch.zeros(Vp)
    h[:, 0] = 1.0                        # no all-zero row of h
    W[5] = W[40] = W[V - 3] = 2.0 * h[0].sign()
    W[V:] = 3.0 * h[0].sign()            # padded: larger still, must be masked
    return h.to(device, dtype), W.to(device, dtype), b.to(device, dtype)


# ---- torch backend and the reference ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend(monkeypatch, dtype):
    monkeypatch.setattr(LA, "TORCH_V_CHUNK", 64)        # several V chunks at a small V
    monkeypatch.setattr(LA, "TORCH_ROW_CHUNK", 16)
    h, W, b = _problem(37, 257, 320, 24, dtype, device="cpu")
    _check(logits_argmax(h, W, b, 257, backend="torch"), h, W, b, 257)
    assert torch.equal(logits_argmax(h, W, b, 257, backend="torch"), logits_argmax(h, W, b, 257, backend="reference"))


def test_torch_backend_ties(monkeypatch):
    monkeypatch.setattr(LA, "TORCH_V_CHUNK", 64)
    h, W, b = _int_problem(33, 257, 300, 16, torch.float32, device="cpu")
    out = logits_argmax(h, W, b, 257, backend="torch")
    assert torch.equal(out, ref.logits_argmax_ref(h, W[:257], b[:257]))
    assert out[0].item() == 5


def test_validation_and_leading_dims():
    h, W, b = _problem(6, 50, 64, 8, torch.float32, device="cpu")
    out = logits_argmax(h.view(2, 3, 8), W, b, 50, backend="torch")
    assert out.shape == (2, 3) and torch.equal(out.view(-1), logits_argmax(h, W, b, 50, backend="reference"))
    with pytest.raises(ValueError):
        logits_argmax(h, W, b, 65, backend="torch")
    with pytest.raises(ValueError):
        logits_argmax(h[:, :7], W, b, 50, backend="torch")
    with pytest.raises(ValueError):
        logits_argmax(h, W, b, 0, backend="torch")


# ---- triton (CUDA, or CPU under the interpreter) ---------------------------------------------------
TRITON_CASES = [
    pytest.param(1, 257, 257, 64, torch.float32, True, None, id="rows1-V257"),
    pytest.param(37, 257, 384, 64, torch.float32, True,
                 dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, splits=3), id="rows37-pad-split3-smallblocks"),
    pytest.param(3, 257, 300, 96, torch.float16, False,
                 dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), id="rows3-fp16-Ktail-nobias"),
    pytest.param(3, 50258, 50304, 64, torch.float32, True, None, id="rows3-V50258"),
    pytest.param(2, 1000, 1024, 768, torch.float16, True, dict(BLOCK_N=256, splits=2), id="rows2-D768-fp16"),
    # the previous epilogue (tl.max with indices), kept as config epilogue="pairs" for the benchmark
    pytest.param(37, 257, 384, 64, torch.float32, True,
                 dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, splits=3, epilogue="pairs"), id="rows37-split3-pairs"),
    pytest.param(3, 257, 300, 96, torch.float16, False,
                 dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, epilogue="pairs"), id="rows3-fp16-nobias-pairs"),
]


@needs_triton
@pytest.mark.parametrize("M,V,Vp,D,dtype,bias,cfg", TRITON_CASES)
def test_triton_matches_reference(M, V, Vp, D, dtype, bias, cfg):
    h, W, b = _problem(M, V, Vp, D, dtype, bias)
    idx = LA.logits_argmax_fwd(h, W, None if b is None else b, V, cfg)
    _check(idx, h, W, b, V)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, splits=4), {}], ids=["split4", "default"])
@pytest.mark.parametrize("epilogue", LA.EPILOGUES)
def test_triton_ties_lowest_index(dtype, cfg, epilogue):
    """Exact ties within a tile (one 512-column tile by default), across tiles and across splits: the lowest
    column wins, with either epilogue; without a bias the padded columns are masked all the same."""
    h, W, b = _int_problem(19, 257, 320, 32, dtype)
    idx = LA.logits_argmax_fwd(h, W, b, 257, {**cfg, "epilogue": epilogue})
    assert torch.equal(idx, LA.logits_argmax_fwd(h, W, None, 257, {**cfg, "epilogue": epilogue}))   # b is zero
    assert torch.equal(idx.cpu(), ref.logits_argmax_ref(h.double(), W[:257].double(), b[:257].double()).cpu())
    assert idx[0].item() == 5


@needs_triton
def test_triton_bad_epilogue_is_refused():
    h, W, b = _problem(3, 50, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="epilogue"):
        LA.logits_argmax_fwd(h, W, b, 50, {"epilogue": "pair"})


@needs_triton
def test_triton_padded_columns_never_win():
    """All valid logits ≈ −50 (or all negative, without a bias): a padded column (its weight row is read as zero)
    scoring 0 would win if not masked."""
    h, W, b = _problem(5, 100, 128, 32, torch.float32)
    b[:100] = -50.0
    # without a bias: h > 0 and W[:100] < 0 make every valid logit negative
    hp, Wn = h.abs() + 0.1, -(W.abs() + 0.1)
    for cfg in ({}, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, splits=2)):
        for epilogue in LA.EPILOGUES:
            idx = LA.logits_argmax_fwd(h, W, b, 100, {**cfg, "epilogue": epilogue})
            _check(idx, h, W, b, 100)
            idx = LA.logits_argmax_fwd(hp, Wn, None, 100, {**cfg, "epilogue": epilogue})
            _check(idx, hp, Wn, None, 100)


@needs_triton
def test_triton_functional_and_op():
    """backend='triton' through the registered op, leading dims, and torch.library.opcheck."""
    h, W, b = _problem(6, 100, 128, 32, torch.float32)
    with must_launch(LA, "_logits_argmax_fwd_kernel"):           # the op, not a fallback to torch
        out = logits_argmax(h.view(2, 3, 32), W, b, 100, backend="triton")
    assert out.shape == (2, 3)
    _check(out.view(-1), h, W, b, 100)
    torch.library.opcheck(torch.ops.fmlm.logits_argmax.default, (h, W, b[:100], 100))
    torch.library.opcheck(torch.ops.fmlm.logits_argmax.default, (h, W, None, 100))


# ---- the opt-in TMA kernel (config={"tma": True}) --------------------------------------------------
def _only(monkeypatch, kernel):
    """Forbid the other kernel: 'tma' → the pointer kernel must not launch, 'pointer' → the TMA kernel."""
    other = "_logits_argmax_fwd_kernel" if kernel == "tma" else "_logits_argmax_tma_fwd_kernel"
    forbid(monkeypatch, LA, other)


def _expected_kernel(h, W, block_k):
    """Aligned inputs take the TMA kernel, except fp32 on CUDA (pointer kernel by design, see tma_usable)."""
    if LA.tma_usable(h, W, block_k):
        return "tma"
    assert ON_DEVICE and h.dtype == torch.float32, "aligned inputs must be able to take the TMA kernel"
    return "pointer"


TMA_CASES = [
    pytest.param(37, 257, 384, 64, torch.float32, True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, splits=3),
                 id="rows37-V257-pad-split3"),
    pytest.param(37, 257, 384, 72, torch.float16, False, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
                 id="rows37-fp16-Ktail-nobias-nosplit"),
    pytest.param(1, 101, 101, 24, torch.float32, True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, splits=2),
                 id="rows1-V101-Ktail-split2"),
]


@needs_triton
@pytest.mark.parametrize("M,V,Vp,D,dtype,bias,cfg", TMA_CASES)
def test_triton_tma_matches_reference(monkeypatch, M, V, Vp, D, dtype, bias, cfg):
    """Rows not a multiple of BLOCK_M, prime V, padded weight rows, D % BLOCK_K != 0: TMA zero-fills the
    out-of-bounds parts of every box; padded columns must still lose (the epilogue's −inf)."""
    h, W, b = _problem(M, V, Vp, D, dtype, bias)
    _only(monkeypatch, _expected_kernel(h, W, cfg["BLOCK_K"]))
    idx = LA.logits_argmax_fwd(h, W, b, V, dict(cfg, tma=True))
    _check(idx, h, W, b, V)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, splits=4),
                                 dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, splits=1)], ids=["split4", "nosplit"])
def test_triton_tma_ties_lowest_index(monkeypatch, dtype, cfg):
    h, W, b = _int_problem(19, 257, 320, 32, dtype)
    _only(monkeypatch, _expected_kernel(h, W, cfg["BLOCK_K"]))
    idx = LA.logits_argmax_fwd(h, W, b, 257, dict(cfg, tma=True))
    assert torch.equal(idx.cpu(), ref.logits_argmax_ref(h.double(), W[:257].double(), b[:257].double()).cpu())
    assert idx[0].item() == 5


@needs_triton
@pytest.mark.parametrize("layout", ["offset-base", "row-stride", "weight-row-stride"])
def test_triton_tma_falls_back_to_pointer_kernel(monkeypatch, layout):
    """A base not 16-byte aligned or a row stride not a multiple of 16 bytes cannot be a TMA descriptor:
    config={"tma": True} must then run the pointer kernel (and still be right)."""
    M, V, Vp, D = 9, 100, 128, 32
    h, W, b = _problem(M, V, Vp, D, torch.float16)
    assert LA.tma_usable(h, W, 16)                    # the same data, aligned
    if layout == "offset-base":                       # data_ptr ≡ 2 mod 16
        h = torch.cat([torch.zeros(1, device=h.device, dtype=h.dtype), h.reshape(-1)])[1:].view(M, D)
    elif layout == "row-stride":                      # rows 33 halves = 66 bytes apart
        h = torch.cat([h, torch.zeros(M, 1, device=h.device, dtype=h.dtype)], 1)[:, :D]
    else:
        W = torch.cat([W, torch.zeros(Vp, 1, device=W.device, dtype=W.dtype)], 1)[:, :D]
    assert not LA.tma_usable(h, W, 16)
    _only(monkeypatch, "pointer")
    idx = LA.logits_argmax_fwd(h, W, b, V, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, splits=2, tma=True))
    _check(idx, h, W, b, V)


@needs_triton
@pytest.mark.skipif(ON_DEVICE, reason="the CPU smoke run of the benchmark; make gpu-check runs it for real")
def test_triton_bench_smoke(monkeypatch):
    """bench/bench_logits_argmax.py end to end at a tiny shape on the CPU, so the one GPU run cannot die on a bug."""
    from fmlm.bench import bench_logits_argmax as bench
    from fmlm.bench import common

    # BUDGET_S: every optional row, however slow the interpreter runs on a loaded machine
    for k, v in dict(DEVICE="cpu", V=250, VP=256, D=32, SHAPES=(32, 8, 3), LARGE_ROWS=40, BUDGET_S=1e4,
                     GRAPH_MAX_ROWS=8).items():
        monkeypatch.setattr(bench, k, v)
    monkeypatch.setattr(bench, "time_fn", lambda fn, warmup=2, iters=10, device="cpu": common.time_fn(fn, 1, 2, device))
    monkeypatch.setattr(bench, "peak_memory_bytes", lambda fn, device="cpu": 0)
    captured = []       # no CUDA graph on the CPU: the "replay" calls fn, so the graph columns are computed
    monkeypatch.setattr(bench, "graphed", lambda fn, warmup=2: captured.append(fn) or fn)
    rows = bench.run(quick=True)
    impls = [r["impl"] for r in rows]
    # at ≤ GRAPH_MAX_ROWS rows the op's rows (default, launcher baseline, candidates) also have graph replay times,
    # and their speedup_vs_default is the graph one; above it, and for the reference and cuBLAS rows, none
    graph = [r for r in rows if "graph_ms" in r]
    assert graph and len(captured) == len(graph) and all(r["rows"] <= 8 and r["graph_ms"] > 0 for r in graph)
    assert not any("reference" in r["impl"] or "cuBLAS" in r["impl"] for r in graph)
    small = [r for r in rows if r.get("rows") in (8, 3) and "agree_with_default" in r]
    assert small and all("graph_ms" in r and "host_speedup_vs_default" in r for r in small)
    base = {r["rows"]: r for r in rows if r["impl"].endswith("via the launcher, as the candidates")}
    assert all(r["speedup_vs_default"] == pytest.approx(base[r["rows"]]["graph_ms"] / r["graph_ms"]) for r in small)
    assert impls[0].startswith("triton default [pointer") and any(i.startswith("best measured") for i in impls)
    assert all(not str(r.get("note", "")).startswith(("failed", "skipped: TMA")) for r in rows), rows
    tma = [r for r in rows if "[TMA" in r["impl"]]
    assert {r["rows"] for r in tma} == {32, 8, 3} and all(r["agree_with_default"] == 1.0 and r["speedup_vs_default"] > 0
                                                         for r in tma), tma
    one = [r for r in rows if "one_V_tile_per_program" in r["impl"]]     # the batch-1 candidate at the small shapes
    assert {r["rows"] for r in one} == {8, 3} and all(r["agree_with_default"] == 1.0 for r in one), one
    big = [r for r in rows if "[TMA bm128_bn256" in r["impl"] and r["rows"] in (8, 3)]   # the large-row tile there
    assert {r["rows"] for r in big} == {8, 3} and all(r["agree_with_default"] == 1.0 for r in big), big
    # the pointer kernel at the large-row tile (the default there before the TMA kernel), at 32 and LARGE_ROWS rows
    prev = [r for r in rows if r["impl"].endswith("(the previous default)")]
    assert {r["rows"] for r in prev} == {32, 40} and all("[pointer bm128_bn256" in r["impl"]
                                                         and r["agree_with_default"] == 1.0 for r in prev), prev
    assert rows[0]["ms"] > 0 and rows[0]["rows"] == 32
    pairs = [r for r in rows if r["impl"].startswith("triton [") and "pairs epilogue" in r["impl"]]   # not "best"
    assert len(pairs) == 1 and pairs[0]["agree_with_default"] == 1.0 and pairs[0]["speedup_vs_default"] > 0
    diag = [r for r in rows if "triton GEMM" in r["impl"]]
    assert len(diag) == 1 and diag[0]["ms"] > 0 and diag[0]["rows"] == 32
    # the rows that store logits count them in their bytes; the fused op counts W, h read and indices written
    esz = 4                                                   # fp32 on the CPU (bf16 on the GPU)
    gemms = [r for r in rows if r["impl"].startswith("cuBLAS") or "triton GEMM" in r["impl"]]
    assert sorted(r["rows"] for r in gemms) == [32, 32, 40]
    for r in gemms:
        want = (256 * 32 + r["rows"] * 32 + r["rows"] * 256) * esz
        assert r["gbs"] * r["ms"] * 1e6 == pytest.approx(want), r["impl"]
    assert rows[0]["gbs"] * rows[0]["ms"] * 1e6 == pytest.approx((256 * 32 + 32 * 32) * esz + 32 * 8)


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
    W = (torch.randn(Vp, D, device="cuda", generator=g) * (3.0 / D ** 0.5)).to(dtype)
    b = torch.randn(Vp, device="cuda", generator=g).to(dtype)
    W[V:], b[V:] = 0, 0
    return h, W, b


@pytest.mark.gpu
def test_gpu_bf16_owt():
    h, W, b = _owt()
    idx = logits_argmax(h, W, b, 50258, backend="triton")
    # the two epilogues fold the same fp32 tiles with the same tie rule: the same indices, bit for bit
    assert torch.equal(idx, LA.logits_argmax_fwd(h, W, b, 50258, {"epilogue": "pairs"}))
    rows = torch.arange(0, h.shape[0], 8, device="cuda")     # the budget check on 2048 rows (memory)
    _check(idx[rows], h[rows], W, b, 50258)
    small = logits_argmax(h[:128], W, b, 50258, backend="triton")   # B=1, L=128: the V-split path
    _check(small, h[:128], W, b, 50258)


@pytest.mark.gpu
def test_gpu_no_rows_by_v_buffer():
    h, W, b = _owt()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logits_argmax(h, W, b, 50258, backend="triton")
    torch.cuda.synchronize()
    delta = torch.cuda.max_memory_allocated() - base
    assert delta < h.shape[0] * 50258 * 2 / 64, f"peak extra memory {delta / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_small_dtypes(dtype):
    h, W, b = _problem(37, 1000, 1024, 768, dtype, device="cuda")
    _check(logits_argmax(h, W, b, 1000, backend="triton"), h, W, b, 1000)
    h, W, b = _int_problem(19, 257, 320, 64, dtype, device="cuda")
    assert logits_argmax(h, W, b, 257, backend="triton")[0].item() == 5


@pytest.mark.gpu
def test_gpu_tma_bf16_owt(monkeypatch):
    """The TMA kernel at the OWT shape (and the V-split path at 128 rows) == the pointer kernel == the
    reference argmax, under the same budget and clear-winner rule as test_gpu_bf16_owt."""
    h, W, b = _owt()
    rows = torch.arange(0, h.shape[0], 8, device="cuda")
    for n, cfg in ((h.shape[0], LA.GPU_CONFIG), (128, LA.GPU_CONFIG_SMALL_M)):
        hn = h[:n]
        ptr = LA.logits_argmax_fwd(hn, W, b, 50258, cfg)
        with monkeypatch.context() as mp:
            _only(mp, "tma")
            tma = LA.logits_argmax_fwd(hn, W, b, 50258, dict(cfg, tma=True))
        sel = rows[rows < n]
        _check(tma[sel], hn[sel], W, b, 50258)
        _check(ptr[sel], hn[sel], W, b, 50258)
        # same tiles and K order: any disagreement must be a near tie (the budget applies to both anyway)
        assert (tma == ptr).float().mean().item() > 0.999
    h, W, b = _int_problem(19, 257, 320, 64, torch.bfloat16, device="cuda")   # exact ties in bf16
    # at BLOCK_N 128 row 0's tied columns 5, 40 share a tile, 254 is in the next one: splits=3 puts that tile in
    # another split (a tie across splits), splits=2 does not
    for cfg in (dict(LA.GPU_CONFIG_SMALL_M, splits=s) for s in (1, 2, 3)):
        idx = LA.logits_argmax_fwd(h, W, b, 257, dict(cfg, tma=True))
        assert torch.equal(idx, ref.logits_argmax_ref(h.double(), W[:257].double(), b[:257].double()))


@pytest.mark.gpu
@pytest.mark.parametrize("n,cfg", [(1024, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3,
                                              splits=1)),
                                   (128, None)], ids=["nosplit", "split"])
def test_gpu_tma_cuda_graph(monkeypatch, n, cfg):
    """Captured in a CUDA graph, the TMA path replays on new contents of the same buffers == eager: the
    descriptors are encoded on the host at capture and baked into the graph by value."""
    h, W, b = _owt(M=2 * n)
    cfg = dict(cfg or LA.default_config(n, h.device), tma=True)
    _only(monkeypatch, "tma")
    static_h = h[:n].clone()
    g, out = capture(lambda: LA.logits_argmax_fwd(static_h, W, b, 50258, cfg))
    for part in (h[:n], h[n:]):
        static_h.copy_(part)
        g.replay()
        assert torch.equal(out, LA.logits_argmax_fwd(part.contiguous(), W, b, 50258, cfg))


@needs_triton
def test_functional_config_reaches_the_launcher(monkeypatch):
    """logits_argmax(config=...) runs the launcher with that config (the engine's kernel_options path)."""
    seen = []
    real = LA.logits_argmax_fwd
    monkeypatch.setattr(LA, "logits_argmax_fwd", lambda *a: seen.append(a[-1]) or real(*a))
    g = torch.Generator().manual_seed(3)
    h, W, b = (torch.randn(*s, generator=g).to(DEV) for s in ((5, 32), (67, 32), (67,)))
    out = LA.logits_argmax(h, W, b, 61, backend="triton", config={"BLOCK_N": 32})
    assert seen == [{"BLOCK_N": 32}]
    assert torch.equal(out, (h @ W[:61].T + b[:61]).argmax(-1))


def test_bad_shapes_and_n_valid_are_refused():
    """A 2-D bias would be flattened by the kernel (wrong tokens, no error), a float n_valid truncated, a 1-D weight
    failed deep inside: clear errors instead."""
    h, W, b = _problem(6, 100, 128, 32, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="bias must be 1-D"):
        logits_argmax(h, W, b.view(64, 2), 100, backend="torch")
    with pytest.raises(TypeError, match="n_valid must be an int"):
        logits_argmax(h, W, b, 99.5, backend="torch")
    with pytest.raises(ValueError, match="shape mismatch"):
        logits_argmax(h, W[:, 0], b, 100, backend="torch")


@needs_triton
def test_triton_input_forms(monkeypatch):
    """The Triton launcher refuses fp64 (TypeError naming the torch backend); promotes mixed dtypes (h fp16, W fp32:
    the fp32 kernel on the promoted operands); copies an h or W whose last dim is not unit-stride (the kernels add
    column offsets to row pointers); returns an empty result for no rows without a launch."""
    h, W, b = _problem(5, 100, 128, 32, torch.float32, seed=3)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        logits_argmax(h.double(), W.double(), b.double(), 100, backend="triton")
    for hh, ww in ((h.half(), W), (h, W.half())):
        want = logits_argmax(hh.float(), ww.float(), b, 100, backend="triton")
        _check(want, hh.float(), ww.float(), b, 100)
        assert torch.equal(logits_argmax(hh, ww, b, 100, backend="triton"), want)
    want = logits_argmax(h, W, b, 100, backend="triton")
    ht, Wt = h.t().contiguous().t(), W.t().contiguous().t()
    assert ht.stride(-1) != 1 and Wt.stride(-1) != 1
    for hh, ww in ((ht, W), (h, Wt), (ht, Wt)):
        assert torch.equal(logits_argmax(hh, ww, b, 100, backend="triton"), want)
        assert torch.equal(LA.logits_argmax_fwd(hh, ww, b[:100], 100, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)),
                           LA.logits_argmax_fwd(h, W, b[:100], 100, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)))
    forbid(monkeypatch, LA, "_logits_argmax_fwd_kernel")
    forbid(monkeypatch, LA, "_logits_argmax_tma_fwd_kernel")
    out = logits_argmax(h[:0].view(0, 4, 32), W, b, 100, backend="triton")
    assert out.shape == (0, 4) and out.dtype == torch.long


@needs_triton
@pytest.mark.parametrize("splits,M", [(1, 5), (3, 17), (37, 33), (130, 70)])
def test_reduce_splits_is_the_sequential_fold(splits, M):
    """The split launch's reduction against the rule it replaces (a fold over splits in order, strict >): ties
    within one chunk of splits and across chunks (BLOCK_S splits per step), rows of −inf everywhere (split 0's
    index), rows past a chunk boundary; the partials' values drawn from few levels so that ties are common."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    g = torch.Generator().manual_seed(splits)
    vals = torch.randint(0, 4, (splits, M), generator=g).float()
    vals[:, 0] = float("-inf")
    vals[torch.rand(splits, M, generator=g) < 0.2] = float("-inf")
    if splits > 20:                    # the row's only maximum in the last chunk, and a tie 16 splits apart
        vals[:, 1] = 0.0
        vals[-1, 1] = 9.0
        vals[:, 2] = 1.0
        vals[[3, 19], 2] = 5.0
    idxs = (torch.arange(splits)[:, None] * 1000 + torch.randint(0, 1000, (splits, M), generator=g)).int()
    want = []
    for r in range(M):
        best, at = vals[0, r], idxs[0, r]
        for s in range(1, splits):
            if vals[s, r] > best:
                best, at = vals[s, r], idxs[s, r]
        want.append(int(at))
    out = torch.empty(M, dtype=torch.long, device=dev)
    got = LA.reduce_splits(vals.to(dev), idxs.to(dev), out)
    assert got is out and got.cpu().tolist() == want
    if splits > 20:
        assert want[1] == idxs[-1, 1] and want[2] == idxs[3, 2]


@needs_triton
def test_one_v_tile_per_program_config(monkeypatch):
    """GPU_CONFIG_ONE_TILE (the batch-1 candidate): "splits" beyond the tile count is clamped to one V tile per
    program, the reduction then folds that many splits (17 here: two of the interpreter's chunks of 16), ties still
    go to the lowest column and the indices are the reference's."""
    seen = []
    real = LA.reduce_splits
    monkeypatch.setattr(LA, "reduce_splits", lambda vals, *a, **k: seen.append(vals.shape[0]) or real(vals, *a, **k))
    h, W, b = _int_problem(19, 257, 320, 32, torch.float32)
    cfg = dict(LA.GPU_CONFIG_ONE_TILE, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)      # interpreter-sized tiles
    idx = LA.logits_argmax_fwd(h, W, b, 257, cfg)
    assert seen == [17]                                            # ⌈257 / 16⌉ tiles, one per program
    assert torch.equal(idx.cpu(), ref.logits_argmax_ref(h.double(), W[:257].double(), b[:257].double()).cpu())
    assert idx[0].item() == 5
    assert LA.GPU_CONFIG_ONE_TILE["splits"] >= 1 << 20 and LA.GPU_CONFIG_ONE_TILE["BLOCK_M"] == 64


# ---- backend='cuda': the CUDA C++ kernel of csrc/logits_argmax.cu --------------------------------------
# On CPU: nvcc builds the library (the CUDA runtime linked statically, so it loads without a GPU) and its C ABI's
# argument checks and policy are tested; on a GPU: the kernel against the reference, ties, the split reduction,
# CUDA-graph replay.
from fmlm.kernels import _cuda  # noqa: E402

needs_nvcc = pytest.mark.skipif(_cuda.find_nvcc() is None, reason="no nvcc to build csrc/")
CUDA_ARCH = _cuda.device_arch(0) if ON_DEVICE else "90"


def csrc_gpu(fn):
    """A GPU test of the csrc/ kernel: marked csrc_gpu, not gpu, so that make gpu-check runs it in a subprocess of
    its own (test_csrc_gpu_isolated): a fault in new CUDA code then cannot poison the CUDA context that the other
    GPU tests of this pytest worker share."""
    return pytest.mark.csrc_gpu(needs_nvcc(pytest.mark.skipif(not ON_DEVICE, reason="needs CUDA")(fn)))


@pytest.mark.gpu
@needs_nvcc
def test_csrc_gpu_isolated():
    """Every csrc_gpu test (here and in test_runner.py), in one child pytest process."""
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.join(here, "test_logits_argmax.py"),
                        os.path.join(here, "test_runner.py"), "-q", "-m", "csrc_gpu", "-p", "no:cacheprovider",
                        "-rfE"], capture_output=True, text=True, timeout=600, cwd=os.path.dirname(here))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def _abi_call(lib, **kw):
    """fmlm_logits_argmax with valid-looking arguments (fake, aligned addresses), overridden by kw."""
    a = dict(dtype=0, h=1 << 20, ldh=768, w=1 << 21, ldw=768, bias=None, bias_dtype=0, M=128, n_valid=30522, D=768,
             splits=1, part_val=None, part_idx=None, counters=None, out=1 << 22, flags=0, device=-1, stream=None)
    a.update(kw)
    return lib.fmlm_logits_argmax(*a.values())


@needs_nvcc
def test_cuda_library_abi_and_argument_errors():
    """The built library answers its ABI: the version, the tile rows, the dynamic shared memory (3 stages of
    (128 + 128) × 72 bf16 in each of 4 stages), the Triton launcher's one-wave split policy; every bad
    argument gets its own negative code and message before any CUDA call, and with valid arguments on a machine
    without a GPU the CUDA runtime's error comes back (a positive code), not a crash."""
    lib = _cuda.library(CUDA_ARCH)
    assert lib.fmlm_abi_version() == _cuda.ABI_VERSION == 1
    assert lib.fmlm_logits_argmax_rows_per_block() == 128
    assert lib.fmlm_logits_argmax_smem_bytes() == 4 * 256 * 72 * 2
    for M, V, sms in ((128, 30522, 132), (1024, 50258, 132), (16384, 50258, 132), (1, 100, 132), (300, 257, 4)):
        blocks, tiles = -(-M // 128), -(-V // 128)
        assert lib.fmlm_logits_argmax_default_splits(M, V, sms) == max(1, min(tiles, sms // blocks)), (M, V, sms)
    bad = {"dtype": dict(dtype=2), "bias dtype": dict(bias_dtype=3), "no h": dict(h=None), "no out": dict(out=None),
           "M": dict(M=0), "n_valid": dict(n_valid=0), "ldh < D": dict(ldh=512), "D % 8": dict(D=100, ldh=104,
                                                                                               ldw=104),
           "ldw % 8": dict(ldw=772), "h alignment": dict(h=(1 << 20) + 8), "splits 0": dict(splits=0),
           "splits > tiles": dict(splits=239 + 1), "split without partials": dict(splits=2), "flags": dict(flags=4)}
    codes = {}
    for name, kw in bad.items():
        rc = _abi_call(lib, **kw)
        assert rc < 0, name
        codes[name] = rc
        assert _cuda.error_string(lib, rc) not in ("no error", "unknown error"), name
    assert len(set(codes.values())) == 6            # dtype, shape, alignment, null pointer, splits, flags
    assert _cuda.error_string(lib, 0) == "no error"
    if not torch.cuda.is_available():
        rc = _abi_call(lib)
        assert rc > 0 and "no error" not in _cuda.error_string(lib, rc)


@needs_nvcc
def test_cuda_build_cache(tmp_path, monkeypatch):
    """One nvcc build per (sources, target, nvcc): the second call finds the library in the cache (no log, the same
    file untouched); no nvcc → a CudaBuildError that says how to provide one."""
    monkeypatch.setenv("FMLM_CUDA_CACHE", str(tmp_path))
    path, log = _cuda.build("90", quiet=True)
    assert path.parent == tmp_path and path.exists() and "registers" in log
    stamp = path.stat().st_mtime_ns
    again, log2 = _cuda.build("90", quiet=True)
    assert again == path and log2 == "" and path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]      # no temporary file left behind
    monkeypatch.setattr(_cuda, "find_nvcc", lambda: None)
    with pytest.raises(_cuda.CudaBuildError, match="FMLM_NVCC"):
        _cuda.build("90", quiet=True)


C_CALLER = r"""
#include <stdio.h>
#include "fmlm_csrc.h"
int main(void) {
  long long out[4];
  int rc;
  if (fmlm_abi_version() != FMLM_ABI_VERSION) return 10;
  rc = fmlm_logits_argmax(FMLM_BF16, (const void*)0, 768, (const void*)0, 768, (const void*)0, FMLM_FP32, 4, 100,
                          768, 1, (float*)0, (int*)0, (unsigned*)0, out, 0, -1, (void*)0);
  if (rc != FMLM_ERR_NULL) return 11;
  printf("%s\n%d\n", fmlm_error_string(rc), fmlm_logits_argmax_default_splits(128, 30522, 132));
  return 0;
}
"""


@needs_nvcc
@pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc"))), reason="no C compiler")
def test_cuda_c_header_links_from_c(tmp_path, monkeypatch):
    """The library is usable from plain C (C99, no torch, no CUDA headers): csrc/fmlm_csrc.h declares what the
    library exports (a mismatch fails to link or returns wrong codes), and `fmlm csrc`'s link line works."""
    monkeypatch.setenv("FMLM_CUDA_CACHE", str(tmp_path / "cache"))
    path, _ = _cuda.build("90", quiet=True)
    (tmp_path / "caller.c").write_text(C_CALLER)
    cc = shutil.which("cc") or shutil.which("gcc")
    r = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{_cuda.source_dir()}", str(tmp_path / "caller.c"),
                        f"-L{path.parent}", f"-l:{path.name}", f"-Wl,-rpath,{path.parent}", "-o",
                        str(tmp_path / "caller")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(tmp_path / "caller")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split("\n")[:2] == [_cuda.error_string(_cuda.library("90"), -4), "132"]


def test_cuda_backend_input_checks():
    """backend='cuda' and config {"impl": "cuda"} refuse CPU tensors and other dtypes with errors that name the
    alternatives, before building anything; an unknown impl is refused."""
    h, W, b = _problem(5, 100, 128, 32, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        logits_argmax(h.bfloat16(), W.bfloat16(), b, 100, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        LA.logits_argmax_fwd(h.bfloat16(), W.bfloat16(), b, 100, {"impl": "cuda"})
    with pytest.raises(ValueError, match="impl must be"):
        LA.logits_argmax_fwd(h, W, b, 100, {"impl": "cutlass"})
    if ON_DEVICE:
        with pytest.raises(TypeError, match="bf16 or fp16"):
            logits_argmax(h.cuda(), W.cuda(), b.cuda(), 100, backend="cuda")
        with pytest.raises(ValueError, match="multiples of 8"):
            logits_argmax(h[:, :30].cuda().half(), W[:, :30].cuda().half(), None, 100, backend="cuda")


def test_cuda_backend_shape_checks():
    """Shapes the C ABI cannot check (it sees pointers) are refused in Python, before any device check: weight of
    another width, n_valid past weight's rows or below 1, a bias shorter than n_valid, a row count past its int."""
    h, W, b = _problem(5, 100, 128, 32, torch.float32, device="cpu")
    bad = {"width": (h, W[:, :16], b, 100), "n_valid": (h, W, b, 129), "n_valid 0": (h, W, b, 0),
           "bias": (h, W, b[:99], 100), "1-D h": (h[0], W, b, 100)}
    for name, args in bad.items():
        with pytest.raises(ValueError, match="backend='cuda'"):
            LA.logits_argmax_cuda(*args)
    big = torch.empty(2 ** 31, 0)                  # 2^31 rows of nothing: no memory
    with pytest.raises(ValueError, match="2\\^31 rows"):
        LA.logits_argmax_cuda(big, torch.empty(4, 0), None, 4)


def test_cuda_split_counters_capture(monkeypatch):
    """The split counters are zeroed outside CUDA-graph capture only: an eager call zeroes its stream's buffer and
    leaves a spare per device; a stream first seen while capturing takes that spare (no allocation, so no memset
    inside the graph) and keeps it; with no spare left, capture raises and says what to do; an eager call refills
    the spare. (CPU tensors stand in for the device's: the bookkeeping is the same.)"""
    monkeypatch.setattr(LA, "_COUNTERS", {})
    monkeypatch.setattr(LA, "_SPARE_COUNTERS", {})
    dev = torch.device("cpu")
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    a = LA._split_counters(dev, 11, 3)
    assert a.numel() >= 3 and not a.any() and LA._split_counters(dev, 11, 2) is a
    spare = LA._SPARE_COUNTERS[None]
    assert spare.numel() >= LA.SPARE_COUNTERS and not spare.any()
    capturing[0] = True
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: pytest.fail("allocated while capturing"))
    assert LA._split_counters(dev, 22, 5) is spare                # the capture stream takes the spare ...
    assert LA._split_counters(dev, 22, 5) is spare and LA._split_counters(dev, 11, 3) is a     # ... and keeps it
    with pytest.raises(RuntimeError, match="once eagerly"):
        LA._split_counters(dev, 33, 1)                            # another new stream: no spare left
    monkeypatch.setattr(torch, "zeros", zeros)
    capturing[0] = False
    LA._split_counters(dev, 44, 1)
    capturing[0] = True
    assert LA._split_counters(dev, 33, 1) is not spare            # the eager call made a new spare
    with pytest.raises(RuntimeError, match="once eagerly"):       # larger than the spare: refused, not overrun
        LA._split_counters(dev, 55, LA.SPARE_COUNTERS + 1)


@csrc_gpu
@pytest.mark.parametrize("M,V,Vp,D,dtype,bias", [
    (1, 50258, 50304, 768, torch.bfloat16, torch.bfloat16),
    (3, 1009, 1024, 64, torch.float16, None),
    (128, 30522, 30592, 768, torch.bfloat16, torch.float32),      # LM1B B=1, the engine's fp32 head bias
    (130, 50258, 50304, 768, torch.bfloat16, torch.bfloat16),     # two row blocks, the second with 2 rows
    (1024, 50258, 50304, 768, torch.bfloat16, torch.float32),     # OWT B=1
    (37, 1000, 1024, 776, torch.float16, torch.float16),          # D not a multiple of the 64-wide K step
], ids=["owt-1row", "prime-V-D64-fp16", "lm1b-B1", "rows130", "owt-B1", "D776"])
def test_gpu_cuda_matches_reference(M, V, Vp, D, dtype, bias):
    h, W, b = _problem(M, V, Vp, D, dtype, bias=bias is not None, device="cuda")
    b = None if b is None else b.to(bias)
    idx = logits_argmax(h, W, b, V, backend="cuda")
    _check(idx, h, W, b, V)
    for splits in (1, 7):                          # no split (no partials), and a split the default would not pick
        _check(LA.logits_argmax_cuda(h, W, b, V, splits), h, W, b, V)
    tri = logits_argmax(h, W, b, V, backend="triton")
    assert (idx == tri).float().mean().item() > 0.99         # both fp32 sums of the same products: near ties only


@csrc_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_ties_lowest_index(dtype):
    """Exact ties (integer inputs): row 0's best columns 5 and 40 (one warp's column half), 70 (the other half of
    the same tile) and 254 (the next tile): every split count (1: one CTA, 2 and 3: across CTAs, reduced by the
    last one) gives the reference's lowest index, for every row."""
    h, W, b = _int_problem(19, 257, 320, 64, dtype, device="cuda")
    W[70] = W[5]
    want = ref.logits_argmax_ref(h.double(), W[:257].double(), b[:257].double())
    assert want[0].item() == 5
    for splits in (1, 2, 3):
        assert torch.equal(LA.logits_argmax_cuda(h, W, b, 257, splits), want), splits


@csrc_gpu
def test_gpu_cuda_graph_replay_and_counters():
    """Captured in a CUDA graph (the library loaded by the warm-up call), the split launch replays on new contents
    of h == eager, many times: the reducing CTA leaves the row blocks' counters at zero for the next replay (the
    capture stream took counters zeroed before capture, so no memset inside the graph does it); a second graph on
    the same capture stream, replayed before and after the first, shares them."""
    h, W, b = _owt(M=2 * 256)
    static_h = h[:256].clone()
    g, out = capture(lambda: LA.logits_argmax_cuda(static_h, W, b, 50258))
    g2, out2 = capture(lambda: LA.logits_argmax_cuda(static_h[:130], W, None, 50258))
    for _ in range(3):
        for part in (h[:256], h[256:]):
            static_h.copy_(part)
            g2.replay()
            g.replay()
            assert torch.equal(out, LA.logits_argmax_cuda(part.contiguous(), W, b, 50258))
            assert torch.equal(out2, LA.logits_argmax_cuda(part[:130].contiguous(), W, None, 50258))
    _check(out, static_h, W, b, 50258)
    torch.cuda.synchronize()
    for bufs in LA._COUNTERS.values():
        for c in bufs:
            assert not c.any(), "a launch left a split counter set"


@csrc_gpu
def test_gpu_cuda_nan_strided_small_d_and_error_recovery():
    """NaN logits never win and do not hide other columns (a NaN column of W; a row of h that is all NaN → 0);
    strided h and W (row strides past D, an odd start that must be copied) and D = 24 (one partial K step) match
    the reference; a call that fails in the CUDA runtime (no such device) does not make the next good call fail."""
    h, W, b = _problem(37, 1000, 1024, 64, torch.float16, device="cuda")
    Wn = W.clone()
    Wn[3] = float("nan")                     # column 3 NaN for every row
    hn = h.clone()
    hn[1] = float("nan")                     # row 1: every logit NaN
    Wm = Wn.clone()
    Wm[3] = 0.0
    bm = b.clone()
    bm[3] = float("-inf")
    want = ref.logits_argmax_ref(h.double(), Wm[:1000].double(), bm[:1000].double())
    for splits in (1, 5):
        got = LA.logits_argmax_cuda(hn, Wn, b, 1000, splits)
        assert got[1].item() == 0
        keep = torch.arange(37, device="cuda") != 1
        assert torch.equal(got[keep], want[keep]), splits
    big_h = torch.randn(37, 96, device="cuda").half()
    big_w = torch.randn(1030, 104, device="cuda").half()
    hs, ws = big_h[:, 8:32], big_w[:1024, 16:40]        # D = 24, row strides 96 and 104, 16-byte aligned starts
    _check(LA.logits_argmax_cuda(hs, ws, b, 1000, 3), hs, ws, b, 1000)
    odd = big_h[:, 1:25]                                  # 2-byte offset: copied before the call
    _check(LA.logits_argmax_cuda(odd, ws, b, 1000), odd, ws, b, 1000)
    lib = _cuda.library(_cuda.device_arch(h.device))
    out = torch.empty(37, device="cuda", dtype=torch.long)
    rc = lib.fmlm_logits_argmax(1, h.data_ptr(), 64, W.data_ptr(), 64, None, 0, 37, 1000, 64, 1, None, None, None,
                                out.data_ptr(), 0, 999, torch.cuda.current_stream().cuda_stream)
    assert rc > 0                                         # cudaSetDevice(999) fails ...
    _check(LA.logits_argmax_cuda(h, W, b, 1000), h, W, b, 1000)      # ... and is not reported again here


@csrc_gpu
@pytest.mark.parametrize("prefetch", [False, True], ids=["pdl", "pdl+prefetch"])
def test_gpu_cuda_pdl_bit_identical(prefetch):
    """Inside pdl_launches the csrc/ kernel launches as a programmatic dependent of the kernel that writes h (and
    with prefetch asks L2 for its W rows first): the same indices as the plain launch, eager and replayed from a
    CUDA graph, with the split counters reused across launches (no memset between producer and argmax)."""
    from fmlm.kernels._backend import pdl_launches
    h, W, b = _owt(M=128)
    want = LA.logits_argmax_cuda(h, W, b.float(), 50258)
    src = h.clone()
    with pdl_launches(True, prefetch):
        assert torch.equal(LA.logits_argmax_cuda(src * 1.0, W, b.float(), 50258), want)
        g, out = capture(lambda: LA.logits_argmax_cuda(src * 1.0, W, b.float(), 50258))
    for _ in range(3):
        g.replay()
        assert torch.equal(out, want)
