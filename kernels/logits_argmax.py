"""logits_argmax: argmax over V of h·Wᵀ+b without writing logits (ties → lowest index, as torch.argmax).

Reference: fmlm.kernels.reference.logits_argmax_ref. The final sampler step needs only argmax D, and
cap and softmax are monotone, so argmax D = argmax logits (DESIGN.md §2.3).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._backend import acc_dtype, resolve

TORCH_V_CHUNK = 4096
TORCH_ROW_CHUNK = 8192


def _logits_argmax_torch(h, weight, bias, n_valid):
    acc = acc_dtype(h.dtype)
    N = h.shape[0]
    out = torch.empty(N, device=h.device, dtype=torch.long)
    for r0 in range(0, N, TORCH_ROW_CHUNK):
        hr = h[r0:r0 + TORCH_ROW_CHUNK].to(acc)
        best = torch.full((hr.shape[0],), float("-inf"), device=h.device, dtype=acc)
        idx = torch.zeros(hr.shape[0], device=h.device, dtype=torch.long)
        for v0 in range(0, n_valid, TORCH_V_CHUNK):
            v1 = min(n_valid, v0 + TORCH_V_CHUNK)
            z = hr @ weight[v0:v1].to(acc).T
            if bias is not None:
                z += bias[v0:v1].to(acc)
            val, i = z.max(-1)
            better = val > best            # strict: an equal value in a later chunk keeps the lower index
            best = torch.where(better, val, best)
            idx = torch.where(better, i + v0, idx)
        out[r0:r0 + hr.shape[0]] = idx
    return out


def logits_argmax(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  n_valid: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """h (..., D) → LongTensor (...): argmax over the first n_valid rows of weight of h·Wᵀ+b."""
    V = weight.shape[0] if n_valid is None else int(n_valid)
    if not 0 < V <= weight.shape[0] or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}, n_valid {V}")
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    b = None if bias is None else bias[:V]
    be = resolve(backend, h.device)
    if be == "reference":
        out = ref.logits_argmax_ref(h2.to(acc_dtype(h.dtype)), weight[:V].to(acc_dtype(h.dtype)),
                                    None if b is None else b.to(acc_dtype(h.dtype)))
    elif be == "triton":
        from .logits_argmax_triton import logits_argmax_fwd  # noqa: PLC0415
        out = logits_argmax_fwd(h2, weight, b, V)
    else:
        out = _logits_argmax_torch(h2, weight, b, V)
    return out.reshape(lead)
