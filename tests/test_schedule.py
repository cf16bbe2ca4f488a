import numpy as np
import pytest
import torch

import fmlm
from fmlm.kernels import reference as ref


@pytest.mark.parametrize("V", [30522, 50258, 131, 7])
def test_device_spline_agrees_with_published_spline(V):
    tau = torch.rand(20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(V))
    tau = torch.cat([tau, torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9], dtype=torch.float64)])
    assert (fmlm.tau_to_gamma(tau, V) - ref.tau_to_gamma_ref(tau, V)).abs().max() < 1e-6
    gam = tau.clone()
    assert (fmlm.gamma_to_tau(gam, V) - ref.gamma_to_tau_ref(gam, V)).abs().max() < 1e-6


def test_spline_matches_exact_tau_and_roundtrips():
    V = 30522
    g = np.linspace(0.01, 0.99, 997)
    exact = ref.tau_exact(g, V)
    tab = fmlm.gamma_to_tau(torch.from_numpy(g), V).numpy()
    assert np.abs(tab - exact).max() < 1e-6
    tau = torch.linspace(0.05, 0.95, 101, dtype=torch.float64)
    back = fmlm.gamma_to_tau(fmlm.tau_to_gamma(tau, V), V)
    assert (back - tau).abs().max() < 1e-4


def test_schedule_is_monotone_and_bounded():
    tau = torch.linspace(0, 1, 5001, dtype=torch.float64)
    g = fmlm.tau_to_gamma(tau, 50258)
    assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    assert (g.diff() >= -1e-12).all()


def test_keeps_dtype_and_device_and_rejects_ints():
    t = torch.tensor([0.25, 0.5], dtype=torch.float32)
    assert fmlm.tau_to_gamma(t, 131).dtype == torch.float32
    with pytest.raises(TypeError):
        fmlm.tau_to_gamma(torch.tensor([1, 2]), 131)


def test_invalid_vocab_sizes_are_refused():
    """The schedule divides by V − 1 and integrates over V: a negative size gave [1, 1] for τ = [0, 0.5] (even
    the endpoint wrong), 2.7 was truncated to 2, and 1, 0 or True divided by zero. numpy ints are fine."""
    import numpy as np

    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    for bad, err in ((-3, ValueError), (1, ValueError), (0, ValueError), (2.7, TypeError), (True, TypeError),
                     ("131", TypeError)):
        for fn in (fmlm.tau_to_gamma, fmlm.gamma_to_tau):
            with pytest.raises(err, match="vocab_size"):
                fn(t, bad)
    assert torch.equal(fmlm.tau_to_gamma(t, np.int64(131)), fmlm.tau_to_gamma(t, 131))
    assert fmlm.tau_to_gamma(t, 2)[0] == 0
