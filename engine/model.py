"""FlowLM: the DiT of the released FLM/FMLM checkpoints, parameter names identical to theirs.

The module holds the weights; the math lives in fmlm.kernels (the reference is a real backend). It has two
entry points: `forward(x, tau_s, tau_t)` on the V-space state, as published, and `trunk(h, tau_s, tau_t)`
on the hidden state h = x·E, which is all the engine ever carries (DESIGN.md §2).
"""
from __future__ import annotations

import math
import weakref
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

    def trunk(self, h: torch.Tensor, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor] = None,
              backend: str = "auto") -> torch.Tensor:
        """Hidden state h = x·E (B, L, D) → output features u (B, L, D); logits = u·Wᵀ + b.

        backend: 'reference' — trunk_ref (plain PyTorch, any device) in h's dtype, or, with bf16/fp16 weights,
        under autocast in that dtype as published; 'fast' — bf16 weights (cached per weight version), fused
        adaLN / gate-residual, softcap flash attention with rotary on load; returns bf16 features; 'auto' —
        'fast' on CUDA, 'reference' otherwise."""
        if h.dim() != 3 or h.shape[-1] != self.cfg.hidden:
            raise ValueError(f"h must be (B, L, D={self.cfg.hidden}), got {tuple(h.shape)}")
        for name, t in (("tau_s", tau_s), ("tau_t", tau_t)):
            if t is not None and torch.is_tensor(t) and t.dim() > 0 and t.shape != (h.shape[0],):
                raise ValueError(f"{name} must be a scalar or ({h.shape[0]},), got {tuple(t.shape)}")
        if backend == "auto":
            backend = "fast" if h.is_cuda else "reference"
        if backend == "fast":
            return _fast_trunk(self, h, tau_s, tau_t, torch.bfloat16)
        if backend != "reference":
            raise ValueError(f"trunk backend must be 'auto', 'reference' or 'fast', got {backend!r}")
        p = self.params()
        with torch.autocast(h.device.type, dtype=self._half_dtype() or torch.bfloat16,
                            enabled=self._half_dtype() is not None and not torch.is_autocast_enabled(h.device.type)):
            return ref.trunk_ref(p, h, ref.cond_ref(p, tau_s, tau_t), self.cfg)

    def _half_dtype(self) -> Optional[torch.dtype]:
        """bf16/fp16 weights: the reference math runs under autocast in that dtype, as the published code trains
        and samples (its LayerNorm stays fp32, so plain half-precision weights would meet fp32 activations)."""
        dt = self.embed.dtype
        return dt if dt in (torch.bfloat16, torch.float16) else None

    def forward(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.cfg.vocab_size:
            raise ValueError(f"x must be (B, L, V={self.cfg.vocab_size}), got {tuple(x.shape)}")
        for name, t in (("tau_s", tau_s), ("tau_t", tau_t)):
            if t is not None and torch.is_tensor(t) and t.dim() > 0 and t.shape != (x.shape[0],):
                raise ValueError(f"{name} must be a scalar or ({x.shape[0]},), got {tuple(t.shape)}")
        # under a caller's autocast (the training loop's bf16), or with bf16/fp16 weights, the reference runs its
        # blocks under that autocast, as the published mixed-precision code does
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self._half_dtype()
        return ref.dit_forward_ref(self.params(), x, _as_batch(tau_s, x), None if tau_t is None else _as_batch(tau_t, x),
                                   self.cfg, amp_dtype=amp)


def _as_batch(tau, x: torch.Tensor) -> torch.Tensor:
    tau = torch.as_tensor(tau, device=x.device, dtype=x.dtype)
    return tau.expand(x.shape[0]) if tau.dim() == 0 else tau


# ---------------------------------------------------------------------------------------------
# The fast trunk (CUDA, bf16): the same function as trunk_ref, computed with the fused fmlm.kernels ops
# ---------------------------------------------------------------------------------------------


class _FastWeights:
    """The trunk's weights in the compute dtype, laid out for the fast path, built once per weight version.

    All blocks' adaLN modulations (and the final layer's) are one (n_blocks·6·D + 2·D, cond) matrix: one GEMM
    per call instead of 13. LayerNorm weights stay fp32 (the reference's LayerNorm is fp32)."""

    def __init__(self, model: "FlowLM", device: torch.device, dtype: torch.dtype):
        self.sources = [*model.parameters(), *model.buffers()]
        self.key, self.dtype = _version_key(self.sources), dtype
        cast = lambda t: t.detach().to(device=device, dtype=dtype).contiguous()          # noqa: E731
        f32 = lambda t: t.detach().to(device=device, dtype=torch.float32).contiguous()   # noqa: E731
        self.cond_p = {n: t.detach().to(device) for n, t in model.named_parameters()
                       if n.startswith("sigma_map")}
        ada = [(b.adaLN_modulation.weight, b.adaLN_modulation.bias) for b in model.blocks]
        ada.append((model.output_layer.adaLN_modulation.weight, model.output_layer.adaLN_modulation.bias))
        self.ada_w = cast(torch.cat([w for w, _ in ada]))
        self.ada_b = cast(torch.cat([b for _, b in ada]))
        self.blocks = [dict(norm1=f32(b.norm1.weight), wqkv=cast(b.attn_qkv.weight), wout=cast(b.attn_out.weight),
                            norm2=f32(b.norm2.weight), w0=cast(b.mlp[0].weight), b0=cast(b.mlp[0].bias),
                            w2=cast(b.mlp[2].weight), b2=cast(b.mlp[2].bias)) for b in model.blocks]
        self.final_norm = f32(model.output_layer.norm_final.weight)
        self.inv_freq = f32(model.rotary_emb.inv_freq)
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, L: int):
        """cos/sin (L, d/2) in the compute dtype (the reference rounds them to x's dtype too), made once so
        the attention launcher casts nothing per call."""
        if L not in self._rope:
            self._rope[L] = tuple(t.to(self.dtype).contiguous() for t in ref.rotary_cos_sin(L, self.inv_freq))
        return self._rope[L]


def weights_epoch(model) -> int:
    """A per-model counter that every weight cache adds to its key. It moves on each `load_state_dict` of the model
    (a post-hook, registered on first use), whenever a Parameter, buffer or submodule is assigned anywhere in the
    model (`model.blocks[0].attn_qkv.weight = nn.Parameter(...)`, a submodule's `load_state_dict(assign=True)`,
    `model.blocks[1] = block`: torch's global registration hooks, see _watch), and on `fmlm.refresh(model)`.
    Those swap the objects the caches hold, so neither their pointers nor their versions change. Data written
    through `.data` bypasses every check: that needs `fmlm.refresh(model)`."""
    d = model.__dict__
    if "_fmlm_epoch" not in d:
        d["_fmlm_epoch"] = 0
        model.register_load_state_dict_post_hook(_next_epoch)
        _watch(model, model)
    return d["_fmlm_epoch"]


def _next_epoch(module, incompatible_keys=None) -> None:
    module.__dict__["_fmlm_epoch"] = module.__dict__.get("_fmlm_epoch", 0) + 1


# submodule → the models (roots) whose weights epoch an assignment inside it moves. Weak both ways: watching a
# model keeps neither it nor its submodules alive.
_WATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_HOOKS: list = []


def _watch(root, module) -> None:
    """Let assignments inside `module` (and its submodules) move `root`'s weights epoch."""
    if not _HOOKS:
        from torch.nn.modules import module as nn_module  # noqa: PLC0415
        _HOOKS.extend([nn_module.register_module_parameter_registration_hook(_on_registration),
                       nn_module.register_module_buffer_registration_hook(_on_registration),
                       nn_module.register_module_module_registration_hook(_on_registration)])
    for m in module.modules():
        _WATCHED.setdefault(m, weakref.WeakSet()).add(root)


def _on_registration(module, name, value):
    """torch calls this for every Parameter, buffer or submodule registered on any module of the process (at
    construction too: one dict lookup when the module is not watched). Returns None: the value is kept."""
    roots = _WATCHED.get(module)
    if roots:
        for root in list(roots):
            _next_epoch(root)
            if isinstance(value, torch.nn.Module):
                _watch(root, value)          # a new submodule: assignments inside it count as well
    return None


def refresh(model) -> None:
    """Tell fmlm that `model`'s weights changed in a way it cannot see: written through `.data` (e.g. an EMA
    `copy_to` that way). Every cache derived from the weights (the fast-path copies, the padded heads and noise
    factor, the Samplers' graphs) is rebuilt on its next use. In-place updates, `load_state_dict`, `.to()`, dtype
    casts and Parameters, buffers or submodules assigned to the model need no call: they are detected."""
    weights_epoch(model)
    _next_epoch(model)


def _version_key(tensors) -> tuple:
    """Changes when a weight's data is replaced (.to(), .data =: new pointer) or updated in place (_version).
    ~0.3 µs per tensor: cheap enough to check on every call (walking model.parameters() is ~10× dearer)."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


_FAST_CACHE: "weakref.WeakKeyDictionary[FlowLM, dict]" = weakref.WeakKeyDictionary()  # model → {(dev, dtype): w}


def _fast_weights(model: "FlowLM", device: torch.device, dtype: torch.dtype) -> _FastWeights:
    """The cached fast-path weights, rebuilt when a weight changed (in place, its data replaced, a load_state_dict,
    an assignment in the model, or `refresh(model)`)."""
    per_model = _FAST_CACHE.setdefault(model, {})
    w = per_model.get((device, dtype))
    epoch = weights_epoch(model)
    if w is None or _version_key(w.sources) != w.key or w.epoch != epoch:
        per_model.pop((device, dtype), None)       # free the stale copy before building the new one
        w = per_model[(device, dtype)] = _FastWeights(model, device, dtype)
        w.epoch = epoch
    return w


def _drop_fast_weights(model: "FlowLM") -> None:
    _FAST_CACHE.pop(model, None)


def _linear_gelu_tanh(y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(y·wᵀ + b). On CUDA one cuBLASLt GEMM with the bias+GELU epilogue (saves a read and a write
    of the (rows, 4·D) activation, 400 MB at B=32, L=1024); its GELU differs from the tanh form by < 5e-4,
    below bf16's rounding of the output."""
    if y.is_cuda and y.dtype in (torch.bfloat16, torch.float16):
        y2 = y.reshape(-1, y.shape[-1])
        return torch._addmm_activation(b, y2, w.t(), use_gelu=True).view(*y.shape[:-1], w.shape[0])
    return torch.nn.functional.gelu(torch.nn.functional.linear(y, w, b), approximate="tanh")


GEMM_IMPLS = ("cublas", "triton_small", "triton_fused")


class _FusedState:
    """What a 'triton_fused' block hands the next one instead of the adaLN output y: y itself (the trunk's first
    block), or the residual stream's row statistics (kernels/norm_linear.py RowStats) with the LayerNorm weight,
    shift and scale the next GEMM applies in its prologue; and the trunk's int32 split-K counters (zero between
    launches: one memset per trunk call instead of one per GEMM)."""

    def __init__(self, sem: torch.Tensor, y: Optional[torch.Tensor] = None, rs=None, norm: tuple = ()):
        self.sem, self.y, self.rs, self.norm = sem, y, rs, norm


def _fast_block(x, y, wb, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_w, next_shift, next_scale, cos, sin,
                n_heads: int, softcap, in_place: bool, kb: str, ab: str, rotary_impl: str = "load",
                gemm_impl: str = "cublas", attn_fixed_shift: bool = True, attn_out_proj: bool = False,
                attn_poly_exp2: bool = False, attn_kv_split: int = 1, attn_config: Optional[dict] = None):
    """One DiT block from (x = residual stream fp32, y = adaLN-modulated norm1(x) in the compute dtype) to
    (x', y' = the next adaLN input: the next block's norm1 or the final layer's norm). in_place: x may be
    overwritten (False for the caller's h and under torch.compile, which wants functional ops). rotary_impl:
    passed to softcap_attention ('load' default; 'prepass'/'prepass_k'/'prepass_tma' opt-in candidates).
    gemm_impl: 'cublas' (default), the opt-in 'triton_fused' (_fused_block; y is then a _FusedState) or the opt-in
    'triton_small' (kernels/linear.py), which at ≤ SMALL_ROWS rows
    runs the four GEMMs as Triton kernels: rotary applied to q and k in the qkv GEMM's epilogue (attention then
    rotates nothing; rotary_impl does not apply), the two GEMMs that feed the residual as split-K partials
    summed by gate_residual (no memsets, every GEMM spread over the GPU at batch 1); cuBLAS above SMALL_ROWS.
    attn_fixed_shift: the attention kernel's softmax without a running max (kernels/attention.py
    fixed_shift_log2; the default since the H100 run of 2026-11-27 run5, 1.01-1.14x the online softmax in
    bench_attention at the four headline shapes; False: the online softmax). attn_out_proj (with 'triton_small',
    at ≤ attention.OUT_PROJ_MAX_ROWS rows): the attention kernel applies the output projection itself and writes
    per-head fp32 partials that gate_residual sums (kernels/attention.py softcap_attention_out_proj): one launch
    fewer per block. attn_poly_exp2 (with attn_fixed_shift; opt-in, unmeasured): the fixed-shift softmax's 2^x for
    half the key columns by a polynomial on the FMA pipes (kernels/attention.py POLY_COEFFS); attn_kv_split (with
    attn_fixed_shift; opt-in, unmeasured): each query tile's keys in up to that many ranges run by separate programs,
    then summed (kernels/attention.py KV_SPLIT); neither inside the attn_out_proj kernel. attn_config (opt-in,
    eager blocks only): tile overrides of the attention kernel (kernels/attention.py TILE_KEYS, e.g.
    {"num_stages": 4}), not inside the attn_out_proj kernel."""
    from fmlm.kernels import adaln, attention  # noqa: PLC0415
    from fmlm.kernels import linear as lin  # noqa: PLC0415

    B, L, D = x.shape
    F = torch.nn.functional
    if gemm_impl not in GEMM_IMPLS:
        raise ValueError(f"gemm_impl must be one of {GEMM_IMPLS}, got {gemm_impl!r}")
    if isinstance(y, _FusedState):
        return _fused_block(x, y, wb, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_w, next_shift, next_scale, cos,
                            sin, n_heads, softcap, in_place, kb, ab, attn_fixed_shift, attn_poly_exp2, attn_kv_split,
                            attn_config)
    if gemm_impl != "cublas" and B * L <= lin.SMALL_ROWS:
        # rotary in the qkv GEMM's epilogue (q and k: the first 2·D columns), then attention without rotation
        d = D // n_heads
        in_gemm = cos is not None and d >= 16 and d & (d - 1) == 0
        qkv = lin.linear(y, wb["wqkv"], backend=kb, rotary=(cos, sin, 2 * D) if in_gemm else None)
        qkv = qkv.view(B, L, 3, n_heads, d)
        rc, rs = (None, None) if in_gemm else (cos, sin)
        if attn_out_proj and B * L <= attention.OUT_PROJ_MAX_ROWS:
            p = attention.softcap_attention_out_proj(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], wb["wout"], softcap,
                                                     rc, rs, backend=ab, fixed_shift=attn_fixed_shift)
        else:
            att = attention.softcap_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softcap, rc, rs, backend=ab,
                                              rotary_impl=rotary_impl, fixed_shift=attn_fixed_shift,
                                              poly_exp2=attn_poly_exp2, kv_split=attn_kv_split,
                                              tile_config=attn_config)
            p = lin.linear_partials(att, wb["wout"], backend=kb)
        x, y = adaln.gate_residual(x, gate_msa, p, wb["norm2"], shift_mlp, scale_mlp, out_dtype=y.dtype,
                                   x_out=x if in_place else None, backend=kb)
        p = lin.linear_partials(lin.linear(y, wb["w0"], wb["b0"], "gelu_tanh", backend=kb), wb["w2"], backend=kb)
        return adaln.gate_residual(x, gate_mlp, p, next_w, next_shift, next_scale, out_dtype=y.dtype,
                                   x_out=x if in_place else None, backend=kb, y_bias=wb["b2"])
    qkv = F.linear(y, wb["wqkv"]).view(B, L, 3, n_heads, D // n_heads)
    att = attention.softcap_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softcap, cos, sin, backend=ab,
                                      rotary_impl=rotary_impl, fixed_shift=attn_fixed_shift,
                                      poly_exp2=attn_poly_exp2, kv_split=attn_kv_split, tile_config=attn_config)
    o = F.linear(att, wb["wout"])
    x, y = adaln.gate_residual(x, gate_msa, o, wb["norm2"], shift_mlp, scale_mlp, out_dtype=y.dtype,
                               x_out=x if in_place else None, backend=kb)
    o = F.linear(_linear_gelu_tanh(y, wb["w0"], wb["b0"]), wb["w2"], wb["b2"])
    return adaln.gate_residual(x, gate_mlp, o, next_w, next_shift, next_scale, out_dtype=y.dtype,
                               x_out=x if in_place else None, backend=kb)


def _fused_block(x, st: _FusedState, wb, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_w, next_shift, next_scale,
                 cos, sin, n_heads: int, softcap, in_place: bool, kb: str, ab: str, attn_fixed_shift: bool,
                 attn_poly_exp2: bool, attn_kv_split: int, attn_config: Optional[dict]):
    """_fast_block with gemm_impl 'triton_fused' (opt-in, unmeasured; at ≤ SMALL_ROWS rows): 5 launches instead of
    7. The qkv GEMM normalizes the previous block's residual stream itself (norm_linear: LayerNorm-modulate in
    its A prologue, rotary in its epilogue), the output projection and the second MLP GEMM add their gated
    result to the stream and leave its row statistics (residual_linear: split-K, the last split of a tile does
    the residual), the first MLP GEMM normalizes again (norm_linear, GELU epilogue); no gate_residual kernel.
    Returns (x', the _FusedState the next block or the trunk's final norm takes)."""
    from fmlm.kernels import attention  # noqa: PLC0415
    from fmlm.kernels import linear as lin  # noqa: PLC0415
    from fmlm.kernels import norm_linear as nl  # noqa: PLC0415

    B, L, D = x.shape
    d = D // n_heads
    in_gemm = cos is not None and d >= 16 and d & (d - 1) == 0
    rot = (cos, sin, 2 * D) if in_gemm else None
    if st.rs is None:          # the trunk's first block: y from adaln_modulate
        qkv = lin.linear(st.y, wb["wqkv"], backend=kb, rotary=rot)
    else:
        qkv = nl.norm_linear(st.rs, *st.norm, wb["wqkv"], rotary=rot, backend=kb)
    qkv = qkv.view(B, L, 3, n_heads, d)
    rc, rs_ = (None, None) if in_gemm else (cos, sin)
    att = attention.softcap_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softcap, rc, rs_, backend=ab,
                                      fixed_shift=attn_fixed_shift, poly_exp2=attn_poly_exp2, kv_split=attn_kv_split,
                                      tile_config=attn_config)
    x_out = x if in_place else torch.empty_like(x)
    rs = nl.residual_linear(att, wb["wout"], None, x, gate_msa, x_out=x_out, sem=st.sem, backend=kb)
    hid = nl.norm_linear(rs, wb["norm2"], shift_mlp, scale_mlp, wb["w0"], wb["b0"], "gelu_tanh", backend=kb)
    rs = nl.residual_linear(hid, wb["w2"], wb["b2"], rs.x, gate_mlp, x_out=rs.x, sem=st.sem, backend=kb)
    return rs.x, _FusedState(st.sem, rs=rs, norm=(next_w, next_shift, next_scale))


def _fast_modulation(model: "FlowLM", tau_s: torch.Tensor, tau_t: Optional[torch.Tensor],
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """All adaLN modulation rows, (B, (6·n_blocks + 2)·D) in `dtype`: c = cond(τ_s, τ_t) in fp32 (as the
    reference), then one GEMM for every block and the final layer. A sampler's times are fixed by its plan,
    so it computes these once per step and weight version instead of ~20 small kernels per call."""
    w = _fast_weights(model, tau_s.device, dtype)
    c = ref.cond_ref(w.cond_p, tau_s, tau_t)
    return torch.nn.functional.linear(c.to(dtype), w.ada_w, w.ada_b)


def _fast_trunk(model: "FlowLM", h: torch.Tensor, tau_s: Optional[torch.Tensor], tau_t: Optional[torch.Tensor],
                dtype: torch.dtype = torch.bfloat16, kernel_backend: str = "auto", attn_backend: str = "auto",
                block_fn=None, mods: Optional[torch.Tensor] = None, rotary_impl: str = "load",
                gemm_impl: str = "cublas", attn_fixed_shift: bool = True, attn_out_proj: bool = False,
                attn_poly_exp2: bool = False, attn_kv_split: int = 1,
                attn_config: Optional[dict] = None) -> torch.Tensor:
    """trunk_ref computed with the fused ops: GEMMs in `dtype` (fp32 accumulate), residual stream fp32,
    LayerNorm/modulate/gate in fp32, softcap attention with rotary fused on load. Returns u in `dtype`.
    block_fn: a replacement for _fast_block (e.g. torch.compile(_fast_block)); kernel_backend/attn_backend
    select the op backends (tests run 'triton' under TRITON_INTERPRET=1 with dtype=float32). mods: the
    precomputed _fast_modulation rows, (B, ·) or (1, ·) broadcast over the batch, instead of the times.
    rotary_impl: how the attention applies rotary (kernels/attention.py softcap_attention). gemm_impl: the
    blocks' GEMMs, 'cublas' or the opt-in 'triton_small' (see _fast_block); attn_fixed_shift, attn_out_proj,
    attn_poly_exp2, attn_kv_split, attn_config: see _fast_block."""
    from fmlm.kernels import adaln  # noqa: PLC0415
    from . import nvtx  # noqa: PLC0415

    cfg = model.cfg
    if h.dim() != 3 or h.shape[-1] != cfg.hidden:
        raise ValueError(f"h must be (B, L, {cfg.hidden}), got {tuple(h.shape)}")
    B, L, D = h.shape
    w = _fast_weights(model, h.device, dtype)
    in_place = block_fn is None       # a compiled block_fn gets functional ops
    block_fn = block_fn or _fast_block
    if mods is None:
        with nvtx.range("cond"):
            mods = _fast_modulation(model, tau_s, tau_t, dtype)
    if mods.dim() != 2 or mods.shape[0] not in (1, B) or mods.shape[1] != (6 * cfg.n_blocks + 2) * D:
        raise ValueError(f"mods must be (B or 1, {(6 * cfg.n_blocks + 2) * D}), got {tuple(mods.shape)}")
    mods = mods.expand(B, -1).view(B, -1, D)      # a (1, ·) row broadcasts with batch stride 0
    cos, sin = w.rope(L)
    nb = cfg.n_blocks
    x = h if h.dtype in (torch.float32, torch.float64) else h.float()
    y = adaln.adaln_modulate(x, w.blocks[0]["norm1"], mods[:, 0], mods[:, 1], out_dtype=dtype,
                             backend=kernel_backend)
    from fmlm.kernels import linear as lin  # noqa: PLC0415
    if gemm_impl == "triton_fused" and B * L <= lin.SMALL_ROWS:
        if x.dtype != torch.float32 or not in_place:
            raise ValueError("gemm_impl 'triton_fused' runs the eager blocks on an fp32 residual stream")
        # split-K tile counters for every residual GEMM of the trunk (each launch leaves them zero): at least one
        # per tile of the smallest tile (16 × 16)
        y = _FusedState(torch.zeros(-(-B * L // 16) * -(-D // 16), device=x.device, dtype=torch.int32), y=y)
    for i, wb in enumerate(w.blocks):
        m = 6 * i
        if i + 1 < nb:
            nxt = (w.blocks[i + 1]["norm1"], mods[:, m + 6], mods[:, m + 7])
        else:
            nxt = (w.final_norm, mods[:, 6 * nb], mods[:, 6 * nb + 1])
        blk_mods = (mods[:, m + 2], mods[:, m + 3], mods[:, m + 4], mods[:, m + 5], *nxt)
        if not in_place:
            # a compiled block specializes on its inputs' storage offsets: views at 13 offsets of one
            # modulation tensor would recompile per block
            blk_mods = tuple(t.contiguous() for t in blk_mods)
        with nvtx.range(f"block{i}"):
            # block 0 must not write into the caller's h; later blocks update their own stream in place
            x, y = block_fn(x, y, wb, *blk_mods, cos, sin, cfg.n_heads, cfg.attn_softcap, in_place and i > 0,
                            kernel_backend, attn_backend, rotary_impl, gemm_impl, attn_fixed_shift, attn_out_proj,
                            attn_poly_exp2, attn_kv_split, *((attn_config,) if attn_config else ()))
    if isinstance(y, _FusedState):      # the final layer's adaLN, which the fused blocks leave to the trunk
        y = adaln.adaln_modulate(y.rs.x, *y.norm, out_dtype=dtype, backend=kernel_backend)
    return y
