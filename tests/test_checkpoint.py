"""Checkpoint IO: reference Lightning .ckpt (read as data, never executed) and fmlm directories."""
import builtins
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import fmlm
from fmlm.engine import checkpoint as ck
from fmlm.engine.checkpoint import CheckpointError, inspect_checkpoint, load_checkpoint, save_checkpoint

from ckpt_builders import ema_like, small_model, write_reference_ckpt

# The released checkpoints' backbone parameter names, in named_parameters() order (DESIGN.md §1), written out
# here so that the builder, FlowLM and the loader cannot agree on a wrong layout among themselves.
_BLOCK = ["norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
          "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"]
_TIME = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]


def reference_param_names(n_blocks, two_time, llw):
    names = ["vocab_embed.embedding"] + [f"sigma_map.{n}" for n in _TIME]
    names += [f"sigma_map_prime.{n}" for n in _TIME] if two_time else []
    if llw:
        names += [f"learnable_loss_weighting.s_embed.{n}" for n in _TIME]
        names += [f"learnable_loss_weighting.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    for i in range(n_blocks):
        names += [f"blocks.{i}.{n}" for n in _BLOCK]
    return names + ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
                    "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]


def _x(cfg, B=3, L=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    L = L or min(cfg.seq_len, 9)
    # a noisy one-hot state, as the sampler feeds the network
    x = torch.nn.functional.one_hot(torch.randint(cfg.vocab_size, (B, L), generator=g), cfg.vocab_size).float()
    return 0.6 * x + 0.4 * torch.randn(B, L, cfg.vocab_size, generator=g)


def _logits(model, x):
    tau = torch.tensor([0.1, 0.5, 0.9])[: x.shape[0]]
    tau_t = torch.tensor([0.7, 0.95, 1.0])[: x.shape[0]] if model.cfg.two_time else None
    with torch.no_grad():
        return model(x, tau, tau_t)


def _assert_params_equal(loaded, source):
    got, want = dict(loaded.named_parameters()), dict(source.named_parameters())
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n


VARIANTS = {
    # name: (model kwargs, writer kwargs)
    "flm": (dict(), dict()),
    "fmlm_compiled_with_teacher": (dict(two_time=True), dict(orig_mod=True, teacher=True)),
    "learnable_loss_weighting": (dict(llw=True), dict()),
    "V2_L1": (dict(vocab_size=2, seq_len=1), dict()),
    "V50258_no_stored_config": (dict(vocab_size=50258, seq_len=1024), dict(store_config=False)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One reference-layout checkpoint per variant: (path, raw model, EMA model)."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for name, (mkw, wkw) in VARIANTS.items():
        m = small_model(**mkw)
        e = ema_like(m, seed=len(out) + 1)
        out[name] = (write_reference_ckpt(root / f"{name}.ckpt", m, e, **wkw), m, e)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_builder_writes_the_reference_key_layout(built, variant):
    path, m, e = built[variant]
    obj = ck._read_torch_zip(path)        # the raw dict (the look-alike classes are not importable any more)
    cfg = m.cfg
    prefix = "backbone._orig_mod." if VARIANTS[variant][1].get("orig_mod") else "backbone."
    backbone = [k for k in obj["state_dict"] if k.startswith("backbone.")]
    names = reference_param_names(cfg.n_blocks, cfg.two_time, cfg.learnable_loss_weighting)
    cut = 5 + 4 * cfg.two_time               # state_dict order: the rotary buffer follows the time embeddings
    assert backbone == [prefix + n for n in names[:cut] + ["rotary_emb.inv_freq"] + names[cut:]]
    assert len(obj["ema"]["shadow_params"]) == len(names)
    assert not torch.equal(obj["ema"]["shadow_params"][0], obj["state_dict"][prefix + names[0]])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "raw"])
def test_load_reference_checkpoint(built, variant, use_ema):
    path, raw, ema = built[variant]
    src = ema if use_ema else raw
    model = load_checkpoint(path, ema=use_ema)
    assert isinstance(model, fmlm.FlowLM)
    assert model.cfg == raw.cfg
    assert model.loaded_weights == ("ema" if use_ema else "raw")
    _assert_params_equal(model, src)
    assert torch.equal(model.rotary_emb.inv_freq, raw.rotary_emb.inv_freq)
    x = _x(model.cfg)
    got = _logits(model, x)
    assert torch.equal(got, _logits(src, x))
    assert not torch.equal(got, _logits(raw if use_ema else ema, x))


def test_top_level_api_and_dtype_device(built):
    path, raw, ema = built["fmlm_compiled_with_teacher"]
    model = fmlm.load_checkpoint(path, dtype=torch.float64, device="cpu")
    for (n, p), q in zip(model.named_parameters(), ema.parameters()):
        assert p.dtype == torch.float64 and p.device.type == "cpu" and torch.equal(p, q.double()), n
    assert model.rotary_emb.inv_freq.dtype == torch.float32   # angles stay fp32 whatever the weights' dtype
    assert all(p.is_contiguous() for p in model.parameters())
    bf = load_checkpoint(path, dtype="bf16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}


def test_loader_imports_nothing_the_pickle_names(built):
    before = set(sys.modules)
    load_checkpoint(built["flm"][0])
    new = {m.split(".")[0] for m in set(sys.modules) - before}
    assert not new & {"omegaconf", "transformers", "lightning", "tokenizers", "numpy", "pathlib_abc"}, new


def test_inspect_reference_checkpoint(built):
    path, raw, _ = built["fmlm_compiled_with_teacher"]
    info = inspect_checkpoint(path)
    assert info["kind"] == "lightning"
    assert info["config"] == raw.cfg.to_dict()
    assert info["config_sources"]["n_heads"] == "stored config" and info["config_sources"]["seq_len"] == "stored config"
    assert info["config_sources"]["two_time"] == "shapes"
    assert info["guessed"] == []
    assert info["n_params"] == sum(p.numel() for p in raw.parameters())
    assert info["has_ema"] and info["ema"]["count"] == len(list(raw.parameters())) and info["ema"]["decay"] == 0.9999
    assert info["lightning_version"] == "2.5.0.post0" and info["global_step"] == 1234
    assert info["keys"]["ignored"] == {"teacher_model": 4} and info["keys"]["compiled_orig_mod"] is True
    assert info["stored_config"]["model.n_heads"] == 4 and info["stored_config"]["model.length"] == 9
    assert info["stored_config"]["algo.name"] == "flm_distill_double"
    assert info["tokenizer"]["name_or_path"] == "gpt2"
    assert info["tokenizer"]["class"].endswith("GPT2TokenizerFast")
    assert info["problems"] == []


def test_inspect_says_what_was_guessed(built, tmp_path):
    info = inspect_checkpoint(built["V50258_no_stored_config"][0])
    assert info["config"]["seq_len"] == 1024 and info["guessed"] == ["seq_len"]
    assert info["config"]["n_heads"] == 4 and info["config_sources"]["n_heads"] == "rotary buffer"
    m = small_model(vocab_size=131)
    p = write_reference_ckpt(tmp_path / "bare.ckpt", m, store_config=False, include_inv_freq=False)
    info = inspect_checkpoint(p)
    assert info["guessed"] == ["n_heads", "seq_len"] and info["config"]["seq_len"] == 128
    assert info["config"]["hidden"] % info["config"]["n_heads"] == 0


def test_config_overrides(built):
    path, raw, _ = built["flm"]
    m = load_checkpoint(path, config_overrides={"logit_cap": None, "seq_len": 17})
    assert m.cfg.logit_cap is None and m.cfg.seq_len == 17 and m.cfg.n_heads == raw.cfg.n_heads
    with pytest.raises(CheckpointError, match="unknown ModelConfig fields.*'heads'"):
        load_checkpoint(path, config_overrides={"heads": 2})
    with pytest.raises(CheckpointError, match="rotary_emb.inv_freq"):   # 2 heads contradict the rotary buffer
        load_checkpoint(path, config_overrides={"n_heads": 2})


def test_plain_state_dict_file(tmp_path):
    m = small_model()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", config_overrides={"seq_len": 9})
    _assert_params_equal(loaded, m)
    assert inspect_checkpoint(tmp_path / "sd.pt")["kind"] == "state_dict"


def test_missing_ema_warns_and_loads_raw(tmp_path):
    m = small_model()
    p = write_reference_ckpt(tmp_path / "noema.ckpt", m, include_ema=False)
    with pytest.warns(UserWarning, match="no EMA"):
        loaded = load_checkpoint(p)
    _assert_params_equal(loaded, m)
    assert loaded.loaded_weights.startswith("raw")


# -- save / load round trip ------------------------------------------------------------------------------------

def test_save_load_round_trip(built, tmp_path):
    path, raw, ema = built["fmlm_compiled_with_teacher"]
    model = load_checkpoint(path)
    out = save_checkpoint(model, tmp_path / "conv")
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    import json
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.pop("format") == "fmlm" and cfg.pop("version") == 1 and cfg == raw.cfg.to_dict()
    back = load_checkpoint(out)
    assert back.cfg == model.cfg and back.loaded_weights == "saved"
    _assert_params_equal(back, ema)
    assert torch.equal(back.rotary_emb.inv_freq, model.rotary_emb.inv_freq)
    x = _x(back.cfg)
    assert torch.equal(_logits(back, x), _logits(ema, x))
    info = inspect_checkpoint(out)
    assert info["kind"] == "dir" and info["config"] == raw.cfg.to_dict() and info["problems"] == []
    assert load_checkpoint(out / "model.safetensors").cfg == model.cfg     # the weights file names its directory
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == raw.cfg.vocab_size and tok.token_to_id("[PAD]") == raw.cfg.vocab_size - 1
    # a directory round trip keeps the tokenizer too (fmlm convert DIR DIR2)
    again = save_checkpoint(back, tmp_path / "conv2")
    assert (again / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_save_bf16_and_plain_model(tmp_path):
    m = small_model(two_time=True).to(torch.bfloat16)
    fmlm.save_checkpoint(m, tmp_path / "bf")
    assert not (tmp_path / "bf" / "tokenizer.json").exists()
    back = load_checkpoint(tmp_path / "bf")
    for (n, p), q in zip(back.named_parameters(), m.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), n


def test_save_overwrites_only_checkpoints_and_is_atomic(tmp_path, monkeypatch):
    a, b = small_model(seed=1), small_model(seed=2)
    target = save_checkpoint(a, tmp_path / "out")
    save_checkpoint(b, target)                                  # replacing an fmlm checkpoint is fine
    _assert_params_equal(load_checkpoint(target), b)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt.*refusing to overwrite"):
        save_checkpoint(a, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(ck, "_write_text", crash)               # dies after the weights file is written
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(a, target)
    _assert_params_equal(load_checkpoint(target), b)            # the previous checkpoint is intact
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(a, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out", "user"]   # no temporary leftovers


# -- refusing to execute pickled code --------------------------------------------------------------------------

class _Payload:
    """Pickles as `fn(*args)`: what a malicious checkpoint plants."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(canary: Path, canary_dir: Path):
    import codecs
    import collections
    import copyreg
    import functools
    import operator
    c = str(canary)
    return {
        "os.system": (_Payload(os.system, f"touch {c}"), "system"),
        "builtins.exec": (_Payload(builtins.exec, f"open({c!r}, 'w').close()"), "exec"),
        "builtins.eval": (_Payload(builtins.eval, f"open({c!r}, 'w').close()"), "eval"),
        "builtins.open": (_Payload(builtins.open, c, "w"), "open"),
        "subprocess.call": (_Payload(subprocess.call, ["touch", c]), "subprocess.call"),
        "shutil.rmtree": (_Payload(shutil.rmtree, str(canary_dir)), "shutil.rmtree"),
        "importlib.import_module": (_Payload(importlib.import_module, "antigravity"), "importlib"),
        "pickle.loads": (_Payload(pickle.loads, pickle.dumps(_Payload(os.system, f"touch {c}"))), "loads"),
        "functools.partial": (_Payload(functools.partial(os.system, f"touch {c}")), "functools.partial"),
        "getattr_on_real_object": (_Payload(getattr, dict, "fromkeys"), "getattr"),
        "torch.load": (_Payload(torch.load, c), "torch.serialization.load"),
        # guarded callables used on data, called on something else
        "type_3_args": (_Payload(type, "Evil", (), {"x": 1}), "builtins.type with arguments"),
        "codecs_zlib": (_Payload(codecs.encode, b"x", "zlib"), "_codecs.encode with codec 'zlib'"),
        "getitem_on_real_object": (_Payload(operator.getitem, {"a": 1}, "a"), "operator.getitem on 'dict'"),
        "reconstructor_on_real_type": (_Payload(copyreg._reconstructor, collections.OrderedDict, dict, {}),
                                       "copyreg._reconstructor for"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "builtins.eval", "builtins.open",
                                     "subprocess.call", "shutil.rmtree", "importlib.import_module", "pickle.loads",
                                     "functools.partial", "getattr_on_real_object", "torch.load",
                                     "type_3_args", "codecs_zlib", "getitem_on_real_object",
                                     "reconstructor_on_real_type"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    canary, canary_dir = tmp_path / "pwned", tmp_path / "keep"
    canary_dir.mkdir()
    obj, name = _payloads(canary, canary_dir)[payload]
    p = write_reference_ckpt(tmp_path / "evil.ckpt", small_model(),
                             edit=lambda c: c["hyper_parameters"].__setitem__("evil", obj))
    for fn in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="nothing was executed") as e:
            fn(p)
        assert name in str(e.value) and "refusing" in str(e.value)
    assert not canary.exists()
    assert canary_dir.is_dir()


@pytest.mark.parametrize("where", ["state_dict", "ema", "top_level"])
def test_malicious_payload_anywhere_in_the_file(tmp_path, where):
    canary = tmp_path / "pwned"
    evil = _Payload(os.system, f"touch {canary}")

    def edit(c):
        if where == "state_dict":
            c["state_dict"]["backbone.blocks.0.norm1.weight"] = evil
        elif where == "ema":
            c["ema"]["shadow_params"][3] = evil
        else:
            c["zzz"] = evil
    p = write_reference_ckpt(tmp_path / "evil.ckpt", small_model(), edit=edit)
    with pytest.raises(CheckpointError, match="system.*nothing was executed"):
        load_checkpoint(p)
    assert not canary.exists()


def test_inert_stand_ins_never_run_even_when_chained(tmp_path):
    """Globals of allowlisted data libraries are stand-ins: a payload routed through them records, never runs."""
    canary = tmp_path / "pwned"
    chained = _Payload(Path(canary).touch)           # pickles as getattr(pathlib.PosixPath(...), 'touch')()
    np = pytest.importorskip("numpy")
    numpy_call = _Payload(np.save, str(canary), np.arange(3))
    m = small_model()
    p = write_reference_ckpt(tmp_path / "odd.ckpt", m, edit=lambda c: c["hyper_parameters"].update(
        a=chained, b=numpy_call))
    loaded = load_checkpoint(p)
    _assert_params_equal(loaded, m)
    assert not canary.exists() and not Path(str(canary) + ".npy").exists()


def test_torchscript_archive_is_refused(tmp_path):
    p = tmp_path / "ts.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CheckpointError, match="TorchScript.*nothing was executed"):
        load_checkpoint(p)


# -- bad inputs ------------------------------------------------------------------------------------------------

def _bad(tmp_path, edit, **kw):
    return write_reference_ckpt(tmp_path / "bad.ckpt", small_model(), ema_like(small_model()), edit=edit, **kw)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_truncated_file(tmp_path, built):
    p = tmp_path / "trunc.ckpt"
    data = built["flm"][0].read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(p)


@pytest.mark.parametrize("content,msg", [
    pytest.param(b"hello, not a checkpoint\n" * 10, "not a torch checkpoint", id="text"),
    pytest.param(pickle.dumps({"state_dict": {}}, protocol=2), "legacy", id="bare_pickle"),
    pytest.param(None, "not a torch.save checkpoint", id="zip_without_data_pkl"),
])
def test_not_a_checkpoint(tmp_path, content, msg):
    p = tmp_path / "x.ckpt"
    if content is None:
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "hi")
    else:
        p.write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(p)


def test_corrupt_pickle_record(tmp_path, built):
    src = built["flm"][0]
    p = tmp_path / "corrupt.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data[:40] + b"\xff\xfe garbage" + data[60:]
            zout.writestr(item, data)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)


def test_missing_backbone_keys_are_named(tmp_path):
    p = _bad(tmp_path, lambda c: [c["state_dict"].pop(k) for k in
                                  ("backbone.blocks.1.mlp.2.bias", "backbone.output_layer.linear.bias")])
    with pytest.raises(CheckpointError, match=r"missing keys: 'blocks.1.mlp.2.bias', 'output_layer.linear.bias'"):
        load_checkpoint(p, ema=False)


def test_unexpected_keys_are_named(tmp_path):
    p = _bad(tmp_path, lambda c: c["state_dict"].__setitem__("backbone.latent_projection.0.weight",
                                                             torch.randn(4, 4)))
    with pytest.raises(CheckpointError, match="unexpected keys: 'latent_projection.0.weight'"):
        load_checkpoint(p)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    p = _bad(tmp_path, lambda c: c["state_dict"].__setitem__("backbone.blocks.1.attn_out.weight",
                                                             torch.randn(32, 31)))
    with pytest.raises(CheckpointError, match=r"blocks.1.attn_out.weight: checkpoint \(32, 31\) vs model \(32, 32\)"):
        load_checkpoint(p)


def test_shadow_params_count_mismatch(tmp_path):
    n = len(list(small_model().parameters()))
    p = _bad(tmp_path, lambda c: c["ema"]["shadow_params"].pop())
    with pytest.raises(CheckpointError, match=f"{n - 1} tensors but the model has {n} parameters"):
        load_checkpoint(p)
    _assert_params_equal(load_checkpoint(p, ema=False), small_model())   # the raw weights are still usable
    assert "ema.shadow_params" in inspect_checkpoint(p)["problems"][0]


def test_shadow_params_out_of_order(tmp_path):
    def swap(c):
        s = c["ema"]["shadow_params"]
        s[1], s[2] = s[2], s[1]                                # sigma_map.mlp.0.weight <-> .bias
    with pytest.raises(CheckpointError, match=r"shadow_params\[1\].*sigma_map.mlp.0.weight"):
        load_checkpoint(_bad(tmp_path, swap))


@pytest.mark.parametrize("edit,msg", [
    pytest.param(lambda c: c.pop("state_dict"), "no 'state_dict'", id="no_state_dict"),
    pytest.param(lambda c: c.__setitem__("state_dict", {"model." + k[len("backbone."):]: v
                                                        for k, v in c["state_dict"].items()}),
                 "no backbone.* weights.*'model'", id="no_backbone_prefix"),
    pytest.param(lambda c: c["state_dict"].__setitem__("backbone.blocks.0.norm1.weight", [1.0, 2.0]),
                 r"state_dict\['backbone.blocks.0.norm1.weight'\] is a list", id="not_a_tensor"),
    pytest.param(lambda c: c["state_dict"].pop("backbone.vocab_embed.embedding"),
                 "missing key 'vocab_embed.embedding'", id="no_embedding"),
    pytest.param(lambda c: c["state_dict"].__setitem__("backbone.rotary_emb.inv_freq",
                                                       c["state_dict"]["backbone.rotary_emb.inv_freq"] * 0.9),
                 "rotary_emb.inv_freq does not match", id="rotary_values"),
])
def test_malformed_reference_checkpoints(tmp_path, edit, msg):
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(_bad(tmp_path, edit))


def test_stored_n_heads_contradicting_the_rotary_buffer(tmp_path):
    p = write_reference_ckpt(tmp_path / "h.ckpt", small_model(), n_heads=2)
    with pytest.raises(CheckpointError, match=r"rotary_emb.inv_freq: checkpoint \(4,\) vs model \(8,\)"):
        load_checkpoint(p)


def test_bad_directories(tmp_path):
    d = save_checkpoint(small_model(), tmp_path / "ok")
    for missing in ("config.json", "model.safetensors"):
        bad = tmp_path / f"no_{missing}"
        shutil.copytree(d, bad)
        (bad / missing).unlink()
        with pytest.raises(CheckpointError, match=f"without {missing}"):
            load_checkpoint(bad)
    bad = tmp_path / "badjson"
    shutil.copytree(d, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(bad)
    (bad / "config.json").write_text('{"format": "other", "version": 1}')
    with pytest.raises(CheckpointError, match="format is 'other'"):
        load_checkpoint(bad)
    bad = tmp_path / "trunc"
    shutil.copytree(d, bad)
    w = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(w[: len(w) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_checkpoint(bad)


def test_save_rejects_non_models(tmp_path):
    with pytest.raises(CheckpointError, match="expects a FlowLM"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path / "x")


def test_real_omegaconf_config_is_read_without_importing_omegaconf(tmp_path, monkeypatch):
    omegaconf = pytest.importorskip("omegaconf")
    from ckpt_builders import reference_config
    m = small_model()
    hp = {"config": omegaconf.OmegaConf.create(reference_config(m, 4, 9)), "tokenizer": None}
    p = write_reference_ckpt(tmp_path / "oc.ckpt", m, hyper_parameters=hp)
    for name in [k for k in sys.modules if k == "omegaconf" or k.startswith("omegaconf.")]:
        monkeypatch.setitem(sys.modules, name, None)     # any import of omegaconf now fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = inspect_checkpoint(p)
    assert info["config_sources"]["n_heads"] == "stored config" and info["config"]["seq_len"] == 9


def test_save_into_the_working_directory_is_refused(tmp_path, monkeypatch):
    """save_checkpoint(m, '.') used to fail inside (Path('.') has no name to rename); renaming the working directory
    away would leave the caller's shell in a deleted directory. It is refused with a clear error, nothing touched;
    a relative name below the working directory still saves."""
    a = small_model(seed=1)
    d = tmp_path / "ck"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    monkeypatch.chdir(d)
    for target in (".", "./", "..", str(d)):
        with pytest.raises(CheckpointError, match="working directory or holds it"):
            save_checkpoint(a, target)
    assert sorted(f.name for f in d.iterdir()) == ["notes.txt"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ck"]
    assert save_checkpoint(a, "model") == d / "model"
    _assert_params_equal(load_checkpoint("model"), a)


def test_guessed_n_heads_warns(tmp_path):
    """Neither a stored config nor the rotary buffer gives n_heads (it changes no tensor shape): the loader guesses
    and says so, naming the guessed fields and how to avoid the guess."""
    m = small_model(vocab_size=131)
    p = write_reference_ckpt(tmp_path / "bare.ckpt", m, store_config=False, include_inv_freq=False)
    with pytest.warns(UserWarning, match=r"n_heads=\d+, seq_len=128 .*config_overrides.*config.json") as rec:
        loaded = load_checkpoint(p)
    assert str(p) in str(rec[0].message) and loaded.cfg.n_heads == max(1, m.cfg.hidden // 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(p, config_overrides={"n_heads": 4, "seq_len": 9}).cfg == m.cfg
        inspect_checkpoint(p)                       # `fmlm info` reports the guess in "guessed" instead
        load_checkpoint(write_reference_ckpt(tmp_path / "inv.ckpt", m, store_config=False))   # rotary buffer


def test_bare_safetensors_file_says_what_it_needs(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    for f in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=r"w.safetensors: a safetensors file not named model.safetensors"
                                                  r".*model.safetensors \+ config.json"):
            f(tmp_path / "w.safetensors")
    d = save_checkpoint(small_model(), tmp_path / "ck")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="safetensors file without config.json beside it"):
        load_checkpoint(d / "model.safetensors")
    (tmp_path / "weights.bin").write_bytes((d / "model.safetensors").read_bytes())   # by content, not by name
    with pytest.raises(CheckpointError, match="a safetensors file not named"):
        load_checkpoint(tmp_path / "weights.bin")


# -- layouts and branches the tests above do not reach (coverage review) -----------------------------------------

def _hp_with(conf_edit=None, tokenizer=None):
    """The look-alike hyper_parameters (AttributeDict of an omegaconf-like config and a tokenizer); call inside
    fake_modules(_FAKES) so the look-alikes pickle under omegaconf/transformers names."""
    import ckpt_builders as cb
    m = small_model()
    conf = cb.reference_config(m, 4, 9)
    if conf_edit is not None:
        conf_edit(conf)
    hp = cb._AttributeDict()
    hp["config"] = cb._DictConfig(conf)
    hp["tokenizer"] = tokenizer
    return hp


def test_protocol_1_checkpoint_keeps_its_hyper_parameters(tmp_path, monkeypatch):
    """torch.save(..., pickle_protocol=1) pickles Lightning's AttributeDict (a dict subclass) as
    copyreg._reconstructor(AttributeDict, dict, {items}). The stand-in used to drop those items: the stored config
    and tokenizer were lost and seq_len silently guessed (128 instead of 9)."""
    import collections
    import copyreg
    import functools
    import ckpt_builders as cb
    m = small_model()
    monkeypatch.setattr(torch, "save", functools.partial(torch.save, pickle_protocol=1))
    with cb.fake_modules({**cb._FAKES, "omegaconf.listconfig.ListLike": _ListLike}):
        hp = _hp_with(tokenizer=cb._FastTokenizer(None, "gpt2", 9))
        hp["plain"] = _Payload(copyreg.__newobj__, collections.OrderedDict)   # a container: allowed
        hp["callbacks"] = _ListLike([1, "two"])           # _reconstructor(ListLike, list, [1, 'two'])
        p = write_reference_ckpt(tmp_path / "p1.ckpt", m, hyper_parameters=hp)
    assert ck._plain(ck._read_torch_zip(p)["hyper_parameters"]._map["callbacks"]) == [1, "two"]
    info = inspect_checkpoint(p)
    assert info["config_sources"]["n_heads"] == "stored config" and info["config_sources"]["seq_len"] == "stored config"
    assert info["stored_config"]["model.length"] == 9 and info["tokenizer"]["name_or_path"] == "gpt2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint(p)
    assert loaded.cfg == m.cfg and loaded.tokenizer_name == "gpt2"
    _assert_params_equal(loaded, m)
    # copyreg.__newobj__ (a protocol-1 global) builds stand-ins and plain containers only
    with cb.fake_modules(cb._FAKES):
        hp = _hp_with()
        hp["evil"] = _Payload(copyreg.__newobj__, torch.device)
        p = write_reference_ckpt(tmp_path / "p1evil.ckpt", m, hyper_parameters=hp)
    with pytest.raises(CheckpointError, match=r"copyreg.__newobj__ for .*torch.device.*nothing was executed"):
        load_checkpoint(p)


def test_optional_type_hints_in_hyper_parameters(tmp_path):
    """typing.Optional[str] (omegaconf's ref_type of an optional field) pickles as
    getitem(typing.Union, (str, type(None))): builtins.type(None) must give NoneType, not a refusal."""
    import typing
    m = small_model()
    p = write_reference_ckpt(tmp_path / "opt.ckpt", m,
                             edit=lambda c: c["hyper_parameters"].__setitem__("ref_type", typing.Optional[str]))
    hp = ck._read_torch_zip(p)["hyper_parameters"]
    assert hp._map["ref_type"]._args == ((str, type(None)),)
    _assert_params_equal(load_checkpoint(p), m)


class _ListLike(list):
    pass


class _SlotTokenizer:
    __slots__ = ("name_or_path", "_tokenizer")

    def __init__(self, name):
        self.name_or_path, self._tokenizer = name, None


class _BadBackend:
    def __getstate__(self):
        return b"not tokenizer.json"        # bytes, as tokenizers pickles its JSON, but not JSON

    def __setstate__(self, state):
        pass


def test_inert_containers_slots_and_unreadable_tokenizer_json(tmp_path):
    """Data-only layouts the look-alike config does not use: a config that is itself an AttributeDict (a dict
    subclass: SETITEMS), a list subclass of an allowlisted package (APPENDS → extend), a tokenizer whose fields
    live in __slots__ (state (None, {slots})), and a backend whose state is not tokenizer.json (no json, no
    error)."""
    import ckpt_builders as cb
    m = small_model()
    fakes = {**cb._FAKES, "omegaconf.listconfig.ListLike": _ListLike,
             "transformers.tokenization_utils_fast.SlotTokenizer": _SlotTokenizer,
             "tokenizers.Tokenizer": _BadBackend}
    with cb.fake_modules(fakes):
        conf = cb._AttributeDict(cb.reference_config(m, 4, 9))
        conf["callbacks"] = _ListLike([1, "two", 3.0])
        tok = _SlotTokenizer("gpt2")
        p = write_reference_ckpt(tmp_path / "slots.ckpt", m,
                                 hyper_parameters=cb._AttributeDict(config=conf, tokenizer=tok))
    info = inspect_checkpoint(p)
    assert info["config_sources"]["n_heads"] == "stored config" and info["stored_config"]["model.length"] == 9
    assert info["tokenizer"]["name_or_path"] == "gpt2" and info["tokenizer"]["class"].endswith("SlotTokenizer")
    assert ck._plain(ck._read_torch_zip(p)["hyper_parameters"]._map["config"])["callbacks"] == [1, "two", 3.0]
    with cb.fake_modules(fakes):
        tok = cb._FastTokenizer(_BadBackend(), "gpt2", 9)
        p = write_reference_ckpt(tmp_path / "badjson.ckpt", m, hyper_parameters=cb._AttributeDict(
            config=cb._DictConfig(cb.reference_config(m, 4, 9)), tokenizer=tok))
    loaded = load_checkpoint(p)
    assert loaded.tokenizer_json is None and loaded.tokenizer_name == "gpt2" and loaded.cfg == m.cfg
    assert inspect_checkpoint(p)["tokenizer"]["has_tokenizer_json"] is False


def test_shared_config_nodes_are_read_once(tmp_path, monkeypatch):
    """A pickle shares objects by reference: 40 levels of {'a': x, 'b': x} take a few hundred bytes, and
    reading them as a tree visited 2**40 nodes (`fmlm info` hung). Each node is read once; a cycle ends too."""
    m = small_model()
    junk = {"leaf": 1}
    for _ in range(40):
        junk = {"a": junk, "b": junk}
    junk["self"] = junk
    conf = {"model": {"n_heads": 4, "length": 9}, "optim": {"betas": (0.9, 0.999)}, "junk": junk}
    p = write_reference_ckpt(tmp_path / "dag.ckpt", m, hyper_parameters={"config": conf, "tokenizer": None})
    calls = []
    real = ck._plain

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10_000:
            raise AssertionError("_plain walked the shared nodes as a tree")
        return real(*args, **kwargs)
    monkeypatch.setattr(ck, "_plain", counting)
    info = inspect_checkpoint(p)
    assert info["stored_config"] == {"model.n_heads": 4, "model.length": 9} and len(calls) < 1000
    assert ck._plain(conf)["optim"] == {"betas": [0.9, 0.999]}


def test_lightning_checkpoint_without_hyper_parameters(tmp_path):
    """A LightningModule that never called save_hyperparameters(): no stored config, no tokenizer. n_heads comes
    from the rotary buffer, seq_len is a guess (inspect says so), the weights load."""
    m = small_model()
    p = write_reference_ckpt(tmp_path / "nohp.ckpt", m, edit=lambda c: c.pop("hyper_parameters"))
    info = inspect_checkpoint(p)
    assert info["stored_config"] == {} and info["tokenizer"] is None and info["guessed"] == ["seq_len"]
    assert info["config_sources"]["n_heads"] == "rotary buffer" and info["config"]["n_heads"] == 4
    loaded = load_checkpoint(p, config_overrides={"seq_len": 9})
    assert loaded.cfg == m.cfg and loaded.tokenizer_json is None and loaded.tokenizer_name is None
    _assert_params_equal(loaded, m)


def test_guessed_n_heads_for_a_hidden_size_not_a_multiple_of_64(tmp_path):
    """hidden=200: 200 // 64 = 3 heads do not divide it; the guess steps down to 2 (head dim 100)."""
    m = small_model(hidden=200, n_heads=4)
    p = write_reference_ckpt(tmp_path / "h200.ckpt", m, store_config=False, include_inv_freq=False)
    with pytest.warns(UserWarning, match="n_heads=2"):
        loaded = load_checkpoint(p)
    assert loaded.cfg.n_heads == 2 and loaded.cfg.hidden == 200
    _assert_params_equal(loaded, m)


def test_odd_hidden_size_is_a_checkpoint_error(tmp_path):
    """No head count fits an odd hidden size (rotary needs an even head dim): the n_heads guess used to count
    down to 0 and fail with ZeroDivisionError instead of saying what is wrong."""
    def edit(c):
        sd = c["state_dict"]
        sd["backbone.vocab_embed.embedding"] = torch.randn(131, 33)
        sd["backbone.blocks.0.mlp.0.weight"] = torch.randn(132, 33)
    p = write_reference_ckpt(tmp_path / "odd.ckpt", small_model(), store_config=False, include_inv_freq=False,
                             edit=edit)
    for fn in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="inferred configuration is invalid.*head dim"):
            fn(p)


@pytest.mark.parametrize("edit,msg", [
    pytest.param(lambda c: c.__setitem__("state_dict", [1, 2]), "'state_dict' is a list, not a dict",
                 id="state_dict_not_a_dict"),
    pytest.param(lambda c: c["state_dict"].__setitem__(3, torch.zeros(1)), "non-string state_dict keys: 3",
                 id="int_key"),
    pytest.param(lambda c: c["state_dict"].__setitem__("backbone._orig_mod.blocks.0.norm1.weight",
                                                       c["state_dict"]["backbone.blocks.0.norm1.weight"]),
                 "two state_dict keys map to 'blocks.0.norm1.weight'", id="compiled_and_plain_key"),
    pytest.param(lambda c: c["ema"].__setitem__("shadow_params", {"a": 1}), "shadow_params is a dict, not a list",
                 id="shadow_not_a_list"),
    pytest.param(lambda c: c["ema"]["shadow_params"].__setitem__(2, None),
                 r"shadow_params\[2\] \(sigma_map.mlp.0.bias\) is a NoneType, not a tensor", id="shadow_none"),
    pytest.param(lambda c: c["state_dict"].__setitem__("backbone.vocab_embed.embedding", torch.zeros(131, 4, 8)),
                 r"vocab_embed.embedding has shape \(131, 4, 8\), expected \(V, hidden\)", id="embedding_3d"),
    pytest.param(lambda c: [c["state_dict"].pop(k) for k in list(c["state_dict"]) if ".blocks." in k],
                 "no blocks.<i>.* keys: cannot infer n_blocks", id="no_blocks"),
    pytest.param(lambda c: c["state_dict"].__setitem__("backbone.blocks.0.mlp.0.weight", torch.zeros(100, 32)),
                 r"blocks.0.mlp.0.weight has shape \(100, 32\): not a multiple of hidden=32", id="mlp_ratio"),
])
def test_more_malformed_reference_checkpoints(tmp_path, edit, msg):
    p = _bad(tmp_path, edit)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(p)


def test_top_level_not_a_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="top level is a Tensor, not a dict"):
        load_checkpoint(tmp_path / "t.pt")


def test_inspect_reports_what_would_fail_instead_of_raising(tmp_path):
    """`fmlm info` lists a key problem under 'problems' (and still prints the rest); loading raises it."""
    p = _bad(tmp_path, lambda c: c["state_dict"].pop("backbone.output_layer.linear.bias"))
    info = inspect_checkpoint(p)
    assert len(info["problems"]) == 1 and "missing keys: 'output_layer.linear.bias'" in info["problems"][0]
    assert info["config"]["hidden"] == 32 and info["has_ema"]
    with pytest.raises(CheckpointError, match="missing keys: 'output_layer.linear.bias'"):
        load_checkpoint(p)


def test_dtype_argument_is_checked(built):
    path = built["flm"][0]
    with pytest.raises(CheckpointError, match="unknown dtype 'fp8'"):
        load_checkpoint(path, dtype="fp8")
    with pytest.raises(CheckpointError, match="dtype must be a floating type, got torch.int8"):
        load_checkpoint(path, dtype=torch.int8)
    assert {p.dtype for p in load_checkpoint(path, dtype="half").parameters()} == {torch.float16}


def test_bad_directory_configs(tmp_path):
    import json
    d = save_checkpoint(small_model(), tmp_path / "ok")
    cfg = json.loads((d / "config.json").read_text())
    for content, msg in (([1, 2], "expected a JSON object"),
                         ({**cfg, "version": 2}, "format version 2; this fmlm reads version 1"),
                         ({**cfg, "n_experts": 8}, r"unknown ModelConfig fields \['n_experts'\]")):
        (d / "config.json").write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(d)


def test_forced_weights_only_load_is_explained(built, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch refuse any explicit pickle_module: say what to unset."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="unset TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        load_checkpoint(built["flm"][0])


def test_unreadable_path_is_a_checkpoint_error(tmp_path):
    """A path that exists but cannot be opened (here a unix socket; a file without read permission alike)."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "s.ckpt"))
        with pytest.raises(CheckpointError, match="s.ckpt: cannot read"):
            load_checkpoint(tmp_path / "s.ckpt")
    finally:
        s.close()


def test_save_refuses_a_root_or_a_file_and_saves_from_a_deleted_cwd(tmp_path, monkeypatch):
    m = small_model()
    with pytest.raises(CheckpointError, match="filesystem root"):
        save_checkpoint(m, "/")
    (tmp_path / "f").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_checkpoint(m, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "mine"
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()                                 # the working directory was deleted: saving elsewhere works
    _assert_params_equal(load_checkpoint(save_checkpoint(m, tmp_path / "out")), m)


def test_save_writes_the_tokenizer_file_a_model_names(tmp_path):
    m = small_model()
    tok = tmp_path / "my_tokenizer.json"
    tok.write_text('{"version": "1.0", "model": {}}')
    m.tokenizer_path = str(tok)
    out = save_checkpoint(m, tmp_path / "ck")
    assert (out / "tokenizer.json").read_text() == tok.read_text()
    assert load_checkpoint(out).tokenizer_json == tok.read_text()


def test_failed_rename_restores_the_previous_checkpoint(tmp_path, monkeypatch):
    """The new directory's rename into place fails after the old one was moved aside: the old one comes back."""
    a, b = small_model(seed=1), small_model(seed=2)
    target = save_checkpoint(a, tmp_path / "out")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("rename failed (simulated)")
        return real(src, dst)
    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(b, target)
    monkeypatch.undo()
    assert len(calls) == 3 and calls[2][1] == "out"
    _assert_params_equal(load_checkpoint(target), a)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def _failing_fsync(monkeypatch, is_kind, err: OSError) -> None:
    """os.fsync raises `err` for the file kinds is_kind (stat.S_ISDIR, S_ISREG) accepts, and syncs the others."""
    real = os.fsync

    def fsync(fd):
        if is_kind(os.fstat(fd).st_mode):
            raise err
        return real(fd)
    monkeypatch.setattr(ck.os, "fsync", fsync)


def test_directory_fsync_refused_by_the_filesystem(tmp_path, monkeypatch):
    """Some filesystems refuse fsync on a directory: the checkpoint is still written."""
    import errno
    import stat
    _failing_fsync(monkeypatch, stat.S_ISDIR, OSError(errno.EINVAL, "Invalid argument"))
    m = small_model()
    _assert_params_equal(load_checkpoint(save_checkpoint(m, tmp_path / "ck")), m)


def test_a_file_fsync_error_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """An I/O error on a file's fsync (its data may not be on disk) fails the save instead of reporting success;
    the previous checkpoint stays, and no temporary directory is left."""
    import errno
    import stat
    m = small_model()
    target = save_checkpoint(m, tmp_path / "ck")
    before = (target / "model.safetensors").read_bytes()
    _failing_fsync(monkeypatch, stat.S_ISREG, OSError(errno.EIO, "Input/output error"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(m, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_tokenizer_named_by_a_string_is_reported_by_name(tmp_path):
    """hyper_parameters['tokenizer'] may be a name ('gpt2') rather than a pickled tokenizer: info reports that name."""
    path = write_reference_ckpt(tmp_path / "s.ckpt", small_model(),
                                edit=lambda ck: ck["hyper_parameters"].__setitem__("tokenizer", "gpt2"))
    info = inspect_checkpoint(path)
    assert info["tokenizer"] == {"class": "str", "name_or_path": "gpt2", "has_tokenizer_json": False}
