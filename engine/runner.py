"""Sampler: the plan, the noise factor and the padded heads computed once; one CUDA graph per batch bucket.

    sampler = fmlm.Sampler(model, batch_size=32, steps=1)       # method='fmlm', renoise=0.0, graph=True
    tokens = sampler.sample(seed=0)                             # (32, L) LongTensor; replays a CUDA graph

The captured region draws ξ from a Philox kernel that reads the seed from a device tensor (so replays
with another seed differ without recapture), forms h0 = ξ·C, runs the trunk and the head for every step
of the plan, and writes the tokens into a static buffer. Nothing in it waits on the host: the plan's
coefficients are Python floats baked into the kernels' arguments, the times live in device tensors, and
every weight copy is made before capture. Batches are padded up to a power-of-two bucket (1, 2, 4, ...);
row i's noise does not depend on the bucket (counter-based streams).

On the CPU (or with graph=False) the same `_run` executes eagerly; on the CPU it draws noise from a torch
Generator in the order `fmlm.sample` does, so `Sampler(...).sample(seed)` equals
`fmlm.sample(..., generator=torch.Generator().manual_seed(seed), backend='torch')` there.
"""
from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import Optional

import torch

from fmlm import kernels
from fmlm.kernels import reference as ref
from . import nvtx
from .model import (_FAST_CACHE, GEMM_IMPLS, _drop_fast_weights, _fast_modulation, _fast_trunk, _version_key,
                    weights_epoch)
from .sampling import Heads, check_method, hidden_noise_factor, make_plan, positive_int

BACKENDS = ("auto", "fast", "reference")


def bucket_for(batch_size: int) -> int:
    """The CUDA-graph batch bucket: the smallest power of two ≥ batch_size."""
    return 1 << (positive_int(batch_size, "batch_size") - 1).bit_length()


@dataclasses.dataclass
class _Slot:
    """Static buffers of one bucket: the state the graph starts from, its times, and the token output."""
    bucket: int
    h: torch.Tensor                         # (bucket, L, D) fp32: h0, written by the seed draw or by the caller
    tau_s: list                             # per step (bucket,) fp32
    tau_t: list                             # per step (bucket,) fp32 or None
    tokens: torch.Tensor                    # (bucket, L) int64
    coef: list                              # per step (a, b, c) as (bucket,) fp32 for flow_map_step, or []
    graphs: dict = dataclasses.field(default_factory=dict)     # from_seed (bool) → CUDAGraph
    keep: list = dataclasses.field(default_factory=list)       # what the graphs read, alive as long as they are


class Sampler:
    """Samples (B, L) token ids from an FMLM (method='fmlm', flow map, optional re-noising) or an FLM
    (method='flm', Euler), replaying one CUDA graph per (batch bucket, steps) on CUDA.

    backend: 'auto' — the fast bf16 trunk and the Triton head ops on CUDA, the reference trunk and the
    chunked head elsewhere; 'fast' / 'reference' force the trunk path. graph: capture CUDA graphs (ignored
    without CUDA: the sampler runs eagerly). compile_blocks: run the fast trunk's blocks through
    torch.compile (off by default; the Triton ops stay opaque custom ops). Weights changed in place or
    replaced (in place, load_state_dict, .to(), a Parameter or submodule assigned anywhere in the model) invalidate
    every graph on the next call; weights written through .data need `fmlm.refresh(model)` (or `refresh()`).
    kernel_options (fast trunk on CUDA; kernel variants that `fmlm bench e2e` times beside the defaults):
    {"rotary_impl": "load" | "prepass" | "prepass_k" | "prepass_tma"} (kernels/attention.py),
    {"argmax_config": {...}} (kernels/logits_argmax.py launcher config, e.g. {"tma": True}),
    {"gemm_impl": "cublas" | "triton_small" | "triton_fused"} (the blocks' GEMMs; engine/model.py _fast_block,
    kernels/linear.py; 'triton_fused': the gate-residual and LayerNorm inside the GEMMs, kernels/norm_linear.py),
    {"attention_fixed_shift": False} (the attention's online softmax; the default, True, drops the running max:
    kernels/attention.py fixed_shift_log2), {"pdl": True} (the Triton trunk and argmax kernels
    launched with programmatic dependent launch on sm_90+: kernels/_backend.py pdl_launches),
    {"attention_out_proj": True} (with gemm_impl 'triton_small', at ≤ 512 rows: the output projection inside the
    attention kernel, kernels/attention.py softcap_attention_out_proj), {"attention_poly_exp2": True} (the
    fixed-shift softmax's 2^x for half the key columns by a polynomial on the FMA pipes instead of the MUFU unit:
    kernels/attention.py POLY_COEFFS), {"attention_kv_split": S} (each query tile's keys in up to S ranges run by
    separate programs, then summed: more programs of shorter key loops at batch 1; kernels/attention.py KV_SPLIT),
    {"pdl_prefetch": True} (with pdl: the Triton GEMMs and the pointer argmax ask L2 for their weights before they
    wait on their predecessor, kernels/_prefetch.py), {"attention_config": {"num_stages": 4, ...}} (tile overrides
    of the attention kernel, kernels/attention.py TILE_KEYS; not with compile_blocks), {"gemm_deep_pipeline": True}
    (with gemm_impl 'triton_small': one operand stage per K step, all of a program's loads in flight at once,
    kernels/_backend.py deep_pipelines)."""

    def __init__(self, model, batch_size: int, steps: int, method: str = "fmlm", renoise: float = 0.0,
                 graph: bool = True, backend: str = "auto", compile_blocks: bool = False,
                 kernel_options: Optional[dict] = None):
        cfg = model.cfg
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._model, self.cfg = model, cfg           # cached_sampler swaps in a weak reference
        self.batch_size = positive_int(batch_size, "batch_size")    # a float is refused, not truncated
        self.plan = make_plan(method, steps, renoise, cfg.vocab_size)
        check_method(method, cfg)
        self.backend = backend
        self.graph = bool(graph)
        self.compile_blocks = bool(compile_blocks)
        self.kernel_options = _check_kernel_options(kernel_options)
        if self.compile_blocks and self.kernel_options.get("attention_config"):
            raise ValueError("kernel option attention_config overrides eager launches: not with compile_blocks")
        if self.compile_blocks and self.kernel_options.get("gemm_impl") == "triton_fused":
            raise ValueError("gemm_impl 'triton_fused' runs eager blocks (its ops are not registered for "
                             "torch.compile): not with compile_blocks")
        self._key = None
        self._slots: dict[int, _Slot] = {}
        self._prepare()

    # -- state that depends on the weights --------------------------------------------------------
    @property
    def model(self):
        m = self._model() if isinstance(self._model, weakref.ref) else self._model
        if m is None:
            raise RuntimeError("the model of this cached Sampler was garbage-collected")
        return m

    @property
    def device(self) -> torch.device:
        return self.model.embed.device

    @property
    def use_graphs(self) -> bool:
        return self.graph and self.device.type == "cuda"

    def _prepare(self):
        """(Re)build everything derived from the weights; drops captured graphs. Runs at init and whenever
        a weight is replaced, moved, cast or updated in place."""
        model, dev = self.model, self.device
        self._sources = [*model.parameters(), *model.buffers()]
        self._key = _version_key(self._sources)
        self._epoch = weights_epoch(model)
        self._slots.clear()
        self._pool = None
        cuda = dev.type == "cuda"
        self.trunk_backend = ("fast" if cuda else "reference") if self.backend == "auto" else self.backend
        self.head_backend = "auto" if cuda else "torch"
        E = model.embed.detach()
        C = hidden_noise_factor(E)                     # float64, D×D
        heads = Heads.from_model(model)
        if self.trunk_backend == "fast":
            # ξ·C in fp16 (10-bit mantissa; |h0| is far below fp16's range for any sane E) on tensor cores:
            # an fp32 GEMM of 32768×768×768 takes ~0.8 ms on an H100, this ~0.06 ms.
            big = float(C.abs().max()) * 8.0 * C.shape[0] ** 0.5 > 6e4
            self.noise_dtype = torch.bfloat16 if big else torch.float16
            self.heads = Heads(heads.weight.to(torch.bfloat16).contiguous(), heads.bias.float().contiguous(),
                               heads.embed.to(torch.bfloat16).contiguous(), heads.n_valid)
        else:
            self.noise_dtype = E.dtype
            self.heads = heads
        self.C = C.to(dev, self.noise_dtype)
        self.state_dtype = torch.float32 if self.trunk_backend == "fast" else E.dtype
        self._mods = []
        if self.trunk_backend == "fast":
            # the plan fixes every step's times, so the conditioning (time MLPs + every adaLN row) is one
            # (1, ·) row per step, broadcast over the batch: ~20 fewer kernels per step in the graph
            with torch.no_grad():
                for ts, tt in zip(self.plan.tau_s, self.plan.tau_t):
                    t1 = torch.full((1,), ts, device=dev, dtype=torch.float32)
                    t2 = None if tt is None else torch.full((1,), tt, device=dev, dtype=torch.float32)
                    self._mods.append(_fast_modulation(model, t1, t2, torch.bfloat16))
        self._seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self._flow_map_step = None
        if self.head_backend != "torch":
            from fmlm.kernels import flow_map_step  # noqa: PLC0415
            self._flow_map_step = flow_map_step

    def _weights_unchanged(self) -> bool:
        return _version_key(self._sources) == self._key and weights_epoch(self.model) == self._epoch

    def _check_weights(self):
        if not self._weights_unchanged():
            self._prepare()

    def refresh(self) -> "Sampler":
        """Rebuild everything from the model's current weights and drop the captured graphs now. In-place
        updates, load_state_dict (assign=True too), .to(), dtype casts and Parameters, buffers or submodules assigned
        in the model are detected on every call; weights written through .data are not: call this, or
        `fmlm.refresh(model)` (which reaches every Sampler of the model, and fmlm.sample's caches)."""
        _drop_fast_weights(self.model)
        self._prepare()
        return self

    def _slot(self, bucket: int) -> _Slot:
        if bucket not in self._slots:
            cfg, dev, dt = self.cfg, self.device, self.state_dtype
            tdt = torch.float32 if self.trunk_backend == "fast" else dt

            def times(v, dtype=tdt):
                return None if v is None else torch.full((bucket,), v, device=dev, dtype=dtype)

            p = self.plan
            coef = [] if self._flow_map_step is None else [
                tuple(times(v, torch.float32) for v in abc) for abc in zip(p.a, p.b, p.c)]
            self._slots[bucket] = _Slot(
                bucket, torch.zeros(bucket, cfg.seq_len, cfg.hidden, device=dev, dtype=dt),
                [times(v) for v in p.tau_s], [times(v) for v in p.tau_t],
                torch.zeros(bucket, cfg.seq_len, device=dev, dtype=torch.int64), coef)
        return self._slots[bucket]

    # -- the sampling loop (eager, and the body of every captured graph) ---------------------------
    def _noise(self, n: int, stream: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """ε'·E for stream `stream`: ξ·C with ξ ~ N(0, I) of shape (n, L, D)."""
        cfg = self.cfg
        shape = (n, cfg.seq_len, cfg.hidden)
        if generator is not None:        # CPU: fmlm.sample's draw, op for op
            return torch.randn(shape, generator=generator, device=self.device, dtype=self.noise_dtype) @ self.C
        xi = kernels_randn().randn_philox(shape, self._seed, stream, dtype=self.noise_dtype)
        return (xi.view(-1, cfg.hidden) @ self.C).view(shape)

    @torch.no_grad()
    def _run(self, slot: _Slot, from_seed: bool, generator: Optional[torch.Generator] = None,
             n: Optional[int] = None) -> None:
        from fmlm.kernels._backend import deep_pipelines, pdl_launches  # noqa: PLC0415

        opts = self.kernel_options
        with pdl_launches(opts.get("pdl", False), opts.get("pdl_prefetch", False)), \
                deep_pipelines(opts.get("gemm_deep_pipeline", False)):
            self._run_steps(slot, from_seed, generator, n)

    def _run_steps(self, slot: _Slot, from_seed: bool, generator: Optional[torch.Generator],
                   n: Optional[int]) -> None:
        plan, heads = self.plan, self.heads
        n = n or slot.bucket
        h = slot.h[:n]
        if from_seed:
            with nvtx.range("embed"):
                h.copy_(self._noise(n, 0, generator))
        for k in range(plan.steps):
            with nvtx.range(f"step{k}"):
                tt = slot.tau_t[k]
                u = self._trunk(h, k, slot.tau_s[k][:n], None if tt is None else tt[:n])
                with nvtx.range("head"):
                    if k == plan.steps - 1:
                        slot.tokens[:n].copy_(kernels.logits_argmax(
                            u, heads.weight, heads.bias, heads.n_valid, backend=self.head_backend,
                            config=self.kernel_options.get("argmax_config")))
                        return
                    noise = self._noise(n, k + 1, generator).to(h.dtype) if plan.c[k] else None
                    h = self._update(u, h, k, noise, [t[:n] for t in slot.coef[k]] if slot.coef else None)
        raise AssertionError("unreachable")

    def _trunk(self, h, k: int, tau_s, tau_t):
        if self.trunk_backend == "fast":
            block_fn = _compiled_block() if self.compile_blocks else None
            return _fast_trunk(self.model, h, None, None, torch.bfloat16, block_fn=block_fn, mods=self._mods[k],
                               rotary_impl=self.kernel_options.get("rotary_impl", "load"),
                               gemm_impl=self.kernel_options.get("gemm_impl", "cublas"),
                               attn_fixed_shift=self.kernel_options.get("attention_fixed_shift", True),
                               attn_out_proj=self.kernel_options.get("attention_out_proj", False),
                               attn_poly_exp2=self.kernel_options.get("attention_poly_exp2", False),
                               attn_kv_split=self.kernel_options.get("attention_kv_split", 1),
                               attn_config=self.kernel_options.get("attention_config"))
        return self.model.trunk(h, tau_s, tau_t, backend=self.trunk_backend)

    def _update(self, u, h, k: int, noise, coef):
        """h_next = a·h + b·(D·E) [+ c·noise]: one fused flow_map_step when the head ops provide it."""
        plan, heads = self.plan, self.heads
        if coef is not None:
            a, b, c = coef
            out = self._flow_map_step(u, heads.weight, heads.bias, heads.embed, h, a, b,
                                      c if noise is not None else None, noise, cap=self.cfg.logit_cap,
                                      n_valid=heads.n_valid, backend=self.head_backend)
            return out[0] if isinstance(out, tuple) else out
        de, _ = kernels.vocab_attention(u, heads.weight, heads.bias, heads.embed, self.cfg.logit_cap, heads.n_valid,
                                        backend=self.head_backend)
        h = plan.a[k] * h + plan.b[k] * de.to(h.dtype)     # the order of fmlm.sample's update, op for op
        if noise is not None:
            h = h + plan.c[k] * noise
        return h

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def _capture(self, slot: _Slot, from_seed: bool) -> "torch.cuda.CUDAGraph":
        dev = self.device
        cur = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(cur)
        # warm-up off the capture: Triton JIT, cuBLAS handles and workspaces, the fast trunk's weight copies
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(slot, from_seed)
        cur.wait_stream(side)
        # sample() replays a graph before it checks the weights, so a stale graph can run once after they changed.
        # By then another Sampler of the model (or a direct fast-trunk call) may have rebuilt the model's fast
        # weight copies, and a cast or move replaced the parameters' storage: the slot holds everything the
        # graph reads (the parameters' tensors, the fast copies) so that the stale replay never reads freed memory
        slot.keep = self._graph_reads()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        # Graphs share one pool: every output goes to the slot's static buffers, so no graph's memory is
        # live across another's replay (replays are serialized on the current stream).
        # capture on our side stream: the default capture stream is made once, on whichever device was current then
        with torch.cuda.graph(g, pool=self._pool, stream=side):
            self._run(slot, from_seed)
        return g

    def _graph_reads(self) -> list:
        """The weights' tensors (their current storage) and the model's fast-path weight copies: what a graph
        captured now reads besides the slot's own buffers."""
        return [*(t.detach() for t in self._sources), *_FAST_CACHE.get(self.model, {}).values()]

    def warmup(self, batch_sizes=None, from_seed: bool = True) -> "Sampler":
        """Capture the graphs of these batch sizes' buckets now (default: the constructor's batch_size)."""
        self._check_weights()
        if self.use_graphs:
            with torch.cuda.device(self.device):
                for B in batch_sizes or [self.batch_size]:
                    slot = self._slot(bucket_for(B))
                    if from_seed not in slot.graphs:
                        slot.graphs[from_seed] = self._capture(slot, from_seed)
        return self

    # -- public --------------------------------------------------------------------------------------
    def sample(self, seed: int = 0, batch_size: Optional[int] = None, h0: Optional[torch.Tensor] = None,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids (B, L), int64, on the model's device. Same seed → same tokens (eager or replay).

        h0: optional initial hidden state (B, L, D) (= z0·E) instead of the seeded draw; noise: optional
        V-space z0 (B, L, V), projected to h0 (parity with the reference sampler on the same z0, without
        re-noising)."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):    # streams, graphs and replays on the model's GPU, not the current
                return self._sample(seed, batch_size, h0, noise)
        return self._sample(seed, batch_size, h0, noise)

    def _sample(self, seed, batch_size, h0, noise) -> torch.Tensor:
        if noise is not None:
            if h0 is not None:
                raise ValueError("give h0 or noise, not both")
            if any(self.plan.c):
                # the reference re-noises with V-space ε' from its generator; this Sampler draws ξ·C from the seed
                raise ValueError("noise (the reference's z0) with re-noising would not give the reference's tokens: "
                                 "the re-noising draws differ; use fmlm.sample(..., noise=z0, generator=g, "
                                 "backend='torch')")
            V = self.cfg.vocab_size
            if noise.dim() != 3 or noise.shape[1:] != (self.cfg.seq_len, V):
                raise ValueError(f"noise must be (B, {self.cfg.seq_len}, {V}), got {tuple(noise.shape)}")
            E = self.model.embed.detach()
            h0 = ref.embed_ref({"vocab_embed.embedding": E}, noise.to(E.device, E.dtype))
        if h0 is not None:
            if h0.dim() != 3 or h0.shape[1:] != (self.cfg.seq_len, self.cfg.hidden):
                raise ValueError(f"h0 must be (B, {self.cfg.seq_len}, {self.cfg.hidden}), got {tuple(h0.shape)}")
            if batch_size is not None and batch_size != h0.shape[0]:
                raise ValueError(f"batch_size {batch_size} disagrees with the batch of "
                                 f"{'noise' if noise is not None else 'h0'} ({h0.shape[0]})")
            batch_size = h0.shape[0]
        B = self.batch_size if batch_size is None else batch_size
        bucket = bucket_for(B)
        if isinstance(seed, bool):
            raise TypeError("seed must be an int, got a bool")
        seed = operator.index(seed)         # an int (or numpy/0-d integer tensor); a float is refused, not truncated
        from_seed = h0 is None
        if self.use_graphs:
            slot = self._slots.get(bucket)
            graph = None if slot is None else slot.graphs.get(from_seed)
            if graph is not None:
                # the common case: replay first, then check the weights on the host while the device runs it
                # (walking ~135 tensors' versions took ~45 µs of Python, which at batch 1 the device would
                # otherwise wait for); tokens are returned only if the weights were the captured ones
                self._feed(slot, seed, h0, B)
                graph.replay()
                if self._weights_unchanged():
                    return slot.tokens[:B].clone()
                # the stale replay ends before its graph and pool are dropped (on the device it was captured on,
                # which a model.to() may have left)
                if slot.tokens.is_cuda:
                    torch.cuda.synchronize(slot.tokens.device)
        self._check_weights()
        if self.device.type != "cuda":
            # eager on the host, exact batch: fmlm.sample's generator order (h0 draw, then each re-noise)
            slot = self._slot(bucket)
            if h0 is not None:
                slot.h[:B].copy_(h0)
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._run(slot, from_seed, generator=g, n=B)
            return slot.tokens[:B].clone()
        slot = self._slot(bucket)
        self._feed(slot, seed, h0, B)
        if not self.use_graphs:
            self._run(slot, from_seed)
            return slot.tokens[:B].clone()
        if from_seed not in slot.graphs:
            slot.graphs[from_seed] = self._capture(slot, from_seed)   # reads slot.h, never writes it (h0 mode)
        slot.graphs[from_seed].replay()
        return slot.tokens[:B].clone()

    def _feed(self, slot: _Slot, seed: int, h0: Optional[torch.Tensor], B: int) -> None:
        """A call's inputs into the static buffers the graphs read: the seed, and h0 (padded rows zeroed)."""
        self._seed.fill_(seed)
        if h0 is not None:
            slot.h[:B].copy_(h0)
            if B < slot.bucket:
                slot.h[B:].zero_()        # padded rows: finite values, results discarded

    def __call__(self, seed: int = 0, batch_size: Optional[int] = None) -> torch.Tensor:
        return self.sample(seed, batch_size)

    def __repr__(self):
        p = self.plan
        return (f"Sampler(method={p.method!r}, steps={p.steps}, renoise={p.renoise}, batch_size={self.batch_size}, "
                f"device={self.device}, graphs={self.use_graphs}, trunk={self.trunk_backend}"
                + (f", kernel_options={self.kernel_options}" if self.kernel_options else "") + ")")


KERNEL_OPTIONS = {"rotary_impl": ("load", "prepass", "prepass_k", "prepass_tma"), "argmax_config": dict,
                  "gemm_impl": GEMM_IMPLS, "pdl": bool, "attention_fixed_shift": bool, "attention_out_proj": bool,
                  "attention_poly_exp2": bool, "attention_kv_split": int, "pdl_prefetch": bool,
                  "attention_config": dict, "gemm_deep_pipeline": bool}


def _check_kernel_options(opts: Optional[dict]) -> dict:
    opts = dict(opts or {})
    for k, v in opts.items():
        if k not in KERNEL_OPTIONS:
            raise ValueError(f"unknown kernel option {k!r}; known: {sorted(KERNEL_OPTIONS)}")
        allowed = KERNEL_OPTIONS[k]
        if isinstance(allowed, tuple) and v not in allowed:
            raise ValueError(f"kernel option {k} must be one of {allowed}, got {v!r}")
        if isinstance(allowed, type) and (not isinstance(v, allowed) or (allowed is int and isinstance(v, bool))):
            raise ValueError(f"kernel option {k} must be a {allowed.__name__}, got {type(v).__name__}")
    if "attention_config" in opts:
        from fmlm.kernels.attention import check_tile_config  # noqa: PLC0415
        try:
            opts["attention_config"] = check_tile_config(opts["attention_config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"kernel option attention_config: {e}") from None
    if opts.get("gemm_deep_pipeline") and opts.get("gemm_impl") not in ("triton_small", "triton_fused"):
        raise ValueError("kernel option gemm_deep_pipeline deepens the Triton GEMMs' operand pipelines: it needs "
                         "gemm_impl 'triton_small' or 'triton_fused'")
    if opts.get("gemm_impl") == "triton_fused" and opts.get("attention_out_proj"):
        raise ValueError("kernel option attention_out_proj (the projection in the attention kernel) is not part of "
                         "gemm_impl 'triton_fused', whose projection GEMM does the residual")
    if opts.get("pdl_prefetch") and not opts.get("pdl"):
        raise ValueError("kernel option pdl_prefetch prefetches weights before the programmatic-dependent-launch wait: "
                         "it needs pdl=True")
    if opts.get("attention_kv_split", 1) < 1:
        raise ValueError(f"kernel option attention_kv_split must be ≥ 1, got {opts['attention_kv_split']}")
    if ((opts.get("attention_poly_exp2") or opts.get("attention_kv_split", 1) > 1)
            and (not opts.get("attention_fixed_shift", True) or opts.get("rotary_impl") == "prepass_tma")):
        raise ValueError("kernel options attention_poly_exp2 and attention_kv_split are the fixed-shift softmax's: "
                         "they need attention_fixed_shift (the default) and a rotary_impl other than 'prepass_tma'")
    return opts


_COMPILED = []


def _compiled_block():
    if not _COMPILED:
        from .model import _fast_block  # noqa: PLC0415
        _COMPILED.append(torch.compile(_fast_block, dynamic=False))
    return _COMPILED[0]


def kernels_randn():
    from fmlm.kernels import randn  # noqa: PLC0415 (imports triton lazily)
    return randn


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_sampler(model, batch_size: int, steps: int, method: str = "fmlm", renoise: float = 0.0,
                   graph: bool = True) -> Sampler:
    """One Sampler per (model, steps, method, renoise, graph), kept while the model lives: what
    `fmlm.sample` on CUDA should call so repeated calls replay captured graphs. Larger batches share it
    (buckets are per call). The cached Sampler holds its model weakly (a strong reference from the cache's value
    to its key would keep every sampled model, its graphs and weight copies alive for the whole process)."""
    per = _CACHE.setdefault(model, {})
    key = (int(steps), method, float(renoise), bool(graph))
    s = per.get(key)
    if s is None:
        s = per[key] = Sampler(model, batch_size, steps, method, renoise, graph)
        s._model = weakref.ref(model)
    return s
