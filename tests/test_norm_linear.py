"""kernels/norm_linear.py (the GEMMs of the opt-in 'triton_fused' trunk path) against their references composed of
the published ops, with an fp64 ground truth and the DESIGN.md §6 error budget: the split-K residual GEMM (every
split count; the last split's tail; counters back to zero; the same bits whichever split finishes last) and the
GEMM with the LayerNorm-modulate prologue (statistics merged from column tiles; GELU and rotary epilogues)."""
import importlib

import pytest
import torch

from fmlm.kernels._backend import interpreting, triton_available
from fmlm.kernels.reference import rotary_cos_sin

nl = importlib.import_module("fmlm.kernels.norm_linear")
lin = importlib.import_module("fmlm.kernels.linear")

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _dev():
    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _budget(name, out, reference, truth, dtype, floor_eps=4):
    err = (out.double() - truth).abs().max().item()
    ref_err = (reference.double() - truth).abs().max().item()
    floor = floor_eps * torch.finfo(dtype).eps * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2·{ref_err:.3g} + {floor:.3g}"


def _block(B, L, K, D, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    dev = _dev()
    a = torch.randn(B, L, K, generator=g).to(dev, dtype)
    w = (torch.randn(D, K, generator=g) / K ** 0.5).to(dev, dtype)
    b = (0.5 * torch.randn(D, generator=g)).to(dev, dtype)
    x = (offset + 2.0 * torch.randn(B, L, D, generator=g)).to(dev)
    gate = torch.randn(B, D, generator=g).to(dev, dtype)
    return a, w, b, x, gate


def _config(dev, split_block_k=16):
    base = lin.INTERPRET_CONFIG if dev == "cpu" else lin.GPU_CONFIG_FP32
    return dict(base, BLOCK_K=split_block_k, BLOCK_N=32, BLOCK_M=16)


@needs_triton
@pytest.mark.parametrize("B,L,K,D,dtype", [
    pytest.param(2, 7, 48, 40, torch.float32, id="fp32-D40-rows14"),
    pytest.param(3, 16, 48, 40, torch.float32, id="fp32-L16-one-batch-per-tile"),
    pytest.param(1, 9, 64, 96, torch.float16, id="fp16-D96"),
    pytest.param(3, 1, 20, 33, torch.float32, id="fp32-L1-Dodd-Ktail")])
def test_residual_linear_matches_reference(B, L, K, D, dtype):
    """x' = x + gate·(a·wᵀ + b) within the budget of the fp32 reference at every split count, the tile statistics
    those of x' (each tile's mean and M2, merged = the row's mean and variance), x' in place in x, the counters
    zero afterwards; the same bits at every split count's repeat (the split order is fixed)."""
    a, w, b, x, gate = _block(B, L, K, D, dtype, seed=1)
    truth = x.double() + gate.double()[:, None, :] * (a.double() @ w.double().T + b.double())
    ref_out = nl.residual_linear_ref(a, w, b, x, gate)
    dev = _dev()
    for split in (1, 2, 3):
        cfg = _config(dev)
        sem = torch.zeros(64, device=dev, dtype=torch.int32)
        rs = nl.residual_linear_fwd(a, w, b, x, gate, x_out=torch.empty_like(x), sem=sem, split_k=split, config=cfg)
        _budget(f"x' split {split}", rs.x, ref_out, truth, torch.float32 if dtype == torch.float32 else dtype)
        assert int(sem.abs().sum()) == 0, sem
        assert rs.tile_w == cfg["BLOCK_N"] and rs.stats.shape == (-(-D // cfg["BLOCK_N"]), 3, B * L)
        xt = rs.x.reshape(-1, D).double()
        for t in range(rs.stats.shape[0]):
            c = xt[:, t * rs.tile_w:(t + 1) * rs.tile_w]
            assert torch.equal(rs.stats[t, 0].double(), c[:, 0])            # the tile's first value, exactly
            torch.testing.assert_close(rs.stats[t, 1].double(), (c - c[:, :1]).sum(1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rs.stats[t, 2].double(), (c - c.mean(1, keepdim=True)).square().sum(1),
                                       rtol=1e-4, atol=1e-4)
        mean, var = rs.mean_var()
        torch.testing.assert_close(mean.double(), xt.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), xt.var(1, unbiased=False), rtol=1e-4, atol=1e-4)
        again = nl.residual_linear_fwd(a, w, b, x, gate, x_out=torch.empty_like(x), sem=sem, split_k=split,
                                       config=cfg)
        assert torch.equal(again.x, rs.x) and torch.equal(again.stats, rs.stats)
    # in place (the trunk's residual stream), without a bias, counters allocated by the launcher
    xi = x.clone()
    rs = nl.residual_linear_fwd(a, w, None, xi, gate, split_k=2, config=_config(dev))
    assert rs.x is xi
    _budget("x' in place, no bias", xi, nl.residual_linear_ref(a, w, None, x, gate),
            x.double() + gate.double()[:, None, :] * (a.double() @ w.double().T),
            torch.float32 if dtype == torch.float32 else dtype)


@needs_triton
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centered", "offset300"])
@pytest.mark.parametrize("L", [7, 16], ids=["L7", "L16-one-batch-per-tile"])
def test_norm_linear_matches_reference(act, offset, L):
    """act(adaln(x)·wᵀ + b) from residual_linear's tile statistics, within the budget of the reference (the
    published LayerNorm + modulate in fp32, rounded to w's dtype, then the layer), also for rows far off zero
    (the merge has no E[x²] − E[x]² cancellation); the same from RowStats.of (the trunk's first block)."""
    dev, dtype = _dev(), torch.float32
    a, w1, b1, x, gate = _block(2, L, 48, 40, dtype, seed=2, offset=offset)
    rs = nl.residual_linear_fwd(a, w1, b1, x, gate, x_out=torch.empty_like(x), split_k=2, config=_config(dev))
    g = torch.Generator().manual_seed(3)
    nw = (1 + 0.1 * torch.randn(40, generator=g)).to(dev)
    shift, scale = (0.3 * torch.randn(2, 2, 40, generator=g)).to(dev).unbind(0)
    w2 = (torch.randn(56, 40, generator=g) / 40 ** 0.5).to(dev)
    b2 = (0.5 * torch.randn(56, generator=g)).to(dev)
    truth = nl.norm_linear_ref(rs.x.double(), nw.double(), shift.double(), scale.double(), w2.double(),
                               b2.double(), act)
    reference = nl.norm_linear_ref(rs.x, nw, shift, scale, w2, b2, act)
    cfg = dict(_config(dev), BLOCK_K=32)
    for stats in (rs, nl.RowStats.of(rs.x, tile_w=16)):
        out = nl.norm_linear_fwd(stats, nw, shift, scale, w2, b2, act, config=cfg)
        assert out.shape == (2, L, 56) and out.dtype == w2.dtype
        _budget(f"norm_linear {act} tile {stats.tile_w}", out, reference, truth, dtype, floor_eps=64)


@needs_triton
def test_norm_linear_rotary_fp16():
    """The qkv form (fp16 weights, rotary on the first 2·D columns) against linear(adaln(x)) with rotary."""
    dev = _dev()
    B, L, D, H = 1, 5, 64, 2
    a, w1, b1, x, gate = _block(B, L, 32, D, torch.float16, seed=4)
    rs = nl.residual_linear_fwd(a, w1, b1, x, gate, x_out=torch.empty_like(x), split_k=1, config=_config(dev))
    g = torch.Generator().manual_seed(5)
    nw = torch.ones(D).to(dev)
    shift, scale = (0.2 * torch.randn(2, B, D, generator=g)).to(dev, torch.float16).unbind(0)
    w = (torch.randn(3 * D, D, generator=g) / D ** 0.5).to(dev, torch.float16)
    cos, sin = rotary_cos_sin(L, 1.0 / (10000 ** (torch.arange(0, D // H, 2).float() / (D // H))))
    rot = (cos.to(dev), sin.to(dev), 2 * D)
    truth = nl.norm_linear_ref(rs.x.double(), nw.double(), shift.double(), scale.double(), w.double(), None, None,
                               (cos.double().to(dev), sin.double().to(dev), 2 * D))
    reference = nl.norm_linear_ref(rs.x, nw, shift, scale, w, None, None, rot)
    out = nl.norm_linear_fwd(rs, nw, shift, scale, w, None, None, rot, config=dict(_config(dev), BLOCK_N=32))
    _budget("norm_linear rotary fp16", out, reference, truth, torch.float16)


def test_torch_backend_and_errors():
    """Other backends compose the references; malformed inputs are refused by name."""
    a, w, b, x, gate = (t.cpu() for t in _block(2, 3, 8, 16, torch.float32, seed=6))
    rs = nl.residual_linear(a, w, b, x, gate, backend="torch")
    torch.testing.assert_close(rs.x, nl.residual_linear_ref(a, w, b, x, gate))
    assert rs.stats.shape == (1, 3, 6)
    nw, sh, sc = torch.ones(16), torch.zeros(2, 16), torch.zeros(2, 16)
    out = nl.norm_linear(rs, nw, sh, sc, w.T.contiguous(), None, backend="torch")
    torch.testing.assert_close(out, nl.norm_linear_ref(rs.x, nw, sh, sc, w.T.contiguous()))
    with pytest.raises(ValueError, match="x must be"):
        nl.residual_linear_fwd(a, w, b, x.half(), gate)
    with pytest.raises(ValueError, match="gate must be"):
        nl.residual_linear_fwd(a, w, b, x, gate[:1])
    with pytest.raises(ValueError, match="sem must be"):
        nl.residual_linear_fwd(a, w, b, x, gate, sem=torch.zeros(0, dtype=torch.int32))
    with pytest.raises(ValueError, match="shift must be"):
        nl.norm_linear_fwd(rs, nw, sh[:1], sc, w.T.contiguous())


@needs_triton
@pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="the compile check covers sm_90a")
def test_bf16_engine_shapes_on_gpu():
    """bf16 at the LM1B B=1 block shapes with the engine's configs (split chosen by shape)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    D, F = 768, 3072
    hid = torch.randn(1, 128, F, device="cuda", generator=g).to(torch.bfloat16)
    w2 = (torch.randn(D, F, device="cuda", generator=g) / F ** 0.5).to(torch.bfloat16)
    b2 = (0.1 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    x = 3 * torch.randn(1, 128, D, device="cuda", generator=g)
    gate = torch.randn(1, D, device="cuda", generator=g).to(torch.bfloat16)
    truth = x.double() + gate.double()[:, None] * (hid.double() @ w2.double().T + b2.double())
    rs = nl.residual_linear(hid, w2, b2, x, gate, x_out=torch.empty_like(x))
    _budget("bf16 residual", rs.x, nl.residual_linear_ref(hid, w2, b2, x, gate), truth, torch.float32, 64)
    nw = torch.ones(D, device="cuda")
    sh, sc = (0.1 * torch.randn(2, 1, D, device="cuda", generator=g)).to(torch.bfloat16).unbind(0)
    w0 = (torch.randn(F, D, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16)
    b0 = torch.zeros(F, device="cuda", dtype=torch.bfloat16)
    truth = nl.norm_linear_ref(rs.x.double(), nw.double(), sh.double(), sc.double(), w0.double(), b0.double(),
                               "gelu_tanh")
    out = nl.norm_linear(rs, nw, sh, sc, w0, b0, "gelu_tanh")
    _budget("bf16 norm_linear", out, nl.norm_linear_ref(rs.x, nw, sh, sc, w0, b0, "gelu_tanh"), truth,
            torch.bfloat16)


@needs_triton
def test_deep_pipelines_count_the_norm_kernels_stage(monkeypatch):
    """Under deep_pipelines (forced on here) the LayerNorm GEMM's stages are counted with its fp32 x tile, so they
    stay within linear.DEEP_PIPELINE_SMEM (at the engine's 64×64 bf16 tile: 7 stages, 158 KB on sm_90a, where
    the plain A + W count would give 12 and 283 KB, more than an SM has); the residual GEMM's with A and W; the
    results are the default's bit for bit."""
    from kernel_test_utils import LaunchArgs

    cfg = dict(lin.GPU_CONFIG_SMALL, K_PER_SPLIT=768)
    assert lin.deep_stages(cfg, 2, 64 * 64 * 4 + 64 * 64 * 2 + 2 * 64 * 2 + 64 * 2) == 7
    assert lin.deep_stages(cfg, 2) == 12
    dev = _dev()
    a, w1, b1, x, gate = _block(2, 16, 256, 40, torch.float32, seed=8)
    c = _config(dev, split_block_k=32)
    want = nl.residual_linear_fwd(a, w1, b1, x, gate, x_out=torch.empty_like(x), split_k=1, config=c)
    nw, sh, sc = torch.ones(40, device=dev), torch.zeros(2, 40, device=dev), torch.zeros(2, 40, device=dev)
    w2 = torch.randn(24, 40, device=dev)
    want_y = nl.norm_linear_fwd(want, nw, sh, sc, w2, config=c)
    spies = [LaunchArgs(nl._residual_linear_kernel), LaunchArgs(nl._norm_linear_kernel)]
    monkeypatch.setattr(nl, "_residual_linear_kernel", spies[0])
    monkeypatch.setattr(nl, "_norm_linear_kernel", spies[1])
    monkeypatch.setattr(nl, "deep_pipelines_active", lambda t: True)
    monkeypatch.setattr(nl, "sm_count", lambda device: 64)
    got = nl.residual_linear_fwd(a, w1, b1, x, gate, x_out=torch.empty_like(x), split_k=1, config=c)
    got_y = nl.norm_linear_fwd(got, nw, sh, sc, w2, config=c)
    assert torch.equal(got.x, want.x) and torch.equal(got_y, want_y)
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    assert spies[0].launches[0]["num_stages"] == lin.deep_stages(dict(c, K_PER_SPLIT=256), 4)
    per_stage = bm * bk * 4 + bn * bk * 4 + 2 * bk * 4 + bk * 4          # fp32 w; L = 16: one vector per tile
    assert spies[1].launches[0]["num_stages"] == lin.deep_stages(dict(c, K_PER_SPLIT=40), 4, per_stage)


def test_two_cta_stages():
    """The LayerNorm GEMM's stages where its grid exceeds the SMs: two CTAs per SM (≤ TWO_CTA_STAGE_BYTES of
    stages, at least 2); one wave or less keeps the config's."""
    large = 128 * 64 * 4 + 128 * 64 * 2 + 2 * 64 * 2 + 64 * 2           # OWT B=1's 128×128 tile, bf16
    small = 64 * 64 * 4 + 64 * 64 * 2 + 2 * 64 * 2 + 64 * 2
    assert nl.two_cta_stages(3, large, 144, 132) == 2
    assert nl.two_cta_stages(3, large, 96, 132) == 3
    assert nl.two_cta_stages(4, small, 192, 132) == 4
    assert nl.two_cta_stages(4, 64 * 64 * 4 + 128 * 64 * 2 + 2 * 64 * 2 + 64 * 2, 200, 132) == 3


def test_one_wave_split():
    """The residual GEMM's splits: with 8-warp 128×128 tiles (one CTA per SM) no more programs than SMs; with the
    4-warp tiles, or within a wave, linear_partials' choice."""
    large, small = dict(lin.GPU_CONFIG_LARGE, SPLIT=3), dict(lin.GPU_CONFIG_SMALL, SPLIT=3)
    assert nl.one_wave_split(large, 1024, 768, 132) == 2           # 48 tiles: 144 programs → 96
    assert nl.one_wave_split(large, 256, 768, 132) == 3            # 12 tiles: 36 programs
    assert nl.one_wave_split(dict(large, SPLIT=1), 4096, 768, 132) == 1
    assert nl.one_wave_split(small, 1024, 768, 132) == 3
    cfg = lin.pick_config(1024, 768, 768, torch.bfloat16, torch.device("cuda"), 0)
    assert cfg["BLOCK_M"] == 128 and cfg["num_warps"] == 8 and cfg["SPLIT"] == 3      # what OWT B=1 gets
