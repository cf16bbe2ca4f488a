"""Engine samplers (hidden state h = x·E) against the reference samplers (V-space state), same z0."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fmlm
from fmlm.engine import sampling
from fmlm.kernels import reference as ref


def _model(cfg, dtype=torch.float64, seed=0):
    m = fmlm.FlowLM(cfg)
    m.reset_parameters(seed=seed)
    return m.to(dtype).eval()


CASES = [
    pytest.param("flm", 1, 0.0, id="flm-1"),
    pytest.param("flm", 4, 0.0, id="flm-4"),
    pytest.param("flm", 8, 0.0, id="flm-8"),
    pytest.param("fmlm", 1, 0.0, id="fmlm-1"),
    pytest.param("fmlm", 2, 0.0, id="fmlm-2-g0"),
    pytest.param("fmlm", 4, 0.0, id="fmlm-4-g0"),
    pytest.param("fmlm", 2, 1.0, id="fmlm-2-g1"),
    pytest.param("fmlm", 4, 1.0, id="fmlm-4-g1"),
    pytest.param("fmlm", 4, 0.8, id="fmlm-4-g0.8"),
]


@pytest.mark.parametrize("method,steps,renoise", CASES)
def test_engine_matches_reference_on_same_z0(tiny_cfg, method, steps, renoise):
    cfg = tiny_cfg(two_time=method == "fmlm")
    m = _model(cfg)
    z0 = torch.randn(3, cfg.seq_len, cfg.vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    toks = {}
    for backend in ("reference", "torch"):
        g = torch.Generator().manual_seed(11)
        toks[backend] = fmlm.sample(m, 3, steps, method, renoise, noise=z0, generator=g, backend=backend)
    assert toks["reference"].shape == (3, cfg.seq_len) and toks["reference"].dtype == torch.long
    assert torch.equal(toks["reference"], toks["torch"])
    # the published sampler, written out independently of fmlm.sample's dispatch
    p = m.params()
    direct = ref.flm_sample_ref(p, cfg, z0, steps) if method == "flm" else \
        ref.fmlm_sample_ref(p, cfg, z0, steps, renoise, torch.Generator().manual_seed(11))
    assert torch.equal(direct, toks["torch"])


@pytest.mark.parametrize("shape", [
    pytest.param(dict(vocab_size=257, seq_len=1), id="V257-L1"),
    pytest.param(dict(vocab_size=4099, seq_len=5), id="V4099prime-L5"),
    pytest.param(dict(vocab_size=5, seq_len=13, hidden=24, n_heads=2), id="V5-lt-D"),
])
def test_odd_shapes(tiny_cfg, shape):
    cfg = tiny_cfg(two_time=True, **shape)
    m = _model(cfg)
    z0 = torch.randn(3, cfg.seq_len, cfg.vocab_size, dtype=torch.float64)
    a = fmlm.sample(m, 3, 2, "fmlm", 0.5, noise=z0, generator=torch.Generator().manual_seed(1), backend="reference")
    b = fmlm.sample(m, 3, 2, "fmlm", 0.5, noise=z0, generator=torch.Generator().manual_seed(1), backend="torch")
    assert torch.equal(a, b)
    c = fmlm.sample(m, 3, 1, "fmlm", backend="torch", generator=torch.Generator().manual_seed(1))
    assert c.shape == (3, cfg.seq_len) and int(c.min()) >= 0 and int(c.max()) < cfg.vocab_size


def test_fp32_parity_is_near_exact(tiny_cfg):
    """In fp32 the two paths round differently (x·E once vs h updated); tokens may differ only at near-ties."""
    cfg = tiny_cfg(two_time=True, seq_len=64)
    m = _model(cfg, torch.float32)
    z0 = torch.randn(4, cfg.seq_len, cfg.vocab_size)
    a = fmlm.sample(m, 4, 4, "fmlm", 0.0, noise=z0, backend="reference")
    b = fmlm.sample(m, 4, 4, "fmlm", 0.0, noise=z0, backend="torch")
    assert (a == b).float().mean() >= 0.99


def test_same_seed_same_tokens_and_different_seed_differs(tiny_cfg):
    cfg = tiny_cfg(two_time=True)
    m = _model(cfg, torch.float32)
    s = [fmlm.sample(m, 3, 2, "fmlm", 1.0, generator=torch.Generator().manual_seed(k), backend="torch") for k in (5, 5, 6)]
    assert torch.equal(s[0], s[1])
    assert not torch.equal(s[0], s[2])


class _VocabTensorWatch(TorchDispatchMode):
    """Largest numel of any op output whose last dimension is the (padded) vocabulary."""
    def __init__(self, vocab_dims):
        super().__init__()
        self.dims, self.largest = set(vocab_dims), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] in self.dims:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method,steps,renoise", [("fmlm", 3, 0.8), ("flm", 3, 0.0)])
def test_engine_never_holds_a_BLV_tensor(tiny_cfg, method, steps, renoise):
    cfg = tiny_cfg(vocab_size=10007, seq_len=9, two_time=method == "fmlm")
    m = _model(cfg, torch.float32)
    sampling.noise_factor(m)                       # weight-set caches are built once, outside the watch
    B = 3
    blv = B * cfg.seq_len * cfg.vocab_size
    watch = _VocabTensorWatch({cfg.vocab_size, cfg.padded_vocab})
    with watch:
        fmlm.sample(m, B, steps, method, renoise, backend="torch")
    assert 0 < watch.largest < blv / 2
    watch = _VocabTensorWatch({cfg.vocab_size})
    with watch:                                    # the detector does see the reference's V-space state
        fmlm.sample(m, B, steps, method, renoise, backend="reference")
    assert watch.largest >= blv


def test_hidden_noise_covariance_is_EtE():
    torch.manual_seed(0)
    V, D, n = 50, 6, 200_000
    E = torch.randn(V, D, dtype=torch.float64)
    C = sampling.hidden_noise_factor(E)
    x = torch.randn(n, D, dtype=torch.float64) @ C
    cov = x.T @ x / n
    sigma = E.T @ E
    se = ((torch.outer(sigma.diagonal(), sigma.diagonal()) + sigma ** 2) / n).sqrt()   # std of each entry
    assert ((cov - sigma).abs() / se).max() < 5.0
    assert (x.mean(0).abs() / (sigma.diagonal() / n).sqrt()).max() < 5.0
    # singular EᵀE (V < D) still yields the right covariance
    E2 = torch.randn(3, D, dtype=torch.float64)
    C2 = sampling.hidden_noise_factor(E2)
    torch.testing.assert_close(C2.T @ C2, E2.T @ E2, atol=1e-10, rtol=1e-10)


def test_plan_matches_reference_schedule():
    for g in (0.0, 0.8, 1.0):
        plan = sampling.make_plan("fmlm", 4, g, 30522)
        sched = ref.fmlm_schedule_ref(4, g, 30522)
        for k, (tau_k, g_k, _, sigma, sigma_t, gamma_t, tau_t) in enumerate(sched):
            assert plan.tau_s[k] == pytest.approx(tau_k, abs=1e-12)
            assert plan.tau_t[k] == pytest.approx(tau_t, abs=1e-9)
            assert plan.a[k] == pytest.approx((1 - gamma_t) / (1 - g_k), abs=1e-9)
            assert plan.c[k] == pytest.approx(g * sigma, abs=1e-12)
    one = sampling.make_plan("fmlm", 1, 0.0, 50258)
    assert one.tau_s == (0.0,) and one.tau_t[0] == pytest.approx(1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(method="ddpm"), "method"), (dict(steps=0), "steps"), (dict(renoise=1.5), "renoise"),
    (dict(method="flm", renoise=0.5), "renoise"), (dict(noise=torch.zeros(2, 2, 2)), "shape"),
    (dict(steps=True), "steps"), (dict(steps=2.0), "steps"), (dict(renoise=True), "renoise"),   # were accepted
])
def test_bad_arguments_raise_clear_errors(tiny_cfg, kw, match):
    m = _model(tiny_cfg(two_time=True), torch.float32)
    args = dict(batch_size=3, steps=1, method="fmlm") | kw
    with pytest.raises(ValueError, match=match):
        fmlm.sample(m, **args)


def test_fmlm_method_on_flm_model_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="two-time"):
        fmlm.sample(_model(tiny_cfg(two_time=False)), 2, 1, "fmlm")
    with pytest.raises(ValueError, match="two-time"):
        fmlm.Sampler(_model(tiny_cfg(two_time=False)), 2, 1, "fmlm")


def test_flm_method_on_an_fmlm_warns_and_runs_the_published_sampler(tiny_cfg):
    """method='flm' on a two-time model is the published FLM sampler without the second time input: allowed (the
    same tokens as reference.flm_sample_ref on the same z0) but warned about, by fmlm.sample and by the Sampler."""
    m = _model(tiny_cfg(two_time=True))
    z0 = torch.randn(2, m.cfg.seq_len, m.cfg.vocab_size, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64)
    with pytest.warns(UserWarning, match="method='flm' on a two-time FMLM .* use method='fmlm'"):
        got = fmlm.sample(m, 2, 2, "flm", noise=z0, backend="torch")
    assert torch.equal(got, ref.flm_sample_ref(m.params(), m.cfg, z0, 2))
    with pytest.warns(UserWarning, match="method='flm' on a two-time FMLM"):
        fmlm.Sampler(m, 2, 1, "flm", graph=False)


def test_schedule_functions_take_python_numbers():
    """fmlm's tau_to_gamma / gamma_to_tau accept a Python number or list (as float64), the same values as the tensor;
    integer tensors are refused."""
    from fmlm.engine.schedule import gamma_to_tau, tau_to_gamma

    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    g = tau_to_gamma([0.0, 0.25, 0.5, 1.0], 131)
    assert g.dtype == torch.float64 and torch.equal(g, tau_to_gamma(t, 131))
    assert float(tau_to_gamma(0.25, 131)) == float(g[1])
    assert torch.equal(gamma_to_tau([0.5, 0.9], 131), gamma_to_tau(torch.tensor([0.5, 0.9], dtype=torch.float64), 131))
    assert float(g[0]) == 0.0 and float(g[-1]) == 1.0 and 0 < float(g[1]) < float(g[2]) < 1
    with pytest.raises(TypeError, match="tau must be a floating tensor"):
        tau_to_gamma(torch.tensor([0, 1]), 131)
