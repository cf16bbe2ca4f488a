import pytest
import torch

import fmlm
from fmlm.kernels import reference as ref

# The released checkpoints' parameter names, in backbone.named_parameters() order (DESIGN.md §1).
BLOCK = ["norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
         "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"]
TIME = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]


def expected_names(n_blocks, two_time, llw=False):
    names = ["vocab_embed.embedding"] + [f"sigma_map.{n}" for n in TIME]
    if two_time:
        names += [f"sigma_map_prime.{n}" for n in TIME]
    if llw:
        names += [f"learnable_loss_weighting.s_embed.{n}" for n in TIME]
        names += ["learnable_loss_weighting.mlp.0.weight", "learnable_loss_weighting.mlp.0.bias",
                  "learnable_loss_weighting.mlp.2.weight", "learnable_loss_weighting.mlp.2.bias"]
    for i in range(n_blocks):
        names += [f"blocks.{i}.{n}" for n in BLOCK]
    names += ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
              "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    return names


@pytest.mark.parametrize("two_time,llw", [(False, False), (True, False), (False, True)])
def test_parameter_names_and_order_match_released_checkpoints(tiny_cfg, two_time, llw):
    m = fmlm.FlowLM(tiny_cfg(two_time=two_time, learnable_loss_weighting=llw))
    assert [n for n, _ in m.named_parameters()] == expected_names(2, two_time, llw)
    assert [n for n, _ in m.named_buffers()] == ["rotary_emb.inv_freq"]


def test_released_small_shapes():
    cfg = fmlm.ModelConfig(vocab_size=50258, seq_len=1024, two_time=True)
    with torch.device("meta"):
        m = fmlm.FlowLM(cfg, init="published")
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["vocab_embed.embedding"] == (50258, 768)
    assert shapes["blocks.11.attn_qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.adaLN_modulation.weight"] == (4608, 128)
    assert shapes["output_layer.adaLN_modulation.weight"] == (1536, 128)
    assert shapes["sigma_map.mlp.0.weight"] == (128, 256)
    assert cfg.padded_vocab == 50304 and fmlm.ModelConfig(vocab_size=30522, seq_len=128).padded_vocab == 30592


def test_forward_equals_trunk_plus_head(tiny_cfg):
    cfg = tiny_cfg(two_time=True)
    m = fmlm.FlowLM(cfg).double()
    x = torch.randn(3, cfg.seq_len, cfg.vocab_size, dtype=torch.float64)
    ts, tt = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    logits = m(x, ts, tt)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    u = m.trunk(x @ m.embed, ts, tt)
    torch.testing.assert_close(logits, u @ m.output_layer.linear.weight.T + m.output_layer.linear.bias)
    # scalar times broadcast over the batch
    torch.testing.assert_close(m(x, 0.3, 0.7), m(x, torch.full((3,), 0.3, dtype=torch.float64),
                                                  torch.full((3,), 0.7, dtype=torch.float64)))


def test_attention_softcap_is_applied():
    q, k, v = (torch.randn(2, 5, 3, 8, dtype=torch.float64) * 20 for _ in range(3))
    capped, plain = ref.attention_ref(q, k, v, 50.0), ref.attention_ref(q, k, v, None)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 8 ** 0.5
    expect = torch.einsum("bhij,bjhd->bihd", torch.softmax(50 * torch.tanh(s / 50), -1), v).reshape(2, 5, 24)
    torch.testing.assert_close(capped, expect)
    assert not torch.allclose(capped, plain)


def test_rotary_is_rotate_half_on_q_and_k():
    x = torch.randn(1, 4, 1, 6, dtype=torch.float64)
    cos, sin = ref.rotary_cos_sin(4, 1.0 / (10000 ** (torch.arange(0, 6, 2, dtype=torch.float64) / 6)))
    y = ref.apply_rotary_ref(x, cos, sin)
    # position 0 is the identity; norms are preserved per pair (i, i + d/2)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    pair = lambda t: t[..., :3] ** 2 + t[..., 3:] ** 2  # noqa: E731
    torch.testing.assert_close(pair(y), pair(x))


@pytest.mark.parametrize("kw,match", [
    (dict(vocab_size=0), "vocab_size"), (dict(hidden=30, n_heads=4), "divisible"),
    (dict(hidden=12, n_heads=4), "even"), (dict(dropout=1.5), "dropout"), (dict(seq_len=2.5), "seq_len"),
])
def test_config_validation(kw, match):
    base = dict(vocab_size=10, seq_len=4, hidden=32, n_heads=4)
    with pytest.raises(ValueError, match=match):
        fmlm.ModelConfig(**{**base, **kw})


def test_config_roundtrip_and_unknown_fields():
    cfg = fmlm.ModelConfig(vocab_size=10, seq_len=4, hidden=32, n_heads=4, logit_cap=None)
    assert fmlm.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        fmlm.ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_forward_rejects_wrong_state_shape(tiny_cfg):
    m = fmlm.FlowLM(tiny_cfg())
    with pytest.raises(ValueError, match="B, L, V"):
        m(torch.randn(2, 9, 7), 0.5)


def test_bad_config_numbers_and_tau_shapes_are_refused(tiny_cfg):
    """A non-numeric or negative cap, a rotary base ≤ 1, and a τ whose length is not the batch (it failed deep
    inside the conditioning) get clear errors."""
    for kw in (dict(logit_cap="x"), dict(attn_softcap=-1.0), dict(rotary_base=-1), dict(rotary_base=True)):
        with pytest.raises(ValueError, match="invalid ModelConfig"):
            tiny_cfg(**kw)
    assert tiny_cfg(logit_cap=0).logit_cap is None
    m = fmlm.FlowLM(tiny_cfg(two_time=True))
    x = torch.randn(2, 9, 131)
    with pytest.raises(ValueError, match=r"tau_s must be a scalar or \(2,\)"):
        m(x, torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"tau_t must be a scalar or \(2,\)"):
        m.trunk(torch.randn(2, 9, 32), torch.zeros(2), torch.ones(5))
    with pytest.raises(ValueError, match="h must be"):
        m.trunk(torch.randn(2, 9, 31), torch.zeros(2))
    assert m(x, 0.5, torch.ones(2)).shape == (2, 9, 131)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_weights_run_the_reference_under_autocast(tiny_cfg, dtype):
    """bf16/fp16 weights: forward, trunk and fmlm.sample (every CPU backend) run the reference math under autocast in
    that dtype, as the published code does; before, its fp32 LayerNorm output met half weights and failed. The
    result is the fp32 model's under the same autocast."""
    m32 = fmlm.FlowLM(tiny_cfg(two_time=True))
    m32.reset_parameters(seed=0)
    m16 = fmlm.FlowLM(tiny_cfg(two_time=True))
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(dtype)
    x = torch.randn(2, 9, 131, generator=torch.Generator().manual_seed(1))
    tau = torch.tensor([0.3, 0.7])
    with torch.autocast("cpu", dtype=dtype):
        want = m32(x, tau, tau)
    got = m16(x.to(dtype), tau.to(dtype), tau.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
    h = x.to(dtype) @ m16.embed
    assert torch.isfinite(m16.trunk(h, tau.to(dtype), tau.to(dtype), backend="reference").float()).all()
    for backend in ("auto", "torch", "reference"):
        t = fmlm.sample(m16, 2, 2, backend=backend, generator=torch.Generator().manual_seed(0))
        assert t.shape == (2, 9) and int(t.min()) >= 0 and int(t.max()) < 131


def test_init_must_be_random_or_published(tiny_cfg):
    with pytest.raises(ValueError, match="init must be 'random' .* or 'published'"):
        fmlm.FlowLM(tiny_cfg(), init="zeros")


def test_fast_trunk_refuses_a_wrong_state_or_gemm_impl(tiny_cfg):
    """The fast trunk's own checks (Sampler and trunk(backend='fast') check first; these guard direct callers)."""
    from fmlm.engine import model as M

    m = fmlm.FlowLM(tiny_cfg())
    for h in (torch.randn(2, 9, 31), torch.randn(9, 32)):
        with pytest.raises(ValueError, match=r"h must be \(B, L, 32\), got"):
            M._fast_trunk(m, h, torch.zeros(2), None)
    x = torch.zeros(1, 9, 32)
    with pytest.raises(ValueError, match=r"gemm_impl must be one of \('cublas', 'triton_small', 'triton_fused'\), "
                                         r"got 'cutlass'"):
        M._fast_block(x, x, {}, *([None] * 9), 4, None, False, "torch", "torch", gemm_impl="cutlass")
    # the fused GEMMs write an fp32 residual stream in place: an fp64 stream or a compiled (functional) block is
    # refused by name
    h = torch.randn(1, 9, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton_fused"):
        M._fast_trunk(m.double(), h, torch.zeros(1, dtype=torch.float64), None, torch.float64,
                      kernel_backend="torch", attn_backend="reference", gemm_impl="triton_fused")
    with pytest.raises(ValueError, match="triton_fused"):
        M._fast_trunk(m.float(), h.float(), torch.zeros(1), None, torch.float32, kernel_backend="torch",
                      attn_backend="reference", gemm_impl="triton_fused", block_fn=M._fast_block)
