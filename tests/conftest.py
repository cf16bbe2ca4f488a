import os

# numpy BLAS: a small matmul took 150 ms with two OpenBLAS threads on a loaded 2-core machine, 67 µs with one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Without CUDA, Triton kernels run under the interpreter (read when a kernel is defined, so set it before
# anything imports triton); with CUDA they run for real.
if not os.path.exists("/dev/nvidiactl") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    import fmlm
    return lambda **kw: fmlm.ModelConfig(**{**dict(vocab_size=131, seq_len=9, hidden=32, n_blocks=2, n_heads=4,
                                                   cond_dim=16), **kw})
