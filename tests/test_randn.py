"""kernels/randn.py: the launcher's checks on `out` (the draws, streams and moments: tests/test_runner.py)."""
import pytest
import torch

from fmlm.kernels._backend import interpreting, triton_available
from fmlm.kernels.randn import randn_philox

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@needs_triton
def test_out_must_be_contiguous_and_fit_one_stream():
    """The kernel writes element i at out's base + i: a strided `out` is refused (it would get the values of
    another layout), as is one of 2^32 or more elements (the counters of one stream); a contiguous out is
    filled in place with the values a fresh draw gives."""
    seed = torch.tensor([3], device=DEV)
    buf = torch.full((4, 6), float("nan"), device=DEV)
    with pytest.raises(ValueError, match="contiguous"):
        randn_philox((4, 5), seed, out=buf[:, :5], backend="triton")
    assert buf.isnan().all()
    big = torch.empty(1, device=DEV).expand(2 ** 32)
    with pytest.raises(ValueError, match=r"at most 2\^32"):
        randn_philox(big.shape, seed, out=big, backend="triton")
    out = torch.empty(4, 6, device=DEV)
    got = randn_philox((4, 6), seed, stream=2, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, randn_philox((4, 6), seed, stream=2, backend="triton"))
