"""Time schedule τ ↔ γ on the device (DESIGN.md §1).

τ(γ) is computed exactly (Gauss–Hermite, log space, float64) once per vocabulary size by the reference's
own construction (`fmlm.kernels.reference.build_luts`); the two cubic splines it builds are stored as
module buffers (knots + per-interval coefficients, float64) and evaluated on the tensor's device with
`searchsorted` + Horner: the same piecewise polynomials as the published host spline, no host round trip.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn as nn

from fmlm.kernels import reference as ref


def _eval_spline(x: torch.Tensor, knots: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    xd = x.to(torch.float64)
    i = (torch.searchsorted(knots, xd.contiguous(), right=True) - 1).clamp(0, knots.numel() - 2)
    dx = xd - knots[i]
    c = coef[:, i]
    y = ((c[0] * dx + c[1]) * dx + c[2]) * dx + c[3]
    return y.clamp(0.0, 1.0).to(x.dtype)


class TimeSchedule(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = int(vocab_size)
        t2g, g2t = ref.build_luts(self.vocab_size)
        for name, s in (("t2g", t2g), ("g2t", g2t)):
            self.register_buffer(f"{name}_knots", torch.from_numpy(s.x.copy()), persistent=False)
            self.register_buffer(f"{name}_coef", torch.from_numpy(s.c.copy()), persistent=False)

    def tau_to_gamma(self, tau: torch.Tensor) -> torch.Tensor:
        return _eval_spline(tau, self.t2g_knots, self.t2g_coef)

    def gamma_to_tau(self, gamma: torch.Tensor) -> torch.Tensor:
        return _eval_spline(gamma, self.g2t_knots, self.g2t_coef)


@functools.lru_cache(maxsize=32)
def get_schedule(vocab_size: int, device: str = "cpu") -> TimeSchedule:
    return TimeSchedule(vocab_size).to(device)


def _check(x, name):
    if not torch.is_tensor(x):
        x = torch.as_tensor(x, dtype=torch.float64)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor")
    return x


def _vocab(vocab_size) -> int:
    """An int ≥ 2 (the schedule divides by V − 1): -3 gave garbage, 2.7 was truncated, 1 divided by zero."""
    if isinstance(vocab_size, bool):
        raise TypeError("vocab_size must be an int, got a bool")
    try:
        v = operator.index(vocab_size)
    except TypeError:
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}") from None
    if v < 2:
        raise ValueError(f"vocab_size must be at least 2, got {v}")
    return v


def tau_to_gamma(tau, vocab_size: int) -> torch.Tensor:
    """Network time τ ("alpha") → interpolant time γ, on tau's device."""
    tau = _check(tau, "tau")
    return get_schedule(_vocab(vocab_size), str(tau.device)).tau_to_gamma(tau)


def gamma_to_tau(gamma, vocab_size: int) -> torch.Tensor:
    """Interpolant time γ → network time τ, on gamma's device."""
    gamma = _check(gamma, "gamma")
    return get_schedule(_vocab(vocab_size), str(gamma.device)).gamma_to_tau(gamma)
