"""vocab_attention: softmax(cap(h·Wᵀ+b))·E and its log-sum-exp, never writing (rows, V) logits.

Reference: fmlm.kernels.reference.vocab_attention_ref (and flow_map_update_ref for the epilogue).
It is attention over the vocabulary: queries = output features h, keys = output weights W, values =
the input embedding E, head dim D; an online softmax over V tiles (DESIGN.md §2.2).

Backends: 'torch' — chunked plain PyTorch (any device); 'reference' — materializes logits.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._backend import acc_dtype, resolve

TORCH_V_CHUNK = 4096     # (rows × 4096) fp32 logits per chunk: 16 MB at 1024 rows
TORCH_ROW_CHUNK = 8192


def _vocab_attention_torch(h, weight, bias, embed, cap, n_valid):
    acc = acc_dtype(h.dtype)
    N, V = h.shape[0], n_valid
    out = torch.empty(N, embed.shape[1], device=h.device, dtype=acc)
    lse = torch.empty(N, device=h.device, dtype=acc)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        hr = h[r0:r0 + TORCH_ROW_CHUNK].to(acc)
        m = torch.full((hr.shape[0],), float("-inf"), device=h.device, dtype=acc)
        s = torch.zeros_like(m)
        o = torch.zeros(hr.shape[0], embed.shape[1], device=h.device, dtype=acc)
        for v0 in range(0, V, TORCH_V_CHUNK):
            v1 = min(V, v0 + TORCH_V_CHUNK)
            z = hr @ weight[v0:v1].to(acc).T
            if bias is not None:
                z += bias[v0:v1].to(acc)
            if cap:
                z = cap * torch.tanh(z / cap)
            m_new = torch.maximum(m, z.amax(-1))
            alpha = torch.exp(m - m_new)
            pz = torch.exp(z - m_new[:, None])
            s = s * alpha + pz.sum(-1)
            o = o * alpha[:, None] + pz @ embed[v0:v1].to(acc)
            m = m_new
        out[r0:r0 + hr.shape[0]] = o / s[:, None]
        lse[r0:r0 + hr.shape[0]] = m + torch.log(s)
    return out, lse


def vocab_attention(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                    cap: Optional[float] = 30.0, n_valid: Optional[int] = None, backend: str = "auto"):
    """h (..., D) → (softmax(cap(h·Wᵀ+b))·E of shape (..., De), lse (...)), in fp32 (fp64 for fp64 h).

    weight (Vp, D) and embed (Vp, De) may be padded past the vocabulary: only the first n_valid rows count.
    """
    V = weight.shape[0] if n_valid is None else int(n_valid)
    if not 0 < V <= weight.shape[0] or embed.shape[0] < V or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"embed {tuple(embed.shape)}, n_valid {V}")
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    b = None if bias is None else bias[:V]
    be = resolve(backend, h.device)
    if be == "reference":
        out, lse = ref.vocab_attention_ref(h2, weight[:V], b, embed[:V], cap)
    elif be == "triton":
        from .vocab_attention_triton import vocab_attention_fwd  # noqa: PLC0415 (GPU-only module)
        out, lse = vocab_attention_fwd(h2, weight, b, embed, cap, V)
    else:
        out, lse = _vocab_attention_torch(h2, weight, b, embed, cap, V)
    return out.reshape(*lead, -1), lse.reshape(lead)
