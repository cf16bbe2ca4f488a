"""ModelConfig: a zero cap means no cap (both caps), non-finite numbers are refused, the JSON form round-trips."""
import json
import math

import pytest
import torch

import fmlm

BASE = dict(vocab_size=131, seq_len=9, hidden=32, n_blocks=1, n_heads=4, cond_dim=16, two_time=True)


@pytest.mark.parametrize("zero", [0, 0.0, None])
def test_a_zero_attention_softcap_is_no_softcap(zero):
    """attn_softcap 0 is stored as None, so the attention runs uncapped (a literal 0 would compute 0·tanh(s/0))."""
    cfg = fmlm.ModelConfig(**BASE, attn_softcap=zero, logit_cap=zero)
    assert cfg.attn_softcap is None and cfg.logit_cap is None
    m, plain = fmlm.FlowLM(cfg), fmlm.FlowLM(fmlm.ModelConfig(**BASE, attn_softcap=None, logit_cap=None))
    m.reset_parameters(seed=0)
    plain.load_state_dict(m.state_dict())
    x, t = torch.randn(2, 9, 131, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.6])
    out = m(x, t, t)
    assert torch.isfinite(out).all() and torch.equal(out, plain(x, t, t))


@pytest.mark.parametrize("kw", [dict(logit_cap=math.inf), dict(logit_cap=math.nan), dict(attn_softcap=math.inf),
                                dict(attn_softcap=math.nan), dict(rotary_base=math.inf),
                                dict(rotary_base=math.nan)], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_non_finite_caps_and_rotary_base_are_refused(kw):
    """An infinite or NaN cap or rotary base was accepted and every logit came out NaN (or 0·inf): fmlm.sample then
    returned token 0 everywhere without an error."""
    (name, v), = kw.items()
    with pytest.raises(ValueError, match=f"invalid ModelConfig: {name} must be .*finite.*got {v}"):
        fmlm.ModelConfig(**BASE, **kw)
    with pytest.raises(ValueError, match="finite"):
        fmlm.ModelConfig.from_dict(json.loads(json.dumps({**BASE, **kw})))      # JSON's Infinity / NaN
    fmlm.ModelConfig(**BASE, logit_cap=1e6, attn_softcap=1e6, rotary_base=1e6)   # large but finite: fine


def test_to_json_round_trips():
    cfg = fmlm.ModelConfig(**BASE, logit_cap=None, rotary_base=500.0)
    text = cfg.to_json()
    assert json.loads(text)["rotary_base"] == 500.0 and text.index('"attn_softcap"') < text.index('"cond_dim"')
    assert fmlm.ModelConfig.from_dict(json.loads(text)) == cfg


def test_flags_must_be_bools():
    """two_time and learnable_loss_weighting build different models: a string such as "no" was accepted and, being
    truthy, built the two-time FMLM. Bools pass; 0/1 and numpy bools (from pickled configs) become bools."""
    import numpy as np

    base = {k: v for k, v in BASE.items() if k != "two_time"}
    for name in ("two_time", "learnable_loss_weighting"):
        for bad in ("no", "False", 2, None, 0.0):
            with pytest.raises(ValueError, match=f"{name} must be a bool"):
                fmlm.ModelConfig(**base, **{name: bad})
        for ok, want in ((True, True), (0, False), (1, True), (np.bool_(True), True)):
            v = getattr(fmlm.ModelConfig(**base, **{name: ok}), name)
            assert v is want
