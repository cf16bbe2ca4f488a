"""Training losses as pure functions of (model, tokens, generator): no trainer state (DESIGN.md §1).

FLM: per-token −log softmax(cap(logits))[y] at x_γ = (1−γ)ε + γ·onehot(y), γ = γ(τ), τ stratified over the
batch, optional learnable weighting e^{−w(τ)}·loss + w(τ).
FMLM (v2): semigroup distillation with cross-entropy against δ̄ = λ·δ_{s,u}(x_s) + (1−λ)·δ_{u,t}(X_{s,u}(x_s))
(student's own weights, no grad), plus the diagonal term against the frozen FLM teacher.

Each loss has two paths with the same expectation:
  path="reference"  V-space one-hot + noise and the dense x·E, exactly as published (holds (B, L, V));
  path="engine"     hidden-space interpolation h = (1−γ)·ε·E + γ·E[y] (fmlm.kernels.interp_embed), the trunk
                    on h, and the chunked (soft) linear cross-entropy (fmlm.kernels.linear_cross_entropy):
                    never a (B, L, V) tensor.
A `noise_seed` makes both paths use the same counter-based V-space ε and compute the same numbers (parity).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from fmlm.kernels import reference as ref
from .schedule import tau_to_gamma

PATHS = ("engine", "reference")
# The trunk as trained: plain-PyTorch blocks under autocast, differentiable. (FlowLM.trunk's 'fast' backend,
# its default on CUDA, runs on cached bf16 weight copies for inference and passes no gradient to the weights.)
TRUNK = "reference"


# ---------------------------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------------------------
def stratified_times(n: int, generator: Optional[torch.Generator] = None, device=None,
                     t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """n times in [t_min, t_max), one per stratum [k/n, (k+1)/n), in random order (the reference's
    antithetic sampling: (u/n + k/n) mod 1, then a permutation). float32, on `device`."""
    if n < 1:
        return torch.empty(0, device=device)
    u = torch.rand(n, generator=generator, device=device)
    u = (u / n + torch.arange(n, device=device) / n) % 1
    u = u[torch.randperm(n, generator=generator, device=device)]
    return t_min + (t_max - t_min) * u


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in fp32 (as published), fp64 for fp64 models (ground truths in tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_tokens(model, tokens: torch.Tensor):
    cfg = model.cfg
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64/int32 ids, got {tokens.dtype}")
    if tokens.shape[1] > cfg.seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's seq_len {cfg.seq_len}")


def _check_path(path: str):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _weighting(model, tau: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    if not model.cfg.learnable_loss_weighting:
        return loss
    w = model.learnable_loss_weighting(tau).to(loss.dtype)[:, None]
    return torch.exp(-w) * loss + w


def _head(model):
    lin = model.output_layer.linear
    return lin.weight, lin.bias


def _head_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The output layer's compute dtype: autocast's (bf16 on GPU, as the published Linear under autocast), else
    the parameters'. The fused ops take features and weights of one dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _cast(dtype, *ts):
    return [None if t is None else t.to(dtype) for t in ts]


def _draw_seed(generator: Optional[torch.Generator], device) -> int:
    """A Philox seed for fmlm.kernels noise, drawn from the loss generator (so resume replays it)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))


def _use_vocab_noise(embed: torch.Tensor) -> bool:
    """Hidden noise needs EᵀE positive definite (V ≥ D); a toy vocabulary smaller than the hidden size
    draws V-space noise instead (exact, and O(L·V·D) ≤ O(L·D²) there)."""
    return embed.shape[0] < embed.shape[1]


def _interp(tokens, gamma, embed, noise_seed: Optional[int], generator, backend, chol=None, xi=None):
    """h = ((1−γ)·ε + γ·onehot(y))·E: Philox V-space noise of `noise_seed` (parity with the reference path,
    which materializes the same ε), or hidden noise ξ·C (C differentiable in E)."""
    from fmlm.kernels.interp_embed import interp_embed  # noqa: PLC0415 (call-time import, DESIGN.md layering)

    if noise_seed is not None or _use_vocab_noise(embed):
        seed = noise_seed if noise_seed is not None else _draw_seed(generator, tokens.device)
        return interp_embed(tokens, gamma, embed, noise="vocab", seed=seed, backend=backend)
    if chol is None:
        chol = _cholesky(embed)
    if xi is None and tokens.device.type == "cuda":       # Philox inside the kernel: no ξ tensor
        return interp_embed(tokens, gamma, embed, noise="hidden", seed=_draw_seed(generator, tokens.device),
                            chol=chol, backend=backend)
    if xi is None:      # CPU: torch.randn is ~10x cheaper than the counter-based stream in int64 torch ops
        xi = torch.randn((*tokens.shape, embed.shape[1]), generator=generator, device=tokens.device, dtype=embed.dtype)
    return interp_embed(tokens, gamma, embed, noise="hidden", xi=xi, chol=chol, backend=backend)


def _cholesky(embed: torch.Tensor) -> torch.Tensor:
    """C = chol(EᵀE)ᵀ, differentiable in E, with autocast off: a bf16 Gram matrix under the training autocast
    would lose the precision the factorization needs."""
    from fmlm.kernels.interp_embed import embed_cholesky  # noqa: PLC0415

    with torch.autocast(device_type=embed.device.type, enabled=False):
        return embed_cholesky(embed)


def _vocab_eps(noise_seed: Optional[int], shape, generator, device, dtype) -> torch.Tensor:
    if noise_seed is None:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    from fmlm.kernels.interp_embed import vocab_noise  # noqa: PLC0415

    return vocab_noise(noise_seed, *shape, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# FLM
# ---------------------------------------------------------------------------------------------
def flm_loss(model, tokens: torch.Tensor, generator: Optional[torch.Generator] = None, path: str = "engine",
             tau: Optional[torch.Tensor] = None, noise_seed: Optional[int] = None,
             backend: str = "auto", weighting: bool = True) -> torch.Tensor:
    """Per-token FLM loss (B, L); weighted when the model has learnable loss weighting and weighting=True
    (weighting=False gives the plain cross-entropy, what validation reports).

    tau: optional network times (B,) (default: stratified draws from `generator`). noise_seed: parity mode —
    both paths use the same counter-based V-space noise ε (fmlm.kernels.interp_embed.vocab_noise) and agree
    to rounding; default: fresh noise from `generator` (engine: hidden-space ξ·C, same law)."""
    _check_path(path)
    _check_tokens(model, tokens)
    cfg = model.cfg
    B, L = tokens.shape
    dev = tokens.device
    dt = model.embed.dtype
    if tau is None:
        tau = stratified_times(B, generator, dev)
    tau = tau.to(dev, torch.float32)
    gamma = tau_to_gamma(tau.double(), cfg.vocab_size)
    if path == "reference":
        x1 = F.one_hot(tokens, cfg.vocab_size).to(dt)
        eps = _vocab_eps(noise_seed, x1.shape, generator, dev, dt)
        g = gamma.to(dt).view(-1, 1, 1)
        logits = model((1 - g) * eps + g * x1, tau.to(dt))
        lp = ref.cap_ref(_acc(logits), cfg.logit_cap).log_softmax(-1)
        loss = -lp.gather(-1, tokens[..., None])[..., 0]
        return _weighting(model, tau, loss) if weighting else loss
    from fmlm.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: PLC0415

    h = _interp(tokens, gamma.to(dt), model.embed, noise_seed, generator, backend)
    u = model.trunk(h, tau.to(dt), backend=TRUNK)
    u, W, b = _cast(_head_dtype(dev, dt), u, *_head(model))
    loss = linear_cross_entropy(u, W, b, tokens, cap=cfg.logit_cap, reduction="none", backend=backend)
    loss = _acc(loss)
    return _weighting(model, tau, loss) if weighting else loss


# ---------------------------------------------------------------------------------------------
# FMLM (v2) semigroup distillation
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DistillTimes:
    """Per-row network times: off-diagonal rows (s < u < t, u the τ-midpoint, boundary rows (0, 1)) first,
    then diagonal rows (s = u = t). n_off rows of the first kind."""
    tau_s: torch.Tensor
    tau_u: torch.Tensor
    tau_t: torch.Tensor
    n_off: int
    boundary: torch.Tensor      # (n_off,) bool

    @property
    def n_diag(self) -> int:
        return self.tau_s.shape[0] - self.n_off


def distill_times(n: int, generator: Optional[torch.Generator] = None, device=None, diag_fraction: float = 0.5,
                  boundary_fraction: float = 1 / 32, min_gap: float = 1e-6) -> DistillTimes:
    """The batch split of DESIGN.md §1: round(diag_fraction·n) diagonal rows (t stratified); of the rest,
    each is a boundary pair (0, 1) with probability boundary_fraction, else d ~ U (stratified, ≥ min_gap),
    s ~ U·(1−d), t = s + d."""
    if not 0.0 <= diag_fraction <= 1.0 or not 0.0 <= boundary_fraction <= 1.0:
        raise ValueError("diag_fraction and boundary_fraction must be in [0, 1]")
    n_diag = int(round(diag_fraction * n))
    n_off = n - n_diag
    d = stratified_times(n_off, generator, device).clamp(min=min_gap)
    s = torch.rand(n_off, generator=generator, device=device) * (1.0 - d)
    boundary = torch.rand(n_off, generator=generator, device=device) < boundary_fraction
    s = torch.where(boundary, torch.zeros_like(s), s)
    d = torch.where(boundary, torch.ones_like(d), d)
    t = (s + d).clamp(max=1.0)
    td = stratified_times(n_diag, generator, device)
    return DistillTimes(torch.cat([s, td]), torch.cat([s + d / 2, td]), torch.cat([t, td]), n_off, boundary)


def semigroup_lambda(g_s: torch.Tensor, g_u: torch.Tensor, g_t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """λ = (1−t)(u−s) / ((1−u)(t−s)) in γ values: δ_{s,t} = λ·δ_{s,u} + (1−λ)·δ_{u,t}∘X_{s,u} makes
    X_{s,t} = X_{u,t}∘X_{s,u} (DESIGN.md §1); clamped to [0, 1] against rounding at tiny gaps."""
    lam = (1 - g_t) * (g_u - g_s) / ((1 - g_u) * (g_t - g_s)).clamp(min=eps)
    return lam.clamp(0.0, 1.0)


def flow_map_coeffs(g_s: torch.Tensor, g_u: torch.Tensor):
    """X_{s,u}(x) = a·x + b·δ with a = (1−u)/(1−s), b = (u−s)/(1−s) (γ values)."""
    a = (1 - g_u) / (1 - g_s)
    return a, 1 - a


@torch.no_grad()
def init_student(teacher) -> "torch.nn.Module":
    """The FMLM student: a copy of the FLM teacher with a second time embedding (two_time=True) whose last
    layer sigma_map_prime.mlp.2 is zero, so δ_{s,t} = D_s at the start (as the reference initialises it), and
    without the teacher's learnable loss weighting (the distillation loss is not weighted)."""
    from .model import FlowLM  # noqa: PLC0415

    cfg = copy.deepcopy(teacher.cfg)
    cfg.two_time = True
    # the distillation loss is not weighted: a teacher's learnable loss weighting would be a parameter no loss
    # uses (DistributedDataParallel fails on those), so the student does not carry it
    cfg.learnable_loss_weighting = False
    student = FlowLM(cfg, init="published").to(device=teacher.embed.device, dtype=teacher.embed.dtype)
    weights = {k: v for k, v in teacher.state_dict().items() if not k.startswith("learnable_loss_weighting.")}
    missing, unexpected = student.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("sigma_map_prime.") for k in missing):
        raise ValueError(f"teacher/student mismatch: missing {missing}, unexpected {unexpected}")
    if teacher.cfg.two_time:
        return student                     # continuing from an FMLM: keep its second embedding
    # sigma_map_prime.mlp.0 keeps its fresh init (as the reference's student); the zero mlp.2 makes the
    # second embedding contribute nothing until trained
    student.sigma_map_prime.mlp[2].weight.zero_()
    student.sigma_map_prime.mlp[2].bias.zero_()
    return student


def _teacher_hidden_noise(n_s: torch.Tensor, E_s: torch.Tensor, E_t: torch.Tensor,
                          generator: Optional[torch.Generator]) -> torch.Tensor:
    """Given n_s = ε·E_s (hidden noise of the student's embedding), draw n_t = ε·E_t from its exact
    conditional law: n_t = n_s·M + ξ'·C_R, M = E_s⁺E_t (least squares), R = E_t − E_s·M, C_RᵀC_R = RᵀR.
    While the student's embedding still equals the teacher's, M = I and R = 0: n_t = n_s."""
    Es, Et = E_s.detach().double(), E_t.detach().double()
    M = torch.linalg.lstsq(Es, Et).solution if Es.shape[0] >= Es.shape[1] else torch.linalg.pinv(Es) @ Et
    R = Et - Es @ M
    out = n_s.double() @ M
    G = R.T @ R
    if float(G.diagonal().sum()) > 1e-20 * float((Et * Et).sum()):
        evals, evecs = torch.linalg.eigh(G)
        C = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
        xi = torch.randn(n_s.shape, generator=generator, device=n_s.device, dtype=n_s.dtype)
        out = out + xi.double() @ C
    return out.to(n_s.dtype)


def _augmented_head(Ws, bs, Wt, bt):
    """[W_s | W_t | b_s | b_t] (V × (2D+2)): student rows [u_s, 0, 1, 0] and teacher rows [0, u_t, 0, 1]
    give each their own logits through one weight, so one soft cross-entropy call scores the student
    against a teacher with a different head (the teacher part is constant)."""
    return torch.cat([Ws, Wt.detach(), bs[:, None], bt.detach()[:, None]], dim=1)


def _augment(u: torch.Tensor, which: int, other_width: int) -> torch.Tensor:
    """Rows for _augmented_head: student (which 0) [u_s, 0 (D_t), 1, 0]; teacher (which 1) [0 (D_s), u_t, 0, 1].
    other_width is the other model's hidden size (a teacher may be wider or narrower than its student)."""
    z = u.new_zeros(*u.shape[:-1], other_width)
    one, zero = torch.ones_like(u[..., :1]), torch.zeros_like(u[..., :1])
    return torch.cat([u, z, one, zero] if which == 0 else [z, u, zero, one], dim=-1)


def fmlm_distill_loss(student, teacher, tokens: torch.Tensor, generator: Optional[torch.Generator] = None,
                      path: str = "engine", times: Optional[DistillTimes] = None,
                      noise_seed: Optional[int] = None, diag_fraction: float = 0.5,
                      boundary_fraction: float = 1 / 32, backend: str = "auto") -> torch.Tensor:
    """Per-token FMLM v2 distillation loss (B, L): −Σ_v δ̄_v·log δ_{s,t}(x_s)_v on off-diagonal rows,
    −Σ_v D_teacher(x_t)_v·log δ_{t,t}(x_t)_v on diagonal rows (rows ordered as `times`).

    student: two-time FlowLM (see init_student); teacher: frozen one-time FLM. noise_seed: parity mode (the
    same V-space noise in both paths, see flm_loss)."""
    _check_path(path)
    _check_tokens(student, tokens)
    if not student.cfg.two_time:
        raise ValueError("the student must be a two-time FMLM (init_student(teacher) builds one)")
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise ValueError("teacher and student vocabularies differ")
    cfg = student.cfg
    V, cap = cfg.vocab_size, cfg.logit_cap
    B, L = tokens.shape
    dev, dt = tokens.device, student.embed.dtype
    if times is None:
        times = distill_times(B, generator, dev, diag_fraction, boundary_fraction)
    no, off, dg = times.n_off, slice(0, times.n_off), slice(times.n_off, B)
    ts, tu, tt = (x.to(dev, torch.float32) for x in (times.tau_s, times.tau_u, times.tau_t))
    g_s, g_u, g_t = (tau_to_gamma(x.double(), V) for x in (ts, tu, tt))
    lam = semigroup_lambda(g_s[off].double(), g_u[off].double(), g_t[off].double()).to(dt)
    a, b = (c.to(dt).view(-1, 1, 1) for c in flow_map_coeffs(g_s[off].double(), g_u[off].double()))
    # x_s for off-diagonal rows, x_t for diagonal rows: one interpolation at γ_s (= γ_t on the diagonal)
    g_in = g_s.to(dt)

    if path == "reference":
        x1 = F.one_hot(tokens, V).to(dt)
        eps = _vocab_eps(noise_seed, x1.shape, generator, dev, dt)
        x = (1 - g_in.view(-1, 1, 1)) * eps + g_in.view(-1, 1, 1) * x1
        lq = ref.cap_ref(_acc(student(x, ts.to(dt), tt.to(dt))), cap).log_softmax(-1)
        with torch.no_grad():
            tgt = torch.empty_like(lq)
            if no:
                p_su = ref.cap_ref(_acc(student(x[off], ts[off].to(dt), tu[off].to(dt))), cap).softmax(-1)
                x_u = a * x[off] + b * p_su.to(dt)
                p_ut = ref.cap_ref(_acc(student(x_u, tu[off].to(dt), tt[off].to(dt))), cap).softmax(-1)
                lam3 = lam.to(lq.dtype).view(-1, 1, 1)
                tgt[off] = lam3 * p_su + (1 - lam3) * p_ut
            if B - no:
                tgt[dg] = ref.cap_ref(_acc(teacher(x[dg], tt[dg].to(dt))), cap).softmax(-1)
        return -(tgt * lq).sum(-1)

    from fmlm.kernels.linear_cross_entropy import soft_linear_cross_entropy  # noqa: PLC0415
    from fmlm.kernels.vocab_attention import vocab_attention  # noqa: PLC0415

    Es, Et = student.embed, teacher.embed
    Ws, bs = _head(student)
    Wt, bt = _head(teacher)
    if noise_seed is not None or _use_vocab_noise(Es):
        # V-space Philox noise: the teacher sees the same ε through its own embedding (element (b, l, v)
        # depends on the row b of the full batch, so the teacher's call covers the full batch)
        seed = noise_seed if noise_seed is not None else _draw_seed(generator, dev)
        h = _interp(tokens, g_in, Es, seed, None, backend)
        with torch.no_grad():
            h_teacher = _interp(tokens, g_in, Et.detach(), seed, None, backend)[dg] if B - no else None
    else:
        xi = torch.randn((B, L, Es.shape[1]), generator=generator, device=dev, dtype=dt)
        C = _cholesky(Es)
        h = _interp(tokens, g_in, Es, None, None, backend, chol=C, xi=xi)
        h_teacher = None
        if B - no:
            with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
                n_t = _teacher_hidden_noise(xi[dg] @ C.detach().to(dt), Es, Et, generator)
                gd = g_in[dg].view(-1, 1, 1)
                h_teacher = (1 - gd) * n_t + gd * Et.detach()[tokens[dg]]
    cd = _head_dtype(dev, dt)
    u_main = student.trunk(h, ts.to(dt), tt.to(dt), backend=TRUNK).to(cd)
    Wc, bc = _cast(cd, Ws, bs)
    parts = []
    if no:
        with torch.no_grad():
            h_off = h[off].detach()
            u1 = student.trunk(h_off, ts[off].to(dt), tu[off].to(dt), backend=TRUNK).to(cd)
            de, _ = vocab_attention(u1, Wc.detach(), bc.detach(), Es.detach().to(cd), cap, backend=backend)
            u2 = student.trunk(a * h_off + b * de.to(dt), tu[off].to(dt), tt[off].to(dt), backend=TRUNK).to(cd)
        parts.append(soft_linear_cross_entropy(u_main[off], Wc, bc, u1, u2, lam[:, None], cap=cap, backend=backend))
    if B - no:
        with torch.no_grad():
            u_t = teacher.trunk(h_teacher, tt[dg].to(dt), backend=TRUNK).to(cd)
        Wa = _augmented_head(Wc, bc, *_cast(cd, Wt, bt))
        ut_aug = _augment(u_t, 1, Ws.shape[1])
        parts.append(soft_linear_cross_entropy(_augment(u_main[dg], 0, Wt.shape[1]), Wa, None, ut_aug, ut_aug,
                                               torch.ones((B - no, 1), device=dev, dtype=dt), cap=cap, backend=backend))
    return _acc(torch.cat(parts))
