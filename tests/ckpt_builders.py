"""Build checkpoints laid out exactly as the reference code (github.com/david3684/flm) writes them, for tests.

A reference `.ckpt` is `torch.save` of Lightning's checkpoint dict: `state_dict` with the DiT under `backbone.`
(`backbone._orig_mod.` when the backbone was torch.compiled) beside other modules (`teacher_model.*` while
distilling), `ema` = ExponentialMovingAverage.state_dict() whose `shadow_params` follow
`backbone.named_parameters()`, `hyper_parameters` = {'config': omegaconf DictConfig, 'tokenizer': HF tokenizer},
optimizer / scheduler / loop / callback state and `pytorch-lightning_version`.

The config and tokenizer are pickled by classes that do NOT exist when the checkpoint is loaded: look-alikes of
omegaconf's DictConfig/AnyNode/(Container)Metadata, Lightning's AttributeDict and a transformers fast tokenizer,
registered in `sys.modules` under the real module names only while `torch.save` runs (`_fake_modules`). Their
pickled layout matches what omegaconf 2.x writes (a DictConfig's __dict__ with children in `_content`, each leaf
node's value in `_val`, `_parent` pointing back up, typing.Any and a defaultdict in the metadata), so a loader
must read them as inert data. The tokenizer's backend is a real `tokenizers.Tokenizer`, pickled as the library
pickles it (its tokenizer.json as bytes).
"""
from __future__ import annotations

import collections
import contextlib
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Optional

import torch

from fmlm.engine.model import FlowLM


@contextlib.contextmanager
def fake_modules(objects: dict[str, object]):
    """Make `objects` ({"pkg.mod.Name": obj}) picklable by reference under those names, for the duration only."""
    saved = {}
    try:
        for full, obj in objects.items():
            mod_name, name = full.rsplit(".", 1)
            parts = mod_name.split(".")
            for i in range(1, len(parts) + 1):
                m = ".".join(parts[:i])
                if m not in saved:
                    saved[m] = sys.modules.get(m)
                    sys.modules[m] = types.ModuleType(m)
            setattr(sys.modules[mod_name], name, obj)
            obj.__module__, obj.__qualname__ = mod_name, name
        yield
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old


# -- omegaconf look-alikes ---------------------------------------------------------------------------------------

class _Meta:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _ContainerMeta(_Meta):
    pass


class _AnyNode:
    def __init__(self, value, key, parent):
        self._metadata = _Meta(ref_type=typing.Any, object_type=None, optional=True, key=key, flags={},
                               flags_root=False, resolver_cache=collections.defaultdict(dict))
        self._parent = parent
        self._val = value


class _DictConfig:
    def __init__(self, content: dict, key=None, parent=None):
        # a typed root, as omegaconf records for structured configs: pickles through operator.getitem
        ref_type = typing.Dict[str, typing.Any] if parent is None else typing.Any
        self._metadata = _ContainerMeta(ref_type=ref_type, object_type=dict, optional=True, key=key, flags={},
                                        flags_root=False, resolver_cache=collections.defaultdict(dict),
                                        key_type=typing.Any, element_type=typing.Any)
        self._parent = parent
        self._content = {k: (_DictConfig(v, k, self) if isinstance(v, dict) else _AnyNode(v, k, self))
                         for k, v in content.items()}


class _AttributeDict(dict):
    pass


class _FastTokenizer:
    def __init__(self, backend, name: str, length: int):
        self.name_or_path = name
        self.init_kwargs = {"name_or_path": name, "model_max_length": length}
        self.model_max_length = length
        self.padding_side = "right"
        self._tokenizer = backend


class _TrainerFn(enum.Enum):
    FITTING = "fit"


_FAKES = {
    "omegaconf.dictconfig.DictConfig": _DictConfig,
    "omegaconf.nodes.AnyNode": _AnyNode,
    "omegaconf.base.Metadata": _Meta,
    "omegaconf.base.ContainerMetadata": _ContainerMeta,
    "lightning.fabric.utilities.data.AttributeDict": _AttributeDict,
    "transformers.models.gpt2.tokenization_gpt2_fast.GPT2TokenizerFast": _FastTokenizer,
    "lightning.pytorch.trainer.states.TrainerFn": _TrainerFn,
}


def _numpy_scalar(v):
    try:
        import numpy as np
    except ImportError:
        return v
    return np.float64(v)


def word_level_tokenizer(vocab_size: int):
    """A real `tokenizers.Tokenizer` with `vocab_size` entries (the last one a [PAD], as in the OWT models), or
    None without the optional `tokenizers` package."""
    try:
        from tokenizers import Tokenizer, models
    except ImportError:
        return None
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["[UNK]"] = vocab_size - 2
    vocab["[PAD]"] = vocab_size - 1
    return Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))


def reference_config(model: FlowLM, n_heads, length, algo_name: Optional[str] = None) -> dict:
    cfg = model.cfg
    return {
        "mode": "train",
        "algo": {"name": algo_name or ("flm_distill_double" if cfg.two_time else "flm"), "backbone": "dit",
                 "parameterization": "mean", "time_conditioning": True, "causal_attention": False,
                 "double_temb": cfg.two_time, "learnable_loss_weighting": cfg.learnable_loss_weighting},
        "model": {"name": "tiny", "type": "ddit", "hidden_size": cfg.hidden, "cond_dim": cfg.cond_dim,
                  "length": length, "n_blocks": cfg.n_blocks, "n_heads": n_heads, "scale_by_sigma": True,
                  "dropout": 0.1, "tie_word_embeddings": False},
        "data": {"tokenizer_name_or_path": "gpt2", "train": "openwebtext-split", "wrap": True},
        "training": {"ema": 0.9999, "sampling_eps": 1e-3},
        "sampling": {"steps": 1, "predictor": "ancestral", "interp": "${model.length}"},
    }


def ema_like(model: FlowLM, scale: float = 0.01, seed: int = 1) -> FlowLM:
    """A copy of `model` with every parameter moved a little: an EMA that differs from the raw weights."""
    import copy
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def write_reference_ckpt(path, model: FlowLM, ema_model: Optional[FlowLM] = None, n_heads=None, length=None, *,
                         algo_name: Optional[str] = None, orig_mod: bool = False, teacher: bool = False,
                         store_config: bool = True, include_ema: bool = True, include_inv_freq: bool = True,
                         tokenizer_name: str = "gpt2", hyper_parameters=None, edit=None) -> Path:
    """Write `model` (raw weights) and `ema_model` (EMA shadow params; default: the raw weights) as the reference
    code's Lightning checkpoint. n_heads / length go into the pickled config (default: model.cfg's);
    store_config=False leaves them out. `hyper_parameters` replaces the look-alike config + tokenizer (e.g. with a
    real omegaconf DictConfig). `edit(ckpt_dict)` may tamper with the dict before it is saved."""
    path = Path(path)
    n_heads = model.cfg.n_heads if n_heads is None else n_heads
    length = model.cfg.seq_len if length is None else length
    prefix = "backbone._orig_mod." if orig_mod else "backbone."
    state = collections.OrderedDict()
    for k, v in model.state_dict().items():
        if k == "rotary_emb.inv_freq" and not include_inv_freq:
            continue
        state[prefix + k] = v.detach().clone()
    if teacher:
        for k, v in list(model.state_dict().items())[:4]:
            state["teacher_model." + k] = v.detach().clone() + 1.0
    shadow_src = ema_model if ema_model is not None else model
    params = list(model.parameters())
    conf = reference_config(model, n_heads, length, algo_name)
    if not store_config:
        conf["model"] = {k: v for k, v in conf["model"].items() if k not in ("n_heads", "length")}
        conf["sampling"].pop("interp")
    ckpt = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "2.5.0.post0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3},
                                                                    "current": {"ready": 4, "completed": 3}},
                               "epoch_loop.batch_progress": {"total": {"completed": 1234}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/nll', 'mode': 'min'}": {
            "best_model_score": torch.tensor(3.25), "best_model_path": "/ckpts/best.ckpt",
            "dirpath": Path("/ckpts"), "kth_best_model_path": "", "stage": _TrainerFn.FITTING,
            "seen": {1, 2}, "frozen": frozenset({"a"}), "window": slice(1, 5), "z": 1 + 2j, "blob": b"\x00\xff",
            "np_score": _numpy_scalar(0.5)}},
        "optimizer_states": [{"state": {i: {"step": torch.tensor(1234.0), "exp_avg": torch.randn(p.shape),
                                            "exp_avg_sq": torch.rand(p.shape)} for i, p in enumerate(params[:3])},
                              "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                "weight_decay": 0.0, "params": list(range(len(params)))}]}],
        "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 1234, "_step_count": 1235, "lr_lambdas": [None]}],
        "hparams_name": "kwargs",
        "sampler": {"random_state": torch.Generator().get_state()},
    }
    if include_ema:
        ckpt["ema"] = {"decay": 0.9999, "num_updates": 1234,
                       "shadow_params": [p.detach().clone() for p in shadow_src.parameters()],
                       "collected_params": []}
    fakes = _FAKES if hyper_parameters is None else {k: v for k, v in _FAKES.items() if k.startswith("lightning")}
    with fake_modules(fakes):
        if hyper_parameters is None:
            hp = _AttributeDict()
            hp["config"] = _DictConfig(conf)
            hp["tokenizer"] = _FastTokenizer(word_level_tokenizer(model.cfg.vocab_size), tokenizer_name, length)
            hyper_parameters = hp
        ckpt["hyper_parameters"] = hyper_parameters
        if edit is not None:
            edit(ckpt)
        torch.save(ckpt, path)
    return path


def small_model(vocab_size: int = 131, seq_len: int = 9, two_time: bool = False, llw: bool = False,
                seed: int = 0, **kw) -> FlowLM:
    """The small FlowLM the checkpoint tests use (V prime, L=9, hidden 32, 2 blocks, 4 heads, cond 16)."""
    from fmlm.engine.config import ModelConfig
    cfg = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, hidden=kw.pop("hidden", 32),
                      n_blocks=kw.pop("n_blocks", 2), n_heads=kw.pop("n_heads", 4), cond_dim=kw.pop("cond_dim", 16),
                      two_time=two_time, learnable_loss_weighting=llw, **kw)
    torch.manual_seed(seed)
    m = FlowLM(cfg)
    m.reset_parameters(seed=seed)
    return m
