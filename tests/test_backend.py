"""kernels/_backend.py: backend resolution, the index check under torch.compile, the TMA and addmm(out_dtype)
gates, accumulate_mm and with_default_constexprs (the compile check's spec completion)."""
import pytest
import torch

from fmlm.kernels import _backend
from fmlm.kernels._backend import triton_available

CPU = torch.device("cpu")


def test_resolve_refuses_unknown_backends_and_missing_triton(monkeypatch):
    """An unknown name: ValueError; backend='triton' without the package, or on CPU tensors outside the
    interpreter: RuntimeError; 'auto' without triton (or off CUDA) is 'torch'."""
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("cuda", CPU)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        _backend.resolve("triton", CPU)
    assert _backend.resolve("auto", torch.device("cuda")) == "torch"
    assert _backend.resolve("reference", CPU) == "reference"
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if triton_available():
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            _backend.resolve("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_available():
        assert _backend.resolve("triton", CPU) == "triton"


def test_check_indices_is_skipped_while_compiling(monkeypatch):
    """While torch.compile traces, the (data-dependent) range check is skipped; the dtype check is not."""
    idx = torch.tensor([0, 7])
    with pytest.raises(ValueError, match=r"idx\[1\] = 7"):
        _backend.check_indices(idx, 5, "idx")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _backend.check_indices(idx, 5, "idx")
    with pytest.raises(TypeError, match="int32/int64"):
        _backend.check_indices(idx.float(), 5, "idx")


def test_tma_gate_without_host_descriptors(monkeypatch):
    """No host tensor descriptors (triton < 3.4): no TMA kernel on any device; with them, CPU tensors (the
    interpreter) of any dtype pass the device half of the rule."""
    t = torch.zeros(4, 16)
    if _backend.host_descriptors():
        assert _backend.tma_device_ok(t) and _backend.tma_device_ok(t.half())
    monkeypatch.setattr(_backend, "host_descriptors", lambda: False)
    assert not _backend.tma_device_ok(t) and not _backend.tma_device_ok(t.half())


def test_pdl_is_never_active_off_cuda():
    with _backend.pdl_launches():
        assert not _backend.pdl_active(torch.zeros(2))
    assert _backend.pdl_launch_kwargs(False) == {"USE_PDL": False}


def test_addmm_fp32_probe_is_false_where_torch_lacks_the_kernel():
    """torch without addmm(out_dtype=float32) on the device (here: the CPU, NotImplementedError) makes the probe
    answer False instead of raising; addmm_fp32_ok is False off CUDA without probing or caching."""
    assert _backend._probe_addmm_fp32(CPU) is False
    before = dict(_backend.ADDMM_FP32_OUT)
    assert _backend.addmm_fp32_ok(CPU) is False
    assert _backend.ADDMM_FP32_OUT == before


def test_accumulate_mm_paths(monkeypatch):
    """out (fp32) += p·e: where the device has addmm(out_dtype=float32), one call accumulating into out (out is
    both the input and the destination; a stand-in for the CUDA-only kernel here); otherwise p·e in p's dtype,
    then added; fp32 operands and fp32_addmm=False take the second path."""
    g = torch.Generator().manual_seed(0)
    p, e = torch.randn(5, 7, generator=g).half(), torch.randn(7, 3, generator=g).half()
    out0 = torch.randn(5, 3, generator=g)
    want = out0 + p.float() @ e.float()
    calls = []

    def addmm(c, a, b, out_dtype=None, out=None):
        calls.append((c.data_ptr(), out_dtype, None if out is None else out.data_ptr()))
        return out.add_(a.float() @ b.float())

    monkeypatch.setattr(_backend, "addmm_fp32_ok", lambda device: True)
    monkeypatch.setattr(_backend.torch, "addmm", addmm)
    out = out0.clone()
    _backend.accumulate_mm(out, p, e)
    assert calls == [(out.data_ptr(), torch.float32, out.data_ptr())]
    torch.testing.assert_close(out, want)
    for args in ((p, e, False), (p.float(), e.float(), True)):
        out = out0.clone()
        _backend.accumulate_mm(out, *args)
        torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    assert len(calls) == 1


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_with_default_constexprs():
    """Trailing parameters with defaults that a spec leaves out are added as constexprs with their default values
    (triton.compile's ASTSource wants every parameter); a spec's own value wins; the input specs are not changed."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(X, n, A: tl.constexpr, m=7, B: tl.constexpr = 4, USE_PDL: tl.constexpr = False):
        pass

    sig = {"X": "*fp32", "n": "i32", "A": "constexpr", "m": "i32"}
    specs = [dict(name="k", fn=_k, signature=dict(sig), constexprs={"A": 1}, num_warps=4),
             dict(name="k_pdl", fn=_k, signature={**sig, "USE_PDL": "constexpr"}, constexprs={"A": 2, "USE_PDL": True}),
             dict(name="k_b8", fn=_k, signature={"X": "*fp32", "n": "i32", "A": "i32"}, constexprs={"B": 8})]
    out = _backend.with_default_constexprs(specs)
    assert [s["name"] for s in out] == ["k", "k_pdl", "k_b8"] and out[0]["num_warps"] == 4
    assert out[0]["signature"] == {**sig, "B": "constexpr", "USE_PDL": "constexpr"}      # m keeps its i32
    assert out[0]["constexprs"] == {"A": 1, "B": 4, "USE_PDL": False}
    assert out[1]["constexprs"] == {"A": 2, "B": 4, "USE_PDL": True}
    assert out[2]["constexprs"] == {"B": 8, "m": 7, "USE_PDL": False} and out[2]["signature"]["A"] == "i32"
    assert specs[0]["signature"] == sig and specs[0]["constexprs"] == {"A": 1} and specs[2]["constexprs"] == {"B": 8}


def test_tma_rows_ok_needs_aligned_rows_that_do_not_overlap():
    """The shared TMA operand rule: 16-byte aligned base and row stride, unit column stride, a 16-byte box row, and
    a row stride that covers the row (an expanded h, row stride 0, is 16-byte "aligned" but no descriptor can hold
    it: the opt-in TMA kernels fall back to pointer loads for it)."""
    from fmlm.kernels._backend import tma_rows_ok

    h = torch.zeros(64, 48, dtype=torch.float16)
    assert tma_rows_ok(32, h)
    assert not tma_rows_ok(4, h)                                   # an 8-byte box row
    assert not tma_rows_ok(32, torch.zeros(64, 52, dtype=torch.float16)[:, :48])   # 104-byte rows
    assert not tma_rows_ok(32, h.t())                              # column-major
    assert not tma_rows_ok(32, h[0:1].expand(64, 48))              # row stride 0
    assert tma_rows_ok(32, torch.zeros(64, 64, dtype=torch.float16)[:, :48])       # 128-byte rows, a row view
    assert not tma_rows_ok(32, h, h[:, 1:])                        # any operand failing fails them all
