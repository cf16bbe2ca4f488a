"""The spec: the published FLM / FMLM math in plain PyTorch, op for op (DESIGN.md §1).

Follows the reference code github.com/david3684/flm (models/dit.py, algo.py, utils.py): V-space
state, dense x·E, attention with the tanh softcap, logit cap, the Euler FLM sampler, the FMLM flow-map
sampler with the re-noising knob, and the time schedule (Gauss–Hermite in log space, tabulated on
10,000 γ points, inverted with a cubic spline on the host at every call, exactly as published).

Everything here materializes the vocabulary axis exactly like the published code. It runs on any
device and is a real backend (`backend="reference"`). It is never edited to match a faster path.

Functions take `p`, a mapping from parameter name (the released checkpoints' names, without the
`backbone.` prefix) to tensor, and `cfg`, any object with the ModelConfig attributes they read.
The per-op references used by the fused kernels sit at the end of the file.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

Params = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Time schedule (utils.compute_alpha_exact / build_luts / alpha_to_gamma / gamma_to_alpha)
# ---------------------------------------------------------------------------------------------
N_GH = 100          # Gauss–Hermite nodes
N_LUT = 10_000      # γ grid points of the published lookup table


def tau_exact(gamma: np.ndarray, vocab_size: int, n_gh: int = N_GH, sigma_floor: float = 1e-12) -> np.ndarray:
    """τ(γ) = K/(K−1)·(q(γ) − 1/K), q(γ) = E_z[Φ(z + γ/(1−γ))^(K−1)], float64, as published
    (including its monotonicity nudge (γ−1)·1e-10 and the clip to [0, 1])."""
    from scipy.special import log_ndtr

    K = int(vocab_size)
    gamma = np.asarray(gamma, dtype=np.float64)
    sigma = np.maximum(1.0 - gamma, sigma_floor)
    m_c = gamma / sigma
    x, w = np.polynomial.hermite.hermgauss(n_gh)
    w = w / np.sqrt(np.pi)
    z = np.sqrt(2.0) * x
    log_prod = (K - 1) * log_ndtr(z[None, :] + m_c[:, None])
    q = np.sum(w * np.exp(log_prod), axis=-1)
    tau = K / (K - 1.0) * (q - 1.0 / K)
    tau = tau + (gamma - 1) * 1e-10
    return np.clip(tau, 0.0, 1.0)


@functools.lru_cache(maxsize=16)
def build_luts(vocab_size: int, n_points: int = N_LUT):
    """(tau→gamma spline, gamma→tau spline): scipy CubicSplines built exactly as published."""
    from scipy.interpolate import CubicSpline

    gamma_vals = np.linspace(0.0, 1.0, n_points)
    tau_vals = tau_exact(gamma_vals, vocab_size)
    g2t = CubicSpline(gamma_vals, tau_vals)
    order = np.argsort(tau_vals)
    uniq_tau, idx = np.unique(tau_vals[order], return_index=True)
    t2g = CubicSpline(uniq_tau, gamma_vals[order][idx])
    return t2g, g2t


def tau_to_gamma_ref(tau: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Host spline round trip, as published (`utils.alpha_to_gamma`)."""
    t2g, _ = build_luts(int(vocab_size))
    out = np.clip(t2g(tau.detach().cpu().double().numpy()), 0.0, 1.0)
    return torch.from_numpy(out).to(tau.device, tau.dtype)


def gamma_to_tau_ref(gamma: torch.Tensor, vocab_size: int) -> torch.Tensor:
    _, g2t = build_luts(int(vocab_size))
    out = np.clip(g2t(gamma.detach().cpu().double().numpy()), 0.0, 1.0)
    return torch.from_numpy(out).to(gamma.device, gamma.dtype)


# ---------------------------------------------------------------------------------------------
# The DiT backbone (models/dit.py: DIT, DDiTBlock, DDiTFinalLayer, TimestepEmbedder, Rotary)
# ---------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """The published code computes embed and LayerNorm in fp32; float64 inputs stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def time_mlp_ref(p: Params, prefix: str, t: torch.Tensor) -> torch.Tensor:
    w0 = p[f"{prefix}.mlp.0.weight"]
    x = timestep_embedding(t, w0.shape[1]).to(w0.dtype)
    x = F.silu(F.linear(x, w0, p[f"{prefix}.mlp.0.bias"]))
    return F.linear(x, p[f"{prefix}.mlp.2.weight"], p[f"{prefix}.mlp.2.bias"])


def cond_ref(p: Params, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """c = silu(sigma_map(τ_s) [+ sigma_map_prime(τ_t)]); an FLM given τ_t reuses sigma_map, as published."""
    emb = time_mlp_ref(p, "sigma_map", tau_s)
    if tau_t is not None:
        prefix = "sigma_map_prime" if "sigma_map_prime.mlp.0.weight" in p else "sigma_map"
        emb = emb + time_mlp_ref(p, prefix, tau_t)
    return F.silu(emb)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = F.layer_norm(x.to(_acc(x.dtype)), [x.shape[-1]])
    return y * weight[None, None, :]


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def rotary_cos_sin(seq_len: int, inv_freq: torch.Tensor):
    t = torch.arange(seq_len, device=inv_freq.device).type_as(inv_freq)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()          # (L, head_dim/2) each


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (non-interleaved) rotary on x of shape (B, L, H, d); cos/sin (L, d/2)."""
    d2 = x.shape[-1] // 2
    cos = cos.to(x.dtype)[None, :, None, :]
    sin = sin.to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :d2], x[..., d2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_ref(q, k, v, softcap: Optional[float]) -> torch.Tensor:
    """Non-causal attention with the tanh softcap on the scaled scores (flash_attn softcap=50).
    q, k, v: (B, L, H, d) → (B, L, H·d). Scores in fp32 (flash-attention accumulates in fp32)."""
    B, L, H, d = q.shape
    acc = _acc(q.dtype)
    s = torch.einsum("bihd,bjhd->bhij", q.to(acc), k.to(acc)) / math.sqrt(d)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    a = torch.softmax(s, dim=-1)
    o = torch.einsum("bhij,bjhd->bihd", a, v.to(acc)).to(q.dtype)
    return o.reshape(B, L, H * d)


def block_ref(p: Params, i: int, x: torch.Tensor, c: torch.Tensor, cos, sin, cfg) -> torch.Tensor:
    pre = f"blocks.{i}."
    B, L, D = x.shape
    mod = F.linear(c, p[pre + "adaLN_modulation.weight"], p[pre + "adaLN_modulation.bias"])[:, None]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
    x_skip = x
    y = modulate(layer_norm_ref(x, p[pre + "norm1.weight"]), shift_msa, scale_msa)
    qkv = F.linear(y, p[pre + "attn_qkv.weight"]).view(B, L, 3, cfg.n_heads, D // cfg.n_heads)
    q = apply_rotary_ref(qkv[:, :, 0], cos, sin)
    k = apply_rotary_ref(qkv[:, :, 1], cos, sin)
    att = attention_ref(q, k, qkv[:, :, 2], cfg.attn_softcap)
    x = x_skip + gate_msa * F.linear(att, p[pre + "attn_out.weight"])
    y = modulate(layer_norm_ref(x, p[pre + "norm2.weight"]), shift_mlp, scale_mlp)
    y = F.linear(y, p[pre + "mlp.0.weight"], p[pre + "mlp.0.bias"])
    y = F.linear(F.gelu(y, approximate="tanh"), p[pre + "mlp.2.weight"], p[pre + "mlp.2.bias"])
    return x + gate_mlp * y


def trunk_ref(p: Params, h: torch.Tensor, c: torch.Tensor, cfg) -> torch.Tensor:
    """Blocks + final norm/modulate: hidden input h = x·E (B, L, D) → features u with logits = u·Wᵀ + b."""
    cos, sin = rotary_cos_sin(h.shape[1], p["rotary_emb.inv_freq"])
    x = h
    for i in range(cfg.n_blocks):
        x = block_ref(p, i, x, c, cos, sin, cfg)
    shift, scale = F.linear(c, p["output_layer.adaLN_modulation.weight"],
                            p["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, dim=2)
    return modulate(layer_norm_ref(x, p["output_layer.norm_final.weight"]), shift, scale)


def embed_ref(p: Params, x: torch.Tensor) -> torch.Tensor:
    """Dense x·E over the whole vocabulary (EmbeddingLayer.forward on a 3-D state)."""
    E = p["vocab_embed.embedding"]
    acc = _acc(x.dtype)
    return torch.einsum("blv,ve->ble", x.to(acc), E.to(acc)).to(x.dtype)


def dit_forward_ref(p: Params, x: torch.Tensor, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor], cfg,
                    amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Raw logits (B, L, V) before the cap. amp_dtype=torch.bfloat16 reproduces the published autocast."""
    h = embed_ref(p, x)
    c = cond_ref(p, tau_s, tau_t)
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        u = trunk_ref(p, h, c, cfg)
        return F.linear(u, p["output_layer.linear.weight"], p["output_layer.linear.bias"])


def cap_ref(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return cap * torch.tanh(logits / cap) if cap else logits


def denoiser_ref(p, x, tau_s, tau_t, cfg, amp_dtype=None) -> torch.Tensor:
    """D = softmax(cap(logits)) (B, L, V), computed as the published exp(log_softmax)."""
    logits = dit_forward_ref(p, x, tau_s, tau_t, cfg, amp_dtype).float()
    return cap_ref(logits, cfg.logit_cap).log_softmax(dim=-1).exp()


# ---------------------------------------------------------------------------------------------
# Samplers (algo.FLM.generate_samples; FMLM v2 flow-map sampler with the re-noising knob g)
# ---------------------------------------------------------------------------------------------
def flm_sample_ref(p, cfg, z0: torch.Tensor, steps: int, amp_dtype=None) -> torch.Tensor:
    """Euler in γ on a uniform τ grid: z ← z + (γ_{k+1}−γ_k)(D − z)/(1 − γ_k + 1e−5); last step argmax D."""
    B, V = z0.shape[0], cfg.vocab_size
    z = z0.clone()
    t_vals = torch.linspace(0.0, 1.0, steps + 1, device=z.device, dtype=z.dtype)
    for i in range(steps):
        t_in = t_vals[i].expand(B)
        g_in = tau_to_gamma_ref(t_in, V)
        dg = tau_to_gamma_ref(t_vals[i + 1].expand(B), V) - g_in
        D = denoiser_ref(p, z, t_in, None, cfg, amp_dtype).to(z.dtype)
        if i == steps - 1:
            return D.argmax(dim=-1)
        z = z + dg.view(-1, 1, 1) * (D - z) / (1.0 - g_in.view(-1, 1, 1) + 1e-5)
    raise ValueError("steps must be >= 1")


def fmlm_schedule_ref(steps: int, renoise: float, vocab_size: int, dtype=torch.float64):
    """Per step k: (τ_k, γ_k, γ_{k+1}, σ, σ̃, γ̃, τ̃) as python floats, through the published splines."""
    t_vals = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)
    gam = tau_to_gamma_ref(t_vals, vocab_size)
    out = []
    for k in range(steps):
        sigma = 1.0 - gam[k + 1]
        sigma_t = sigma * math.sqrt(1.0 - renoise ** 2)
        gamma_t = 1.0 - sigma_t
        tau_t = gamma_to_tau_ref(gamma_t.reshape(1), vocab_size)[0]
        out.append(tuple(float(v) for v in (t_vals[k], gam[k], gam[k + 1], sigma, sigma_t, gamma_t, tau_t)))
    return out


def fmlm_sample_ref(p, cfg, z0: torch.Tensor, steps: int, renoise: float = 0.0,
                    generator: Optional[torch.Generator] = None, amp_dtype=None) -> torch.Tensor:
    """σ = 1−γ_{k+1}, σ̃ = σ√(1−g²), γ̃ = 1−σ̃, τ̃ = τ(γ̃), D = δ(z; τ_k, τ̃); last step argmax D; else
    z ← X_{γ_k,γ̃}(z) + (σ̃−σ)·D + g·σ·ε', X_{s,t}(x) = ((1−t)/(1−s))·x + ((t−s)/(1−s))·δ."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0.0 <= renoise <= 1.0:
        raise ValueError("renoise must be in [0, 1]")
    B = z0.shape[0]
    z = z0.clone()
    for k, (tau_k, g_k, _, sigma, sigma_t, gamma_t, tau_t) in enumerate(fmlm_schedule_ref(steps, renoise, cfg.vocab_size)):
        ts = torch.full((B,), tau_k, device=z.device, dtype=z.dtype)
        tt = torch.full((B,), tau_t, device=z.device, dtype=z.dtype)
        D = denoiser_ref(p, z, ts, tt, cfg, amp_dtype).to(z.dtype)
        if k == steps - 1:
            return D.argmax(dim=-1)
        z = ((1 - gamma_t) / (1 - g_k)) * z + ((gamma_t - g_k) / (1 - g_k)) * D + (sigma_t - sigma) * D
        if renoise > 0:
            z = z + renoise * sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Per-op references for the fused kernels (fmlm.kernels.*): each materializes (rows, V).
# ---------------------------------------------------------------------------------------------
def interp_embed_ref(tokens: torch.Tensor, gamma: torch.Tensor, embed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """h = ((1−γ)·ε + γ·onehot(y))·E with V-space noise ε (B, L, V); gamma (B,)."""
    x1 = F.one_hot(tokens, embed.shape[0]).to(noise.dtype)
    g = gamma.to(noise.dtype).view(-1, 1, 1)
    x = (1 - g) * noise + g * x1
    return torch.einsum("blv,vd->bld", x, embed.to(noise.dtype))


def interp_embed_hidden_ref(tokens, gamma, embed, xi, chol_upper) -> torch.Tensor:
    """h = (1−γ)·ξ·C + γ·E[y], C = chol(EᵀE)ᵀ: the same distribution as interp_embed_ref (DESIGN.md §2.1)."""
    g = gamma.to(embed.dtype).view(-1, 1, 1)
    return (1 - g) * (xi.to(embed.dtype) @ chol_upper) + g * embed[tokens]


def hidden_noise_factor_ref(embed: torch.Tensor) -> torch.Tensor:
    """C = chol(EᵀE)ᵀ (upper triangular, D×D) in float64: ξ·C ~ N(0, EᵀE) when ξ ~ N(0, I)."""
    E = embed.detach().double()
    return torch.linalg.cholesky(E.T @ E).T.contiguous()


def logits_ref(h, weight, bias):
    out = h @ weight.T
    return out + bias if bias is not None else out


def linear_cross_entropy_ref(h, weight, bias, targets, cap: Optional[float] = 30.0, ignore_index: int = -100,
                             reduction: str = "none"):
    """Per-token −log softmax(cap(h·Wᵀ+b))[target]; ignored targets give 0 (and are excluded from 'mean')."""
    lp = cap_ref(logits_ref(h, weight, bias).float(), cap).log_softmax(-1)
    valid = targets != ignore_index
    loss = -lp.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0] * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def soft_linear_cross_entropy_ref(h, weight, bias, h1, h2, lam, cap: Optional[float] = 30.0):
    """−Σ_v δ̄_v·log softmax(cap(h·Wᵀ+b))_v with δ̄ = λ·softmax(cap(h1·Wᵀ+b)) + (1−λ)·softmax(cap(h2·Wᵀ+b)),
    no gradient through the targets; lam has one value per row (broadcast over leading dims)."""
    with torch.no_grad():
        p1 = cap_ref(logits_ref(h1, weight, bias).float(), cap).softmax(-1)
        p2 = cap_ref(logits_ref(h2, weight, bias).float(), cap).softmax(-1)
        lam = lam.float()[..., None]
        target = lam * p1 + (1 - lam) * p2
    lp = cap_ref(logits_ref(h, weight, bias).float(), cap).log_softmax(-1)
    return -(target * lp).sum(-1)


def vocab_attention_ref(h, weight, bias, embed, cap: Optional[float] = 30.0):
    """(softmax(cap(h·Wᵀ+b))·E, logsumexp(cap(h·Wᵀ+b))): attention over the vocabulary, head dim D."""
    s = cap_ref(logits_ref(h, weight, bias).float(), cap)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ embed.float(), lse


def flow_map_update_ref(h_state, de, a, b, c=None, noise=None):
    """h_next = a·h_state + b·(D·E) [+ c·noise], coefficients per batch row (B,), states (B, L, D)."""
    out = a.view(-1, 1, 1) * h_state + b.view(-1, 1, 1) * de
    if noise is not None:
        out = out + c.view(-1, 1, 1) * noise
    return out


def logits_argmax_ref(h, weight, bias, cap: Optional[float] = None):
    """argmax over V of cap(h·Wᵀ+b) (ties → lowest index, as torch.argmax). The cap is monotone, so
    cap=None gives the same token unless the cap merges two nearly equal maxima."""
    return cap_ref(logits_ref(h, weight, bias).float(), cap).argmax(-1)
