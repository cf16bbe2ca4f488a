"""Checkpoint IO: reference Lightning `.ckpt` files (read without running pickled code) and fmlm directories.

Two formats are read by `load_checkpoint`:
- a directory written by `save_checkpoint`: `model.safetensors` (parameters and buffers under FlowLM's names),
  `config.json` (`ModelConfig.to_dict()` plus `{"format": "fmlm", "version": 1}`), optionally `tokenizer.json`;
- a Lightning `.ckpt` as the reference code (github.com/david3684/flm, DESIGN.md §1) writes it: a torch.save zip
  whose pickle holds `state_dict` (`backbone.<name>`, maybe `._orig_mod.` from torch.compile, and keys of other
  modules such as `teacher_model.*`), `ema.shadow_params` (a list in `backbone.named_parameters()` order),
  `hyper_parameters` (a pickled omegaconf config and HF tokenizer), optimizer and loop state.

A `.ckpt` is a pickle, and unpickling runs whatever callables it names. We never import or call anything the file
asks for except an explicit allowlist of tensor-rebuild functions and plain types (`_REAL_GLOBALS`); classes of
data-only libraries that legitimately appear in `hyper_parameters` (omegaconf, transformers, tokenizers, numpy, ...)
become inert stand-ins (`_Inert`) that record their constructor arguments and state and never run code; any other
global aborts the load with a CheckpointError before anything is called. The stored config is then read as inert
data (the omegaconf node tree) to recover what the tensor shapes cannot tell: n_heads and seq_len.
"""
from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import ModelConfig
from .model import FlowLM

FORMAT_NAME = "fmlm"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
_OUR_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit FlowLM; the message names the problem."""


# ---------------------------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------------------------

class _Refused(pickle.UnpicklingError):
    """Raised from find_class (or a guarded callable) before anything named by the pickle is called."""


class _Inert:
    """Stand-in for an object of a data-only library: records how pickle would build it and never runs code.

    Subclassed once per global name (`_inert_type`), because pickle's NEWOBJ needs a real type. Supports the
    protocol pickle uses on the objects it builds: __new__/__call__ (NEWOBJ, REDUCE), __setstate__ (BUILD),
    append/extend (APPENDS on list subclasses), __setitem__ (SETITEMS on dict subclasses), add (ADDITEMS).
    """

    _fmlm_global = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.__dict__.update(_args=args, _kwargs=kwargs, _state=None, _items=[], _map={})
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def append(self, value):
        self._items.append(value)

    def extend(self, values):
        self._items.extend(values)

    def add(self, value):
        self._items.append(value)

    def __setitem__(self, key, value):
        self._map[key] = value

    def __repr__(self):
        return f"<inert {self._fmlm_global}>"


def _is_inert(obj) -> bool:
    return isinstance(obj, _Inert) or (isinstance(obj, type) and issubclass(obj, _Inert))


def _inert_name(obj) -> str:
    return obj._fmlm_global


# Packages whose classes may appear in a Lightning checkpoint's hyper_parameters / callback states as plain data.
# Their globals become `_Inert` stand-ins: nothing is imported, nothing is called, even for their functions.
_INERT_PACKAGES = frozenset({
    "omegaconf", "hydra", "transformers", "tokenizers", "huggingface_hub", "sentencepiece",
    "typing", "typing_extensions", "numpy", "pathlib", "enum", "datetime", "decimal", "fractions", "uuid",
    "lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics",
})


def _torch_named_values() -> dict[str, Any]:
    """torch.<dtype>, torch.<layout>, torch.<memory_format>: read from torch's namespace without getattr (torch's
    module __getattr__ imports submodules lazily, and importing is running code)."""
    return {f"torch.{k}": v for k, v in vars(torch).items()
            if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))}


def _real_globals() -> dict[str, Any]:
    import torch._tensor
    import torch._utils
    import torch.serialization
    rc: dict[str, Any] = {
        # tensors and parameters exactly as torch.save writes them (plain, not sparse/quantized/nested)
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.UntypedStorage": torch.UntypedStorage,
        "torch.storage.UntypedStorage": torch.UntypedStorage,
        # plain containers and scalars
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "collections.Counter": collections.Counter,
        "collections.deque": collections.deque,
    }
    if hasattr(torch._utils, "_rebuild_tensor_v3"):
        rc["torch._utils._rebuild_tensor_v3"] = torch._utils._rebuild_tensor_v3
    for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool, slice, range,
              object):
        rc[f"builtins.{t.__name__}"] = t
    rc.update(_torch_named_values())
    return rc


# Callables that pickle legitimately uses on data, replaced by versions that only touch inert stand-ins or plain
# values. builtins.getattr and operator.getitem appear in pickles of enum members and typing generics; on anything
# that is not an inert stand-in they refuse (getattr(<real object>, name) is how pickle exploits reach os.system).
def _guarded_getattr(obj, name, *default):
    if _is_inert(obj) and isinstance(name, str):
        return _inert_type(f"{_inert_name(obj)}.{name}")
    raise _Refused(f"builtins.getattr on {type(obj).__name__!r} (only allowed on inert data stand-ins)")


def _guarded_getitem(obj, key):
    if _is_inert(obj):
        return _inert_type(f"{_inert_name(obj)}[]")(key)
    raise _Refused(f"operator.getitem on {type(obj).__name__!r} (only allowed on inert data stand-ins)")


def _guarded_type(*args):
    if len(args) == 1 and (args[0] is None or args[0] is Ellipsis or args[0] is NotImplemented):
        return type(args[0])
    raise _Refused("builtins.type with arguments other than None/Ellipsis/NotImplemented")


def _guarded_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); other codecs (zlib, ...) are not data.
    if isinstance(obj, str) and encoding in ("latin1", "latin-1") and errors == "strict":
        return obj.encode("latin1")
    raise _Refused(f"_codecs.encode with codec {encoding!r}")


def _guarded_newobj(cls, *args):
    if _is_inert(cls) or cls in _PLAIN_TYPES:
        return cls.__new__(cls, *args)
    raise _Refused(f"copyreg.__newobj__ for {cls!r}")


def _guarded_reconstructor(cls, base, state):
    if _is_inert(cls):
        obj = cls(state) if state is not None else cls()
        # protocol 0/1 pickle a dict (list) subclass as _reconstructor(cls, dict, dict(obj)): keep the items
        if isinstance(state, dict):
            obj._map.update(state)
        elif isinstance(state, list):
            obj._items.extend(state)
        return obj
    raise _Refused(f"copyreg._reconstructor for {cls!r}")


_PLAIN_TYPES = (dict, list, tuple, set, frozenset, collections.OrderedDict, collections.defaultdict,
                collections.Counter, collections.deque)

_GUARDED_GLOBALS = {
    "builtins.getattr": _guarded_getattr,
    "builtins.type": _guarded_type,
    "operator.getitem": _guarded_getitem,
    "_operator.getitem": _guarded_getitem,
    "_codecs.encode": _guarded_codecs_encode,
    "codecs.encode": _guarded_codecs_encode,
    "copyreg.__newobj__": _guarded_newobj,
    "copyreg._reconstructor": _guarded_reconstructor,
}

_INERT_TYPES: dict[str, type] = {}


def _inert_type(full_name: str) -> type:
    """One stand-in type per global name, shared across loads (a type holds nothing but the name)."""
    t = _INERT_TYPES.get(full_name)
    if t is None:
        short = full_name.rsplit(".", 1)[-1] or "Inert"
        t = type(short, (_Inert,), {"_fmlm_global": full_name, "__module__": __name__})
        _INERT_TYPES[full_name] = t
    return t


class _RestrictedUnpickler(pickle.Unpickler):
    """find_class is the only door through which a pickle reaches code: it opens on the allowlist only."""

    _real: Optional[dict[str, Any]] = None

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Refused(f"non-string global name {module!r}.{name!r}")
        # protocol-2 pickles name Python 2 modules (__builtin__.long); map them as pickle's own find_class does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if _RestrictedUnpickler._real is None:
            _RestrictedUnpickler._real = _real_globals()
        obj = _RestrictedUnpickler._real.get(full)
        if obj is not None:
            return obj
        if full in _GUARDED_GLOBALS:
            return _GUARDED_GLOBALS[full]
        if module.split(".", 1)[0] in _INERT_PACKAGES:
            return _inert_type(full)
        raise _Refused(f"callable {full}")


class _RestrictedPickleModule:
    """What torch.load needs of a `pickle_module`: a name and an Unpickler class (torch subclasses it to map
    storage types, then calls our find_class for everything else)."""

    __name__ = "fmlm_restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def _refusal_message(path: Path, e: _Refused) -> str:
    return (f"{path}: the checkpoint's pickle asks for {e} - neither an allowlisted tensor type nor data of a "
            f"known data-only library; refusing to load it; nothing was executed")


def _read_torch_zip(path: Path) -> Any:
    """Unpickle a torch.save zip with the restricted unpickler; storages are memory-mapped, so tensors the model
    does not need (optimizer moments, the teacher) are never read from disk."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if any(n.endswith("/constants.pkl") for n in names):
                raise CheckpointError(f"{path}: is a TorchScript archive (torch.load would hand it to torch.jit.load, "
                                      f"which runs its code); refusing; nothing was executed")
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: a zip archive but not a torch.save checkpoint "
                                      f"(expected one '<name>/data.pkl' record, found {pkl or 'none'})")
            zf.read(pkl[0])         # checks the pickle record's CRC: a corrupt one fails here, not mid-unpickle
    except zipfile.BadZipFile as e:
        if head == b"PK\x03\x04":
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from None
        if head[:1] == b"\x80":
            raise CheckpointError(f"{path}: a bare pickle / legacy (torch<1.6) torch.save file, not a zip-format "
                                  f"checkpoint; not supported (re-save it with a current torch.save)") from None
        raise CheckpointError(f"{path}: not a torch checkpoint (not a zip archive; first bytes {head!r})") from None
    except (OSError, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or unreadable ({e})") from None
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False,
                          mmap=True)
    except _Refused as e:
        raise CheckpointError(_refusal_message(path, e)) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside torch.load means a corrupt or odd file
        if isinstance(e.__context__, _Refused):
            raise CheckpointError(_refusal_message(path, e.__context__)) from None
        if "explicit pickle_module" in str(e):
            raise CheckpointError(f"{path}: torch refused the restricted loader ({e}); unset "
                                  f"TORCH_FORCE_WEIGHTS_ONLY_LOAD (this loader is at least as strict)") from None
        raise CheckpointError(f"{path}: corrupt or unreadable torch checkpoint: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading inert data (omegaconf trees, AttributeDicts, tokenizers)
# ---------------------------------------------------------------------------------------------------------------

def _inert_state(obj: _Inert) -> dict:
    st = obj._state
    if isinstance(st, tuple) and len(st) == 2:        # (dict state, slot state)
        merged = {}
        for part in st:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return st if isinstance(st, dict) else {}


def _plain(obj: Any, depth: int = 0, memo: Optional[dict] = None) -> Any:
    """Inert omegaconf / Lightning containers → plain dicts and lists; other stand-ins are left as they are.

    omegaconf 2.x pickles a DictConfig/ListConfig as its __dict__ with the children in `_content` and each leaf
    node (AnyNode, IntegerNode, ...) with its value in `_val`; `_parent` points back up and is never followed.
    Each container is converted once (`memo`): a pickle can share one node 2**64 times in a few hundred bytes."""
    if depth > 64:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        return obj
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)][1]
    out = obj
    if isinstance(obj, dict):
        out = {k: _plain(v, depth + 1, memo) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = [_plain(v, depth + 1, memo) for v in obj]
    elif isinstance(obj, _Inert):
        st = _inert_state(obj)
        if "_content" in st:
            out = _plain(st["_content"], depth + 1, memo)
        elif "_val" in st:
            out = _plain(st["_val"], depth + 1, memo)
        elif obj._map:
            out = {k: _plain(v, depth + 1, memo) for k, v in obj._map.items()}
        elif obj._items:
            out = [_plain(v, depth + 1, memo) for v in obj._items]
    memo[id(obj)] = (obj, out)       # holding obj keeps its id from being reused while the memo lives
    return out


def _mapping(obj: Any) -> dict:
    """A dict view of a plain dict or an inert dict subclass (Lightning's AttributeDict)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, _Inert):
        return obj._map or _inert_state(obj)
    return {}


def _dig(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


_STORED_FIELDS = ("model.n_heads", "model.length", "model.hidden_size", "model.n_blocks", "model.cond_dim",
                  "model.dropout", "model.name", "algo.name", "algo.double_temb", "algo.learnable_loss_weighting",
                  "algo.backbone", "algo.causal_attention", "data.tokenizer_name_or_path", "data.train",
                  "training.ema")


def _stored_config(hparams: Any) -> dict[str, Any]:
    """The fields of the pickled reference config we could read as plain values ({'model.n_heads': 12, ...})."""
    cfg = _plain(_mapping(hparams).get("config"))
    out = {}
    for name in _STORED_FIELDS:
        v = _dig(cfg, name)
        if isinstance(v, (str, int, float, bool)):
            out[name] = v
    return out


def _tokenizer_info(hparams: Any) -> Optional[dict[str, Any]]:
    """Class, name and (for fast tokenizers) the tokenizer.json text of the pickled HF tokenizer, read as data."""
    tok = _mapping(hparams).get("tokenizer")
    if tok is None:
        return None
    if isinstance(tok, str):          # a config that names its tokenizer instead of pickling one
        return {"class": "str", "name_or_path": tok or None, "json": None}
    if not isinstance(tok, _Inert):
        return {"class": type(tok).__name__, "name_or_path": None, "json": None}
    st = _inert_state(tok)
    name = None
    for cand in (st.get("name_or_path"), st.get("_name_or_path"), _mapping(st.get("init_kwargs")).get("name_or_path")):
        if isinstance(cand, str) and cand:
            name = cand
            break
    text = None
    backend = st.get("_tokenizer")
    if isinstance(backend, _Inert) and isinstance(backend._state, (bytes, str)):
        raw = backend._state
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            json.loads(text)
        except (UnicodeDecodeError, ValueError):
            text = None
    return {"class": _inert_name(tok), "name_or_path": name, "json": text}


# ---------------------------------------------------------------------------------------------------------------
# Parsing a loaded checkpoint object
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Parsed:
    path: Path
    kind: str                                  # "lightning" | "state_dict" | "dir"
    raw: dict[str, torch.Tensor]               # backbone weights under FlowLM names (lightning/state_dict)
    shadow: Optional[list] = None              # ema.shadow_params
    ema_meta: dict = dataclasses.field(default_factory=dict)
    stored: dict = dataclasses.field(default_factory=dict)
    tokenizer: Optional[dict] = None
    lightning_version: Optional[str] = None
    global_step: Optional[int] = None
    epoch: Optional[int] = None
    top_level: list = dataclasses.field(default_factory=list)
    ignored: dict = dataclasses.field(default_factory=dict)   # prefix → count of non-backbone keys
    orig_mod: bool = False
    dir_config: Optional[dict] = None          # kind == "dir": config.json minus format fields
    shapes: dict = dataclasses.field(default_factory=dict)    # name → shape (from headers for dirs)


def _clean_key(key: str) -> str:
    """Drop torch.compile's `_orig_mod` level (`backbone._orig_mod.x` → `backbone.x`), as the reference does."""
    key = key.replace("._orig_mod.", ".")
    return key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key


def _parse_obj(obj: Any, path: Path) -> _Parsed:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: top level is a {type(obj).__name__}, not a dict: not a Lightning checkpoint "
                              f"or state dict")
    if "state_dict" in obj:
        sd, kind = obj["state_dict"], "lightning"
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict")
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, kind = obj, "state_dict"
    else:
        raise CheckpointError(f"{path}: no 'state_dict' in the checkpoint (top-level keys: {_names(list(obj))})")
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: non-string state_dict keys: {_names(bad)}")
    # a Lightning module keeps the DiT under `backbone.`; a bare state dict may or may not carry the prefix
    prefixed = kind == "lightning" or any(_clean_key(k).startswith("backbone.") for k in sd)
    raw: dict[str, torch.Tensor] = {}
    ignored: dict[str, int] = {}
    orig_mod = False
    for k, v in sd.items():
        name = _clean_key(k)
        orig_mod |= name != k
        if prefixed:
            if not name.startswith("backbone."):
                head = k.split(".", 1)[0]
                ignored[head] = ignored.get(head, 0) + 1
                continue
            name = name[len("backbone."):]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        if name in raw:
            raise CheckpointError(f"{path}: two state_dict keys map to {name!r} (one with ._orig_mod.)")
        raw[name] = v
    if not raw:
        raise CheckpointError(f"{path}: no backbone.* weights in the state_dict (key prefixes found: "
                              f"{_names(sorted(ignored))})")
    p = _Parsed(path=path, kind=kind, raw=raw, ignored=ignored, orig_mod=orig_mod,
                top_level=sorted(str(k) for k in obj), shapes={k: tuple(v.shape) for k, v in raw.items()})
    if kind == "lightning":
        ema = obj.get("ema")
        if isinstance(ema, dict) and ema.get("shadow_params") is not None:
            shadow = ema["shadow_params"]
            if not isinstance(shadow, (list, tuple)):
                raise CheckpointError(f"{path}: ema.shadow_params is a {type(shadow).__name__}, not a list")
            p.shadow = list(shadow)
            p.ema_meta = {k: ema[k] for k in ("decay", "num_updates") if isinstance(ema.get(k), (int, float))}
        hp = obj.get("hyper_parameters")
        p.stored = _stored_config(hp)
        p.tokenizer = _tokenizer_info(hp)
        v = obj.get("pytorch-lightning_version")
        p.lightning_version = v if isinstance(v, str) else None
        p.global_step = obj.get("global_step") if isinstance(obj.get("global_step"), int) else None
        p.epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    return p


def _names(keys, limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")


def _infer_config(p: _Parsed, overrides: Optional[dict]) -> tuple[ModelConfig, dict[str, str]]:
    """ModelConfig from tensor shapes, then the stored config (n_heads, seq_len), then guesses; `sources` says
    where each field came from ('shapes', 'rotary buffer', 'stored config', 'default', 'guess', 'override')."""
    sh, path = p.shapes, p.path
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.default is not dataclasses.MISSING}
    src = {k: "default" for k in fields}

    def need(name):
        if name not in sh:
            raise CheckpointError(f"{path}: missing key {name!r}: cannot infer the model configuration "
                                  f"(not an FLM/FMLM DiT backbone?)")
        return sh[name]

    emb = need("vocab_embed.embedding")
    if len(emb) != 2:
        raise CheckpointError(f"{path}: vocab_embed.embedding has shape {emb}, expected (V, hidden)")
    fields["vocab_size"], fields["hidden"] = emb
    blocks = {int(m.group(1)) for k in sh if (m := _BLOCK_RE.match(k))}
    if not blocks:
        raise CheckpointError(f"{path}: no blocks.<i>.* keys: cannot infer n_blocks")
    fields["n_blocks"] = max(blocks) + 1
    fields["cond_dim"] = need("sigma_map.mlp.2.weight")[0]
    fields["two_time"] = any(k.startswith("sigma_map_prime.") for k in sh)
    fields["learnable_loss_weighting"] = any(k.startswith("learnable_loss_weighting.") for k in sh)
    D = fields["hidden"]
    mlp0 = need("blocks.0.mlp.0.weight")
    if mlp0[0] % D:
        raise CheckpointError(f"{path}: blocks.0.mlp.0.weight has shape {mlp0}: not a multiple of hidden={D}")
    fields["mlp_ratio"] = mlp0[0] // D
    src.update({k: "shapes" for k in ("vocab_size", "hidden", "n_blocks", "cond_dim", "two_time",
                                      "learnable_loss_weighting", "mlp_ratio")})

    stored = p.stored
    inv = sh.get("rotary_emb.inv_freq")
    if isinstance(stored.get("model.n_heads"), int) and not isinstance(stored.get("model.n_heads"), bool):
        fields["n_heads"], src["n_heads"] = stored["model.n_heads"], "stored config"
    elif inv is not None and len(inv) == 1 and inv[0] > 0 and D % (2 * inv[0]) == 0:
        fields["n_heads"], src["n_heads"] = D // (2 * inv[0]), "rotary buffer"
    else:
        # the released models use 64-dim heads (768 = 12 x 64)
        n = max(1, D // 64)
        while n > 1 and (D % n or (D // n) % 2):     # an odd hidden: n=1, which ModelConfig then refuses
            n -= 1
        fields["n_heads"], src["n_heads"] = max(n, 1), "guess"
    if isinstance(stored.get("model.length"), int) and not isinstance(stored.get("model.length"), bool):
        fields["seq_len"], src["seq_len"] = stored["model.length"], "stored config"
    else:
        # the released models: LM1B (bert-base-uncased, V=30522) L=128, OWT (GPT-2 + [PAD], V=50258) L=1024
        fields["seq_len"], src["seq_len"] = (1024 if fields["vocab_size"] > 40000 else 128), "guess"
    return _apply_overrides(fields, src, overrides, path), src


def _warn_guessed(path: Path, cfg: ModelConfig, src: dict[str, str]) -> None:
    """n_heads changes no tensor shape: a wrong guess loads without error and computes wrong outputs."""
    guessed = {k: getattr(cfg, k) for k, v in src.items() if v == "guess"}
    warnings.warn(f"{path}: neither a stored config nor rotary_emb.inv_freq gives n_heads; guessed "
                  f"{', '.join(f'{k}={v}' for k, v in guessed.items())} (a wrong n_heads loads without error but "
                  f"computes wrong outputs); pass config_overrides={{'n_heads': ..., 'seq_len': ...}}, or load a "
                  f"directory whose {CONFIG_FILE} holds the config (save_checkpoint writes one)", stacklevel=3)


def _apply_overrides(fields: dict, src: dict, overrides: Optional[dict], path: Path) -> ModelConfig:
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise CheckpointError(f"config_overrides: unknown ModelConfig fields {unknown} (known: {sorted(known)})")
        for k, v in overrides.items():
            fields[k], src[k] = v, "override"
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: inferred configuration is invalid: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Validation and materialization
# ---------------------------------------------------------------------------------------------------------------

class _ParamsOnMeta(torch.overrides.TorchFunctionMode):
    """Allocating factories (empty/zeros/ones/...) go to the meta device; everything else runs for real.

    A plain `with torch.device("meta")` would also put FlowLM's small rotary computation (arange, divide) on meta,
    whose Python meta kernels import torch._refs on first use: 2-4 s per process, against 0.04 s for this."""

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                            torch.empty_strided})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _meta_model(cfg: ModelConfig) -> FlowLM:
    """FlowLM with parameters on the meta device (no memory, no init cost) and its buffers computed on the CPU."""
    with _ParamsOnMeta():
        return FlowLM(cfg, init="published")


def _expected_inv_freq(model: FlowLM) -> torch.Tensor:
    """The rotary buffer as FlowLM computes it (on the CPU, see _ParamsOnMeta)."""
    inv = model.rotary_emb.inv_freq
    if inv.device.type == "meta":
        raise CheckpointError("internal: FlowLM's rotary buffer was not computed on the CPU")
    return inv


def _check_keys(p: _Parsed, model: FlowLM, cfg: ModelConfig) -> None:
    expected = {n: tuple(t.shape) for n, t in model.named_parameters()}
    buffers = {n: tuple(t.shape) for n, t in model.named_buffers()}
    have = p.shapes
    missing = [n for n in expected if n not in have]
    unexpected = [n for n in have if n not in expected and n not in buffers]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    wrong = [f"{n}: checkpoint {have[n]} vs model {shape}" for n, shape in {**expected, **buffers}.items()
             if n in have and tuple(have[n]) != shape]
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:12]) + (f" ... and {len(wrong) - 12} more"
                                                                     if len(wrong) > 12 else ""))
    if problems:
        raise CheckpointError(f"{p.path}: checkpoint does not fit FlowLM({_cfg_brief(cfg)}): " + "; ".join(problems))
    if p.kind != "dir" and "rotary_emb.inv_freq" in p.raw:
        got = p.raw["rotary_emb.inv_freq"].detach().to("cpu", torch.float32)
        want = _expected_inv_freq(model)
        if not torch.allclose(got, want, rtol=1e-6, atol=0.0):
            err = ((got - want).abs() / want.abs()).max().item()
            raise CheckpointError(f"{p.path}: rotary_emb.inv_freq does not match head_dim={cfg.head_dim}, "
                                  f"rotary_base={cfg.rotary_base} (max relative difference {err:.3g}); "
                                  f"pass config_overrides={{'rotary_base': ...}} if the model used another base")


def _cfg_brief(cfg: ModelConfig) -> str:
    return (f"V={cfg.vocab_size}, hidden={cfg.hidden}, blocks={cfg.n_blocks}, heads={cfg.n_heads}, "
            f"cond={cfg.cond_dim}, two_time={cfg.two_time}, llw={cfg.learnable_loss_weighting}")


def _select_weights(p: _Parsed, model: FlowLM, ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    names = [n for n, _ in model.named_parameters()]
    if not ema or p.kind != "lightning":
        return {n: p.raw[n] for n in names}, "raw"
    if p.shadow is None:
        warnings.warn(f"{p.path}: no EMA (ema.shadow_params) in the checkpoint; loading the raw state_dict weights",
                      stacklevel=3)
        return {n: p.raw[n] for n in names}, "raw (no EMA in checkpoint)"
    # The reference zips shadow_params with named_parameters() and fills a shortfall from the raw weights; a count
    # mismatch means the positional mapping is off, so we refuse instead of guessing.
    if len(p.shadow) != len(names):
        raise CheckpointError(f"{p.path}: ema.shadow_params has {len(p.shadow)} tensors but the model has "
                              f"{len(names)} parameters; the EMA cannot be mapped by position (load with ema=False "
                              f"for the raw weights)")
    out = {}
    for i, (n, t) in enumerate(zip(names, p.shadow)):
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{p.path}: ema.shadow_params[{i}] ({n}) is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(p.raw[n].shape):
            raise CheckpointError(f"{p.path}: ema.shadow_params[{i}] has shape {tuple(t.shape)} but parameter {n} "
                                  f"has {tuple(p.raw[n].shape)}: the EMA is not in named_parameters() order")
        out[n] = t
    return out, "ema"


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        d = dtype
    else:
        aliases = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16,
                   "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                   "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}
        d = aliases.get(str(dtype).lower().replace("torch.", ""))
        if d is None:
            raise CheckpointError(f"unknown dtype {dtype!r}")
    if d is not None and not d.is_floating_point:
        raise CheckpointError(f"dtype must be a floating type, got {d}")
    return d


def _materialize(cfg: ModelConfig, weights: dict[str, torch.Tensor], device, dtype) -> FlowLM:
    """A new FlowLM whose tensors are fresh, contiguous copies (one copy each: from the memory-mapped file straight
    to the target device and dtype). The rotary buffer stays fp32: angles up to L·freq lose precision in bf16."""
    device = torch.device(device)
    model = _meta_model(cfg)
    sd = {}
    for name, _ in model.named_parameters():
        t = weights[name]
        out = torch.empty(t.shape, dtype=dtype if dtype is not None else t.dtype, device=device)
        out.copy_(t)
        sd[name] = out
    for name, _ in model.named_buffers():
        if name != "rotary_emb.inv_freq":
            raise CheckpointError(f"FlowLM has a buffer {name!r} this loader does not know how to fill")
        sd[name] = _expected_inv_freq(model).to(device)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# fmlm directories
# ---------------------------------------------------------------------------------------------------------------

def _parse_dir(path: Path) -> _Parsed:
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    missing = [f.name for f in (cfg_file, w_file) if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: a directory without {' and '.join(missing)}: not an fmlm checkpoint "
                              f"(save_checkpoint writes {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    fmt, ver = cfg.pop("format", None), cfg.pop("version", None)
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{cfg_file}: format is {fmt!r}, expected {FORMAT_NAME!r}")
    if ver != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format version {ver!r}; this fmlm reads version {FORMAT_VERSION}")
    from safetensors import safe_open
    try:
        with safe_open(str(w_file), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{w_file}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None
    tok = path / TOKENIZER_FILE
    return _Parsed(path=path, kind="dir", raw={}, dir_config=cfg, shapes=shapes,
                   tokenizer={"class": None, "name_or_path": str(tok), "json": None} if tok.is_file() else None)


def _dir_config(p: _Parsed, overrides: Optional[dict]) -> tuple[ModelConfig, dict[str, str]]:
    fields = dict(p.dir_config)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{p.path / CONFIG_FILE}: unknown ModelConfig fields {unknown}")
    src = {k: "config.json" for k in fields}
    return _apply_overrides(fields, src, overrides, p.path), src


def _read_dir_weights(p: _Parsed, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    w_file = p.path / WEIGHTS_FILE
    try:
        with safe_open(str(w_file), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{w_file}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def _parse(path: PathLike) -> _Parsed:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        path = path.parent
    if path.is_dir():
        return _parse_dir(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        what = (f"without {CONFIG_FILE} beside it" if path.name == WEIGHTS_FILE
                else f"not named {WEIGHTS_FILE} (a bare safetensors file)")
        raise CheckpointError(f"{path}: a safetensors file {what}: safetensors weights load only as an fmlm "
                              f"checkpoint directory, {WEIGHTS_FILE} + {CONFIG_FILE} (what save_checkpoint writes); "
                              f"pass that directory or its {WEIGHTS_FILE}")
    return _parse_obj(_read_torch_zip(path), path)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors header: an 8-byte little-endian length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 32


def load_checkpoint(path: PathLike, ema: bool = True, device="cpu", dtype=None,
                    config_overrides: Optional[dict] = None) -> FlowLM:
    """Load a FlowLM from a reference Lightning `.ckpt` or a directory written by `save_checkpoint`.

    ema: for a `.ckpt`, the EMA weights (`ema.shadow_params`, what the paper evaluates) rather than the raw
        state_dict; without an EMA in the file, warns and loads the raw weights. A directory holds one set.
    device, dtype: where and in what floating dtype the parameters live (None keeps the stored dtype).
    config_overrides: ModelConfig fields to set over the inferred ones (e.g. {"logit_cap": None} for v1 models,
        {"seq_len": 512}); shape-derived fields that contradict the weights fail the shape check.
    The returned model is new and complete, or a CheckpointError is raised and nothing is returned. It carries
    `checkpoint_path`, `loaded_weights` ('ema' / 'raw' / 'saved'), `tokenizer_json` (the pickled fast tokenizer's tokenizer.json,
    or the directory's, or None) and `tokenizer_name`.
    """
    p = _parse(path)
    dtype = _resolve_dtype(dtype)
    if p.kind == "dir":
        cfg, _ = _dir_config(p, config_overrides)
    else:
        cfg, src = _infer_config(p, config_overrides)
        if src.get("n_heads") == "guess":
            _warn_guessed(p.path, cfg, src)
    meta = _meta_model(cfg)
    _check_keys(p, meta, cfg)
    names = [n for n, _ in meta.named_parameters()]
    if p.kind == "dir":
        weights, which = _read_dir_weights(p, names), "saved"
    else:
        weights, which = _select_weights(p, meta, ema)
    model = _materialize(cfg, weights, device, dtype)
    model.checkpoint_path = str(p.path)
    model.loaded_weights = which
    tok = p.tokenizer or {}
    if p.kind == "dir" and (p.path / TOKENIZER_FILE).is_file():
        model.tokenizer_json = (p.path / TOKENIZER_FILE).read_text()
        model.tokenizer_name = str(p.path / TOKENIZER_FILE)
    else:
        model.tokenizer_json = tok.get("json")
        model.tokenizer_name = tok.get("name_or_path")
    return model


def inspect_checkpoint(path: PathLike) -> dict[str, Any]:
    """What `fmlm info` prints: format, the inferred ModelConfig and where each field came from, parameter count,
    EMA presence, key groups, stored-config fields read from the pickle, tokenizer, and any problem that would make
    load_checkpoint fail. Reads no tensor data beyond headers (the .ckpt's storages are memory-mapped)."""
    p = _parse(path)
    info: dict[str, Any] = {"path": str(p.path), "kind": p.kind}
    if p.kind == "dir":
        cfg, src = _dir_config(p, None)
    else:
        cfg, src = _infer_config(p, None)
    meta = _meta_model(cfg)
    info["config"] = cfg.to_dict()
    info["config_sources"] = src
    info["guessed"] = sorted(k for k, v in src.items() if v == "guess")
    info["n_params"] = sum(t.numel() for t in meta.parameters())
    problems = []
    try:
        _check_keys(p, meta, cfg)
    except CheckpointError as e:
        problems.append(str(e))
    info["has_ema"] = p.shadow is not None
    if p.kind != "dir":
        info["ema"] = {"count": len(p.shadow) if p.shadow is not None else 0, **p.ema_meta}
        if p.shadow is not None and not problems:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _select_weights(p, meta, True)
            except CheckpointError as e:
                problems.append(str(e))
        first = next(iter(p.raw.values()))
        info["dtype"] = str(first.dtype).replace("torch.", "")
        info["keys"] = {"backbone": len(p.raw), "ignored": p.ignored, "compiled_orig_mod": p.orig_mod,
                        "top_level": p.top_level}
        info["lightning_version"] = p.lightning_version
        info["global_step"] = p.global_step
        info["epoch"] = p.epoch
        info["stored_config"] = p.stored
    else:
        info["keys"] = {"tensors": len(p.shapes)}
    tok = p.tokenizer
    info["tokenizer"] = None if tok is None else {"class": tok.get("class"), "name_or_path": tok.get("name_or_path"),
                                                  "has_tokenizer_json": bool(tok.get("json")) or p.kind == "dir"}
    info["problems"] = problems
    return info


def save_checkpoint(model: FlowLM, directory: PathLike) -> Path:
    """Write `directory/model.safetensors` + `config.json` (+ `tokenizer.json` when the model carries one: the
    attribute `tokenizer_json` (text) or `tokenizer_path` (a file)). Atomic: everything is written and fsynced in a
    temporary sibling directory, then renamed into place, so `directory` is at every instant absent, the previous
    complete checkpoint, or the new complete one. Overwrites only a directory that holds nothing but these files,
    and never the process's working directory or one that holds it (the rename would leave the caller, and its
    shell, in a deleted directory)."""
    if not isinstance(model, FlowLM):
        raise CheckpointError(f"save_checkpoint expects a FlowLM, got {type(model).__name__}")
    from safetensors.torch import save_file
    # absolute first: Path('.') and Path('..') have no name to make a temporary sibling from or to rename
    directory = Path(directory).resolve()
    if directory == directory.parent:
        raise CheckpointError(f"{directory}: is a filesystem root; refusing to replace it")
    try:
        cwd = Path.cwd().resolve()
    except OSError:                              # the working directory was deleted
        cwd = None
    if cwd is not None and (cwd == directory or directory in cwd.parents):
        raise CheckpointError(f"{directory}: is the working directory or holds it, and saving replaces the target "
                              f"directory as a whole; save into a new directory, e.g. {directory / 'model'}")
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: exists and is not a directory; refusing to overwrite")
        foreign = sorted(f.name for f in directory.iterdir() if f.name not in _OUR_FILES)
        if foreign:
            raise CheckpointError(f"{directory}: exists and holds files that are not an fmlm checkpoint's "
                                  f"({_names(foreign)}); refusing to overwrite")
    # CPU tensors already contiguous are written as they are (no copy); safetensors needs CPU, contiguous data
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **model.cfg.to_dict()}
    tok_text = getattr(model, "tokenizer_json", None)
    tok_path = getattr(model, "tokenizer_path", None)
    if tok_text is None and tok_path and Path(tok_path).is_file():
        tok_text = Path(tok_path).read_text()
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "fmlm_config": json.dumps(config)})
        _write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tok_text:
            _write_text(tmp / TOKENIZER_FILE, tok_text)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if directory.exists():
            old = tmp.with_suffix(".old")
            os.rename(directory, old)
        os.rename(tmp, directory)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not directory.exists():
            os.rename(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise   # a file's data may not be on disk: the save failed (the caller restores the previous one)
        # some filesystems refuse fsync on directories; durability is best effort there
    finally:
        os.close(fd)
