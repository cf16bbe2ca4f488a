"""adaln_modulate / gate_residual (fused Triton row kernels) against the spec composed from reference.py
(layer_norm_ref + modulate, x + gate·y), with an fp64 ground truth and the DESIGN.md §6 error budget."""
import pytest
import torch

from fmlm.kernels import adaln
from fmlm.kernels import reference as ref
from fmlm.kernels._backend import interpreting, triton_available
from kernel_test_utils import must_launch, record_calls

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


KERNEL = "_gate_residual_adaln_kernel"       # the one Triton kernel behind both functionals


def _dev():
    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _inputs(B, L, D, dtype, device="cpu", seed=0):
    """Residual stream in fp32 (as in the DiT), GEMM output y and modulation rows in `dtype`; shift/scale/
    gate are strided column blocks of one (B, 6·D) modulation, as the fast trunk passes them."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(B, L, D, generator=g) + 0.5).to(device)
    y = torch.randn(B, L, D, generator=g).to(device, dtype)
    mods = (0.5 * torch.randn(B, 6 * D, generator=g)).to(device, dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(device)
    return x, y, mods[:, :D], mods[:, D:2 * D], mods[:, 2 * D:3 * D], w


def _budget(out, reference, truth, dtype):
    err = (out.double() - truth).abs().max().item()
    ref_err = (reference.double() - truth).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * truth.abs().max().item()
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2·{ref_err:.3g} + {floor:.3g}"


CASES = [
    pytest.param(1, 1, 32, torch.float32, id="L1"),
    pytest.param(2, 7, 48, torch.float32, id="D48"),
    pytest.param(3, 33, 64, torch.float16, id="B3-L33-fp16"),
    pytest.param(1, 5, 768, torch.float16, id="D768-fp16"),
]


def test_reference_is_the_spec():
    x, y, sh, sc, g, w = _inputs(2, 5, 16, torch.float64)
    want = ref.modulate(ref.layer_norm_ref(x.double(), w.double()), sh[:, None], sc[:, None])
    assert torch.equal(adaln.adaln_modulate_ref(x.double(), w.double(), sh, sc), want)
    assert torch.equal(adaln.gate_residual_ref(x.double(), g, y), x.double() + g[:, None] * y)


@needs_triton
@pytest.mark.parametrize("B,L,D,dtype", CASES)
def test_adaln_modulate(B, L, D, dtype):
    """The Triton kernel (it must launch: the reference fallback would meet the budget too) against fp64."""
    x, y, sh, sc, g, w = _inputs(B, L, D, dtype, _dev())
    with must_launch(adaln, KERNEL):
        out = adaln.adaln_modulate(x, w, sh, sc, out_dtype=dtype, backend="triton")
    truth = adaln.adaln_modulate_ref(x.double(), w.double(), sh.double(), sc.double())
    reference = adaln.adaln_modulate(x, w, sh, sc, out_dtype=dtype, backend="reference")
    assert out.dtype == dtype and out.shape == x.shape
    _budget(out, reference, truth, dtype)


@needs_triton
@pytest.mark.parametrize("B,L,D,dtype", CASES)
def test_gate_residual_fused_norm(B, L, D, dtype):
    """Residual update + next adaLN input from the Triton kernel (which must launch) against fp64."""
    x, y, sh, sc, g, w = _inputs(B, L, D, dtype, _dev())
    with must_launch(adaln, KERNEL):
        xn, out = adaln.gate_residual(x, g, y, w, sh, sc, out_dtype=dtype, backend="triton")
    xt = adaln.gate_residual_ref(x.double(), g.double(), y.double())
    xr, outr = adaln.gate_residual(x, g, y, w, sh, sc, out_dtype=dtype, backend="reference")
    assert xn.dtype == torch.float32 and out.dtype == dtype
    _budget(xn, xr, xt, torch.float32)
    _budget(out, outr, adaln.adaln_modulate_ref(xt, w.double(), sh.double(), sc.double()), dtype)


@needs_triton
def test_gate_residual_in_place_and_plain():
    x, y, sh, sc, g, w = _inputs(2, 9, 40, torch.float32, _dev(), seed=1)
    want = adaln.gate_residual_ref(x.double(), g.double(), y.double())
    x_keep = x.clone()
    with must_launch(adaln, KERNEL):
        out = adaln.gate_residual(x, g, y, backend="triton")            # no norm: returns only x_new
    assert torch.equal(x, x_keep) and torch.is_tensor(out)
    _budget(out, adaln.gate_residual(x, g, y, backend="reference"), want, torch.float32)
    with must_launch(adaln, KERNEL):
        res = adaln.gate_residual(x, g, y, x_out=x, backend="triton")
    assert res.data_ptr() == x.data_ptr()
    _budget(x, out, want, torch.float32)


def test_torch_backend_and_errors():
    """The torch backend against the spec written out with F.layer_norm (independent of adaln's _ref helpers,
    which that backend calls), then the argument check."""
    x, y, sh, sc, g, w = _inputs(2, 3, 8, torch.float32)
    xn, out = adaln.gate_residual(x, g, y, w, sh, sc, backend="torch")
    x_new = x + g[:, None] * y
    torch.testing.assert_close(xn, x_new)
    want = torch.nn.functional.layer_norm(x_new, [x.shape[-1]], eps=adaln.EPS) * w * (1 + sc[:, None]) + sh[:, None]
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError):
        adaln.gate_residual(x, g, y, w, None, sc)


@pytest.mark.skipif(not triton_available() or interpreting(), reason="compile-only check needs the compiling triton")
def test_compiles_for_sm90_without_spills():
    import triton
    from triton.backends.compiler import GPUTarget

    for sp in adaln.compile_specs():
        k = triton.compile(triton.compiler.ASTSource(sp["fn"], sp["signature"], sp["constexprs"], sp.get("attrs")),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=sp["num_warps"], num_stages=sp["num_stages"]))
        assert ".local" not in k.asm["ptx"], f"{sp['name']} spills"


@pytest.mark.gpu
@pytest.mark.parametrize("B,L", [(32, 1024), (1, 128), (3, 7)], ids=["owt-B32", "lm1b-B1", "odd"])
def test_bf16_on_gpu(B, L):
    x, y, sh, sc, g, w = _inputs(B, L, 768, torch.bfloat16, "cuda")
    xn, out = adaln.gate_residual(x, g, y, w, sh, sc)
    xt = adaln.gate_residual_ref(x.double(), g.double(), y.double())
    xr, outr = adaln.gate_residual(x, g, y, w, sh, sc, backend="reference")
    _budget(xn, xr, xt, torch.float32)
    _budget(out, outr, adaln.adaln_modulate_ref(xt, w.double(), sh.double(), sc.double()), torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_bad_norm_shapes_are_refused(backend):
    """A LayerNorm weight of the wrong length (the kernel read past a short one), shift/scale or gate of the wrong
    shape, an x_out of another shape: clear errors on every backend."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    gate, sh, sc = torch.randn(3, 2, 16, generator=g).unbind(0)
    with pytest.raises(ValueError, match="expected weight"):
        adaln.adaln_modulate(x, torch.ones(5), sh, sc, backend=backend)
    with pytest.raises(ValueError, match="expected weight"):
        adaln.gate_residual(x, gate, y, torch.ones(16), sh[:1], sc, backend=backend)
    with pytest.raises(ValueError, match="gate must be"):
        adaln.gate_residual(x, gate[:, :8], y, backend=backend)
    with pytest.raises(ValueError, match="x_out must be"):
        adaln.gate_residual(x, gate, y, x_out=torch.empty(2, 16), backend=backend)


@needs_triton
@pytest.mark.parametrize("strided", ["shift", "scale"])
def test_shift_and_scale_of_different_row_strides(strided):
    """The kernel reads shift and scale with one row stride: where only one of them is a column block of a wider
    modulation (row stride k·D) and the other a (B, D) tensor of its own, the launcher makes both contiguous."""
    x, y, sh, sc, g, w = _inputs(3, 5, 32, torch.float32, _dev(), seed=2)
    if strided == "shift":
        sc = sc.contiguous()
    else:
        sh = sh.contiguous()
    assert sh.stride(0) != sc.stride(0)
    with must_launch(adaln, KERNEL):
        out = adaln.adaln_modulate(x, w, sh, sc, backend="triton")
        xn, out2 = adaln.gate_residual(x, g, y, w, sh, sc, backend="triton")
    truth = adaln.adaln_modulate_ref(x.double(), w.double(), sh.double(), sc.double())
    _budget(out, adaln.adaln_modulate(x, w, sh, sc, backend="reference"), truth, torch.float32)
    xr, outr = adaln.gate_residual(x, g, y, w, sh, sc, backend="reference")
    _budget(out2, outr, adaln.adaln_modulate_ref(xr.double(), w.double(), sh.double(), sc.double()), torch.float32)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_eps_other_than_the_default(backend):
    """eps = 0.5 on rows of variance ~0.04: LayerNorm(x)·w·(1+scale)+shift with that eps (F.layer_norm written out),
    far from the default eps's result; both backends."""
    x, y, sh, sc, g, w = _inputs(2, 3, 16, torch.float32, _dev() if backend == "triton" else "cpu", seed=3)
    x = 0.2 * (x - 0.5) / 3
    want = torch.nn.functional.layer_norm(x.double(), [16], eps=0.5) * w.double() * (1 + sc.double()[:, None]) \
        + sh.double()[:, None]
    out = adaln.adaln_modulate(x, w, sh, sc, eps=0.5, backend=backend)
    assert (adaln.adaln_modulate(x, w, sh, sc, backend=backend).double() - want).abs().max() > 0.1
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    xn, out2 = adaln.gate_residual(x, g, y, w, sh, sc, eps=0.5, backend=backend)
    want2 = adaln.adaln_modulate_ref(xn.double(), w.double(), sh.double(), sc.double(), eps=0.5)
    torch.testing.assert_close(out2.double(), want2, rtol=1e-5, atol=1e-5)


def test_x_must_be_3d_and_the_launcher_checks_modulation_shapes():
    x, y, sh, sc, g, w = _inputs(2, 3, 16, torch.float32)
    with pytest.raises(ValueError, match=r"x must be \(B, L, D\)"):
        adaln.adaln_modulate(x[0], w, sh, sc, backend="reference")
    with pytest.raises(ValueError, match=r"x must be \(B, L, D\)"):
        adaln.gate_residual(x.reshape(6, 16), g, y, w, sh, sc, backend="reference")
    if triton_available() and (interpreting() or torch.cuda.is_available()):
        with pytest.raises(ValueError, match="modulation must be"):      # the launcher called directly
            adaln.gate_residual_adaln_fwd(x, g[:1], y)
        with pytest.raises(ValueError, match="modulation must be"):
            adaln.gate_residual_adaln_fwd(x, weight=w, shift=sh, scale=sc[:, :8])


@needs_triton
def test_compiling_routes_through_the_registered_ops(monkeypatch):
    """fmlm::adaln_modulate passes opcheck (schema, fake shapes); while torch.compile traces (is_compiling) the
    functionals call the registered ops with their arguments (eps, out_dtype, y_bias): bit-equal to the launcher.
    gate_residual into x_out or without the norm keeps the launcher (the ops allocate their outputs)."""
    x, y, sh, sc, g, w = _inputs(2, 5, 32, torch.float16, _dev(), seed=4)
    yb = torch.randn(32, device=x.device, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fmlm.adaln_modulate.default, (x, w, sh, sc, 1e-3, torch.float16))
    want = [adaln.adaln_modulate(x, w, sh, sc, eps=1e-3, out_dtype=torch.float16, backend="triton"),
            *adaln.gate_residual(x, g, y, w, sh, sc, eps=1e-3, backend="triton", y_bias=yb)]
    calls = []
    record_calls(monkeypatch, adaln, calls, _adaln_modulate_op="modulate", _gate_residual_adaln_op="gate")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = [adaln.adaln_modulate(x, w, sh, sc, eps=1e-3, out_dtype=torch.float16, backend="triton"),
           *adaln.gate_residual(x, g, y, w, sh, sc, eps=1e-3, backend="triton", y_bias=yb)]
    assert calls == ["modulate", "gate"]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    adaln.gate_residual(x, g, y, backend="triton")
    adaln.gate_residual(x, g, y, w, sh, sc, x_out=torch.empty_like(x), backend="triton")
    assert calls == ["modulate", "gate"]


@needs_triton
@pytest.mark.parametrize("norm", [False, True])
def test_gate_residual_into_a_transposed_destination(norm):
    """x_out that cannot be viewed as rows (a transposed buffer; x itself when x is transposed, in place) gets the
    result the reference gives; the kernel raised a RuntimeError from x_out.view before. A row view with a row
    stride (a slice of a wider buffer) is written directly, in place."""
    dev = _dev()
    g = torch.Generator().manual_seed(0)
    B, L, D = 2, 5, 24
    mk = lambda *s: torch.randn(*s, generator=g).to(dev)                                    # noqa: E731
    x, y, gate = mk(L, B, D).transpose(0, 1), mk(B, L, D), mk(B, D)
    w, shift, scale = mk(D), mk(B, D), mk(B, D)
    want = adaln.gate_residual(x, gate, y, backend="reference")
    extra = dict(weight=w, shift=shift, scale=scale) if norm else {}
    out_t = torch.full((L, B, D), float("nan"), device=dev).transpose(0, 1)
    got = adaln.gate_residual(x, gate, y, x_out=out_t, backend="triton", **extra)
    got_x = got[0] if norm else got
    assert got_x.data_ptr() == out_t.data_ptr()
    torch.testing.assert_close(out_t, want, rtol=1e-6, atol=1e-6)
    if norm:
        torch.testing.assert_close(got[1], adaln.gate_residual(x, gate, y, backend="reference", **extra)[1],
                                   rtol=1e-5, atol=1e-5)
    x_in = x.clone().transpose(0, 1).contiguous().transpose(0, 1)          # transposed layout, its own memory
    adaln.gate_residual(x_in, gate, y, x_out=x_in, backend="triton", **extra)
    torch.testing.assert_close(x_in, want, rtol=1e-6, atol=1e-6)
    wide = torch.zeros(B, L, 2 * D, device=dev)
    wide[..., :D] = x
    adaln.gate_residual(wide[..., :D], gate, y, x_out=wide[..., :D], backend="triton", **extra)
    torch.testing.assert_close(wide[..., :D], want, rtol=1e-6, atol=1e-6)
    assert wide[..., D:].abs().max() == 0


def test_rows_per_program_leave_no_sm_idle(monkeypatch):
    """On CUDA gate_residual takes ~4K elements per program (4 rows at D = 768) unless that leaves SMs without a
    program: then fewer rows, down to one (LM1B B=1's 128 rows: 128 programs, not 32)."""
    monkeypatch.setattr(adaln, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    got = {n: adaln._block_r(n, 1024, cuda) for n in (1, 128, 256, 300, 528, 1024, 32768)}
    assert got == {1: 1, 128: 1, 256: 1, 300: 2, 528: 4, 1024: 4, 32768: 4}
    assert adaln._block_r(32768, 256, cuda) == 16 and adaln._block_r(128, 256, cuda) == 1


@needs_triton
def test_any_rows_per_program_is_the_same_function():
    """The launcher's rows per program change only how rows are grouped into programs: one row per program (what
    LM1B B=1 gets on an H100), the default and an odd block give the same x' and normalized output, summing split-K
    partials with a bias (the triton_small path) and a plain y."""
    dev = _dev()
    x, y, sh, sc, g, w = _inputs(1, 7, 96, torch.float32, dev)
    parts = torch.randn(3, 1, 7, 96, generator=torch.Generator().manual_seed(1)).to(dev)
    yb = torch.randn(96, generator=torch.Generator().manual_seed(2)).to(dev)
    for yy, bias in ((parts, yb), (y, None)):
        outs = [adaln.gate_residual_adaln_fwd(x, g, yy, w, sh, sc, y_bias=bias, block_r=br) for br in (None, 1, 4)]
        for xo, out in outs[1:]:
            assert torch.equal(xo, outs[0][0])           # elementwise, partials summed in split order
            if dev == "cpu":                             # the interpreter's row sums do not depend on the grouping
                assert torch.equal(out, outs[0][1])
            else:                                        # a GPU's may sum a row in another order
                torch.testing.assert_close(out, outs[0][1], rtol=1e-6, atol=1e-6)
        want_x = x + g[:, None] * (yy.sum(0) + bias if bias is not None else yy)
        torch.testing.assert_close(outs[1][0], want_x, rtol=1e-6, atol=1e-5)
