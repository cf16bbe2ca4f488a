"""FlowLM: the DiT of the released FLM/FMLM checkpoints, parameter names identical to theirs.

The module holds the weights; the math lives in fmlm.kernels (the reference is a real backend). It has two
entry points: `forward(x, tau_s, tau_t)` on the V-space state, as published, and `trunk(h, tau_s, tau_t)`
on the hidden state h = x·E, which is all the engine ever carries (DESIGN.md §2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from fmlm.kernels import reference as ref
from .config import ModelConfig


class _TimeEmbedder(nn.Module):          # TimestepEmbedder: mlp.0 (256→cond), SiLU, mlp.2 (cond→cond)
    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))


class _LayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Embedding(nn.Module):
    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))


class _Block(nn.Module):                 # DDiTBlock; registration order fixes named_parameters() order (EMA)
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden
        self.norm1 = _LayerNorm(D)
        self.attn_qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.norm2 = _LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * D, D))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * D)


class _FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_final = _LayerNorm(cfg.hidden)
        self.linear = nn.Linear(cfg.hidden, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden)


class _LossWeighting(nn.Module):         # LearnableLossWeighting (v1 distill checkpoints)
    def __init__(self, cond_dim: int, hidden: int = 128):
        super().__init__()
        self.s_embed = _TimeEmbedder(cond_dim)
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        p = {f"s_embed.{k}": v for k, v in self.s_embed.named_parameters()}
        return self.mlp(ref.time_mlp_ref(p, "s_embed", tau)).squeeze(-1)


class FlowLM(nn.Module):
    """DiT denoiser. `model(x, tau_s, tau_t=None)` → raw logits (B, L, V) before the cap."""

    def __init__(self, cfg: ModelConfig, init: str = "random"):
        super().__init__()
        self.cfg = cfg
        self.vocab_embed = _Embedding(cfg.hidden, cfg.vocab_size)
        self.sigma_map = _TimeEmbedder(cfg.cond_dim)
        if cfg.two_time:
            self.sigma_map_prime = _TimeEmbedder(cfg.cond_dim)
        self.rotary_emb = _Rotary(cfg.head_dim, cfg.rotary_base)
        if cfg.learnable_loss_weighting:
            self.learnable_loss_weighting = _LossWeighting(cfg.cond_dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_blocks))
        self.output_layer = _FinalLayer(cfg)
        if init == "random":
            self.reset_parameters()
        elif init != "published":
            raise ValueError("init must be 'random' (non-degenerate weights for benchmarks and tests) or "
                             "'published' (the reference's zero adaLN / output layer, for training)")
        else:
            for m in [*(b.adaLN_modulation for b in self.blocks), self.output_layer.adaLN_modulation,
                      self.output_layer.linear]:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, seed: Optional[int] = None):
        """Random, never-zero weights (the published init zeroes adaLN and the head, which makes every
        sample the same token: useless for parity tests and benchmarks)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, prm in self.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g))
            elif name == "vocab_embed.embedding":
                prm.copy_(torch.randn(prm.shape, generator=g) / math.sqrt(prm.shape[1]))
            else:
                prm.copy_(std * torch.randn(prm.shape, generator=g))

    # -- parameters as the reference's mapping ------------------------------------------------
    def params(self) -> dict[str, torch.Tensor]:
        d = dict(self.named_parameters())
        d.update(self.named_buffers())
        return d

    @property
    def embed(self) -> torch.Tensor:
        return self.vocab_embed.embedding

    def cond(self, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ref.cond_ref(self.params(), tau_s, tau_t)

    def trunk(self, h: torch.Tensor, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden state h = x·E (B, L, D) → output features u (B, L, D); logits = u·Wᵀ + b."""
        p = self.params()
        return ref.trunk_ref(p, h, ref.cond_ref(p, tau_s, tau_t), self.cfg)

    def forward(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.cfg.vocab_size:
            raise ValueError(f"x must be (B, L, V={self.cfg.vocab_size}), got {tuple(x.shape)}")
        return ref.dit_forward_ref(self.params(), x, _as_batch(tau_s, x), None if tau_t is None else _as_batch(tau_t, x),
                                   self.cfg)


def _as_batch(tau, x: torch.Tensor) -> torch.Tensor:
    tau = torch.as_tensor(tau, device=x.device, dtype=x.dtype)
    return tau.expand(x.shape[0]) if tau.dim() == 0 else tau
