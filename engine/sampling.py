"""Samplers as pure functions. The engine path carries h = x·E (B, L, D), never x (B, L, V) (DESIGN.md §2).

A `SamplePlan` is computed once on the host (τ/γ per step, update coefficients); the loop then runs
without host round trips. Every update of the published samplers is affine in (state, D, fresh noise):
    h_next = a_k·h + b_k·(D·E) + c_k·(ε'·E)
so the state never needs the vocabulary axis: D·E is `vocab_attention`, the last step `logits_argmax`.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from typing import Optional

import torch

from fmlm import kernels
from fmlm.kernels import reference as ref
from .schedule import get_schedule

METHODS = ("flm", "fmlm")


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    method: str
    steps: int
    renoise: float
    tau_s: tuple[float, ...]
    tau_t: tuple[Optional[float], ...]     # None: one-time FLM denoiser
    a: tuple[float, ...]
    b: tuple[float, ...]
    c: tuple[float, ...]


def check_method(method: str, cfg) -> None:
    """method='fmlm' needs a two-time model (refused otherwise). method='flm' on a two-time FMLM runs it as the
    published FLM sampler would, without its second time input (sigma_map_prime): a conditioning the flow map was
    never trained on, so it is allowed (it is the published function) but warned about."""
    if method == "fmlm" and not cfg.two_time:
        raise ValueError("method='fmlm' needs a two-time (FMLM) model; this checkpoint is an FLM: use method='flm'")
    if method == "flm" and cfg.two_time:
        warnings.warn("method='flm' on a two-time FMLM runs it without its second time input (as the published FLM "
                      "sampler does), which the flow map was not trained for: use method='fmlm'", stacklevel=3)


def make_plan(method: str, steps: int, renoise: float, vocab_size: int) -> SamplePlan:
    """Per-step times and update coefficients, float64 on the host, through the device spline buffers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    steps = positive_int(steps, "steps")             # numpy ints pass; a bool or a float is refused
    if isinstance(renoise, bool) or not isinstance(renoise, (int, float)) or not 0.0 <= renoise <= 1.0:
        raise ValueError(f"renoise must be a number in [0, 1], got {renoise!r}")
    renoise = float(renoise)
    if method == "flm" and renoise:
        raise ValueError("renoise applies to method='fmlm' only")
    sch = get_schedule(int(vocab_size), "cpu")
    taus = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    gam = sch.tau_to_gamma(taus).tolist()
    tau_s, tau_t, a, b, c = [], [], [], [], []
    for k in range(steps):
        tau_s.append(float(taus[k]))
        if method == "flm":
            r = (gam[k + 1] - gam[k]) / (1.0 - gam[k] + 1e-5)
            tau_t.append(None), a.append(1.0 - r), b.append(r), c.append(0.0)
        else:
            sigma = 1.0 - gam[k + 1]
            sigma_t = sigma * math.sqrt(1.0 - renoise ** 2)
            gamma_t = 1.0 - sigma_t
            tau_t.append(float(sch.gamma_to_tau(torch.tensor([gamma_t], dtype=torch.float64))[0]))
            a.append((1.0 - gamma_t) / (1.0 - gam[k]))
            b.append((gamma_t - gam[k]) / (1.0 - gam[k]) + (sigma_t - sigma))
            c.append(renoise * sigma)
    return SamplePlan(method, steps, float(renoise), *map(tuple, (tau_s, tau_t, a, b, c)))


def hidden_noise_factor(embed: torch.Tensor) -> torch.Tensor:
    """C (D×D, float64) with CᵀC = EᵀE, so ξ·C ~ N(0, EᵀE) = the law of ε·E (DESIGN.md §2.1).

    chol(EᵀE)ᵀ when EᵀE is positive definite; a symmetric square root when it is singular (V < D)."""
    try:
        return ref.hidden_noise_factor_ref(embed)
    except torch.linalg.LinAlgError:
        evals, evecs = torch.linalg.eigh(embed.detach().double().T @ embed.detach().double())
        return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


@dataclasses.dataclass
class Heads:
    """Output head and embedding padded to a multiple of 128 rows (DESIGN.md §2.5); n_valid = V."""
    weight: torch.Tensor
    bias: torch.Tensor
    embed: torch.Tensor
    n_valid: int

    @classmethod
    def from_model(cls, model) -> "Heads":
        cfg = model.cfg
        W, bvec, E = model.output_layer.linear.weight, model.output_layer.linear.bias, model.embed
        pad = cfg.padded_vocab - cfg.vocab_size
        if pad:
            W = torch.cat([W, W.new_zeros(pad, W.shape[1])])
            bvec = torch.cat([bvec, bvec.new_zeros(pad)])
            E = torch.cat([E, E.new_zeros(pad, E.shape[1])])
        return cls(W.detach(), bvec.detach(), E.detach(), cfg.vocab_size)


def engine_state(model) -> dict:
    """Per-weight-set engine state (padded heads, hidden-noise factor C), cached on the model and rebuilt
    when the head, bias or embedding changes (data pointer, in-place version, dtype or device, a load_state_dict,
    an assignment in the model, or `fmlm.refresh(model)`: model.weights_epoch)."""
    from .model import weights_epoch  # noqa: PLC0415

    W, bvec, E = model.output_layer.linear.weight, model.output_layer.linear.bias, model.embed
    key = (weights_epoch(model), *((t.data_ptr(), t._version, t.dtype, t.device) for t in (W, bvec, E)))
    cache = model.__dict__.setdefault("_fmlm_engine_cache", {})
    if cache.get("key") != key:
        cache.clear()
        cache.update(key=key, heads=Heads.from_model(model))
    return cache


def noise_factor(model) -> torch.Tensor:
    st = engine_state(model)
    if "C" not in st:
        st["C"] = hidden_noise_factor(model.embed).to(model.embed.dtype)
    return st["C"]


def _times(v: Optional[float], B: int, like: torch.Tensor):
    return None if v is None else torch.full((B,), v, device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_hidden(model, plan: SamplePlan, h0: torch.Tensor, heads: Heads, next_noise=None,
                  backend: str = "auto", trunk_backend: str = "reference") -> torch.Tensor:
    """Run the plan from the hidden state h0 = z0·E. next_noise() returns ε'·E (B, L, D) for re-noising.
    backend selects the vocabulary ops, trunk_backend the DiT blocks ('reference' keeps h's dtype)."""
    h = h0
    B = h.shape[0]
    cap = model.cfg.logit_cap
    for k in range(plan.steps):
        u = model.trunk(h, _times(plan.tau_s[k], B, h), _times(plan.tau_t[k], B, h), backend=trunk_backend)
        if k == plan.steps - 1:
            return kernels.logits_argmax(u, heads.weight, heads.bias, heads.n_valid, backend=backend)
        de, _ = kernels.vocab_attention(u, heads.weight, heads.bias, heads.embed, cap, heads.n_valid, backend=backend)
        h = plan.a[k] * h + plan.b[k] * de.to(h.dtype)
        if plan.c[k]:
            h = h + plan.c[k] * next_noise()
    raise AssertionError("unreachable")


def positive_int(v, name: str) -> int:
    """v as an int ≥ 1: Python and numpy integers pass; a bool, a float (even 2.0) or v < 1 is a ValueError."""
    try:
        i = None if isinstance(v, bool) else operator.index(v)
    except TypeError:
        i = None
    if i is None or i < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return i


def sample(model, batch_size: int, steps: int, method: str = "fmlm", renoise: float = 0.0,
           noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
           backend: str = "auto") -> torch.Tensor:
    """Sample token ids (B, L) from an FLM (method='flm', Euler) or FMLM (method='fmlm', flow map).

    noise: optional initial state z0 (B, L, V). Given z0, the backends that compute in the model's dtype ('torch',
    'reference', and 'auto' off CUDA) return the tokens of the reference sampler on the same z0 (re-noising draws
    V-space ε' from `generator`, as the reference does); on CUDA 'auto'/'triton' run the bf16 fast trunk, whose
    tokens agree with them up to bf16 rounding (nearly all positions, not all). Without z0, the engine draws
    hidden-space noise ξ·C (same law, no (B, L, V) tensor) and the reference V-space z0.

    On CUDA, backend 'auto'/'triton' runs the CUDA-graph `Sampler` (bf16 fused trunk, Triton vocabulary ops;
    its noise comes from a counter-based generator seeded from `generator`). 'torch' keeps the plain-PyTorch
    engine path in the model's dtype on any device; 'reference' runs the published sampler.
    """
    cfg = model.cfg
    batch_size = positive_int(batch_size, "batch_size")
    plan = make_plan(method, steps, renoise, cfg.vocab_size)     # a bad method is refused here, before the warning
    check_method(method, cfg)
    dev, dt = model.embed.device, model.embed.dtype
    shape = (batch_size, cfg.seq_len, cfg.vocab_size)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape (B, L, V) = {shape}, got {tuple(noise.shape)}")
        noise = noise.to(dev, dt)
    if backend == "reference":
        z0 = noise if noise is not None else torch.randn(shape, generator=generator, device=dev, dtype=dt)
        p = model.params()
        with torch.no_grad():
            amp = dt if dt in (torch.bfloat16, torch.float16) else None     # half weights: the published autocast
            if method == "flm":
                return ref.flm_sample_ref(p, cfg, z0, steps, amp_dtype=amp)
            return ref.fmlm_sample_ref(p, cfg, z0, steps, renoise, generator, amp_dtype=amp)
    fast = dev.type == "cuda" and backend in ("auto", "triton")
    if fast and (noise is None or not any(plan.c)):
        from .runner import cached_sampler  # noqa: PLC0415 (CUDA path)
        runner = cached_sampler(model, batch_size, steps, method, renoise)
        if noise is not None:
            return runner.sample(0, noise=noise)
        gdev = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=gdev))
        return runner.sample(seed, batch_size=batch_size)
    heads = engine_state(model)["heads"]
    E = model.embed.detach()
    if noise is not None:
        h0 = ref.embed_ref(model.params(), noise)

        def next_noise():   # parity mode: the reference's V-space draw, projected
            return ref.embed_ref({"vocab_embed.embedding": E},
                                 torch.randn(shape, generator=generator, device=dev, dtype=dt))
    else:
        C = noise_factor(model)

        def next_noise():
            return torch.randn((batch_size, cfg.seq_len, cfg.hidden), generator=generator, device=dev, dtype=dt) @ C

        h0 = next_noise()
    return sample_hidden(model, plan, h0, heads, next_noise, backend=backend,
                         trunk_backend="fast" if fast else "reference")
