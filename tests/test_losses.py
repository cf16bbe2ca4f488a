"""Losses: reference (V-space, as published) vs engine (hidden space, chunked CE) paths; FMLM distillation pieces."""
import math

import pytest
import torch

import fmlm
from fmlm.engine import losses as Lo
from fmlm.kernels import reference as ref
from fmlm.kernels.interp_embed import vocab_noise


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (spin-waiting threads cost 50x on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(tiny_cfg, dtype=torch.float64, seed=0, **kw):
    m = fmlm.FlowLM(tiny_cfg(**kw)).to(dtype)
    m.reset_parameters(seed=seed)
    return m


def _student(teacher, seed=1):
    st = Lo.init_student(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                     # a trained second time embedding: δ_{s,t} depends on t
        for p in st.sigma_map_prime.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return st


# ---------------------------------------------------------------------------------------------
# times and the batch split
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 64])
def test_stratified_times_one_per_stratum(n):
    t = Lo.stratified_times(n, torch.Generator().manual_seed(n))
    assert t.shape == (n,) and float(t.min()) >= 0 and float(t.max()) < 1
    assert sorted((t * n).floor().long().tolist()) == list(range(n))


def test_distill_split_fractions():
    g = torch.Generator().manual_seed(0)
    B, reps = 128, 150
    n_boundary = n_off = 0
    for _ in range(reps):
        tm = Lo.distill_times(B, g)
        assert tm.n_diag == 64 and tm.n_off == 64                    # diagonal fraction 0.5, exactly
        s, u, t = tm.tau_s, tm.tau_u, tm.tau_t
        off = slice(0, tm.n_off)
        assert (s[off] >= 0).all() and (t[off] <= 1).all() and (s[off] < t[off]).all()
        torch.testing.assert_close(u[off], (s[off] + t[off]) / 2)     # u = τ-midpoint
        assert torch.equal(s[tm.n_off:], t[tm.n_off:]) and torch.equal(u[tm.n_off:], t[tm.n_off:])
        bnd = tm.boundary
        assert (s[off][bnd] == 0).all() and (t[off][bnd] == 1).all()
        n_boundary += int(bnd.sum())
        n_off += tm.n_off
    # boundary pairs at 1/32 of the off-diagonal rows: binomial, 5 sigma
    p = 1 / 32
    assert abs(n_boundary / n_off - p) < 5 * math.sqrt(p * (1 - p) / n_off)
    # non-boundary gaps d = t - s are uniform: mean 1/2 (stratified), s | d uniform on [0, 1-d]
    tm = Lo.distill_times(4096, g, diag_fraction=0.0, boundary_fraction=0.0)
    d = tm.tau_t - tm.tau_s
    assert abs(float(d.mean()) - 0.5) < 0.01
    assert abs(float((tm.tau_s / (1 - d)).mean()) - 0.5) < 0.03


def test_semigroup_lambda_makes_flow_maps_compose():
    """δ_{s,t} = λ·δ_{s,u} + (1−λ)·δ_{u,t} ⇒ X_{s,t}(x) = X_{u,t}(X_{s,u}(x)) for any δ's (γ values)."""
    g = torch.Generator().manual_seed(0)
    gs, gu, gt = torch.sort(torch.rand(3, 50, generator=g, dtype=torch.float64) * 0.999, dim=0).values
    x = torch.randn(50, 11, generator=g, dtype=torch.float64)
    d_su = torch.softmax(torch.randn(50, 11, generator=g, dtype=torch.float64), -1)
    d_ut = torch.softmax(torch.randn(50, 11, generator=g, dtype=torch.float64), -1)
    lam = Lo.semigroup_lambda(gs, gu, gt)[:, None]

    def X(s, t, x, d):
        a, b = Lo.flow_map_coeffs(s[:, None], t[:, None])
        return a * x + b * d

    lhs = X(gs, gt, x, lam * d_su + (1 - lam) * d_ut)
    rhs = X(gu, gt, X(gs, gu, x, d_su), d_ut)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    assert float(Lo.semigroup_lambda(gs, gu, torch.ones_like(gt)).abs().max()) == 0.0   # t = 1: all second half


def test_init_student_matches_teacher(tiny_cfg):
    teacher = _model(tiny_cfg)
    st = Lo.init_student(teacher)
    assert st.cfg.two_time and not teacher.cfg.two_time
    last = st.sigma_map_prime.mlp[2]
    assert float(last.weight.detach().abs().max()) == 0 and float(last.bias.detach().abs().max()) == 0
    assert float(st.sigma_map_prime.mlp[0].weight.detach().abs().max()) > 0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, st.state_dict()[k]), k
    x = torch.randn(2, 9, 131, dtype=torch.float64)
    ts = torch.tensor([0.2, 0.7], dtype=torch.float64)
    torch.testing.assert_close(st(x, ts, torch.tensor([0.9, 0.8], dtype=torch.float64)), teacher(x, ts),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# FLM loss
# ---------------------------------------------------------------------------------------------
def test_flm_reference_path_is_the_spec(tiny_cfg):
    """The reference path equals −log denoiser_ref(x_γ)[y] built from the spec functions."""
    m = _model(tiny_cfg)
    tok = torch.randint(0, 131, (3, 9), generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.05, 0.5, 0.97])
    loss = Lo.flm_loss(m, tok, path="reference", tau=tau, noise_seed=11)
    eps = vocab_noise(11, 3, 9, 131, dtype=torch.float64)
    gam = ref.tau_to_gamma_ref(tau.double(), 131).view(-1, 1, 1)
    x = (1 - gam) * eps + gam * torch.nn.functional.one_hot(tok, 131).double()
    lp = ref.cap_ref(ref.dit_forward_ref(m.params(), x, tau.double(), None, m.cfg), m.cfg.logit_cap).log_softmax(-1)
    torch.testing.assert_close(loss, -lp.gather(-1, tok[..., None])[..., 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [pytest.param((3, 9), id="B3-L9"), pytest.param((1, 1), id="B1-L1"),
                                   pytest.param((5, 7), id="B5-L7")])
def test_flm_engine_matches_reference_same_noise(tiny_cfg, shape):
    """Same τ and the same V-space noise: fp32 engine and fp32 reference against the fp64 reference,
    engine error ≤ 2× reference error + floor (DESIGN.md §6); gradients likewise."""
    B, L = shape
    m64 = _model(tiny_cfg)
    tok = torch.randint(0, 131, shape, generator=torch.Generator().manual_seed(1))
    tau = Lo.stratified_times(B, torch.Generator().manual_seed(2))
    out = {}
    for name, path, dt in (("truth", "reference", torch.float64), ("ref", "reference", torch.float32),
                           ("eng", "engine", torch.float32)):
        m = _model(tiny_cfg, dt)
        loss = Lo.flm_loss(m, tok, path=path, tau=tau, noise_seed=3, backend="torch")
        loss.sum().backward()
        out[name] = (loss.detach().double(), {k: p.grad.double() for k, p in m.named_parameters()})
    err = lambda a: float((out[a][0] - out["truth"][0]).abs().max())  # noqa: E731
    assert err("eng") <= 2 * err("ref") + 1e-5, (err("eng"), err("ref"))
    for k, g in out["truth"][1].items():
        e_ref = float((out["ref"][1][k] - g).abs().max())
        e_eng = float((out["eng"][1][k] - g).abs().max())
        assert e_eng <= 2 * e_ref + 1e-5 * (1 + float(g.abs().max())), (k, e_eng, e_ref)
    del m64


def test_flm_engine_fp64_exact(tiny_cfg):
    m = _model(tiny_cfg)
    tok = torch.randint(0, 131, (4, 9), generator=torch.Generator().manual_seed(5))
    tau = torch.tensor([0.0, 0.3, 0.6, 1.0])
    a = Lo.flm_loss(m, tok, path="reference", tau=tau, noise_seed=7)
    b = Lo.flm_loss(m, tok, path="engine", tau=tau, noise_seed=7, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_flm_hidden_noise_equal_in_expectation(tiny_cfg):
    """Engine default (hidden noise ξ·C) vs reference (V-space ε): same expected loss and gradient at fixed τ,
    within 5 standard errors estimated from the samples."""
    m = _model(tiny_cfg)
    tok = torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.4, 0.8])
    g = torch.Generator().manual_seed(0)
    n = 150
    vals = {"reference": [], "engine": []}
    grads = {"reference": [], "engine": []}
    for path in vals:
        for _ in range(n):
            m.zero_grad()
            loss = Lo.flm_loss(m, tok, g, path=path, tau=tau, backend="torch").mean()
            loss.backward()
            vals[path].append(float(loss.detach()))
            grads[path].append(m.embed.grad[tok[0, 0]].clone())       # dE rows see both noise and gather paths
    a, b = torch.tensor(vals["reference"]), torch.tensor(vals["engine"])
    se = math.sqrt(float(a.var()) / n + float(b.var()) / n)
    assert abs(float(a.mean() - b.mean())) < 5 * se + 1e-9, (float(a.mean()), float(b.mean()), se)
    ga, gb = torch.stack(grads["reference"]), torch.stack(grads["engine"])
    se_g = (ga.var(0) / n + gb.var(0) / n).sqrt()
    z = ((ga.mean(0) - gb.mean(0)).abs() / se_g).max()
    assert float(z) < 5.5, float(z)


def test_flm_learnable_weighting(tiny_cfg):
    m = _model(tiny_cfg, learnable_loss_weighting=True)
    tok = torch.randint(0, 131, (3, 9), generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.1, 0.5, 0.9])
    plain = Lo.flm_loss(m, tok, path="reference", tau=tau, noise_seed=1, weighting=False)
    w = m.learnable_loss_weighting(tau.double())[:, None]
    assert float(w.detach().abs().min()) > 0
    torch.testing.assert_close(Lo.flm_loss(m, tok, path="reference", tau=tau, noise_seed=1),
                               torch.exp(-w) * plain + w)
    torch.testing.assert_close(Lo.flm_loss(m, tok, path="engine", tau=tau, noise_seed=1, backend="torch"),
                               torch.exp(-w) * plain + w)


def test_flm_bad_inputs(tiny_cfg):
    m = _model(tiny_cfg)
    with pytest.raises(ValueError, match="path"):
        Lo.flm_loss(m, torch.zeros(2, 9, dtype=torch.long) + 5, path="fast")
    with pytest.raises(ValueError, match="seq_len"):
        Lo.flm_loss(m, torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        Lo.flm_loss(m, torch.ones(2, 9))


# ---------------------------------------------------------------------------------------------
# FMLM distillation loss
# ---------------------------------------------------------------------------------------------
def test_distill_reference_path_is_the_spec(tiny_cfg):
    """Off-diagonal rows: δ̄ = λ·δ_{s,u}(x_s) + (1−λ)·δ_{u,t}(X_{s,u}(x_s)) with the student; diagonal rows:
    the teacher's D(x_t); loss −Σ δ̄·log δ_{s,t}(x_s). Rebuilt here from denoiser_ref."""
    teacher = _model(tiny_cfg)
    st = _student(teacher)
    B = 6
    tok = torch.randint(0, 131, (B, 9), generator=torch.Generator().manual_seed(0))
    tm = Lo.distill_times(B, torch.Generator().manual_seed(3), boundary_fraction=0.5)
    loss = Lo.fmlm_distill_loss(st, teacher, tok, path="reference", times=tm, noise_seed=4)
    V = 131
    s, u, t = (ref.tau_to_gamma_ref(x.double(), V) for x in (tm.tau_s, tm.tau_u, tm.tau_t))
    eps = vocab_noise(4, B, 9, V, dtype=torch.float64)
    x = (1 - s.view(-1, 1, 1)) * eps + s.view(-1, 1, 1) * torch.nn.functional.one_hot(tok, V).double()
    ps, pt = st.params(), teacher.params()

    def den(p, x, ts, tt, cfg):       # denoiser_ref in fp64 (denoiser_ref itself rounds logits to fp32)
        return ref.cap_ref(ref.dit_forward_ref(p, x, ts, tt, cfg), cfg.logit_cap).softmax(-1)

    want = []
    for i in range(B):
        xi = x[i:i + 1]
        ti = lambda v: v[i:i + 1].double()  # noqa: E731
        q = den(ps, xi, ti(tm.tau_s), ti(tm.tau_t), st.cfg)
        if i < tm.n_off:
            d_su = den(ps, xi, ti(tm.tau_s), ti(tm.tau_u), st.cfg)
            xu = (1 - u[i]) / (1 - s[i]) * xi + (u[i] - s[i]) / (1 - s[i]) * d_su
            d_ut = den(ps, xu, ti(tm.tau_u), ti(tm.tau_t), st.cfg)
            lam = (1 - t[i]) * (u[i] - s[i]) / ((1 - u[i]) * (t[i] - s[i]))
            target = lam * d_su + (1 - lam) * d_ut
        else:
            target = den(pt, xi, ti(tm.tau_t), None, teacher.cfg)
        want.append(-(target * q.log()).sum(-1))
    torch.testing.assert_close(loss, torch.cat(want), rtol=1e-9, atol=1e-9)


def _assert_distill_paths_agree(st, teacher, tok, tm, noise_seed):
    """The engine path's distillation loss and student gradients equal the reference path's on the same noise."""
    res = {}
    for path in ("reference", "engine"):
        st.zero_grad()
        loss = Lo.fmlm_distill_loss(st, teacher, tok, path=path, times=tm, noise_seed=noise_seed, backend="torch")
        loss.sum().backward()
        res[path] = (loss.detach(), {k: p.grad.clone() for k, p in st.named_parameters() if p.grad is not None})
    torch.testing.assert_close(res["engine"][0], res["reference"][0], rtol=1e-10, atol=1e-10)
    assert res["engine"][1].keys() == res["reference"][1].keys()
    for k, g in res["reference"][1].items():
        torch.testing.assert_close(res["engine"][1][k], g, rtol=1e-8, atol=1e-10, msg=k)


@pytest.mark.parametrize("B", [pytest.param(6, id="B6"), pytest.param(1, id="B1-offdiag"),
                               pytest.param(3, id="B3")])
def test_distill_engine_matches_reference_same_noise(tiny_cfg, B):
    teacher = _model(tiny_cfg)
    st = _student(teacher)
    with torch.no_grad():                      # the student's head and embedding have drifted from the teacher's
        st.output_layer.linear.weight.add_(0.01)
        st.vocab_embed.embedding.mul_(1.01)
    tok = torch.randint(0, 131, (B, 9), generator=torch.Generator().manual_seed(B))
    tm = Lo.distill_times(B, torch.Generator().manual_seed(1), boundary_fraction=0.3)
    _assert_distill_paths_agree(st, teacher, tok, tm, noise_seed=9)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("teacher_hidden", [16, 48])
def test_distill_engine_with_a_teacher_of_another_width(tiny_cfg, teacher_hidden):
    """A teacher narrower or wider than its student (the loss supports it: _teacher_hidden_noise maps the noise
    between embeddings of any widths): the engine path equals the reference path, value and gradients, with
    diagonal rows (the augmented head [W_s | W_t | b_s | b_t] needs rows padded by the other model's width; the
    student's own width was used, a shape mismatch)."""
    teacher = _model(tiny_cfg, hidden=teacher_hidden, n_heads=2)
    st = Lo.init_student(_model(tiny_cfg, seed=3))
    tok = torch.randint(0, 131, (4, 9), generator=torch.Generator().manual_seed(2))
    tm = Lo.distill_times(4, torch.Generator().manual_seed(1), boundary_fraction=0.3)
    assert tm.n_diag > 0 and teacher.cfg.hidden != st.cfg.hidden
    _assert_distill_paths_agree(st, teacher, tok, tm, noise_seed=5)


def test_teacher_hidden_noise_joint_law():
    """n_t drawn given n_s = ε·E_s has the joint covariance of (ε·E_s, ε·E_t): E_tᵀE_t and E_sᵀE_t."""
    g = torch.Generator().manual_seed(0)
    V, D, N = 40, 6, 60000
    Es = torch.randn(V, D, generator=g, dtype=torch.float64)
    Et = Es + 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)
    xi = torch.randn(N, D, generator=g, dtype=torch.float64)
    C = ref.hidden_noise_factor_ref(Es)
    n_s = xi @ C
    n_t = Lo._teacher_hidden_noise(n_s, Es, Et, g)
    tol = 6 * (Et.T @ Et).diagonal().max() / math.sqrt(N)
    torch.testing.assert_close(n_t.T @ n_t / N, Et.T @ Et, rtol=0, atol=float(tol))
    torch.testing.assert_close(n_s.T @ n_t / N, Es.T @ Et, rtol=0, atol=float(tol))
    same = Lo._teacher_hidden_noise(n_s[:5], Es, Es.clone(), g)           # equal embeddings: n_t = n_s
    torch.testing.assert_close(same, n_s[:5])


def test_distill_engine_hidden_noise_runs_and_learns_boundary(tiny_cfg):
    """Default engine path (hidden noise, teacher conditional noise): finite, per-token, gradient to the
    second time embedding, and equal in expectation to the reference path (5 standard errors)."""
    teacher = _model(tiny_cfg)
    st = _student(teacher)
    with torch.no_grad():
        st.vocab_embed.embedding.mul_(1.02)
    tok = torch.randint(0, 131, (4, 9), generator=torch.Generator().manual_seed(0))
    tm = Lo.distill_times(4, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    n = 60
    vals = {"reference": [], "engine": []}
    for path in vals:
        for _ in range(n):
            vals[path].append(float(Lo.fmlm_distill_loss(st, teacher, tok, g, path=path, times=tm,
                                                         backend="torch").mean().detach()))
    a, b = torch.tensor(vals["reference"]), torch.tensor(vals["engine"])
    se = math.sqrt(float(a.var()) / n + float(b.var()) / n)
    assert abs(float(a.mean() - b.mean())) < 5 * se, (float(a.mean()), float(b.mean()), se)
    loss = Lo.fmlm_distill_loss(st, teacher, tok, g, backend="torch")
    assert loss.shape == (4, 9) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert float(st.sigma_map_prime.mlp[2].weight.grad.abs().max()) > 0


def test_distill_rejects_one_time_student(tiny_cfg):
    teacher = _model(tiny_cfg)
    with pytest.raises(ValueError, match="two-time"):
        Lo.fmlm_distill_loss(teacher, teacher, torch.ones(2, 9, dtype=torch.long))


@pytest.mark.parametrize("path", ["engine", "reference"])
def test_loss_paths_under_bf16_autocast(tiny_cfg, path):
    """The trainer runs the losses under bf16 autocast on GPU: the head goes to the autocast dtype, the Cholesky
    factor stays fp32. Checked here with CPU autocast against fp32 on the same noise and times. The reference path
    (`fmlm train --path reference`, the benchmark's baseline) once failed there: its conditioning came out in bf16
    and met fp32 weights with the autocast switched off."""
    teacher = _model(tiny_cfg, torch.float32)
    st = _student(teacher)
    tok = torch.randint(0, 131, (6, 9), generator=torch.Generator().manual_seed(0))
    tau = Lo.stratified_times(6, torch.Generator().manual_seed(1))
    tm = Lo.distill_times(6, torch.Generator().manual_seed(2))
    kw = dict(path=path, backend="torch")
    ref32 = (Lo.flm_loss(teacher, tok, tau=tau, noise_seed=1, **kw),
             Lo.fmlm_distill_loss(st, teacher, tok, times=tm, noise_seed=1, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = (Lo.flm_loss(teacher, tok, tau=tau, noise_seed=1, **kw),
              Lo.fmlm_distill_loss(st, teacher, tok, times=tm, noise_seed=1, **kw))
        hidden = Lo.flm_loss(teacher, tok, torch.Generator().manual_seed(0), **kw)
    for a, b in zip(ref32, bf):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert abs(float((a.mean() - b.mean()).detach())) < 0.03 * float(a.mean().detach())
    (bf[0].mean() + bf[1].mean() + hidden.mean()).backward()
    assert teacher.embed.grad is not None and torch.isfinite(teacher.embed.grad).all()
    assert st.output_layer.linear.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# GPU (make gpu-check): the fused Triton ops in the training losses against the reference path
# ---------------------------------------------------------------------------------------------
def _gpu_pair(tiny_cfg):
    kw = dict(vocab_size=1000, seq_len=16, hidden=64, n_blocks=2, n_heads=2, cond_dim=32)
    teacher = fmlm.FlowLM(tiny_cfg(**kw)).cuda()
    teacher.reset_parameters(seed=0)
    st = _student(teacher).cuda()
    return teacher, st


@pytest.mark.gpu
def test_losses_engine_cuda_match_reference(tiny_cfg):
    """fp32 on CUDA, same τ and V-space noise: engine path (Triton interp_embed / linear CE / soft CE /
    vocab_attention) vs reference path; losses and gradients."""
    teacher, st = _gpu_pair(tiny_cfg)
    tok = torch.randint(0, 1000, (5, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    tau = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], device="cuda")
    tm = Lo.distill_times(5, torch.Generator("cuda").manual_seed(1), "cuda", boundary_fraction=0.5)
    cases = ((teacher, lambda m, p: Lo.flm_loss(m, tok, path=p, tau=tau, noise_seed=3)),
             (st, lambda m, p: Lo.fmlm_distill_loss(m, teacher, tok, path=p, times=tm, noise_seed=3)))
    for model, fn in cases:
        out = {}
        for path in ("reference", "engine"):
            model.zero_grad()
            loss = fn(model, path)
            loss.sum().backward()
            out[path] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(out["engine"][0], out["reference"][0], rtol=2e-4, atol=2e-4)
        for k, g in out["reference"][1].items():
            torch.testing.assert_close(out["engine"][1][k], g, rtol=2e-2, atol=2e-4 * (1 + float(g.abs().max())),
                                       msg=k)


@pytest.mark.gpu
def test_losses_engine_cuda_bf16_autocast(tiny_cfg):
    teacher, st = _gpu_pair(tiny_cfg)
    tok = torch.randint(0, 1000, (8, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    g = torch.Generator("cuda").manual_seed(0)
    tau = Lo.stratified_times(8, torch.Generator("cuda").manual_seed(2), "cuda")
    ref32 = Lo.flm_loss(teacher, tok, tau=tau, noise_seed=5, path="reference").mean()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = Lo.flm_loss(teacher, tok, tau=tau, noise_seed=5)
        b = Lo.flm_loss(teacher, tok, g)                        # hidden noise, Philox seed inside the kernel
        c = Lo.fmlm_distill_loss(st, teacher, tok, g)
    assert abs(float(a.mean()) - float(ref32)) < 0.05 * float(ref32)
    (a.mean() + b.mean() + c.mean()).backward()
    for m in (teacher, st):
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert float(st.sigma_map_prime.mlp[2].weight.grad.abs().max()) > 0


# ---------------------------------------------------------------------------------------------
# argument checks and the paths a toy vocabulary or an FMLM teacher takes
# ---------------------------------------------------------------------------------------------
def test_tokens_must_be_a_batch_of_rows(tiny_cfg):
    m = _model(tiny_cfg)
    for bad in (torch.ones(9, dtype=torch.long), torch.ones(1, 2, 9, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"tokens must be \(B, L\), got shape"):
            Lo.flm_loss(m, bad)


def test_toy_vocabulary_noise_seed_comes_from_the_generator(tiny_cfg):
    """V < D: hidden noise is undefined (EᵀE singular), so the engine draws V-space Philox noise whose seed comes from
    the loss generator, after the times: the same generator state gives the same loss (a resumed run replays it),
    and it is the parity-mode loss of that seed."""
    m = _model(tiny_cfg, vocab_size=16)               # hidden 32 > V
    tok = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(0))
    a = Lo.flm_loss(m, tok, torch.Generator().manual_seed(5))
    assert torch.equal(a, Lo.flm_loss(m, tok, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, Lo.flm_loss(m, tok, torch.Generator().manual_seed(6)))
    g = torch.Generator().manual_seed(5)
    tau = Lo.stratified_times(3, g)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    torch.testing.assert_close(a, Lo.flm_loss(m, tok, tau=tau, noise_seed=seed), rtol=0, atol=0)


def test_distill_times_fractions_must_be_in_0_1():
    for kw in (dict(diag_fraction=1.5), dict(diag_fraction=-0.1), dict(boundary_fraction=2.0)):
        with pytest.raises(ValueError, match=r"diag_fraction and boundary_fraction must be in \[0, 1\]"):
            Lo.distill_times(8, torch.Generator().manual_seed(0), **kw)


def test_init_student_from_an_fmlm_keeps_its_second_time_embedding(tiny_cfg):
    """Continuing distillation from an FMLM: the student is a copy, trained sigma_map_prime included (only a fresh
    FLM teacher's student gets the zeroed last layer)."""
    teacher = _model(tiny_cfg, two_time=True)
    assert float(teacher.sigma_map_prime.mlp[2].weight.detach().abs().max()) > 0
    st = Lo.init_student(teacher)
    assert st is not teacher and st.cfg.two_time
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, st.state_dict()[k]), k
    x = torch.randn(2, 9, 131, dtype=torch.float64)
    ts, tt = torch.tensor([0.2, 0.7], dtype=torch.float64), torch.tensor([0.9, 0.8], dtype=torch.float64)
    assert torch.equal(st(x, ts, tt), teacher(x, ts, tt))


def test_distill_refuses_a_teacher_of_another_vocabulary(tiny_cfg):
    teacher = _model(tiny_cfg, vocab_size=140)
    student = Lo.init_student(_model(tiny_cfg))
    with pytest.raises(ValueError, match="teacher and student vocabularies differ"):
        Lo.fmlm_distill_loss(student, teacher, torch.ones(2, 9, dtype=torch.long))
