"""kernels/reference.py (the spec) on the paths the parity tests do not take: an odd timestep-embedding width, the
samplers' argument checks, and the cross-entropy reductions."""
import pytest
import torch

import fmlm
from fmlm.kernels import reference as ref


def test_timestep_embedding_of_odd_width_is_zero_padded():
    t = torch.tensor([0.0, 0.3, 1.0])
    even, odd = ref.timestep_embedding(t, dim=4), ref.timestep_embedding(t, dim=5)
    assert odd.shape == (3, 5) and torch.equal(odd[:, :4], even) and torch.equal(odd[:, 4], torch.zeros(3))
    assert torch.equal(even[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))          # cos(0), sin(0)


def _small(two_time):
    cfg = fmlm.ModelConfig(vocab_size=131, seq_len=9, hidden=32, n_blocks=1, n_heads=4, cond_dim=16,
                           two_time=two_time)
    m = fmlm.FlowLM(cfg)
    m.reset_parameters(seed=0)
    return m.params(), cfg, torch.randn(2, 9, 131, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [0, -1])
def test_samplers_refuse_fewer_than_one_step(steps):
    p, cfg, z0 = _small(two_time=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ref.flm_sample_ref(p, cfg, z0, steps)
    p, cfg, z0 = _small(two_time=True)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ref.fmlm_sample_ref(p, cfg, z0, steps)
    assert ref.flm_sample_ref(p, cfg, z0, 1).shape == (2, 9)


@pytest.mark.parametrize("renoise", [-0.1, 1.5])
def test_fmlm_sampler_refuses_renoise_outside_0_1(renoise):
    p, cfg, z0 = _small(two_time=True)
    with pytest.raises(ValueError, match=r"renoise must be in \[0, 1\]"):
        ref.fmlm_sample_ref(p, cfg, z0, 2, renoise)


def test_linear_cross_entropy_reductions():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)
    targets = torch.tensor([[1, 4, -100], [10, -100, 0]])
    none = ref.linear_cross_entropy_ref(h, w, b, targets)
    assert none.shape == (2, 3) and none[0, 2] == 0 and none[1, 1] == 0 and (none[targets != -100] > 0).all()
    assert ref.linear_cross_entropy_ref(h, w, b, targets, reduction="sum") == none.sum()
    assert ref.linear_cross_entropy_ref(h, w, b, targets, reduction="mean") == none.sum() / 4
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        ref.linear_cross_entropy_ref(h, w, b, targets, reduction="max")
