"""softcap_attention (Triton flash kernel with rotary on load, FlexAttention fallback) against the spec:
reference.apply_rotary_ref + reference.attention_ref, with an error budget against an fp64 ground truth
(DESIGN.md §6). Triton cases run on CUDA, or on the CPU under TRITON_INTERPRET=1 (fp32/fp16 only)."""
import pytest
import torch

from fmlm.kernels import attention as A
from fmlm.kernels import reference as ref
from fmlm.kernels._backend import interpreting, triton_available

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
