"""Sampler (engine/runner.py) and the fast trunk (FlowLM.trunk(backend='fast'), engine/model.py).

CPU: bucketing, the plan, eager sampling == fmlm.sample(backend='torch') on the same seed, the h0 / parity
entry points, invalidation on weight change, the device-seed path, the fast trunk against trunk_ref (fp32
with the Triton kernels under TRITON_INTERPRET=1; bf16 with the torch ops). GPU (make gpu-check): graph
replay == eager, no host sync in the captured region, the bf16 fast trunk within its error budget."""
import importlib
import os
from pathlib import Path

import pytest
import torch

import fmlm
from fmlm.engine import model as model_mod
from fmlm.engine import nvtx, runner, sampling
from fmlm.engine.runner import Sampler, bucket_for, cached_sampler
from fmlm.kernels import attention
from fmlm.kernels import adaln
from fmlm.kernels import linear as lin
from fmlm.kernels import _cuda
from fmlm.kernels import reference as ref
from fmlm.kernels._backend import interpreting, triton_available
from kernel_test_utils import LaunchArgs, capture

nl = importlib.import_module("fmlm.kernels.norm_linear")


def _model(two_time=True, device="cpu", seed=0, **kw):
    cfg = fmlm.ModelConfig(**{**dict(vocab_size=131, seq_len=9, hidden=32, n_blocks=2, n_heads=4, cond_dim=16,
                                     two_time=two_time), **kw})
    m = fmlm.FlowLM(cfg)
    m.reset_parameters(seed=seed)
    return m.to(device).eval()


# ---------------------------------------------------------------------------------------------
# CPU: plan, buckets, eager sampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (32, 32), (33, 64), (64, 64), (65, 128),
                                      (512, 512), (513, 1024)])
def test_bucket_for(B, bucket):
    assert bucket_for(B) == bucket


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bucket_for_rejects(bad):
    with pytest.raises(ValueError):
        bucket_for(bad)


def test_sampler_plan_and_validation():
    m = _model()
    s = Sampler(m, 3, 4, renoise=0.5)
    assert s.plan == sampling.make_plan("fmlm", 4, 0.5, m.cfg.vocab_size)
    assert not s.use_graphs and s.trunk_backend == "reference"
    assert s.C.shape == (32, 32)
    torch.testing.assert_close(s.C.double().T @ s.C.double(), m.embed.double().T @ m.embed.double(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        Sampler(_model(two_time=False), 2, 1, method="fmlm")
    with pytest.raises(ValueError):
        Sampler(m, 2, 0)
    with pytest.raises(ValueError):
        Sampler(m, 2, 1, backend="cuda")
    with pytest.raises(ValueError):
        s.sample(0, h0=torch.randn(2, 9, 31))


@pytest.mark.parametrize("method,steps,renoise", [("fmlm", 1, 0.0), ("fmlm", 3, 0.0), ("fmlm", 3, 0.8),
                                                  ("flm", 2, 0.0)])
def test_eager_equals_fmlm_sample(method, steps, renoise):
    m = _model(two_time=method == "fmlm")
    s = Sampler(m, 3, steps, method=method, renoise=renoise, graph=True)    # graph=True falls back on CPU
    for seed in (0, 7):
        want = fmlm.sample(m, 3, steps, method, renoise, generator=torch.Generator().manual_seed(seed),
                           backend="torch")
        got = s.sample(seed)
        assert got.dtype == torch.int64 and got.shape == (3, 9)
        assert torch.equal(got, want)


def test_seeds_and_batch_sizes():
    m = _model()
    s = Sampler(m, 4, 2, renoise=0.5)
    a, b, c = s.sample(1), s.sample(1), s.sample(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert s.sample(1, batch_size=3).shape == (3, 9) and s(1).shape == (4, 9)


def test_from_h0_equals_sample_hidden():
    m = _model()
    plan = sampling.make_plan("fmlm", 3, 0.0, m.cfg.vocab_size)
    h0 = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    want = sampling.sample_hidden(m, plan, h0, sampling.Heads.from_model(m), backend="torch")
    assert torch.equal(Sampler(m, 2, 3).sample(0, h0=h0), want)


def test_parity_mode_matches_reference_sampler():
    """Given the reference's V-space z0, the engine returns the reference's tokens (fp64: no ties broken
    differently by rounding)."""
    m = _model().double()
    z0 = torch.randn(2, 9, 131, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for steps in (1, 3):
        want = fmlm.sample(m, 2, steps, "fmlm", 0.0, noise=z0, backend="reference")
        assert torch.equal(Sampler(m, 2, steps).sample(0, noise=z0), want)


def test_weight_change_invalidates():
    m = _model()
    s = Sampler(m, 3, 1)
    before = s.sample(0)
    key = s._key
    with torch.no_grad():
        m.output_layer.linear.bias.copy_(torch.randn(131, generator=torch.Generator().manual_seed(9)))
    after = s.sample(0)
    assert s._key != key
    want = fmlm.sample(m, 3, 1, generator=torch.Generator().manual_seed(0), backend="torch")
    assert torch.equal(after, want) and not torch.equal(after, before)
    m.double()                                   # a dtype change replaces every tensor's data
    assert s.sample(0).shape == (3, 9) and s.C.dtype == torch.float64
    m.float()
    m.output_layer.linear.bias = torch.nn.Parameter(m.output_layer.linear.bias.detach() + 1.0)
    want = fmlm.sample(m, 3, 1, generator=torch.Generator().manual_seed(0), backend="torch")
    assert torch.equal(s.sample(0), want)        # a swapped Parameter object: seen without refresh()


def test_graph_fast_path_checks_weights_after_the_replay(monkeypatch):
    """With a captured graph, sample() replays first and checks the weights on the host afterwards: unchanged
    weights return the replay's tokens without the pre-replay check; changed weights discard the stale result and
    the graph and take the full path (on the CPU here, with a stand-in graph that records its replays)."""
    m = _model()
    s = Sampler(m, 2, 1)
    monkeypatch.setattr(Sampler, "use_graphs", property(lambda self: True))
    slot = s._slot(2)
    replays, checks = [], []

    class StandIn:
        def replay(self):
            replays.append(1)
            slot.tokens.fill_(7)
    slot.graphs[True] = StandIn()
    check = Sampler._check_weights
    monkeypatch.setattr(Sampler, "_check_weights", lambda self: checks.append(1) or check(self))
    assert torch.equal(s.sample(0), torch.full((2, 9), 7)) and replays == [1] and checks == []
    with torch.no_grad():
        m.output_layer.linear.bias.add_(1.0)
    out = s.sample(0)
    assert replays == [1, 1] and checks == [1] and s._slots[2] is not slot      # the old graph and slot are gone
    assert torch.equal(out, fmlm.sample(m, 2, 1, generator=torch.Generator().manual_seed(0), backend="torch"))


def test_graph_reads_outlive_a_weight_change():
    """What a captured graph reads (kept on its slot by _capture) survives the change that makes the graph stale:
    sample() replays before it checks the weights, so that replay must find the old storage, not freed memory
    (here: a dtype cast replaces every parameter's storage; the model's fast-weight copies are kept as well)."""
    import gc

    from fmlm.engine.model import _FAST_CACHE

    m = _model()
    s = Sampler(m, 2, 1)
    sentinel = object()
    _FAST_CACHE.setdefault(m, {})[("cuda:0", torch.bfloat16)] = sentinel
    keep = s._graph_reads()
    before = [(t.data_ptr(), t.clone()) for t in keep if isinstance(t, torch.Tensor)]
    assert len(before) == len([*m.parameters(), *m.buffers()]) and any(x is sentinel for x in keep)
    m.double()
    _FAST_CACHE.pop(m, None)
    gc.collect()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    for t, (ptr, old) in zip((t for t in keep if isinstance(t, torch.Tensor)), before):
        assert t.data_ptr() == ptr and torch.equal(t, old)


def test_device_seed_path_is_deterministic_and_state_path_agrees():
    """The graph body on the host: the seeded draw (randn_philox) then the steps; running the steps from the
    drawn state gives the same tokens (the two graphs a bucket can hold)."""
    m = _model()
    s = Sampler(m, 3, 2, renoise=0.5)
    slot = s._slot(4)
    s._seed.fill_(11)
    s._run(slot, True)
    t1, h_drawn = slot.tokens.clone(), slot.h.clone()
    s._run(slot, True)
    assert torch.equal(slot.tokens, t1) and torch.equal(slot.h, h_drawn)
    s._run(slot, False)
    assert torch.equal(slot.tokens, t1)
    s._seed.fill_(12)
    s._run(slot, True)
    assert not torch.equal(slot.h, h_drawn)


def test_cached_sampler_reused():
    m = _model()
    a = cached_sampler(m, 2, 1)
    assert cached_sampler(m, 8, 1) is a and cached_sampler(m, 2, 2) is not a


def test_cached_sampler_does_not_keep_its_model_alive():
    """fmlm.sample's cache dies with the model (its Sampler holds the model weakly); a Sampler made directly keeps
    its model, as a drop-in sampler over a freshly loaded model must."""
    import gc
    import weakref

    m = _model()
    cached_sampler(m, 2, 1).sample(0)
    ref_m = weakref.ref(m)
    del m
    gc.collect()
    assert ref_m() is None
    s = Sampler(_model(), 2, 1)
    gc.collect()
    assert s.sample(0).shape == (2, 9)


def test_nvtx_ranges_are_no_ops_here():
    with nvtx.range("x"):
        with nvtx.record_functions():
            with nvtx.range("y"):
                pass
    assert nvtx.backend() in ("nvtx", "torch", "none")


# ---------------------------------------------------------------------------------------------
# randn_philox: the graph-safe noise source
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_randn_philox_streams_prefixes_and_moments():
    from fmlm.kernels.randn import randn_philox

    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    seed = torch.tensor([123], dtype=torch.int64, device=dev)
    a = randn_philox((3, 1000), seed, 0, backend="triton")
    assert torch.equal(a, randn_philox((3, 1000), seed, 0, backend="triton"))
    assert torch.equal(randn_philox((2, 1000), seed, 0, backend="triton"), a[:2])     # bucket-independent rows
    c = randn_philox((3, 1000), seed, 1, backend="triton")
    seed.fill_(124)                                       # a device-side reseed, as sample(seed) does
    d = randn_philox((3, 1000), seed, 0, backend="triton")
    for x in (a, c, d):
        assert abs(x.mean().item()) < 0.06 and abs(x.std().item() - 1) < 0.05    # 3000 draws: ~4σ bounds
    assert abs(torch.corrcoef(torch.stack([a.flatten(), c.flatten(), d.flatten()]))[0, 1:]).max() < 0.08
    h = randn_philox((64,), seed, 2, dtype=torch.float16, backend="triton")
    assert h.dtype == torch.float16 and torch.isfinite(h).all()


@pytest.mark.skipif(not triton_available() or interpreting(), reason="compile-only check needs the compiling triton")
def test_randn_philox_compiles_for_sm90():
    import triton
    from triton.backends.compiler import GPUTarget

    from fmlm.kernels.randn import compile_specs

    sp = compile_specs()[0]
    k = triton.compile(triton.compiler.ASTSource(sp["fn"], sp["signature"], sp["constexprs"]),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=sp["num_warps"]))
    assert "ld.global" in k.asm["ptx"]          # the seed is read from device memory, not baked in


def test_randn_philox_cpu_fallback_and_validation():
    from fmlm.kernels.randn import randn_philox

    seed = torch.tensor([5], dtype=torch.int64)
    a = randn_philox((4, 8), seed, 3, backend="torch")
    assert torch.equal(a, randn_philox((4, 8), seed, 3, backend="torch"))
    assert not torch.equal(a, randn_philox((4, 8), seed, 4, backend="torch"))
    with pytest.raises(ValueError):
        randn_philox((2,), torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError):
        randn_philox((2,), seed, -1)


# ---------------------------------------------------------------------------------------------
# The fast trunk
# ---------------------------------------------------------------------------------------------
def _trunk_inputs(m, B, L, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, m.cfg.hidden, generator=g).to(device, dtype)
    return h, torch.rand(B, generator=g).to(device, dtype), torch.rand(B, generator=g).to(device, dtype)


def _assert_budget(out, reference, truth, floor_rel):
    err = (out.double() - truth).abs().max().item()
    ref_err = (reference.double() - truth).abs().max().item()
    floor = floor_rel * truth.abs().max().item()
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2·{ref_err:.3g} + {floor:.3g}"


TRUNK_KERNELS = {"gemm": (lin, "_linear_kernel"), "attn": (attention, "_softcap_attention_fwd_kernel"),
                 "attn_tma": (attention, "_softcap_attention_tma_fwd_kernel"),
                 "rotary_qk": (attention, "_rotary_qk_fwd_kernel"), "resid": (nl, "_residual_linear_kernel"),
                 "norm": (nl, "_norm_linear_kernel"), "adaln": (adaln, "_gate_residual_adaln_kernel")}

# each kernel option of the fast trunk → the kernel launches (short name, constexprs) that show its path ran
_ROPE_GEMM, _SPLIT_K = ("gemm", dict(ROTARY=True)), ("gemm", dict(PARTIAL=True))
TRUNK_VARIANTS = [
    (dict(), [("attn", dict(ROTARY_Q=True, ROTARY_K=True, FIXED_SHIFT=True))]),
    (dict(rotary_impl="prepass"), [("rotary_qk", {}), ("attn", dict(ROTARY_Q=False, ROTARY_K=False))]),
    (dict(rotary_impl="prepass_tma"), [("rotary_qk", {}), ("attn_tma", {})]),
    (dict(gemm_impl="triton_small"), [_ROPE_GEMM, _SPLIT_K, ("attn", dict(ROTARY_Q=False, ROTARY_K=False))]),
    (dict(attn_fixed_shift=False), [("attn", dict(FIXED_SHIFT=False))]),
    (dict(gemm_impl="triton_small", attn_fixed_shift=False), [_ROPE_GEMM, _SPLIT_K, ("attn", dict(FIXED_SHIFT=False))]),
    (dict(gemm_impl="triton_small", attn_out_proj=True), [_ROPE_GEMM, _SPLIT_K, ("attn", dict(OUT_PROJ=True))]),
    (dict(attn_poly_exp2=True), [("attn", dict(ROTARY_Q=True, FIXED_SHIFT=True, POLY_EXP2=5))]),
    (dict(attn_kv_split=3), [("attn", dict(ROTARY_Q=True, FIXED_SHIFT=True, KV_SPLIT=True))]),
    (dict(attn_poly_exp2=True, rotary_impl="prepass"),
     [("rotary_qk", {}), ("attn", dict(ROTARY_Q=False, FIXED_SHIFT=True, POLY_EXP2=5))]),
    (dict(gemm_impl="triton_small", attn_out_proj=True, attn_fixed_shift=False),
     [_ROPE_GEMM, _SPLIT_K, ("attn", dict(OUT_PROJ=True, FIXED_SHIFT=False))]),
    # the attention's tile overrides (kernel option attention_config) reach its launch, with each rotary path
    (dict(attn_config={"BLOCK_N": 32, "num_stages": 2}),
     [("attn", dict(ROTARY_Q=True, FIXED_SHIFT=True, BLOCK_N=32, num_stages=2))]),
    (dict(attn_config={"BLOCK_N": 32}, rotary_impl="prepass"), [("rotary_qk", {}), ("attn", dict(BLOCK_N=32))]),
    (dict(attn_config={"BLOCK_N": 32}, gemm_impl="triton_small"), [_ROPE_GEMM, ("attn", dict(BLOCK_N=32))]),
    # the residual and LayerNorm inside the GEMMs: the qkv GEMM with rotary in its epilogue (first block), the
    # LayerNorm-prologue GEMMs with rotary and GELU, the residual GEMMs with and without the bias
    (dict(gemm_impl="triton_fused"),
     [_ROPE_GEMM, ("norm", dict(ROTARY=True)), ("norm", dict(ACT=1)), ("resid", dict(HAS_BIAS=True)),
      ("resid", dict(HAS_BIAS=False)), ("attn", dict(ROTARY_Q=False, FIXED_SHIFT=True))]),
]


@pytest.mark.skipif(not (triton_available() and interpreting()), reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("L", [1, 7, 33])
def test_fast_trunk_fp32_triton_matches_trunk_ref(monkeypatch, L):
    """The fast trunk with the Triton kernels, by default and with each opt-in kernel option (Sampler
    kernel_options), within the budget of trunk_ref; launch spies prove each option's kernel variant ran: the
    default path computes the same trunk, so an option dropped on the way would meet the budget too."""
    m = _model(hidden=64, n_heads=2, seq_len=L, n_blocks=2)
    h, ts, tt = _trunk_inputs(m, 2, L)
    truth = m.double().trunk(h.double(), ts.double(), tt.double(), backend="reference")
    m.float()
    reference = m.trunk(h, ts, tt, backend="reference")
    spies = {name: LaunchArgs(getattr(mod, attr)) for name, (mod, attr) in TRUNK_KERNELS.items()}
    for name, (mod, attr) in TRUNK_KERNELS.items():
        monkeypatch.setattr(mod, attr, spies[name])
    for kw, want in TRUNK_VARIANTS:
        for spy in spies.values():
            spy.launches.clear()
        out = model_mod._fast_trunk(m, h, ts, tt, torch.float32, kernel_backend="triton", attn_backend="triton", **kw)
        assert out.dtype == torch.float32 and out.shape == h.shape
        _assert_budget(out, reference, truth, 1e-6)
        for name, flags in want:
            if flags.get("KV_SPLIT") and L <= 16:      # one key tile (BLOCK_N 16 under the interpreter): no split
                flags = {**flags, "KV_SPLIT": False}
            assert any(all(launch.get(k, False) == v for k, v in flags.items()) for launch in spies[name].launches), \
                (kw, name, flags, spies[name].launches)


@pytest.mark.skipif(not (triton_available() and interpreting()),
                    reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
def test_fused_trunk_runs_five_kernels_per_block(monkeypatch):
    """gemm_impl 'triton_fused': per block the qkv GEMM (the first block's from the adaLN output, later ones with
    the LayerNorm in their prologue), the attention, two residual GEMMs and the first MLP GEMM with the LayerNorm
    prologue; gate_residual only for the trunk's first and final adaLN; split-K counters back to zero, and the
    same trunk bit for bit on a second call."""
    m = _model(hidden=64, n_heads=2, seq_len=7, n_blocks=3)
    h, ts, tt = _trunk_inputs(m, 2, 7)
    spies = {name: LaunchArgs(getattr(mod, attr)) for name, (mod, attr) in TRUNK_KERNELS.items()}
    for name, (mod, attr) in TRUNK_KERNELS.items():
        monkeypatch.setattr(mod, attr, spies[name])
    sems = []
    zeros = torch.zeros
    monkeypatch.setattr(model_mod.torch, "zeros", lambda *a, **k: sems.append(zeros(*a, **k)) or sems[-1])
    kw = dict(kernel_backend="triton", attn_backend="triton", gemm_impl="triton_fused")
    out = model_mod._fast_trunk(m, h, ts, tt, torch.float32, **kw)
    counts = {name: len(spy.launches) for name, spy in spies.items()}
    assert counts == {"gemm": 1, "attn": 3, "attn_tma": 0, "rotary_qk": 0, "resid": 6, "norm": 5, "adaln": 2}, counts
    assert all(not launch["HAS_RESIDUAL"] for launch in spies["adaln"].launches)
    assert len(sems) == 1 and sems[0].dtype == torch.int32 and int(sems[0].abs().sum()) == 0
    assert torch.equal(model_mod._fast_trunk(m, h, ts, tt, torch.float32, **kw), out)


@pytest.mark.skipif(not (triton_available() and interpreting()), reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")   # the ops' resolve()
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside torch
@pytest.mark.parametrize("out_proj", [False, True], ids=["", "attn_out_proj"])
def test_compiled_block_with_triton_small_gemms(out_proj):
    """torch.compile of the block with gemm_impl='triton_small': the Triton ops (linear with the rotary epilogue,
    split-K partials, gate_residual summing them; with attn_out_proj the attention writing the projection's
    per-head partials) reach the compiled graph as registered custom ops (read off the graphs handed to
    inductor) and give the eager trunk's values exactly."""
    from torch._inductor.compile_fx import compile_fx

    m = _model(hidden=64, n_heads=2, seq_len=7, n_blocks=2)
    h, ts, tt = _trunk_inputs(m, 2, 7)
    kw = dict(kernel_backend="triton", attn_backend="triton", gemm_impl="triton_small", attn_out_proj=out_proj)
    eager = model_mod._fast_trunk(m, h, ts, tt, torch.float32, **kw)
    graph_ops = set()

    def inductor(gm, example_inputs):
        graph_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    block = torch.compile(model_mod._fast_block, backend=inductor, dynamic=False)
    assert torch.equal(model_mod._fast_trunk(m, h, ts, tt, torch.float32, block_fn=block, **kw), eager)
    attn_op = "fmlm.softcap_attention_out_proj" if out_proj else "fmlm.softcap_attention"
    want = {"fmlm.linear", "fmlm.linear_partials", "fmlm.gate_residual_adaln", attn_op}
    assert {t.rsplit(".", 1)[0] for t in graph_ops if t.startswith("fmlm.")} == want, graph_ops


def test_sampler_kernel_options_validated():
    m = _model(hidden=32, n_heads=2, seq_len=5, n_blocks=1)
    for bad in ({"rotary": "load"}, {"rotary_impl": "fast"}, {"argmax_config": True}, {"gemm_impl": "cutlass"},
                {"pdl": 1}, {"attention_out_proj": "yes"}, {"attention_poly_exp2": 1},
                {"attention_poly_exp2": True, "attention_fixed_shift": False},
                {"attention_poly_exp2": True, "rotary_impl": "prepass_tma"}, {"attention_kv_split": 0},
                {"attention_kv_split": True}, {"attention_kv_split": 2.0},
                {"attention_kv_split": 4, "attention_fixed_shift": False}, {"pdl_prefetch": True},
                {"pdl": True, "pdl_prefetch": 1}, {"pdl": False, "pdl_prefetch": True},
                {"attention_config": [4]}, {"attention_config": {"stages": 4}}, {"attention_config": {"num_stages": 0}},
                {"attention_config": {"BLOCK_M": 48}}, {"attention_config": {"num_warps": 32}},
                {"attention_config": {"num_stages": 4.0}}, {"gemm_deep_pipeline": True},
                {"gemm_impl": "triton_small", "gemm_deep_pipeline": 1},
                {"gemm_impl": "triton_fused", "attention_out_proj": True}):
        with pytest.raises(ValueError, match="kernel option"):
            Sampler(m, 2, 1, graph=False, kernel_options=bad)
    s = Sampler(m, 2, 1, graph=False, kernel_options={"rotary_impl": "prepass", "argmax_config": {"tma": True}})
    assert "kernel_options" in repr(s)
    Sampler(m, 2, 1, graph=False, kernel_options={"pdl": True, "pdl_prefetch": True})     # the pair is accepted
    s = Sampler(m, 2, 1, graph=False, kernel_options={"attention_config": {"num_stages": 4}})
    assert s.sample(0).shape == (2, 5)
    with pytest.raises(ValueError, match="compile_blocks"):
        Sampler(m, 2, 1, graph=False, compile_blocks=True, kernel_options={"attention_config": {"num_stages": 4}})
    with pytest.raises(ValueError, match="compile_blocks"):
        Sampler(m, 2, 1, graph=False, compile_blocks=True, kernel_options={"gemm_impl": "triton_fused"})
    assert s.sample(0).shape == (2, 5)          # CPU: the reference trunk and the torch head ignore them


def _bf16_reference(m, h, ts, tt):
    """trunk_ref as published: bf16 autocast around fp32 weights, cond in fp32."""
    p = m.params()
    c = ref.cond_ref(p, ts, tt)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        return ref.trunk_ref(p, h, c, m.cfg)


def test_fast_trunk_bf16_torch_ops_within_budget():
    m = _model(hidden=64, n_heads=2, seq_len=7)
    h, ts, tt = _trunk_inputs(m, 3, 7)
    truth = m.double().trunk(h.double(), ts.double(), tt.double(), backend="reference")
    m.float()
    out = m.trunk(h, ts, tt, backend="fast")
    assert out.dtype == torch.bfloat16
    _assert_budget(out, _bf16_reference(m, h, ts, tt), truth, 2 ** -8)
    with pytest.raises(ValueError):
        m.trunk(h, ts, tt, backend="triton")


def test_fast_weights_follow_weight_changes():
    m = _model(hidden=64, n_heads=2, seq_len=7)
    h, ts, tt = _trunk_inputs(m, 2, 7)
    w1 = model_mod._fast_weights(m, h.device, torch.bfloat16)
    assert model_mod._fast_weights(m, h.device, torch.bfloat16) is w1
    with torch.no_grad():
        m.blocks[1].attn_out.weight.mul_(-1.0)
    w2 = model_mod._fast_weights(m, h.device, torch.bfloat16)
    assert w2 is not w1 and torch.equal(w2.blocks[1]["wout"], m.blocks[1].attn_out.weight.to(torch.bfloat16))
    truth = m.double().trunk(h.double(), ts.double(), tt.double(), backend="reference")
    m.float()
    _assert_budget(m.trunk(h, ts, tt, backend="fast"), _bf16_reference(m, h, ts, tt), truth, 2 ** -8)


def test_precomputed_modulation_broadcasts():
    """The Sampler's per-step (1, ·) modulation row, broadcast over the batch, is the per-row conditioning."""
    m = _model(hidden=64, n_heads=2, seq_len=7)
    h, _, _ = _trunk_inputs(m, 3, 7)
    ts, tt = torch.full((3,), 0.25), torch.full((3,), 0.75)
    mods = model_mod._fast_modulation(m, ts[:1], tt[:1], torch.float32)
    assert mods.shape == (1, (6 * 2 + 2) * 64)
    a = model_mod._fast_trunk(m, h, ts, tt, torch.float32)
    b = model_mod._fast_trunk(m, h, None, None, torch.float32, mods=mods)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model_mod._fast_trunk(m, h, None, None, torch.float32, mods=mods[:, :-1])


def test_fast_sampler_on_cpu_runs():
    m = _model(hidden=64, n_heads=2)
    s = Sampler(m, 2, 2, backend="fast")
    a = s.sample(3)
    assert a.shape == (2, 9) and torch.equal(a, s.sample(3)) and int(a.max()) < 131
    # gemm_impl='triton_small' on the CPU runs the same ops through their torch backends
    t = Sampler(m, 2, 2, backend="fast", kernel_options={"gemm_impl": "triton_small"})
    assert (t.sample(3) == a).float().mean() >= 0.9


def test_sampler_passes_kernel_options_to_the_fast_trunk(monkeypatch):
    """Every step's fast trunk gets each kernel option: the options pick kernel variants that compute the same
    trunk (test_fast_trunk_fp32_triton_matches_trunk_ref checks them), so a Sampler that dropped or overrode one
    would still sample the same tokens."""
    opts = {"rotary_impl": "prepass_k", "gemm_impl": "triton_small", "attention_fixed_shift": True,
            "attention_out_proj": True, "attention_config": {"num_stages": 4}}
    want = dict(rotary_impl="prepass_k", gemm_impl="triton_small", attn_fixed_shift=True, attn_out_proj=True,
                attn_config={"num_stages": 4})
    calls, trunk = [], runner._fast_trunk

    def spy(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in want})
        return trunk(*args, **kwargs)

    monkeypatch.setattr(runner, "_fast_trunk", spy)
    steps = 2
    Sampler(_model(hidden=32, n_heads=2, seq_len=5, n_blocks=1), 2, steps, backend="fast",
            kernel_options=opts).sample(0)
    assert calls == [want] * steps


# ---------------------------------------------------------------------------------------------
# GPU (make gpu-check)
# ---------------------------------------------------------------------------------------------
NEEDS_NVCC = pytest.mark.skipif(_cuda.find_nvcc() is None, reason="no nvcc to build csrc/ (argmax_config impl 'cuda')")


def _gpu_model(seq_len=64, vocab=1000):
    return _model(device="cuda", vocab_size=vocab, seq_len=seq_len, hidden=256, n_heads=4, n_blocks=2, cond_dim=32)


@pytest.mark.gpu
@pytest.mark.parametrize("B,L", [(2, 128), (1, 1024)], ids=["lm1b", "owt"])
def test_fast_trunk_bf16_gpu(B, L):
    m = _model(device="cuda", vocab_size=1000, seq_len=L, hidden=768, n_heads=12, n_blocks=2, cond_dim=128)
    h, ts, tt = _trunk_inputs(m, B, L, device="cuda")
    h = h * 8.0        # |h0| of the real state (ξ·C with C ~ chol(EᵀE)) is several units per entry
    truth = m.double().trunk(h.double(), ts.double(), tt.double(), backend="reference")
    m.float()
    out = m.trunk(h, ts, tt)              # auto → fast on CUDA
    assert out.dtype == torch.bfloat16
    _assert_budget(out, _bf16_reference(m, h, ts, tt), truth, 2 ** -8)
    # the opt-in Triton GEMMs at batch 1 (kernel option gemm_impl='triton_small'): the same error budget
    small = model_mod._fast_trunk(m, h, ts, tt, gemm_impl="triton_small")
    _assert_budget(small, _bf16_reference(m, h, ts, tt), truth, 2 ** -8)
    if B * L <= 512:   # and with the attention's output projection fused (kernel option attention_out_proj)
        fused = model_mod._fast_trunk(m, h, ts, tt, gemm_impl="triton_small", attn_out_proj=True)
        _assert_budget(fused, _bf16_reference(m, h, ts, tt), truth, 2 ** -8)
    # the gate-residual and LayerNorm inside the GEMMs (gemm_impl 'triton_fused'): the same budget, the same bits
    # on a second call (split-K sums in split order, whichever split finishes last)
    fused = model_mod._fast_trunk(m, h, ts, tt, gemm_impl="triton_fused")
    _assert_budget(fused, _bf16_reference(m, h, ts, tt), truth, 2 ** -8)
    assert torch.equal(model_mod._fast_trunk(m, h, ts, tt, gemm_impl="triton_fused"), fused)


@pytest.mark.gpu
def test_linear_gelu_epilogue_is_gelu_within_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(256, 128, device="cuda", generator=g).bfloat16()
    w = (0.2 * torch.randn(512, 128, device="cuda", generator=g)).bfloat16()
    b = torch.randn(512, device="cuda", generator=g).bfloat16()
    out = model_mod._linear_gelu_tanh(y, w, b).double()
    want = torch.nn.functional.gelu(y.double() @ w.double().T + b.double(), approximate="tanh")
    assert (out - want).abs().max().item() <= 2 ** -7 * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("steps,renoise", [(1, 0.0), (3, 0.5)])
def test_graph_replay_equals_eager(steps, renoise):
    m = _gpu_model()
    g = Sampler(m, 3, steps, renoise=renoise, graph=True)
    e = Sampler(m, 3, steps, renoise=renoise, graph=False)
    for seed in (0, 1):
        a = g.sample(seed)
        assert torch.equal(a, e.sample(seed)) and torch.equal(a, g.sample(seed))
    assert not torch.equal(g.sample(0), g.sample(1))
    assert set(g._slots[4].graphs) == {True}


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{"rotary_impl": "prepass"}, {"rotary_impl": "prepass_k"},
                                  {"rotary_impl": "prepass_tma"}, {"argmax_config": {"tma": True}},
                                  {"gemm_impl": "triton_small"}, {"pdl": True},
                                  {"gemm_impl": "triton_small", "pdl": True}, {"attention_fixed_shift": False},
                                  {"gemm_impl": "triton_small", "pdl": True, "attention_out_proj": True},
                                  {"argmax_config": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4,
                                                     "num_stages": 3}},
                                  {"attention_config": {"num_stages": 4}},
                                  {"attention_config": {"num_stages": 4}, "rotary_impl": "prepass"},
                                  {"gemm_impl": "triton_fused", "pdl": True}],
                         ids=["prepass", "prepass_k", "prepass_tma", "argmax_tma", "gemm_triton_small", "pdl",
                              "gemm_triton_small_pdl", "attention_online_softmax", "gemm_triton_small_pdl_out_proj",
                              "argmax_w4", "attention_4_stages", "attention_4_stages_prepass",
                              "gemm_triton_fused_pdl"])
def test_kernel_option_candidates_match_default(opts):
    """The opt-in kernel variants that bench e2e times (graphs on) give the default's tokens: the rotary prepass
    rounds the rotated q/k exactly as the on-load rotation; the TMA argmax runs the same GEMM tiles; the Triton
    GEMMs differ from cuBLAS only in summation order and in skipping the bf16 rounding of the two GEMM outputs
    that feed the residual (near-ties may flip: the 0.999 agreement bound)."""
    _candidate_matches_default(opts)


@pytest.mark.csrc_gpu     # run in a child process by test_logits_argmax.py::test_csrc_gpu_isolated
@NEEDS_NVCC
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA")
@pytest.mark.parametrize("opts", [{"argmax_config": {"impl": "cuda"}},
                                  {"argmax_config": {"impl": "cuda"}, "gemm_impl": "triton_small", "pdl": True,
                                   "pdl_prefetch": True}], ids=["argmax_cuda", "argmax_cuda_pdl_prefetch"])
def test_csrc_argmax_candidates_match_default(opts):
    """The csrc/ argmax in the Sampler (graphs on; alone, and programmatically launched with its W prefetch after
    the Triton GEMMs): the default's tokens within the same near-tie bound."""
    _candidate_matches_default(opts)


def _candidate_matches_default(opts):
    m = _gpu_model()
    base = Sampler(m, 3, 2, renoise=0.5)
    cand = Sampler(m, 3, 2, renoise=0.5, kernel_options=opts)
    for seed in (0, 1):
        a, b = base.sample(seed), cand.sample(seed)
        assert (a == b).float().mean().item() >= 0.999, (a != b).sum().item()


@pytest.mark.gpu
@pytest.mark.parametrize("gemm_impl", ["cublas", "triton_small", "triton_fused"])
def test_pdl_is_bit_exact(gemm_impl):
    """Programmatic dependent launch changes when kernels start, never what they compute: the fast trunk's output
    is bit-identical with and without it (a kernel reading before its predecessor finished would show here, over
    repeated runs), and the sampler's tokens are identical, graph and eager."""
    from fmlm.kernels._backend import deep_pipelines, pdl_launches

    m = _model(device="cuda", vocab_size=1000, seq_len=128, hidden=768, n_heads=12, n_blocks=2, cond_dim=128)
    h, ts, tt = _trunk_inputs(m, 1, 128, device="cuda")
    x = h * 8.0
    want = model_mod._fast_trunk(m, x, ts, tt, gemm_impl=gemm_impl)

    def replays_equal():
        # in a CUDA graph the launches follow each other back to back (eager ones leave host gaps longer than
        # these batch-1 kernels), so an early read would show here
        g, out = capture(lambda: model_mod._fast_trunk(m, x, ts, tt, gemm_impl=gemm_impl))
        for _ in range(5):
            out.zero_()
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want)

    with pdl_launches():
        for _ in range(5):
            assert torch.equal(model_mod._fast_trunk(m, x, ts, tt, gemm_impl=gemm_impl), want)
        replays_equal()
    # the weights' L2 prefetch before each wait (kernel option pdl_prefetch) is a hint, and the deep operand
    # pipelines (gemm_deep_pipeline) only issue the same loads earlier: the same bits
    with pdl_launches(prefetch=True), deep_pipelines():
        replays_equal()
    s = _gpu_model()
    opts = {"gemm_impl": gemm_impl}
    base = Sampler(s, 3, 2, renoise=0.5, kernel_options=opts)
    pdl = Sampler(s, 3, 2, renoise=0.5, kernel_options={**opts, "pdl": True})
    eager = Sampler(s, 3, 2, renoise=0.5, graph=False, kernel_options={**opts, "pdl": True})
    pf = Sampler(s, 3, 2, renoise=0.5, kernel_options={**opts, "pdl": True, "pdl_prefetch": True})
    deep = (Sampler(s, 3, 2, renoise=0.5, kernel_options={**opts, "gemm_deep_pipeline": True})
            if gemm_impl != "cublas" else pf)
    for seed in (0, 1):
        a = base.sample(seed)
        assert torch.equal(a, pdl.sample(seed)) and torch.equal(a, eager.sample(seed))
        assert torch.equal(a, pf.sample(seed)) and torch.equal(a, deep.sample(seed))


def test_pdl_flag_scoping_and_cpu():
    """pdl_launches is a scoped flag (restored on exit, nested blocks keep their own value); it never activates off
    CUDA, and a Sampler asked for it samples on the CPU like any other."""
    from fmlm.kernels import _backend as be

    t = torch.zeros(1)
    assert be.pdl_launch_kwargs(False) == {"USE_PDL": False}
    assert be.pdl_launch_kwargs(True) == {"USE_PDL": True, "launch_pdl": True}
    with be.pdl_launches():
        assert be._PDL.on and not be.pdl_active(t) and not be._PDL.prefetch
        with be.pdl_launches(False):
            assert not be._PDL.on
        assert be._PDL.on
        with be.pdl_launches(True, prefetch=True):
            assert be._PDL.prefetch and not be.pdl_prefetch_active(t)
        assert not be._PDL.prefetch
    with be.pdl_launches(False, prefetch=True):      # the prefetch rides on PDL's wait: nothing without it
        assert not be._PDL.on and not be._PDL.prefetch
    assert not be._PDL.on and not be._PDL.prefetch
    with be.deep_pipelines():                         # the deep GEMM pipelines: scoped the same way, CUDA only
        assert be._DEEP.on and not be.deep_pipelines_active(t)
        with be.deep_pipelines(False):
            assert not be._DEEP.on
        assert be._DEEP.on
    assert not be._DEEP.on
    # one stage per K step of a split, never fewer than the config's, within DEEP_PIPELINE_SMEM (bf16)
    cfg = dict(lin.GPU_CONFIG_SMALL, K_PER_SPLIT=768)
    assert lin.deep_stages(cfg, 2) == 12
    assert lin.deep_stages(dict(lin.GPU_CONFIG_MID, K_PER_SPLIT=768), 2) == 8           # 24 KiB per stage
    assert lin.deep_stages(dict(lin.GPU_CONFIG_LARGE, K_PER_SPLIT=256), 2) == 4         # 4 K steps
    assert lin.deep_stages(dict(lin.GPU_CONFIG_LARGE, K_PER_SPLIT=64), 2) == 3          # the config's 3
    assert lin.deep_stages(dict(lin.GPU_CONFIG_LARGE, K_PER_SPLIT=3072), 2) == 6
    m = _model(hidden=32, n_heads=2, seq_len=5, n_blocks=1)
    assert Sampler(m, 2, 1, graph=False, kernel_options={"pdl": True}).sample(0).shape == (2, 5)


@pytest.mark.gpu
def test_captured_region_never_syncs():
    m = _gpu_model()
    for graph in (True, False):
        s = Sampler(m, 2, 2, renoise=0.5, graph=graph).warmup()
        s.sample(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for seed in range(3):
                s.sample(seed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_bucket_padding_keeps_rows():
    """Rows are independent: a batch of 3 padded to the bucket of 4 gives the rows of the full batch."""
    m = _gpu_model()
    s = Sampler(m, 4, 2)
    assert torch.equal(s.sample(5, batch_size=3), s.sample(5, batch_size=4)[:3])
    h0 = torch.randn(4, 64, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) @ s.C.float()
    assert torch.equal(s.sample(0, h0=h0[:3]), s.sample(0, h0=h0)[:3])


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")   # the ops' resolve()
def test_compiled_blocks_in_the_graph():
    """Sampler(compile_blocks=True) (what bench_e2e_compile times): the inductor-compiled blocks warm up, are
    captured in the CUDA graph, and the replay gives the compiled eager run's tokens; against the uncompiled blocks
    only rounding differs (inductor fuses the elementwise work between the custom ops, e.g. bias + GELU in fp32)."""
    m = _gpu_model()
    compiled = Sampler(m, 2, 2, renoise=0.5, compile_blocks=True).sample(3)
    assert torch.equal(compiled, Sampler(m, 2, 2, renoise=0.5, compile_blocks=True, graph=False).sample(3))
    plain = Sampler(m, 2, 2, renoise=0.5).sample(3)
    assert (compiled == plain).float().mean().item() >= 0.95      # 128 tokens; unrelated samples agree ~0.1 %


@pytest.mark.gpu
def test_graph_recaptured_after_weight_change():
    m = _gpu_model()
    s = Sampler(m, 2, 1)
    before = s.sample(0)
    with torch.no_grad():
        m.output_layer.linear.weight.mul_(-1.0)
    after = s.sample(0)
    assert not torch.equal(before, after)
    assert torch.equal(after, Sampler(m, 2, 1, graph=False).sample(0))


@pytest.mark.gpu
def test_gpu_sampler_agrees_with_fp32_engine_from_same_h0():
    """bf16 fast path vs the fp32 torch path from one h0: same function, rounding apart (random weights
    give near-tied logits, so a few percent of the tokens may differ; chance agreement is 1/V)."""
    m = _gpu_model()
    s = Sampler(m, 4, 1)
    h0 = torch.randn(4, 64, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)) @ s.C.float()
    got = s.sample(0, h0=h0)
    plan = sampling.make_plan("fmlm", 1, 0.0, m.cfg.vocab_size)
    with torch.no_grad():
        want = sampling.sample_hidden(m, plan, h0, sampling.Heads.from_model(m), backend="torch",
                                      trunk_backend="reference")
    assert (got == want).float().mean().item() >= 0.85


# ---------------------------------------------------------------------------------------------
# bench e2e and profile: the CPU-side pieces
# ---------------------------------------------------------------------------------------------
def test_bench_e2e_floor_flops_and_cpu_skip():
    from fmlm.bench import bench_e2e
    from fmlm.engine.profile import PRESETS, SMALL

    owt = fmlm.ModelConfig(**{**SMALL, **PRESETS["owt"]})
    assert abs(bench_e2e.flops_per_sample(owt, 1) / 1e9 - 292) < 1.5          # DESIGN.md §3
    assert bench_e2e.flops_per_sample(owt, 4) > 4 * bench_e2e.flops_per_sample(owt, 1)
    if not torch.cuda.is_available():
        assert bench_e2e.run(quick=True) == []


def test_bench_e2e_annotate_and_plot(tmp_path):
    from fmlm.bench import bench_e2e

    def row(path, B, steps, ms):
        return {"dataset": "owt", "path": path, "V": 50258, "L": 1024, "B": B, "steps": steps, "ms/sample": ms,
                "floor ms/sample": 0.38 * steps}
    rows = [row("reference (bf16 autocast)", 32, 1, 3.6), row("engine graph", 32, 1, 0.5),
            row("engine graph", 32, 4, 2.4), row("engine eager", 1, 1, 2.0)]
    bench_e2e._annotate(rows)
    assert rows[1]["speedup"] == pytest.approx(7.2) and rows[1]["meets target"] == "yes"
    assert rows[2]["4-step/1-step"] == pytest.approx(4.8) and rows[2]["meets target"] == "NO"
    assert rows[3]["meets target"] == "" and rows[3]["speedup"] != rows[3]["speedup"]
    pytest.importorskip("matplotlib")
    png = bench_e2e.plot(rows, tmp_path / "e2e.png")
    assert png.exists() and png.stat().st_size > 1000


def test_cli_registers_profile_and_bench_e2e(tmp_path):
    from fmlm.engine import cli

    ap = cli.build_parser()
    a = ap.parse_args(["profile", "sample", "--preset", "tiny", "--out", str(tmp_path)])
    assert a.func.__name__ == "profile_sample" and a.batch_size == 8
    a = ap.parse_args(["bench", "e2e", "--datasets", "lm1b", "--steps", "1"])
    assert a.datasets == ["lm1b"] and a.steps == [1]


def test_profile_and_bench_e2e_select_kernel_variants(tmp_path, capsys, monkeypatch):
    """`fmlm profile sample --kernel-options JSON` reaches the Sampler (validated there, a clear error for a bad
    value or non-JSON); `fmlm bench e2e --candidate NAME` times only the named candidates."""
    from fmlm.bench import bench_e2e as bench
    from fmlm.engine import cli

    base = ["profile", "sample", "--preset", "tiny", "--batch-size", "1", "--iters", "1", "--device", "cpu",
            "--out", str(tmp_path)]
    assert cli.main(base + ["--kernel-options", '{"gemm_impl": "triton_small", "pdl": true}']) == 0
    assert "kernel_options={'gemm_impl': 'triton_small', 'pdl': True}" in (tmp_path / "kernels.md").read_text()
    assert cli.main(base + ["--kernel-options", '{"pdl": 1}']) != 0
    assert "kernel option pdl must be a bool" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--kernel-options", "pdl"])
    assert "not valid JSON" in capsys.readouterr().err
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "WIN_SPEEDUP", 1e9)           # no winners rows: only the named candidates
    args = bench.parser().parse_args(["--batch-sizes", "1", "--steps", "1", "--reference", "none", "--iters", "1",
                                      "--candidate", "pdl", "--candidate", "argmax tma"])
    args.datasets = ["tiny"]
    paths = {r["path"] for r in bench.bench(args, quick=True)}
    assert paths == {"engine eager", "engine graph", "engine graph [pdl]", "engine graph [argmax tma]"}
    # under gpu_check (a deadline set): the defaults' rows are on disk before any candidate runs, and a candidate
    # that breaks the CUDA context (an illegal address is sticky) ends the candidates, not the rows measured before
    from fmlm.bench import common
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setenv("FMLM_BENCH_DEADLINE", str(__import__("time").time() + 600))

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")
    monkeypatch.setattr(bench, "_time_candidates", broken)
    rows = bench.bench(args, quick=True)
    assert [r["path"] for r in rows] == ["engine eager", "engine graph", "candidates aborted"]
    assert "illegal memory access" in rows[-1]["note"] and rows[0]["ms/sample"] > 0
    saved = (tmp_path / "results" / "bench_e2e_defaults.md").read_text()
    assert "engine eager" in saved and "aborted" not in saved and "illegal" not in saved
    assert "\n" not in common.fmt("a\nb") and "|" not in common.fmt("a | b")


def test_profile_sample_writes_trace_and_table(tmp_path):
    from fmlm.engine import cli

    rc = cli.main(["profile", "sample", "--preset", "tiny", "--batch-size", "1", "--iters", "1", "--top", "5",
                   "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    assert (tmp_path / "trace.json").stat().st_size > 1000
    table = (tmp_path / "kernels.md").read_text()
    assert "aten::" in table and table.count("\n|") >= 5


def test_profile_busy_time_counts_overlap_once():
    """The profiler's busy time is the union of device intervals: a PDL launch overlapping its predecessor counts
    once, gaps between kernels not at all."""
    from fmlm.engine.profile import busy_us

    assert busy_us([]) == 0.0
    assert busy_us([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0)]) == 17.0      # overlap once, the 8 µs gap not at all
    assert busy_us([(20.0, 25.0), (0.0, 10.0), (2.0, 3.0)]) == 15.0       # unsorted, nested


def test_profile_kernel_time_is_exclusive_under_pdl():
    """The per-kernel table credits each kernel only the time no earlier-started kernel covers: a PDL launch that
    waits beside its predecessor is not charged the wait (it took 100 of 200 µs; 50 % each; found by review)."""
    from fmlm.engine.profile import busy_us, exclusive_us

    iv = [(0.0, 100.0), (10.0, 110.0), (120.0, 130.0), (125.0, 127.0)]
    assert exclusive_us(iv) == [100.0, 10.0, 10.0, 0.0]
    assert sum(exclusive_us(iv)) == busy_us(iv)
    assert exclusive_us([(5.0, 6.0), (0.0, 10.0)]) == [0.0, 10.0]        # order by start, not by position


@pytest.mark.gpu
def test_gpu_randn_philox_moments_and_prefix():
    """The sampler's noise on CUDA (fast-math Box–Muller, four normals per Philox call): N(0, 1) moments over
    2^22 draws, uncorrelated neighbours (lanes of one call), and the prefix property across lengths."""
    from fmlm.kernels.randn import randn_philox
    seed = torch.tensor([12345], dtype=torch.int64, device="cuda")
    x = randn_philox((2 ** 22,), seed, 3).double()
    n = x.numel()
    assert abs(x.mean().item()) < 5 / n ** 0.5 and abs(x.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((x ** 4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    assert abs((x[1:] * x[:-1]).mean().item()) < 5 / n ** 0.5
    assert torch.equal(randn_philox((1001,), seed, 3), x[:1001].float())


def test_bench_profile_cpu_smoke(monkeypatch):
    """bench/bench_profile.py's rows on the CPU with the tiny preset (make gpu-check runs it for real)."""
    from fmlm.bench import bench_profile as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    # an opt-in variant that fails (here an unknown kernel option) is a row, and the points after it still run
    monkeypatch.setitem(bench.VARIANT_OPTIONS, "broken", {"no_such_option": True})
    monkeypatch.setattr(bench, "POINTS", (("tiny", 2, None), ("tiny", 1, "broken"), ("tiny", 1, "triton_small+pdl"),
                                          ("tiny", 1, "kv_split8")))
    rows = bench.run(quick=True)
    failed = [r for r in rows if r["point"] == "tiny B=1 broken"]
    assert len(failed) == 1 and failed[0]["note"].startswith("failed: ValueError"), failed
    assert rows[0]["point"] == "tiny B=2" and rows[0]["sample() call ms"] > 0
    assert rows[0]["kernel launches per call"] > 0
    assert "no device activity" in rows[0]["note"]
    for name in ("triton_small+pdl", "kv_split8"):
        variant = [r for r in rows if r["point"] == f"tiny B=1 {name}"]
        assert variant and variant[0]["sample() call ms"] > 0
    assert "replay ms" not in rows[0]          # the whole call is timed, not the graph replay alone
    assert len(rows) > 3 and all(r["µs per call"] >= 0 for r in rows
                                 if r.get("kernel") not in (None, "(one-step call: summary)"))
    # gpu_check's defaults-only mode: the variant points are reported as skipped, not profiled
    monkeypatch.setenv("FMLM_BENCH_OPTIONAL", "0")
    monkeypatch.setattr(bench, "POINTS", (("tiny", 1, "triton_small+pdl"),))
    assert bench.run(quick=True) == [{"point": "tiny B=1 triton_small+pdl", "note": "skipped: defaults-only check"}]


def test_bench_e2e_run_defaults_only(monkeypatch):
    """In gpu_check's defaults-only mode (FMLM_BENCH_OPTIONAL=0) bench_e2e.run times no candidate; by default it
    does, unless --no-candidates."""
    from fmlm.bench import bench_e2e as bench

    seen = []
    monkeypatch.setattr(bench, "bench", lambda args, quick=False: seen.append(args.candidates) or [])
    monkeypatch.delenv("FMLM_BENCH_OPTIONAL", raising=False)
    bench.run(quick=True)
    bench.run(quick=True, argv=["--no-candidates"])
    monkeypatch.setenv("FMLM_BENCH_OPTIONAL", "0")
    bench.run(quick=True)
    monkeypatch.setenv("FMLM_BENCH_OPTIONAL", "1")
    bench.run(quick=True)
    assert seen == [True, False, False, True]


def test_bench_e2e_cpu_smoke(monkeypatch, tmp_path):
    """bench/bench_e2e.py's whole row logic (reference, eager, graph, the opt-in candidates, annotations, plot) on
    the CPU at the tiny preset, so the one GPU run of the headline benchmark cannot die on a bug in it."""
    from fmlm.bench import bench_e2e as bench
    from fmlm.bench.common import markdown_table

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "WIN_SPEEDUP", 0.0)      # every candidate "wins": the merged winners rows run too
    # the tiny preset's rows are below the real CANDIDATE_MIN_ROWS: all candidates run there but one, kept behind a
    # bound it cannot meet (the row-count filter at work)
    monkeypatch.setattr(bench, "CANDIDATE_MIN_ROWS", {"attention poly exp2": 10 ** 9})
    args = bench.parser().parse_args(["--batch-sizes", "1", "2", "--steps", "1", "2", "--reference", "all",
                                      "--iters", "1"])
    args.datasets = ["tiny"]
    rows = bench.bench(args, quick=True)
    paths = {r["path"] for r in rows}
    assert {"reference (bf16 autocast)", "engine eager", "engine graph"} <= paths
    assert {f"engine graph [{c}]" for c in bench.CANDIDATES} - paths == {"engine graph [attention poly exp2]"}
    assert all(r["ms/sample"] > 0 and "note" not in r for r in rows), [r for r in rows if "note" in r]
    cand = [r for r in rows if "[" in r["path"] and "[winners" not in r["path"]]
    assert all(r["steps"] == 1 and r["vs engine graph"] > 0 for r in cand)
    # every candidate samples what the default samples (the same seed, the same noise): its share of equal tokens
    assert all(r[bench.TOKENS_COL] >= bench.MIN_TOKEN_AGREEMENT for r in cand), [
        (r["path"], r.get(bench.TOKENS_COL)) for r in cand]
    winners = [r for r in rows if r["path"].startswith("engine graph [winners: ")]
    assert sorted((r["B"], r["steps"]) for r in winners) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["vs engine graph"] > 0 for r in winners)
    two = [r for r in rows if r["path"] == "engine graph" and r["steps"] == 2]
    assert all(r["4-step/1-step"] != r["4-step/1-step"] for r in two)     # only 4-step rows get the ratio
    assert "vs engine graph" in markdown_table(rows, bench.COLUMNS)
    # past the deadline gpu_check gives it, every point is reported as skipped instead of the process being killed
    from fmlm.bench import common
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")     # the defaults' rows are saved early
    monkeypatch.setenv("FMLM_BENCH_DEADLINE", "0")
    late = bench.bench(args, quick=True)
    assert late and all(r.get("note") == "skipped: time limit" for r in late)
    assert {r["path"] for r in late} == paths - {r["path"] for r in winners}   # no timed candidate, no winner
    assert bench.plot(rows, tmp_path / "e2e.png").stat().st_size > 0


def test_bench_e2e_combine_winners():
    """The merged candidate set of a point: faster than the default by WIN_SPEEDUP, fastest first, a conflicting
    option (a second rotary variant) left out, other points and slower candidates ignored."""
    from fmlm.bench import bench_e2e as bench

    def row(path, ms, B=1, steps=1, name="lm1b"):
        return {"dataset": name, "path": path, "B": B, "steps": steps, "ms/sample": ms}
    rows = [row("engine graph", 1.0), row("engine graph [pdl]", 0.9), row("engine graph [rotary prepass]", 0.95),
            row("engine graph [rotary prepass k]", 0.8), row("engine graph [argmax tma]", 0.99),
            row("engine graph [attention online softmax (the previous default)]", 1.2),
            row("engine graph [gemm triton small]", 0.5, B=512),
            row("engine graph", 1.0, steps=4), row("engine graph [gemm triton small]", 0.5, name="owt")]
    label, opts = bench.combine_winners(rows, "lm1b", 1)
    assert label == "winners: rotary prepass k, pdl" and opts == {"rotary_impl": "prepass_k", "pdl": True}
    assert bench.combine_winners(rows, "lm1b", 1, min_speedup=1.2) == ("winners: rotary prepass k",
                                                                       {"rotary_impl": "prepass_k"})
    assert bench.combine_winners(rows, "lm1b", 1, min_speedup=1.3) is None
    assert bench.combine_winners(rows, "lm1b", 512) is None            # no default timed there
    nan_default = [row("engine graph", float("nan")), row("engine graph [pdl]", 0.5)]
    assert bench.combine_winners(nan_default, "lm1b", 1) is None
    # the online softmax (the previous default) composes with the TMA prepass, whose kernel has no other
    tma = [row("engine graph", 1.0), row("engine graph [rotary prepass + tma]", 0.8),
           row("engine graph [attention online softmax (the previous default)]", 0.9), row("engine graph [pdl]", 0.95)]
    assert bench.combine_winners(tma, "lm1b", 1) == (
        "winners: rotary prepass + tma, attention online softmax (the previous default), pdl",
        {"rotary_impl": "prepass_tma", "attention_fixed_shift": False, "pdl": True})
    # options that would not compose are left out, so that the label names only what runs: a rotary variant where
    # the triton_small GEMMs do the rotary
    small = [row("engine graph", 1.0), row("engine graph [gemm triton small]", 0.7),
             row("engine graph [rotary prepass]", 0.9)]
    assert bench.combine_winners(small, "lm1b", 1, seq_len=128)[0] == "winners: gemm triton small"
    assert bench.combine_winners(small, "lm1b", 1, seq_len=bench.SMALL_ROWS + 1)[1] == {
        "gemm_impl": "triton_small", "rotary_impl": "prepass"}           # above SMALL_ROWS cuBLAS runs: both act
    # the polynomial exp2 is the fixed-shift pointer kernel's: not merged with the online softmax or the TMA kernel
    poly = [row("engine graph", 1.0), row("engine graph [rotary prepass + tma]", 0.8),
            row("engine graph [attention poly exp2]", 0.85),
            row("engine graph [attention online softmax (the previous default)]", 0.9)]
    assert bench.combine_winners(poly, "lm1b", 1)[1] == {"rotary_impl": "prepass_tma", "attention_fixed_shift": False}
    poly[1]["ms/sample"] = 0.95
    assert bench.combine_winners(poly, "lm1b", 1) == ("winners: attention poly exp2", {"attention_poly_exp2": True})
    ann = [row("engine graph", 1.0), row("engine graph [winners: pdl]", 0.3), row("engine graph [pdl]", 0.3)]
    bench._annotate(ann)
    assert ann[0]["meets target"] == "NO" and ann[1]["meets target"] == "yes (opt-in)" and ann[2]["meets target"] == ""


def test_bench_e2e_compile_cpu_smoke(monkeypatch, tmp_path):
    """bench/bench_e2e_compile.py's row logic on the CPU (tiny preset; the reference trunk runs there)."""
    from fmlm.bench import bench_e2e, bench_e2e_compile as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "POINTS", (("tiny", 2),))
    monkeypatch.setattr(bench_e2e, "DEVICE", "cuda")       # run() sets it; monkeypatch restores it afterwards
    rows = bench.run(quick=True)
    assert [r["path"] for r in rows] == ["engine graph", "engine graph + compile"]
    assert rows[1]["vs engine graph"] > 0 and rows[1]["tokens equal to engine graph"] == 1.0
    # a point that would start too close to gpu_check's deadline is reported as skipped (the next one too)
    monkeypatch.setenv("FMLM_BENCH_DEADLINE", str(__import__("time").time() + bench.POINT_S / 2))
    monkeypatch.setattr(bench, "POINTS", (("tiny", 2), ("tiny", 1)))
    late = bench.run(quick=True)
    assert [(r["B"], r["path"], r["note"]) for r in late] == [
        (B, p, "skipped: time limit") for B in (2, 1) for p in ("engine graph", "engine graph + compile")]
    # a compiled path that fails is a row with the reason; the plain row of the point stays, and under gpu_check
    # each finished point is on disk at once
    from fmlm.bench import common
    from fmlm.engine import runner
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv("FMLM_BENCH_DEADLINE", str(__import__("time").time() + 600))
    monkeypatch.setattr(bench, "POINTS", (("tiny", 2),))
    real = runner.Sampler

    def sampler(*a, compile_blocks=False, **k):
        if compile_blocks:
            raise RuntimeError("inductor failed\nwith a long trace")
        return real(*a, **k)
    monkeypatch.setattr(runner, "Sampler", sampler)
    rows = bench.run(quick=True)
    assert rows[0]["ms/sample"] > 0 and rows[1]["note"].startswith("failed: RuntimeError: inductor failed")
    assert "engine graph" in (tmp_path / "bench_e2e_compile_points.md").read_text()
    # gpu-check's defaults-only mode: the compiled blocks are opt-in, left to gpu-check-full (no time spent)
    monkeypatch.setenv("FMLM_BENCH_OPTIONAL", "0")
    monkeypatch.setattr(runner, "Sampler", None)
    assert [r["note"] for r in bench.run(quick=True)] == ["skipped: defaults-only mode (make gpu-check-full times it)"]


def test_gpu_check_driver_budget_and_order(monkeypatch, capsys, tmp_path):
    """bench/gpu_check.py's driver without a GPU: the GPU tests step, then the benchmarks headline first; with
    the budget spent, the rest are reported as skipped (exit 0), never silently dropped."""
    import tarfile

    from fmlm.bench import common, gpu_check

    calls = []
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "ceilings", lambda: {"bf16_tflops": 1.0, "copy_gbs": 1.0})
    monkeypatch.setattr(common, "device_name", lambda: "fake")

    envs = []

    cmds = []

    def fake_run(cmd, timeout, **kw):
        assert timeout > 0
        cmds.append(cmd)
        calls.append(cmd[-1])
        envs.append(kw.get("env", {}))
        out = kw.get("stdout")          # each step's output goes to its log in the results
        out.write("FAILED tests/test_x.py::test_y - boom\n" if cmd[2] == "pytest" else f"{cmd[-1]} says hi\n")
        out.flush()
        return 0
    monkeypatch.setattr(gpu_check, "run_group", fake_run)
    monkeypatch.setattr(common, "meta", lambda: {})
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())   # as if xdist were there
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_x.md").write_text("| a |\n|---|\n| 1 |\n")
    (results / "ncu_x.ncu-rep").write_bytes(b"x" * 100)      # a failed ncu case's report: never archived
    monkeypatch.setattr(common, "RESULTS_DIR", results)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--budget", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "## GPU test failures" in printed and "FAILED tests/test_x.py::test_y - boom" in printed
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/logs/gpu_tests.log" in names and "results/logs/bench_e2e.log" in names
    assert "results/ncu_x.ncu-rep" not in names
    assert (results / "logs" / "bench_e2e.log").read_text() == "bench_e2e says hi\n"
    assert cmds[0][2] == "pytest" and cmds[0][cmds[0].index("gpu") - 1] == "-m" and calls[1] == "bench_e2e"
    assert cmds[0][-4:] == ["-n", str(min(3, os.cpu_count())), "--dist", "loadfile"]    # the tests spread over 3
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert gpu_check.xdist_args(4) == [] and gpu_check.xdist_args(1) == []
    assert calls[1:] == gpu_check.bench_modules()
    # the results so far come back in one archive, written after each step
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        assert "results/bench_x.md" in tar.getnames()
    # each benchmark process learns its deadline (before the kill, so it can skip what is left and write rows)
    import time
    assert all(time.time() < float(e["FMLM_BENCH_DEADLINE"]) <= time.time() + 1000 for e in envs[1:])
    # the default mode times the defaults only; --full every optional row; the compiled blocks (measured in run5)
    # after the benchmarks of the open candidates, in both modes
    assert all(e["FMLM_BENCH_OPTIONAL"] == "0" for e in envs)
    assert calls.index("bench_e2e_compile") > max(calls.index("bench_vocab_attention"), calls.index("bench_attention"),
                                                  calls.index("bench_profile"))
    calls.clear()
    envs.clear()
    assert gpu_check.main(["--budget", "1000", "--full", "--skip-tests"]) == 0
    assert calls[0] == "bench_e2e" and calls.index("bench_e2e_compile") > calls.index("bench_attention")
    assert sorted(calls) == sorted(gpu_check.bench_modules())
    assert all(e["FMLM_BENCH_OPTIONAL"] == "1" for e in envs)
    calls.clear()
    assert gpu_check.main(["--budget", "0", "--skip-tests"]) == 0
    out = capsys.readouterr().out
    assert calls == [] and out.count("SKIPPED (budget)") == len(gpu_check.bench_modules())


def test_gpu_check_dry_run_plan(capsys):
    """--dry-run prints the plan without a GPU: each step's limit, cut to what is left of the budget (less the
    grace its kill may take), and the steps that would start with < 20 s left reported as skipped."""
    from fmlm.bench import gpu_check

    text = gpu_check.plan(["bench_a", "bench_b", "bench_c"], budget=100, tests_limit=50, default_limit=30, full=False)
    lines = [x for x in text.splitlines() if x.startswith("| ")][1:]
    # bench_b: 20 s left, less the 8 s its kill may take after its limit
    assert lines == ["| gpu tests | 50 | 0 | runs |", "| bench_a | 30 | 50 | runs |",
                     "| bench_b | 30 | 80 | cut to 12 s |", "| bench_c | 30 | 92 | skipped |"], lines
    assert text.startswith("mode: defaults only; budget 100 s") and "worst case 92 s" in text
    assert gpu_check.main(["--dry-run", "--full", "--skip-tests", "--budget", "900"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mode: full") and "gpu tests" not in out and "| bench_e2e_compile |" in out


def test_gpu_check_run_group_kills_the_whole_group(tmp_path):
    """A benchmark or the GPU tests past their limit: the child and what it started (xdist workers, compile
    workers) are killed, not only the child; the exit status comes back otherwise."""
    import subprocess
    import sys
    import time

    from fmlm.bench import gpu_check

    assert gpu_check.run_group([sys.executable, "-c", "raise SystemExit(3)"], 30) == 3
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print(p.pid, flush=True); time.sleep(60)")
    out = tmp_path / "pid.txt"
    with open(out, "w") as f:
        with pytest.raises(subprocess.TimeoutExpired):
            gpu_check.run_group([sys.executable, "-c", child], 6, stdout=f)    # ample time to start both
    printed = out.read_text().split()
    assert printed, "the child did not start its grandchild within the limit"
    pid = int(printed[0])

    def alive(pid):       # a zombie (killed, not yet reaped by its new parent) counts as dead
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid), f"the grandchild {pid} outlived its group's kill"


def test_bench_deadline_helpers(monkeypatch):
    """common.optional_budget / time_left: a benchmark's own budget, cut short by gpu_check's FMLM_BENCH_DEADLINE."""
    import time

    from fmlm.bench import common

    monkeypatch.delenv("FMLM_BENCH_DEADLINE", raising=False)
    t0 = time.time()
    assert common.optional_budget(t0, 40.0, 20.0) == 40.0 and 59.0 < common.time_left(t0, 60.0) <= 60.0
    monkeypatch.setenv("FMLM_BENCH_DEADLINE", str(t0 + 30.0))
    assert common.optional_budget(t0, 40.0, 20.0) == pytest.approx(10.0)
    assert common.optional_budget(t0, 5.0) == 5.0 and common.time_left(t0, 60.0) <= 30.0
    monkeypatch.setenv("FMLM_BENCH_OPTIONAL", "0")       # gpu_check's defaults-only mode: no optional row starts
    assert common.optional_budget(t0, 40.0, 20.0) == 0.0 and not common.optional_rows()


def test_gpu_check_candidate_table(tmp_path, monkeypatch):
    """The decision table gpu-check prints: rows with a speedup over the default, from each benchmark's md."""
    from fmlm.bench import common, gpu_check

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    common.write_rows("bench_x", [{"impl": "default", "rows": 8, "ms": 2.0},
                                  {"impl": "cand", "rows": 8, "ms": 1.0, "speedup_vs_default": 2.0}])
    common.write_rows("bench_e2e", [{"dataset": "owt", "path": "engine graph [c]", "B": 32, "ms/sample": 0.5,
                                     "vs engine graph": 1.25}])
    table = gpu_check.candidate_table(["bench_x", "bench_e2e", "bench_missing"])
    assert "| bench_x | cand | rows=8 | 1 | 2 |" in table
    assert "| bench_e2e | engine graph [c] | dataset=owt B=32 | 0.5 | 1.25 |" in table
    assert "| bench_x | default |" not in table


def test_gpu_check_run_group_interrupts_before_killing(tmp_path, monkeypatch):
    """At the limit the group gets SIGINT first (pytest then prints which tests passed and failed so far), and
    SIGKILL after INTERRUPT_GRACE_S if it does not exit."""
    import subprocess
    import sys
    import time

    from fmlm.bench import gpu_check

    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 1.0)
    polite = ("import signal, sys, time; "
              "signal.signal(signal.SIGINT, lambda *a: (print('summary so far', flush=True), sys.exit(1))); "
              "print('started', flush=True); time.sleep(60)")
    deaf = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "print('started', flush=True); time.sleep(60)")
    for code, want in ((polite, "started\nsummary so far\n"), (deaf, "started\n")):
        out = tmp_path / "out.txt"
        t0 = time.time()
        with open(out, "w") as f:
            with pytest.raises(subprocess.TimeoutExpired):
                gpu_check.run_group([sys.executable, "-c", code], 4, stdout=f)
        assert out.read_text() == want and time.time() - t0 < 20


def test_write_rows_never_puts_rows_under_another_header(tmp_path, monkeypatch):
    """Rows whose columns differ from <name>.csv's go to <name>-<date>.csv, and, if that one has other columns
    too, to a numbered file (a third set of columns used to land under the second header; found by review)."""
    import csv

    from fmlm.bench import common

    monkeypatch.setattr(common, "meta", lambda: {"date": "2026-11-27T12:00:00"})
    for keys in (("a", "b"), ("a", "c"), ("b", "a", "note"), ("a", "c")):
        common.write_rows("t", [{k: i for i, k in enumerate(keys)}], out_dir=tmp_path)
    files = {p.name: list(csv.reader(open(p))) for p in tmp_path.glob("*.csv")}
    assert sorted(files) == ["t-2026-11-27-2.csv", "t-2026-11-27.csv", "t.csv"]
    for rows in files.values():
        assert all(len(r) == len(rows[0]) for r in rows)
    assert files["t-2026-11-27.csv"][0] == ["a", "c", "date"] and len(files["t-2026-11-27.csv"]) == 3


def test_results_dir_is_never_site_packages(tmp_path, monkeypatch):
    """A source checkout writes bench/results/; an installed package writes ./fmlm_results (it wrote into
    site-packages; found by review)."""
    from pathlib import Path

    from fmlm.bench import common

    repo = Path(common.__file__).resolve().parent.parent
    assert common._default_results_dir() == repo / "bench" / "results"
    monkeypatch.chdir(tmp_path)
    installed = tmp_path / "venv" / "lib" / "site-packages" / "fmlm" / "bench"
    installed.mkdir(parents=True)
    assert common._default_results_dir(installed) == tmp_path / "fmlm_results"


def test_git_sha_from_the_environment(monkeypatch):
    """The rows' commit: FMLM_GIT_SHA when given (the device's copy of the tree has no usable git), else git's."""
    from fmlm.bench import common

    common.git_sha.cache_clear()
    monkeypatch.setenv("FMLM_GIT_SHA", "0123abc")
    try:
        assert common.git_sha() == "0123abc" and common.meta()["git"] == "0123abc"
    finally:
        common.git_sha.cache_clear()


def test_batch_size_and_seed_are_ints():
    """A float batch size or seed is refused rather than truncated (2.7 sampled batch 2, seed 1.7 was seed 1);
    numpy integers pass."""
    import numpy as np

    m = _model()
    for bad in (2.7, 2.0, 0, -1, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            Sampler(m, bad, 1)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            fmlm.sample(m, bad, 1, backend="torch")
    s = Sampler(m, np.int64(2), 1)
    assert s.batch_size == 2 and type(s.batch_size) is int
    with pytest.raises(TypeError):
        s.sample(1.7)
    assert torch.equal(s.sample(np.int64(3)), s.sample(3))


def _check_like_fresh(m, s):
    """fmlm.sample's cached heads and Sampler `s` of model m give what a fresh copy of m's current weights gives."""
    c = _model()
    c.load_state_dict(m.state_dict())
    want = fmlm.sample(c, 3, 2, generator=torch.Generator().manual_seed(0), backend="torch")
    assert torch.equal(fmlm.sample(m, 3, 2, generator=torch.Generator().manual_seed(0), backend="torch"), want)
    assert torch.equal(s.sample(5), Sampler(c, 3, 2).sample(5))


def test_weights_swapped_by_load_state_dict_or_written_through_data(tmp_path):
    """load_state_dict(assign=True) swaps the Parameter objects the caches hold: detected (a post-hook moves the
    model's weights epoch). Writes through .data bypass the version counter: fmlm.refresh(model) tells every cache
    (found by review: both went on sampling the old weights, or a mix of old heads and new trunk)."""
    check = _check_like_fresh
    m, other = _model(seed=0), _model(seed=1)
    s = Sampler(m, 3, 2)
    s.sample(5)
    fmlm.sample(m, 3, 2, generator=torch.Generator().manual_seed(0), backend="torch")     # fills the head cache
    m.load_state_dict(other.state_dict(), assign=True)
    check(m, s)
    with torch.no_grad():
        for p, q in zip(m.parameters(), _model(seed=2).parameters()):
            p.data.copy_(q)
    stale = s.sample(5)
    fmlm.refresh(m)
    check(m, s)
    assert not torch.equal(stale, s.sample(5))           # the write through .data was unseen before the refresh


def test_assignments_anywhere_in_the_model_are_seen():
    """A Parameter, buffer or submodule assigned anywhere in the model, or a submodule's own
    load_state_dict(assign=True), moves the model's weights epoch (torch's global registration hooks), so the
    caches rebuild without fmlm.refresh: the heads and noise factor on any device (checked by sampling here), the
    fast trunk's weight copies on CUDA (the epoch is their key as well). Before, each of these went on sampling
    the old objects until a refresh. Other models, and modules outside any sampled model, move nothing."""
    import copy

    from fmlm.engine.model import weights_epoch

    m, other = _model(seed=0), _model(seed=1)
    s = Sampler(m, 3, 2)
    s.sample(5)
    fmlm.sample(m, 3, 2, generator=torch.Generator().manual_seed(0), backend="torch")     # fills the head cache
    m.output_layer.load_state_dict(other.output_layer.state_dict(), assign=True)          # a submodule's own load
    _check_like_fresh(m, s)
    m.vocab_embed.embedding = torch.nn.Parameter(other.embed.detach() * 2)               # the embedding
    _check_like_fresh(m, s)
    m.output_layer = copy.deepcopy(_model(seed=3).output_layer)                           # a submodule replaced
    _check_like_fresh(m, s)
    m.output_layer.linear.bias = torch.nn.Parameter(torch.randn(131) * 3)                 # inside the new submodule
    _check_like_fresh(m, s)
    deep = [lambda: setattr(m.blocks[1].attn_qkv, "weight", torch.nn.Parameter(m.blocks[1].attn_qkv.weight + 1)),
            lambda: setattr(m.rotary_emb, "inv_freq", m.rotary_emb.inv_freq.clone()),    # a buffer
            lambda: m.blocks.__setitem__(0, copy.deepcopy(m.blocks[1]))]
    for assign in deep:
        e = weights_epoch(m)
        assign()
        assert weights_epoch(m) > e
    e, e_other = weights_epoch(m), weights_epoch(other)
    _model(seed=4)                                     # constructing a model registers hundreds of tensors
    other.vocab_embed.embedding = torch.nn.Parameter(other.embed.detach() + 1)
    assert weights_epoch(m) == e and weights_epoch(other) == e_other + 1


def test_sampler_refuses_parity_noise_with_renoising_and_bool_seeds():
    m = _model()
    z0 = torch.randn(2, 9, 131)
    with pytest.raises(ValueError, match="re-noising draws differ"):
        Sampler(m, 2, 2, renoise=0.5).sample(0, noise=z0)
    with pytest.raises(TypeError, match="bool"):
        Sampler(m, 2, 2).sample(True)
    with pytest.raises(ValueError, match=r"batch_size 5 disagrees with the batch of noise \(2\)"):
        Sampler(m, 2, 2).sample(0, batch_size=5, noise=z0)                  # it named h0, which was not given
    with pytest.raises(ValueError, match=r"batch_size 5 disagrees with the batch of h0 \(2\)"):
        Sampler(m, 2, 2).sample(0, batch_size=5, h0=torch.zeros(2, 9, m.cfg.hidden))
