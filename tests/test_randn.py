"""kernels/randn.py: the launcher's checks, the stream's counters past 2^32 values (moments: tests/test_runner.py)."""
import pytest
import torch

from fmlm.kernels._backend import interpreting, triton_available
from fmlm.kernels.randn import randn_philox

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@needs_triton
def test_out_must_be_contiguous():
    """The kernel writes element i at out's base + i: a strided `out` is refused (it would get the values of
    another layout); a contiguous out is filled in place with the values a fresh draw gives."""
    seed = torch.tensor([3], device=DEV)
    buf = torch.full((4, 6), float("nan"), device=DEV)
    with pytest.raises(ValueError, match="contiguous"):
        randn_philox((4, 5), seed, out=buf[:, :5], backend="triton")
    assert buf.isnan().all()
    out = torch.empty(4, 6, device=DEV)
    got = randn_philox((4, 6), seed, stream=2, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, randn_philox((4, 6), seed, stream=2, backend="triton"))


def _philox_stream(seed: int, stream: int, first: int, n: int) -> torch.Tensor:
    """Elements [first, first + n) of a stream from the torch Philox of interp_embed's torch backend (int64
    arithmetic, a separate implementation): element i is lane i % 4 of the counter (q mod 2^32, q div 2^32,
    stream, 0), q = i // 4, lanes (x0, x1) and (x2, x3) each one Box–Muller pair."""
    from fmlm.kernels.interp_embed import _box_muller_torch, _philox_torch

    q = torch.arange(first // 4, (first + n + 3) // 4, device=DEV, dtype=torch.int64)
    x0, x1, x2, x3 = _philox_torch(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, stream), torch.zeros_like(q), seed)
    n0, n1 = _box_muller_torch(x0, x1)
    n2, n3 = _box_muller_torch(x2, x3)
    return torch.stack([n0, n1, n2, n3], -1).reshape(-1)[first % 4:first % 4 + n]


@needs_triton
def test_stream_counters_and_offsets_past_2_32_values():
    """The stream is the documented Philox one: the first values (high word 0, as before the high word was used)
    and a draw crossing q = 2^32 (element 2^34, where a 32-bit counter would wrap to the stream's start) equal a
    separate torch Philox; a draw at an offset is the same slice of one longer draw. One draw may hold more than
    2^32 values (an OWT bucket of 8192 holds 6.4e9), which the counter's high word now allows."""
    from fmlm.kernels.randn import randn_philox_fwd

    seed = torch.tensor([2 ** 40 + 77], device=DEV)
    first = randn_philox((40,), seed, stream=3, backend="triton")
    torch.testing.assert_close(first, _philox_stream(2 ** 40 + 77, 3, 0, 40), rtol=0, atol=1e-4)
    at8 = randn_philox_fwd(torch.empty(32, device=DEV), seed, 3, offset=8)
    assert torch.equal(at8, first[8:])
    far = randn_philox_fwd(torch.empty(32, device=DEV), seed, 3, offset=2 ** 34 - 16)
    torch.testing.assert_close(far, _philox_stream(2 ** 40 + 77, 3, 2 ** 34 - 16, 32), rtol=0, atol=1e-4)
    assert (far[16:] - first[:16]).abs().min() > 0       # past 2^34 it is not the stream's start again
    for bad in (-4, 6):
        with pytest.raises(ValueError, match="multiple of 4"):
            randn_philox_fwd(torch.empty(4, device=DEV), seed, 3, offset=bad)
