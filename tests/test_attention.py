"""softcap_attention (Triton flash kernel with rotary on load, FlexAttention fallback) against the spec:
reference.apply_rotary_ref + reference.attention_ref, with an error budget against an fp64 ground truth
(DESIGN.md §6). Triton cases run on CUDA, or on the CPU under TRITON_INTERPRET=1 (fp32/fp16 only)."""
import pytest
import torch

from fmlm.kernels import attention as A
from fmlm.kernels import reference as ref
from fmlm.kernels._backend import interpreting, triton_available
from kernel_test_utils import LaunchArgs, capture, forbid

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _inputs(B, L, H, d, dtype, device="cpu", scale=2.0, seed=0):
    """q, k, v as strided views of one (B, L, 3, H, d) qkv buffer, as the DiT produces them."""
    g = torch.Generator().manual_seed(seed)
    qkv = (scale * torch.randn(B, L, 3, H, d, generator=g)).to(device, dtype)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = ref.rotary_cos_sin(L, inv_freq.to(device))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], cos, sin


def _check_budget(out, q, k, v, cap, cos, sin):
    """Kernel error ≤ 2× the same-dtype reference's error + a floor of a few ulps of the output scale."""
    truth = A.softcap_attention_ref(q.double(), k.double(), v.double(), cap,
                                    None if cos is None else cos.double(), None if sin is None else sin.double())
    r = A.softcap_attention_ref(q, k, v, cap, cos, sin)
    err = (out.double() - truth).abs().max().item()
    ref_err = (r.double() - truth).abs().max().item()
    floor = 8 * torch.finfo(q.dtype).eps * truth.abs().max().item()
    assert out.shape == truth.shape and out.dtype == q.dtype
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2·{ref_err:.3g} + {floor:.3g}"
    return truth


CASES = [
    pytest.param(1, 1, 2, 16, torch.float32, id="L1"),
    pytest.param(2, 7, 3, 32, torch.float32, id="L7-d32"),
    pytest.param(3, 33, 2, 16, torch.float32, id="B3-L33-d16"),
    pytest.param(1, 33, 2, 64, torch.float16, id="L33-d64-fp16"),
    pytest.param(2, 7, 4, 64, torch.float16, id="L7-H4-fp16"),
]


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", CASES)
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
def test_triton_matches_reference(B, L, H, d, dtype, rotary):
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev)
    if not rotary:
        cos = sin = None
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")
    _check_budget(out, q, k, v, 50.0, cos, sin)


@needs_triton
def test_triton_softcap_is_applied():
    """Scores of several hundred: the cap changes the result, so a kernel without it fails the budget."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 33, 2, 32, torch.float32, dev, scale=6.0, seed=1)
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")
    truth = _check_budget(out, q, k, v, 50.0, cos, sin)
    uncapped = A.softcap_attention_ref(q.double(), k.double(), v.double(), None, cos.double(), sin.double())
    assert (uncapped - truth).abs().max() > 0.1
    out_nocap = A.softcap_attention(q, k, v, None, cos, sin, backend="triton")
    _check_budget(out_nocap, q, k, v, None, cos, sin)


@needs_triton
def test_triton_blocks_not_dividing_L():
    """Explicit tiles: several key tiles with a ragged last one, several query tiles."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 37, 2, 16, torch.float32, dev, seed=2)
    out = A.softcap_attention_fwd(q, k, v, 50.0, cos, sin, block_m=16, block_n=16)
    _check_budget(out, q, k, v, 50.0, cos, sin)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_fallback_matches_reference():
    q, k, v, cos, sin = _inputs(2, 9, 2, 16, torch.float32, scale=6.0, seed=3)
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="flex")
    _check_budget(out, q, k, v, 50.0, cos, sin)


def test_reference_backend_is_the_spec():
    q, k, v, cos, sin = _inputs(2, 5, 2, 8, torch.float64)
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="reference")
    want = ref.attention_ref(ref.apply_rotary_ref(q, cos, sin), ref.apply_rotary_ref(k, cos, sin), v, 50.0)
    assert torch.equal(out, want)


def test_auto_on_cpu_is_reference_and_bad_args_raise():
    assert A.resolve("auto", torch.device("cpu")) == "reference"
    q, k, v, cos, sin = _inputs(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError):
        A.softcap_attention(q, k, v, 50.0, cos, None)
    with pytest.raises(ValueError):
        A.softcap_attention(q, k[:, :3], v, 50.0)
    with pytest.raises(ValueError):
        A.softcap_attention(q, k, v, 50.0, cos[:3], sin[:3])
    with pytest.raises(ValueError):
        A.softcap_attention(q, k, v, 50.0, backend="sdpa")


@pytest.mark.skipif(not triton_available() or interpreting(), reason="compile-only check needs the compiling triton")
def test_compiles_for_sm90_without_spills():
    import triton
    from triton.backends.compiler import GPUTarget

    specs = A.compile_specs()
    assert specs
    for sp in specs[:2]:           # the B=32 and B=1-sized tiles; all are in bench/compile_check
        k = triton.compile(triton.compiler.ASTSource(sp["fn"], sp["signature"], sp["constexprs"], sp.get("attrs")),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=sp["num_warps"], num_stages=sp["num_stages"]))
        ptx = k.asm["ptx"]
        assert "tanh.approx.f32" in ptx and "wgmma" in ptx
        assert ".local" not in ptx, f"{sp['name']} spills to local memory"


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,H,d", [(2, 1024, 12, 64), (1, 128, 12, 64), (3, 33, 4, 32), (1, 1, 12, 64)],
                         ids=["owt", "lm1b-B1", "odd", "L1"])
def test_triton_bf16_on_gpu(B, L, H, d):
    q, k, v, cos, sin = _inputs(B, L, H, d, torch.bfloat16, "cuda", scale=3.0)
    out = A.softcap_attention(q, k, v, 50.0, cos, sin)
    _check_budget(out, q, k, v, 50.0, cos, sin)


# ---- the opt-in rotary prepass candidates (rotary_impl='prepass' / 'prepass_k') ---------------------
PREPASS_CASES = [
    pytest.param(3, 19, 2, 32, torch.float32, id="B3-L19-d32"),
    pytest.param(3, 23, 2, 64, torch.float16, id="B3-L23-d64-fp16"),
    pytest.param(3, 13, 2, 64, torch.float32, id="B3-L13-d64"),
    pytest.param(2, 7, 2, 16, torch.float16, id="L7-d16-fp16"),
]


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", PREPASS_CASES[:2] + [
    pytest.param(1, 1, 3, 64, torch.float32, id="L1"), pytest.param(2, 5, 2, 48, torch.float16, id="d48")])
def test_rotary_qk_is_the_kernels_rotation(B, L, H, d, dtype):
    """rotary_qk = apply_rotary_ref in fp32 from tables rounded to x's dtype, rounded once (what the kernel
    does on load; exact on the CPU), within the same-dtype reference's error of the fp64 rotation, and laid
    out as (B, H, L, d) buffers. d=48: a half (24) that is not a power of two."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev)
    qr, kr = A.rotary_qk(q, k, cos, sin)
    q_only_k, kr2 = A.rotary_qk(q, k, cos, sin, rotate_q=False)
    assert q_only_k is q and torch.equal(kr2, kr)
    assert qr.shape == q.shape and qr.transpose(1, 2).is_contiguous() and kr.transpose(1, 2).is_contiguous()
    for x, xr in ((q, qr), (k, kr)):
        want = A._rotate_like_kernel(x, cos, sin)
        if interpreting():
            assert torch.equal(xr, want)
        truth = ref.apply_rotary_ref(x.double(), cos.to(dtype).double(), sin.to(dtype).double())
        ref_err = (ref.apply_rotary_ref(x, cos, sin).double() - truth).abs().max().item()
        err = (xr.double() - truth).abs().max().item()
        assert err <= ref_err + torch.finfo(dtype).eps * truth.abs().max().item()


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", PREPASS_CASES)
def test_prepass_matches_reference_and_default(B, L, H, d, dtype):
    """Both candidates meet the error budget and equal the default kernel up to fp32 summation order:
    'prepass_k' runs the default's arithmetic exactly (bit-equal under the interpreter); 'prepass' takes q·kᵀ
    as one K=d dot instead of two K=d/2 dots (at most an output ulp or two apart; bit-equal at d=16, where
    the default also uses one dot)."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev)
    out0 = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")
    for impl in ("prepass", "prepass_k"):
        out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl=impl)
        _check_budget(out, q, k, v, 50.0, cos, sin)
        gap = (out.double() - out0.double()).abs().max().item()
        ulp = torch.finfo(dtype).eps * out0.abs().max().item()
        if interpreting() and (impl == "prepass_k" or d < 32):
            assert torch.equal(out, out0), f"{impl}: {gap:.3g}"
        else:
            assert gap <= (64 if dtype == torch.float32 else 2) * ulp, f"{impl}: {gap:.3g} vs ulp {ulp:.3g}"


@needs_triton
def test_prepass_without_rotary_and_bad_impl():
    """No cos/sin: every rotary_impl is the plain kernel; an unknown rotary_impl raises."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, _, _ = _inputs(1, 9, 2, 32, torch.float32, dev)
    out0 = A.softcap_attention(q, k, v, 50.0, backend="triton")
    assert torch.equal(A.softcap_attention(q, k, v, 50.0, backend="triton", rotary_impl="prepass"), out0)
    with pytest.raises(ValueError):
        A.softcap_attention(q, k, v, 50.0, backend="triton", rotary_impl="fused")


@needs_triton
def test_prepass_op_registration():
    """The torch.library op the compiled block calls: fake impl and schema pass opcheck."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 5, 1, 16, torch.float32, dev)
    for rotate_q in (True, False):
        torch.library.opcheck(torch.ops.fmlm.softcap_attention_prepass.default, (q, k, v, 50.0, cos, sin, rotate_q),
                              test_utils=("test_schema", "test_faketensor"))
    # with the fixed shift and its polynomial exp2, and the plain op the same way
    both = (True, True)          # fixed_shift, poly_exp2
    torch.library.opcheck(torch.ops.fmlm.softcap_attention_prepass.default, (q, k, v, 50.0, cos, sin, True, *both),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fmlm.softcap_attention.default, (q, k, v, 50.0, cos, sin, *both),
                          test_utils=("test_schema", "test_faketensor"))


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() and not interpreting(),
                    reason="the CPU smoke run of the benchmark; make gpu-check runs it for real")
def test_bench_attention_smoke(monkeypatch):
    """bench/bench_attention.py end to end at tiny shapes on the CPU, so the one GPU run cannot die on a bug."""
    from fmlm.bench import bench_attention as bench
    from fmlm.bench import common

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SWEEP_UNTIL_S", 1e4)      # every sweep row, however loaded the machine
    monkeypatch.setattr(bench, "SHAPES", (("owt", 2, 19), ("lm1b", 1, 40)))
    monkeypatch.setattr(bench, "H", 1)
    monkeypatch.setattr(bench, "HEAD_DIM", 32)
    monkeypatch.setattr(bench, "SWEEP", (dict(BLOCK_M=16, BLOCK_N=32, num_stages=2, num_warps=4),))
    monkeypatch.setattr(bench, "SMALL_B_SWEEP", (dict(BLOCK_M=32, BLOCK_N=32, num_stages=1, num_warps=4),))
    calls = []

    def fake_time(fn, warmup=2, iters=10, device="cpu"):
        """Each call runs fn once; the first shape's first eleven rows (through the no-rotary fixed shift + poly
        exp2) get falling times, every later row 1000 ms: the fastest row then computes less (no rotary)."""
        common.time_fn(fn, 0, 1, device)
        calls.append(None)
        ms = 100.0 - len(calls) if len(calls) <= 11 else 1000.0
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms, "n": 1}
    monkeypatch.setattr(bench, "time_fn", fake_time)
    rows = bench.run(quick=True)
    impls = [r["impl"] for r in rows]
    assert impls[0] == "triton: rotary on load (default)" and any(i.startswith("best measured") for i in impls)
    # "best measured" only among the rows computing the default's function (rotary included)
    at_owt = [r for r in rows if r.get("shape") == "owt" and r.get("B") == 2 and "ms" in r]
    no_rot = next(r for r in at_owt if r["impl"] == "triton: no rotary + fixed shift + poly exp2 (candidate)")
    best = next(r for r in rows if r["impl"].startswith("best measured"))
    same = [r for r in at_owt if not r["impl"].startswith(("best", " ", "reference", "SDPA"))
            and "no rotary" not in r["impl"]]
    assert no_rot["ms"] < best["ms"] == min(r["ms"] for r in same), (best, no_rot)
    assert best["impl"] == "best measured at this shape: triton: fixed shift + rotary prepass, 4 stages (candidate)"
    # speedup_vs_default is always against the default row of the same shape; the no-rotary rows have none, but
    # each its own baseline row (the online softmax, the fixed shift)
    nr_fixed = next(r for r in at_owt if r["impl"] == "triton: no rotary + fixed shift (candidate)")
    assert "speedup_vs_default" not in no_rot and "speedup_vs_default" not in nr_fixed
    assert no_rot["speedup_vs_fixed_shift"] == pytest.approx(nr_fixed["ms"] / no_rot["ms"])
    assert nr_fixed["speedup_vs_no_rotary_online"] > 0
    poly = next(r for r in at_owt if r["impl"] == "triton: fixed shift + poly exp2 (candidate)")
    fixed = next(r for r in at_owt if r["impl"] == "triton: fixed shift (candidate)")
    assert poly["speedup_vs_fixed_shift"] == pytest.approx(fixed["ms"] / poly["ms"])
    # the 4-stage rows (kernel option attention_config) at the batch-32-like shape only, beside the fixed shift
    four = [r for r in rows if "4 stages" in r["impl"] and not r["impl"].startswith("best")]
    assert [(r["shape"], r["impl"]) for r in four] == [
        ("owt", "triton: fixed shift, 4 stages (candidate)"),
        ("owt", "triton: fixed shift + rotary prepass, 4 stages (candidate)")]
    assert all(r["speedup_vs_fixed_shift"] == pytest.approx(fixed["ms"] / r["ms"]) and "'num_stages': 4" in
               r["config"] and r["max_abs_diff_vs_ref"] < 1e-4 for r in four), four
    for r in rows:
        if "speedup_vs_default" in r:
            default = next(x for x in rows if x.get("shape") == r["shape"] and x.get("B") == r["B"]
                           and x["impl"] == "triton: rotary on load (default)")
            assert r["speedup_vs_default"] == pytest.approx(default["ms"] / r["ms"]), r["impl"]
    # the reference is labelled with the dtype it computes in
    refs = [r for r in rows if r["impl"].startswith("reference")]
    assert refs and all(r["dtype"] == "float32 in, fp32 matmuls (the spec)" and "fp32-matmul spec" in r["note"]
                        for r in refs), refs
    assert sum(i.startswith("sweep") for i in impls) == 3        # 2 at the first shape, 1 at batch 1
    assert any("no softcap" in i for i in impls) and any(i.startswith("reference") for i in impls)
    tma = [r for r in rows if r["impl"] == "triton: prepass_tma (candidate)"]
    assert len(tma) == 2 and all("by TMA" in r["note"] and r["max_abs_diff_vs_default"] < 1e-4 for r in tma), tma
    assert all("failed" not in str(r.get("note", "")) for r in rows), rows
    split = [r for r in rows if "kv split" in r["impl"]]           # at the batch-1 shape of more than 2 key tiles
    assert [(r["shape"], r["impl"]) for r in split] == [("lm1b", f"triton: fixed shift + kv split {S} (candidate)")
                                                        for S in (4, 8)]
    assert all(r["speedup_vs_fixed_shift"] > 0 and r["max_abs_diff_vs_ref"] < 1e-4 for r in split)
    for r in rows:
        if r["impl"].startswith(("triton", "sweep", "  part: attention")):
            assert r["ms"] > 0 and r.get("max_abs_diff_vs_ref", 0) < 1e-4 and r.get("max_abs_diff_vs_default", 0) < 1e-4
    # gpu_check's defaults-only mode: the default, the reference and SDPA; no candidate, no sweep
    monkeypatch.setenv("FMLM_BENCH_OPTIONAL", "0")
    rows = bench.run(quick=True)
    impls = [r["impl"] for r in rows]
    assert impls[0] == "triton: rotary on load (default)" and any(i.startswith("reference") for i in impls)
    assert not any("candidate" in i or i.startswith("  ") for i in impls), impls
    sweeps = [r for r in rows if r["impl"].startswith("sweep")]
    assert sweeps and all(r["note"].startswith("skipped") for r in sweeps)


@pytest.mark.gpu
@pytest.mark.parametrize("rotary_impl", ["prepass", "prepass_k"])
@pytest.mark.parametrize("B,L,H,d", [(2, 1024, 12, 64), (3, 33, 4, 32)], ids=["owt", "odd"])
def test_prepass_bf16_on_gpu(B, L, H, d, rotary_impl):
    """The candidates in bf16 on the GPU: the error budget, and at most an output ulp or two from the default."""
    q, k, v, cos, sin = _inputs(B, L, H, d, torch.bfloat16, "cuda", scale=3.0)
    out0 = A.softcap_attention(q, k, v, 50.0, cos, sin)
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, rotary_impl=rotary_impl)
    _check_budget(out, q, k, v, 50.0, cos, sin)
    gap = (out.double() - out0.double()).abs().max().item()
    assert gap <= 2 * torch.finfo(torch.bfloat16).eps * out0.abs().max().item(), gap


@pytest.mark.gpu
def test_prepass_cuda_graph_replay():
    """rotary_qk allocates its buffer inside the call: capture works and replay equals eager on new inputs."""
    q, k, v, cos, sin = _inputs(2, 129, 12, 64, torch.bfloat16, "cuda")
    fn = lambda: A.softcap_attention(q, k, v, 50.0, cos, sin, rotary_impl="prepass")  # noqa: E731
    g, out = capture(fn)
    q2, k2, v2, _, _ = _inputs(2, 129, 12, 64, torch.bfloat16, "cuda", seed=5)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())


# ---- the opt-in TMA candidate (rotary_impl='prepass_tma') ----------------------------------------------
def _only(monkeypatch, kernel):
    """'tma': the pointer attention kernel must not launch; 'pointer': the TMA kernel must not."""
    other = "_softcap_attention_fwd_kernel" if kernel == "tma" else "_softcap_attention_tma_fwd_kernel"
    forbid(monkeypatch, A, other)


TMA_CASES = [
    pytest.param(3, 19, 2, 32, torch.float32, 50.0, None, id="B3-L19-d32"),
    pytest.param(3, 23, 2, 64, torch.float16, 50.0, None, id="B3-L23-d64-fp16"),
    pytest.param(3, 13, 2, 64, torch.float32, 50.0, None, id="B3-L13-d64-L<BLOCK_N"),
    pytest.param(2, 7, 2, 16, torch.float16, None, None, id="L7-d16-fp16-nocap"),
    pytest.param(1, 1, 2, 32, torch.float32, 50.0, None, id="L1"),
    pytest.param(1, 37, 2, 32, torch.float32, 50.0, dict(BLOCK_M=32, BLOCK_N=16), id="L37-m32-n16"),
]


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype,cap,cfg", TMA_CASES)
def test_prepass_tma_matches_prepass_and_reference(monkeypatch, B, L, H, d, dtype, cap, cfg):
    """The TMA kernel runs (the pointer attention kernel is forbidden), meets the error budget and equals
    'prepass': bit-equal under the interpreter (same tiles, dots and order; zero-filled rows ≥ L, per head, as
    the masked pointer loads; −inf on key columns ≥ L), at most an output ulp apart on the GPU. L prime, L <
    BLOCK_N, L = 1, ragged query and key tiles (L37-m32-n16: 2 query × 3 key tiles), no cap."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev)
    want = A.softcap_attention_prepass_fwd(q, k, v, cap, cos, sin, config=cfg)
    assert A.tma_usable(q, v) or (dev == "cuda" and dtype == torch.float32)
    if A.tma_usable(q, v):
        _only(monkeypatch, "tma")
    if cfg is None:
        out = A.softcap_attention(q, k, v, cap, cos, sin, backend="triton", rotary_impl="prepass_tma")
    else:
        out = A.softcap_attention_prepass_tma_fwd(q, k, v, cap, cos, sin, config=cfg)
    _check_budget(out, q, k, v, cap, cos, sin)
    if interpreting():
        assert torch.equal(out, want)
    else:
        assert (out.double() - want.double()).abs().max() <= torch.finfo(dtype).eps * want.abs().max()


def _odd_layout(q, k, v, layout):
    """v (and q, k) in a layout no TMA descriptor can read; same values."""
    B, L, H, d = q.shape
    if layout == "offset-base":          # v's data_ptr 4 bytes off a 16-byte boundary
        flat = torch.zeros(v.numel() + 1, device=v.device, dtype=v.dtype)
        v = flat[1:].view(B, L, H, d).copy_(v)
    elif layout == "row-stride":         # qkv rows of 3·H·d + 1 elements: not a multiple of 16 bytes
        pad = torch.zeros(B, L, 3 * H * d + 1, device=v.device, dtype=v.dtype)
        qkv = pad[..., :3 * H * d].view(B, L, 3, H, d)
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2] = q, k, v
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:                                # "heads-major": v a (B, H, L, d) buffer seen as (B, L, H, d)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    return q, k, v


@needs_triton
@pytest.mark.parametrize("layout", ["offset-base", "row-stride", "heads-major", "d48"])
def test_prepass_tma_falls_back_to_prepass(monkeypatch, layout):
    """Where a descriptor is impossible (v misaligned or not mergeable into (B, L, H·d), a head dim not a
    power of two) 'prepass_tma' runs the 'prepass' pointer kernel (the TMA kernel is forbidden) and equals it."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    dtype = torch.float16
    q, k, v, cos, sin = _inputs(2, 9, 2, 48 if layout == "d48" else 32, dtype, dev)
    if layout != "d48":
        assert A.tma_usable(q, v) or dev == "cuda"
        q, k, v = _odd_layout(q, k, v, layout)
    assert not A.tma_usable(q, v)
    want = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl="prepass")
    _only(monkeypatch, "pointer")
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl="prepass_tma")
    assert torch.equal(out, want)


@needs_triton
def test_prepass_tma_op_registration_and_no_rotary():
    """The torch.library op (fake impl, schema) passes opcheck; without cos/sin 'prepass_tma' is the plain
    kernel, as every rotary_impl."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 5, 1, 16, torch.float32, dev)
    torch.library.opcheck(torch.ops.fmlm.softcap_attention_prepass_tma.default, (q, k, v, 50.0, cos, sin),
                          test_utils=("test_schema", "test_faketensor"))
    out0 = A.softcap_attention(q, k, v, 50.0, backend="triton")
    assert torch.equal(A.softcap_attention(q, k, v, 50.0, backend="triton", rotary_impl="prepass_tma"), out0)


@pytest.mark.skipif(not triton_available() or interpreting(), reason="compile-only check needs the compiling triton")
def test_tma_kernel_compiles_to_bulk_tensor_copies_and_wgmma():
    """At the B=32 OWT tile (BLOCK_M = 128): TMA copies (cp.async.bulk.tensor), no cp.async gathers, wgmma,
    the fast tanh, no spills."""
    import triton
    from triton.backends.compiler import GPUTarget

    sp = next(s for s in A.compile_specs() if s["name"] == "_softcap_attention_tma_fwd_kernel[m128]")
    k = triton.compile(triton.compiler.ASTSource(sp["fn"], sp["signature"], sp["constexprs"], sp.get("attrs")),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=sp["num_warps"], num_stages=sp["num_stages"]))
    ptx = k.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma" in ptx and "tanh.approx.f32" in ptx
    assert "cp.async.cg" not in ptx and "cp.async.ca" not in ptx and ".local" not in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,H,d", [(2, 1024, 12, 64), (3, 33, 4, 32)], ids=["owt", "odd"])
def test_prepass_tma_bf16_on_gpu(monkeypatch, B, L, H, d):
    """bf16 on the GPU, the TMA kernel forced: the error budget, within an output ulp of 'prepass' (same dots)
    and two of the default."""
    q, k, v, cos, sin = _inputs(B, L, H, d, torch.bfloat16, "cuda", scale=3.0)
    out0 = A.softcap_attention(q, k, v, 50.0, cos, sin)
    want = A.softcap_attention(q, k, v, 50.0, cos, sin, rotary_impl="prepass")
    assert A.tma_usable(q, v)
    _only(monkeypatch, "tma")
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, rotary_impl="prepass_tma")
    _check_budget(out, q, k, v, 50.0, cos, sin)
    ulp = torch.finfo(torch.bfloat16).eps * out0.abs().max().item()
    assert (out.double() - want.double()).abs().max().item() <= ulp
    assert (out.double() - out0.double()).abs().max().item() <= 2 * ulp


@pytest.mark.gpu
def test_prepass_tma_cuda_graph_replay(monkeypatch):
    """Descriptors are encoded on the host at capture and baked into the graph by value (the rotary_qk buffer
    from the capture pool, v the static input): replay on new contents of the same buffers == eager."""
    q, k, v, cos, sin = _inputs(2, 1024, 12, 64, torch.bfloat16, "cuda")
    _only(monkeypatch, "tma")
    fn = lambda: A.softcap_attention(q, k, v, 50.0, cos, sin, rotary_impl="prepass_tma")  # noqa: E731
    g, out = capture(fn)
    q2, k2, v2, _, _ = _inputs(2, 1024, 12, 64, torch.bfloat16, "cuda", seed=5)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())


# ---- the opt-in fixed-shift softmax (fixed_shift=True) -------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", CASES)
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")   # the exact tanh's ±1 limit
def test_fixed_shift_matches_reference(B, L, H, d, dtype, rotary):
    """p = 2^(s − (cap·log2 e − 40)) with no running max: the same function within the error budget, at scores
    spread over the whole capped range (scale 40: |q·kᵀ/√d| far beyond the cap of 50). fp16 takes the online
    softmax (its range cannot hold p); bf16 is checked on the GPU."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    for scale in (2.0, 40.0):
        q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev, scale=scale)
        if not rotary:
            cos = sin = None
        out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True)
        _check_budget(out, q, k, v, 50.0, cos, sin)


def test_fixed_shift_constant_bounds():
    """The shift keeps every 2^(s − shift) in (2^−126, 2^40] for caps up to 57; beyond, or uncapped, no shift."""
    for cap in (1.0, 30.0, 50.0, 57.0):
        c = cap * 1.4426950408889634
        sh = A.fixed_shift_log2(cap)
        assert -c - sh > -126 and c - sh <= 40 + 1e-9
    assert A.fixed_shift_log2(None) is None and A.fixed_shift_log2(0.0) is None and A.fixed_shift_log2(60.0) is None


@needs_triton
def test_fixed_shift_falls_back_where_the_cap_forbids_it():
    """Without a cap (or a cap above 57) fixed_shift=True runs the online softmax: the default kernel, bit for bit."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 9, 2, 32, torch.float32, dev)
    for cap in (None, 80.0):
        want = A.softcap_attention(q, k, v, cap, cos, sin, backend="triton")
        assert torch.equal(A.softcap_attention(q, k, v, cap, cos, sin, backend="triton", fixed_shift=True), want)


@needs_triton
@pytest.mark.parametrize("rotary_impl", ["prepass", "prepass_k"])
def test_fixed_shift_reaches_the_prepass_kernels(monkeypatch, rotary_impl):
    """fixed_shift=True with a 'prepass' rotary runs the fixed-shift kernel (as the engine's merged "winners"
    options ask: fixed shift + rotary prepass), eagerly and through the registered op torch.compile traces."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 9, 2, 32, torch.float32, dev)
    seen = []
    launch = A._launch_fwd
    monkeypatch.setattr(A, "_launch_fwd", lambda *a: seen.append(a[-2]) or launch(*a))
    A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl=rotary_impl, fixed_shift=True)
    A._softcap_attention_prepass_op(q, k, v, 50.0, cos, sin, rotary_impl == "prepass", True)
    A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl=rotary_impl)
    assert [bool((c or {}).get("fixed_shift")) for c in seen] == [True, True, False]


@needs_triton
def test_fixed_shift_fp32_differs_from_online_softmax():
    """fixed_shift=True really runs the other softmax in fp32 (not bit-equal to the default), fp16 falls back."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 33, 2, 32, torch.float32, dev, scale=10.0)
    a = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")
    assert not torch.equal(A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True), a)
    q, k, v = (t.half() for t in (q, k, v))
    a = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")
    assert torch.equal(A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True), a)


@pytest.mark.gpu
@pytest.mark.parametrize("B,L", [(32, 1024), (1, 128)], ids=["owt-B32", "lm1b-B1"])
def test_fixed_shift_bf16_on_gpu(B, L):
    """The candidate in the engine's dtype at the engine's shapes: within the error budget of the bf16 reference."""
    q, k, v, cos, sin = _inputs(B, L, 12, 64, torch.bfloat16, "cuda", seed=3)
    out = A.softcap_attention(q, k, v, 50.0, cos, sin, fixed_shift=True)
    if B == 32:     # the fp64 truth of the full batch is large: check two sequences of it
        q, k, v, out = q[:2], k[:2], v[:2], out[:2]
    _check_budget(out, q, k, v, 50.0, cos, sin)


# ---- the opt-in polynomial exp2 of the fixed-shift softmax (poly_exp2=True) -------------------------------------
def _horner_fp32(coeffs, f):
    """Σ c_i f^i by Horner in fp32, one rounding per multiply and per add (the interpreter's arithmetic)."""
    c = [torch.tensor(x, dtype=torch.float32) for x in coeffs]
    p = c[-1].expand_as(f)
    for ci in reversed(c[:-1]):
        p = p * f + ci
    return p


@needs_triton
@pytest.mark.parametrize("degree", sorted(A.POLY_COEFFS))
def test_exp2_poly_is_the_polynomial_within_its_bound(degree):
    """_exp2_poly evaluates POLY_COEFFS (its hard-coded numbers are the table's: bit-equal to an fp32 Horner of the
    table at 2^round(x)), over the whole range the fixed shift uses and beyond, half-integers (the rounding
    boundary) and integers included; its relative error stays within the table's own minimax error over f in
    [−½, ½] (fp64) plus the fp32 evaluation. Degree 3 must stay far below bf16's rounding of p (2^-9), degree 5
    within a few fp32 ulps: the reasons for each degree."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    x = torch.cat([torch.linspace(-125.0, 127.0, 100_003), torch.arange(-125.0, 127.0) + 0.5,
                   torch.arange(-125.0, 128.0), torch.tensor([-124.49999, 39.99999, 40.0, -0.0])])
    got = A.exp2_poly(x.to(dev), degree).cpu()
    j = torch.round(x)                              # round half to even, as the 1.5·2^23 addition does
    want = torch.ldexp(_horner_fp32(A.POLY_COEFFS[degree], x - j), j)
    if dev == "cpu":     # on a GPU the compiler fuses multiply-adds (one rounding fewer): the bound below holds
        assert torch.equal(got, want)
    f = torch.linspace(-0.5, 0.5, 200_001, dtype=torch.float64)
    table = sum(c * f ** i for i, c in enumerate(A.POLY_COEFFS[degree]))
    bound = ((table - 2.0 ** f) / 2.0 ** f).abs().max().item() + (degree + 2) * 2.0 ** -24
    err = ((got.double() - torch.exp2(x.double())) / torch.exp2(x.double())).abs().max().item()
    assert err <= bound, (err, bound)
    assert err < (2.0 ** -9 / 16 if degree == 3 else 4 * 2.0 ** -23), err
    assert A.poly_degree(torch.bfloat16) == A.poly_degree(torch.float16) == 3 and A.poly_degree(torch.float32) == 5
    with pytest.raises(ValueError, match="degree must be one of"):
        A.exp2_poly(x, 4)
    with pytest.raises(TypeError, match="takes fp32"):
        A.exp2_poly(x.double(), 3)


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", [c for c in CASES if c.values[4] == torch.float32])
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")   # the exact tanh's ±1 limit
def test_poly_exp2_matches_reference(monkeypatch, B, L, H, d, dtype, rotary):
    """fixed_shift + poly_exp2 is the same function within the error budget, scores spread over the whole capped
    range (scale 40) and L not a multiple of the key tile (its −inf columns through the polynomial), rotary on
    load and the 'prepass' kernels, with the polynomial really run (POLY_EXP2 = the dtype's degree reaches the
    kernel). fp32 under the interpreter (degree 5); bf16 (degree 3) on the GPU."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    for scale in (2.0, 40.0):
        q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev, scale=scale)
        if not rotary:
            cos = sin = None
        for impl in ("load", "prepass", "prepass_k") if rotary else ("load",):
            out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True, poly_exp2=True,
                                      rotary_impl=impl)
            _check_budget(out, q, k, v, 50.0, cos, sin)
    assert [kw["POLY_EXP2"] for kw in spy.launches] == [A.poly_degree(dtype)] * (6 if rotary else 2)


@needs_triton
def test_tile_config_overrides_reach_the_launch(monkeypatch):
    """tile_config (the engine's kernel option attention_config) replaces the launcher's tiles on every rotary path,
    the function unchanged within the budget; malformed overrides are refused by name before any launch."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 33, 2, 32, torch.float32, dev, scale=4.0)
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    for impl in ("load", "prepass", "prepass_k"):
        out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl=impl, fixed_shift=True,
                                  tile_config={"BLOCK_N": 32, "num_stages": 2})
        _check_budget(out, q, k, v, 50.0, cos, sin)
    assert [(kw["BLOCK_N"], kw["num_stages"], kw["FIXED_SHIFT"]) for kw in spy.launches] == [(32, 2, True)] * 3
    for bad, err in (({"stages": 4}, ValueError), ({"BLOCK_N": 24}, ValueError), ({"num_warps": 3}, ValueError),
                     ({"num_stages": 0}, ValueError), ({"num_stages": True}, ValueError), ([4], TypeError)):
        with pytest.raises(err, match="tile_config"):
            A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", tile_config=bad)
    assert len(spy.launches) == 3


@needs_triton
def test_poly_exp2_differs_and_falls_back():
    """poly_exp2 really changes the arithmetic in fp32 (not bit-equal to the fixed shift's exp2), and only for the
    odd key columns. Where the fixed shift does not apply (fp16, no cap) it changes nothing; without fixed_shift,
    or with the TMA kernel, refused."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 33, 2, 32, torch.float32, dev, scale=10.0)
    a = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True)
    assert not torch.equal(A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True,
                                               poly_exp2=True), a)
    # which columns: with q > 0 and no rotary, keys of −50 score at the cap's floor (p ≈ 2^(40 − 2c) ≈ 2^-104, lost
    # in every row sum): if only even keys are live, the polynomial (odd columns) changes no bit of the output
    qp = q.abs() + 0.1
    for live, poly_sees_them in ((0, False), (1, True)):
        kk = k.clone()
        kk[:, 1 - live::2] = -50.0
        a = A.softcap_attention(qp, kk, v, 50.0, backend="triton", fixed_shift=True)
        b = A.softcap_attention(qp, kk, v, 50.0, backend="triton", fixed_shift=True, poly_exp2=True)
        assert torch.equal(a, b) != poly_sees_them, live
    for cap, dt in ((50.0, torch.float16), (None, torch.float32)):
        qq, kk, vv = (t.to(dt) for t in (q, k, v))
        a = A.softcap_attention(qq, kk, vv, cap, cos, sin, backend="triton", fixed_shift=True)
        assert torch.equal(A.softcap_attention(qq, kk, vv, cap, cos, sin, backend="triton", fixed_shift=True,
                                               poly_exp2=True), a)
    with pytest.raises(ValueError, match="they need fixed_shift=True and the pointer kernel"):
        A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", poly_exp2=True)
    with pytest.raises(ValueError, match="they need fixed_shift=True and the pointer kernel"):
        A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True, poly_exp2=True,
                            rotary_impl="prepass_tma")


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,scales,impls", [(32, 1024, (2.0,), ("load", "prepass")),
                                              (1, 128, (2.0, 40.0), ("load", "prepass"))], ids=["owt-B32", "lm1b-B1"])
def test_poly_exp2_bf16_on_gpu(B, L, scales, impls):
    """The candidate in the engine's dtype at the engine's shapes (degree 3, MUFU tanh), rotary on load and 'prepass':
    within the error budget of the bf16 reference, at the small shape also with scores over the whole capped range
    (few cases: make gpu-check's 5 minutes include these tests)."""
    for scale in scales:
        q, k, v, cos, sin = _inputs(B, L, 12, 64, torch.bfloat16, "cuda", seed=3, scale=scale)
        for impl in impls:
            out = A.softcap_attention(q, k, v, 50.0, cos, sin, fixed_shift=True, poly_exp2=True, rotary_impl=impl)
            if B == 32:     # the fp64 truth of the full batch is large: check two sequences of it
                _check_budget(out[:2], q[:2], k[:2], v[:2], 50.0, cos, sin)
            else:
                _check_budget(out, q, k, v, 50.0, cos, sin)


# ---- the opt-in key split of the fixed-shift softmax (kv_split=S) -------------------------------------------------
@needs_triton
@pytest.mark.parametrize("B,L,H,d", [(1, 33, 2, 32), (2, 7, 3, 16), (1, 100, 2, 64), (1, 64, 1, 32)],
                         ids=["L33", "L7", "L100-d64", "L64-even"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")   # the exact tanh's ±1 limit
def test_kv_split_matches_reference(monkeypatch, B, L, H, d, rotary):
    """The keys of each query tile split over S programs (as many as there are key tiles at most, a last split
    shorter than the others), their fp32 partials added in order by the combine kernel: the same function within
    the budget at scores over the whole capped range, fp32 under the interpreter; the split grid and the combine
    kernel really ran, and with one split per key tile the sums are the unsplit kernel's, bit for bit (interpreter)."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)

    class Combine(LaunchArgs):            # keeps the row sums the splits handed over (its second argument)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.pl = args[1].clone()
                return super(Combine, self).__getitem__(grid)(*args, **kwargs)
            return launch
    comb = Combine(A._kv_split_combine_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    monkeypatch.setattr(A, "_kv_split_combine_kernel", comb)
    for scale in (2.0, 40.0):
        q, k, v, cos, sin = _inputs(B, L, H, d, torch.float32, dev, scale=scale)
        if not rotary:
            cos = sin = None
        whole = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True)
        tiles = -(-L // spy.launches[-1]["BLOCK_N"])
        for S in (2, 3, 64):
            spy.launches.clear()
            comb.launches.clear()
            out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True, kv_split=S)
            _check_budget(out, q, k, v, 50.0, cos, sin)
            ran = min(S, tiles)
            assert [kw.get("KV_SPLIT", False) for kw in spy.launches] == [ran > 1]
            assert [kw["N_SPLIT"] for kw in comb.launches] == ([-(-tiles // -(-tiles // ran))] if ran > 1 else [])
            if S >= tiles and dev == "cpu":      # a GPU's dot accumulates into acc in its own rounding
                assert torch.equal(out, whole)
        if tiles == 1:                    # one key tile: nothing to split
            continue
        # each key in exactly one split: the splits' row sums add up to Σ_j 2^(s_j − shift) over all keys (fp64)
        qr, kr = (q, k) if cos is None else (ref.apply_rotary_ref(q.double(), cos.double(), sin.double()),
                                             ref.apply_rotary_ref(k.double(), cos.double(), sin.double()))
        sc = torch.einsum("blhd,bjhd->blhj", qr.double(), kr.double()) / d ** 0.5
        l_true = torch.exp2(50.0 * A.LOG2E * torch.tanh(sc / 50.0) - A.fixed_shift_log2(50.0)).sum(-1)
        torch.testing.assert_close(comb.pl.sum(0).view(B, L, H).double().cpu(), l_true.cpu(), rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_gpu_kv_split_only_where_the_gpu_is_not_full(monkeypatch):
    """kv_split splits the keys at OWT B=1 (12 heads × 8 query tiles: fewer programs than SMs) within the budget in
    bf16, and is ignored at OWT B=32 (3072 query programs without it; its fp32 partials would take 805 MB)."""
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    for B, split in ((1, True), (32, False)):
        q, k, v, cos, sin = _inputs(B, 1024, 12, 64, torch.bfloat16, "cuda")
        spy.launches.clear()
        out = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True, kv_split=8)
        assert [kw.get("KV_SPLIT", False) for kw in spy.launches] == [split], B
        if split:
            _check_budget(out, q, k, v, 50.0, cos, sin)


@needs_triton
def test_kv_split_falls_back_and_is_checked():
    """Without the fixed shift (online softmax, fp16, no cap) kv_split is refused or changes nothing, as is the
    output projection's kernel; a bad count is refused."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 40, 2, 32, torch.float32, dev, scale=4.0)
    for cap, dt in ((50.0, torch.float16), (None, torch.float32)):
        qq, kk, vv = (t.to(dt) for t in (q, k, v))
        a = A.softcap_attention(qq, kk, vv, cap, cos, sin, backend="triton", fixed_shift=True)
        assert torch.equal(A.softcap_attention(qq, kk, vv, cap, cos, sin, backend="triton", fixed_shift=True,
                                               kv_split=3), a)
    w = _w_out(24, 2, 32, torch.float32, dev)
    a = A.softcap_attention_out_proj_fwd(q, k, v, 50.0, w, cos, sin, config={"fixed_shift": True})
    assert torch.equal(A.softcap_attention_out_proj_fwd(q, k, v, 50.0, w, cos, sin,
                                                        config={"fixed_shift": True, "kv_split": 3}), a)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="kv_split must be a positive int"):
            A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", fixed_shift=True, kv_split=bad)
    with pytest.raises(ValueError, match="they need fixed_shift=True"):
        A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", kv_split=2)
    torch.library.opcheck(torch.ops.fmlm.softcap_attention.default, (q, k, v, 50.0, cos, sin, True, False, 2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_kv_split_bf16_on_gpu():
    """The candidate at OWT B=1 (the shape it is for: 12 heads × 1024 keys, one sequence), bf16, the engine's two
    splits with rotary on load and 4 with 'prepass': within the error budget of the bf16 reference."""
    q, k, v, cos, sin = _inputs(1, 1024, 12, 64, torch.bfloat16, "cuda", seed=3)
    for S, impl in ((4, "load"), (8, "load"), (4, "prepass")):
        out = A.softcap_attention(q, k, v, 50.0, cos, sin, fixed_shift=True, kv_split=S, rotary_impl=impl)
        _check_budget(out, q, k, v, 50.0, cos, sin)


# ---- the opt-in output projection inside the attention kernel (softcap_attention_out_proj) ----------------------
def _w_out(DM, H, d, dtype, device, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(DM, H * d, generator=g) / (H * d) ** 0.5).to(device, dtype)


def _check_out_proj_budget(parts, q, k, v, w, cap, cos, sin):
    """The per-head partials and their sum over heads (the projected attention output) against the fp64 truth,
    the same-dtype reference (attention rounded to the dtype, then head_partials) setting the error scale."""
    d64 = (lambda t: None if t is None else t.double())
    truth = A.softcap_attention_out_proj(q.double(), k.double(), v.double(), w.double(), cap, d64(cos), d64(sin),
                                         backend="reference")
    r = A.softcap_attention_out_proj(q, k, v, w, cap, cos, sin, backend="reference")
    assert parts.shape == truth.shape == (q.shape[2], q.shape[0], q.shape[1], w.shape[0])
    assert parts.dtype == torch.float32
    for got, want, rr in ((parts, truth, r), (parts.sum(0), truth.sum(0), r.sum(0))):
        err = (got.double() - want).abs().max().item()
        ref_err = (rr.double() - want).abs().max().item()
        floor = 8 * torch.finfo(q.dtype).eps * want.abs().max().item()
        assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2·{ref_err:.3g} + {floor:.3g}"


@needs_triton
@pytest.mark.parametrize("B,L,H,d,dtype", CASES)
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
def test_out_proj_matches_reference(monkeypatch, B, L, H, d, dtype, rotary):
    """Attention with its output projection fused (per-head fp32 partials) within the error budget, at odd
    projection widths (DM = 40: a ragged last chunk) and with the fixed-shift softmax too. The kernel must run
    with OUT_PROJ (and FIXED_SHIFT where the dtype allows it): the unfused path would meet the budget too."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(B, L, H, d, dtype, dev)
    if not rotary:
        cos = sin = None
    w = _w_out(40, H, d, dtype, dev)
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    _check_out_proj_budget(A.softcap_attention_out_proj(q, k, v, w, 50.0, cos, sin, backend="triton"),
                           q, k, v, w, 50.0, cos, sin)
    _check_out_proj_budget(A.softcap_attention_out_proj(q, k, v, w, 50.0, cos, sin, backend="triton",
                                                        fixed_shift=True), q, k, v, w, 50.0, cos, sin)
    fixed = dtype != torch.float16          # fp16 keeps the online softmax (_launch_fwd)
    assert [(kw.get("OUT_PROJ", False), kw["FIXED_SHIFT"]) for kw in spy.launches] == [(True, False), (True, fixed)]


@needs_triton
def test_out_proj_chunks_and_the_unfused_path():
    """Several BLOCK_O chunks (with a ragged last one) give the one-chunk result; the partials' sum is the unfused
    kernel's output times w_outᵀ (fp32: same products, another summation order)."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 19, 3, 16, torch.float32, dev, seed=2)
    w = _w_out(72, 3, 16, torch.float32, dev)
    one = A.softcap_attention_out_proj_fwd(q, k, v, 50.0, w, cos, sin)
    many = A.softcap_attention_out_proj_fwd(q, k, v, 50.0, w, cos, sin, config={"BLOCK_O": 16})
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
    att = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")
    torch.testing.assert_close(one.sum(0), att @ w.t(), rtol=1e-5, atol=1e-5)


@needs_triton
def test_out_proj_narrow_output_keeps_a_16_wide_tile(monkeypatch):
    """A projection narrower than 16 (DM = 8) still launches a BLOCK_O of 16 (masked past DM): tl.dot needs 16 on
    a GPU, which the interpreter does not enforce (next_power_of_2(8) = 8 was launched before), and the result
    stays within the budget."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 9, 2, 16, torch.float32, dev, seed=4)
    w = _w_out(8, 2, 16, torch.float32, dev)
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    _check_out_proj_budget(A.softcap_attention_out_proj(q, k, v, w, 50.0, cos, sin, backend="triton"),
                           q, k, v, w, 50.0, cos, sin)
    assert [kw["BLOCK_O"] for kw in spy.launches] == [16]


def test_out_proj_errors_and_op_registration():
    q, k, v, cos, sin = _inputs(1, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="w_out"):
        A.softcap_attention_out_proj_fwd(q, k, v, 50.0, torch.zeros(8, 31), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        A.softcap_attention_out_proj(q, k, v, torch.zeros(8, 32), 50.0, cos, None)
    # the CPU reference path: partials of the reference attention, summing to the unfused product
    w = _w_out(24, 2, 16, torch.float32, "cpu")
    parts = A.softcap_attention_out_proj(q, k, v, w, 50.0, cos, sin, backend="reference")
    torch.testing.assert_close(parts.sum(0), A.softcap_attention_ref(q, k, v, 50.0, cos, sin) @ w.t())
    if triton_available() and interpreting():
        torch.library.opcheck(torch.ops.fmlm.softcap_attention_out_proj.default, (q, k, v, 50.0, w, cos, sin, False),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("B,L", [(1, 128), (4, 128)], ids=["lm1b-B1", "lm1b-B4"])
def test_out_proj_bf16_on_gpu(B, L):
    """The candidate in the engine's dtype at the engine's shapes (12 heads of 64, DM = 768): within the budget."""
    q, k, v, cos, sin = _inputs(B, L, 12, 64, torch.bfloat16, "cuda", seed=4)
    w = _w_out(768, 12, 64, torch.bfloat16, "cuda")
    for rc, rs in ((cos, sin), (None, None)):
        _check_out_proj_budget(A.softcap_attention_out_proj(q, k, v, w, 50.0, rc, rs), q, k, v, w, 50.0, rc, rs)


def test_mixed_dtypes_are_refused():
    """q, k, v of different dtypes: a TypeError up front, not a compile error inside the kernel's dot."""
    q, k, v, cos, sin = _inputs(1, 5, 2, 16, torch.float32, "cpu")
    with pytest.raises(TypeError, match="one dtype"):
        A.softcap_attention(q.half(), k, v, 50.0, cos, sin, backend="reference")


def _head_strided(t):
    """t's values in a (B, L, H, d) view whose head dim is not unit-stride."""
    return t.transpose(2, 3).contiguous().transpose(2, 3)


@needs_triton
def test_launchers_refuse_a_strided_head_dim_and_bad_rotary_qk_args():
    """A head dim of stride ≠ 1 (the kernels add column offsets to row pointers): a ValueError from every
    launcher, not wrong numbers; rotary_qk's argument and `out` checks; 'prepass_tma' without cos/sin."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 8, 2, 16, torch.float32, dev)
    w = _w_out(24, 2, 16, torch.float32, dev)
    qs = _head_strided(q)
    assert qs.stride(-1) != 1 and torch.equal(qs, q)
    for args in ((qs, k, v), (q, _head_strided(k), v), (q, k, _head_strided(v))):
        with pytest.raises(ValueError, match="unit stride"):
            A.softcap_attention(*args, 50.0, cos, sin, backend="triton")
        with pytest.raises(ValueError, match="unit stride"):
            A.softcap_attention_out_proj_fwd(*args, 50.0, w, cos, sin)
    for args in ((qs, k), (q, _head_strided(k))):
        with pytest.raises(ValueError, match="unit stride"):
            A.rotary_qk(*args, cos, sin)
    with pytest.raises(ValueError, match="rotary_qk needs"):
        A.rotary_qk(q, k[:, :4], cos, sin)
    with pytest.raises(ValueError, match="rotary_qk needs"):
        A.rotary_qk(q, k, None, sin)
    with pytest.raises(ValueError, match="rotary_qk needs"):
        A.rotary_qk(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="rotary_qk needs"):
        A.rotary_qk(q[..., :15], k[..., :15], cos[:, :7], sin[:, :7])        # odd head dim
    good = torch.empty(2, 1, 2, 8, 16, device=dev)
    for bad in (good[:1], good.half(), good.transpose(3, 4).contiguous().transpose(3, 4)):
        with pytest.raises(ValueError, match="out must be"):
            A.rotary_qk(q, k, cos, sin, out=bad)
    qr, kr = A.rotary_qk(q, k, cos, sin, out=good)
    assert qr.data_ptr() == good.data_ptr() and kr.data_ptr() == good[1].data_ptr()
    with pytest.raises(ValueError, match="needs cos/sin"):
        A.softcap_attention_prepass_tma_fwd(q, k, v, 50.0, None, None)


@needs_triton
def test_prepass_tma_without_descriptors_runs_prepass(monkeypatch):
    """tma_usable is False for v of another dtype, and wherever the device half of the rule (_backend.tma_device_ok:
    no host descriptors, or a GPU before sm_90) says no; 'prepass_tma' then runs the 'prepass' pointer kernel."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 9, 2, 32, torch.float16, dev)
    assert not A.tma_usable(q, v.float())
    want = A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl="prepass")
    monkeypatch.setattr(A, "tma_device_ok", lambda t: False)
    assert not A.tma_usable(q, v)
    _only(monkeypatch, "pointer")
    assert torch.equal(A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", rotary_impl="prepass_tma"), want)


def test_resolve_without_triton_or_off_cuda(monkeypatch):
    """backend='triton' without the package, or on CPU tensors outside the interpreter: a RuntimeError; 'auto' on
    CPU is the reference."""
    monkeypatch.setattr(A, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        A.resolve("triton", torch.device("cpu"))
    assert A.resolve("auto", torch.device("cpu")) == "reference"
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if triton_available():
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            A.resolve("triton", torch.device("cpu"))
    assert A.resolve("flex", torch.device("cpu")) == "flex"


@needs_triton
def test_compiling_routes_through_the_registered_ops(monkeypatch):
    """While torch.compile traces (is_compiling), every rotary_impl and the fused output projection call their
    registered ops with the functional's arguments (cap, rotate_q, fixed_shift): bit-equal to the eager call."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(1, 9, 2, 32, torch.float32, dev, scale=4.0)
    w = _w_out(24, 2, 32, torch.float32, dev)
    cases = [dict(rotary_impl=r, fixed_shift=f) for r in A.ROTARY_IMPLS for f in (False, True)]
    cases += [dict(fixed_shift=True, poly_exp2=True), dict(fixed_shift=True, poly_exp2=True, rotary_impl="prepass")]
    want = [A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", **kw) for kw in cases]
    want_p = [A.softcap_attention_out_proj(q, k, v, w, 50.0, cos, sin, backend="triton", fixed_shift=f)
              for f in (False, True)]
    assert not torch.equal(want[0], want[1]) and not torch.equal(want_p[0], want_p[1])    # fixed_shift matters
    seen = []
    launch = A._launch_fwd
    monkeypatch.setattr(A, "_launch_fwd", lambda *a: seen.append(a) or launch(*a))
    calls = []
    for name in ("_softcap_attention_op", "_softcap_attention_prepass_op", "_softcap_attention_prepass_tma_op",
                 "_softcap_attention_out_proj_op"):
        op = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for kw, x in zip(cases, want):
        assert torch.equal(A.softcap_attention(q, k, v, 50.0, cos, sin, backend="triton", **kw), x), kw
    for f, x in zip((False, True), want_p):
        assert torch.equal(A.softcap_attention_out_proj(q, k, v, w, 50.0, cos, sin, backend="triton", fixed_shift=f), x)
    assert not torch.equal(want[-2], want[1]) and not torch.equal(want[-1], want[3])       # poly_exp2 matters
    ops = ["_softcap_attention_op"] * 2 + ["_softcap_attention_prepass_op"] * 4 + \
        ["_softcap_attention_prepass_tma_op"] * 2 + ["_softcap_attention_op", "_softcap_attention_prepass_op"] + \
        ["_softcap_attention_out_proj_op"] * 2
    assert calls == ops
    # what reached the pointer launcher (cos: q rotated on load; k_rotated; the projection): 'load', 'prepass',
    # 'prepass_k' ('prepass_tma' runs the TMA kernel), then the projection
    assert [(a[4] is not None, a[9], a[11] is not None) for a in seen] == \
        [(True, False, False)] * 2 + [(False, True, False)] * 2 + [(True, True, False)] * 2 + [(True, False, False)] \
        + [(False, True, False)] + [(True, False, True)] * 2
    assert [bool((a[10] or {}).get("poly_exp2")) for a in seen] == [False] * 6 + [True, True, False, False]


@needs_triton
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
def test_triton_tiles_dividing_L_and_d(monkeypatch, rotary):
    """L a multiple of BLOCK_N and a power-of-two head dim: the kernel's unmasked V loads (EVEN_N and EVEN_D), as
    at the engine's shapes (L = 128 or 1024, d = 64), within the error budget."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v, cos, sin = _inputs(2, 32, 2, 16, torch.float32, dev, seed=5)
    if not rotary:
        cos = sin = None
    spy = LaunchArgs(A._softcap_attention_fwd_kernel)
    monkeypatch.setattr(A, "_softcap_attention_fwd_kernel", spy)
    out = A.softcap_attention_fwd(q, k, v, 50.0, cos, sin, block_n=16)
    assert spy.launches[0]["EVEN_N"] and spy.launches[0]["BLOCK_D"] == spy.launches[0]["HEAD_DIM"]
    _check_budget(out, q, k, v, 50.0, cos, sin)


@needs_triton
@pytest.mark.parametrize("rotary_impl,fixed_shift", [("load", False), ("load", True), ("prepass", True),
                                                     ("prepass_tma", False)])
def test_negative_softcap_is_the_same_function(rotary_impl, fixed_shift):
    """softcap·tanh(s/softcap) is even in softcap and the reference computes it for a negative one: the kernels
    give what its absolute value gives (fixed_shift gave NaN, exp2 overflowing; without it the tanh lost accuracy)."""
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    g = torch.Generator().manual_seed(3)
    q, k, v = (8 * torch.randn(1, 33, 2, 16, generator=g).to(dev) for _ in range(3))
    cos, sin = (t.to(dev) for t in ref.rotary_cos_sin(33, 1.0 / (10000 ** (torch.arange(0, 16, 2) / 16))))
    kw = dict(backend="triton", rotary_impl=rotary_impl, fixed_shift=fixed_shift)
    got = A.softcap_attention(q, k, v, -5.0, cos, sin, **kw)
    assert torch.isfinite(got).all()
    assert torch.equal(got, A.softcap_attention(q, k, v, 5.0, cos, sin, **kw))
