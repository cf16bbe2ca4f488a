"""Training data: text → token ids (HF `tokenizers`) → one id stream cached on disk → blocks of L tokens.

Packing follows the reference's "wrap" mode (MDLM/DUO/FLM `_group_texts`): every text is followed by an end
token, the texts are concatenated, and the stream is cut into blocks of L−2 ids framed as [bos] … [eos].
  LM1B style: bos = eos = [CLS] (sentence per line, BERT WordPiece). The reference sets eos_token = [SEP] but
    takes the id as `tokenizer.encode(eos_token)[0]`, and BERT's encode puts [CLS] first: the released LM1B
    models saw [CLS] between sentences and at both ends of a block, so this packing does the same.
  OWT style:  bos = eos = the end-of-text token (documents separated by EOS, GPT-2 BPE).
The stream is stored once as a .npy file and memory-mapped, so a run (or each DDP rank) reads blocks
without holding the corpus in memory.

Sources: 'bundled' (the King James Bible shipped in the package: no network), a text file (.txt or .gz)
or a directory of them (one text per non-empty line), or 'hf:<name>[:<config>]' through the optional
`datasets` package (lm1b, openwebtext, ... when the user has them cached or online).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

BUNDLED_FILE = "kjv_verses.txt.gz"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
STYLES = ("lm1b", "owt")
TEXT_SUFFIXES = (".txt", ".gz", ".text", ".md")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def bundled_corpus_path() -> Path:
    """Path of the bundled corpus (King James Bible, one verse per line, gzip; provenance in README.md)."""
    p = importlib.resources.files("fmlm.engine").joinpath("data", BUNDLED_FILE)
    return Path(str(p))


def bundled_corpus() -> str:
    """The bundled public-domain corpus as one string (31,102 verses, one per line, ~4.1 MB)."""
    with gzip.open(bundled_corpus_path(), "rt", encoding="utf-8") as f:
        return f.read()


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"             # gzip by content, whatever the name says
    if gz:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


_BINARY_MAGIC = {b"\xfd7zXZ": "xz", b"BZh": "bzip2", b"PK\x03\x04": "zip", b"\x28\xb5\x2f\xfd": "zstd",
                 b"7z\xbc\xaf": "7z", b"\x93NUMPY": "a .npy array"}


def _check_text_file(path: Path) -> Path:
    """Refuse a file that is not text: its lines would be decoded with replacement characters and trained on."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] == b"\x1f\x8b":                  # gzip: look inside
        with gzip.open(path, "rb") as f:
            head = f.read(4096)
    kind = next((k for m, k in _BINARY_MAGIC.items() if head.startswith(m)), None)
    if kind is not None or b"\x00" in head:
        what = f"{kind} data" if kind else "binary data (NUL bytes)"
        raise ValueError(f"data source {str(path)!r} is not a text file: it holds {what}. Plain text is read "
                         f"(one text per line; {', '.join(TEXT_SUFFIXES)}), gzip-compressed or not")
    return path


def _text_files(source: Path) -> list[Path]:
    if not source.exists():
        raise FileNotFoundError(f"data source {str(source)!r}: no such file or directory "
                                "(or use 'bundled', 'hf:<name>')")
    if source.is_file():
        return [_check_text_file(source)]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {source}")
    return [_check_text_file(f) for f in files]      # a text suffix on binary content is refused too


def iter_texts(source: str, split: str = "train") -> Iterator[str]:
    """Yield the texts of a source: non-empty lines of text files, or the 'text' field of a HF dataset."""
    if source == "bundled":
        with gzip.open(bundled_corpus_path(), "rt", encoding="utf-8") as f:
            yield from (ln.strip() for ln in f if ln.strip())
        return
    if source.startswith("hf:"):
        yield from _iter_hf(source[3:], split)
        return
    for f in _text_files(Path(source).expanduser()):
        with _open_text(f) as fh:
            yield from (ln.strip() for ln in fh if ln.strip())


def _iter_hf(spec: str, split: str) -> Iterator[str]:
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise RuntimeError(f"data 'hf:{spec}' needs the optional package `datasets` (pip install datasets)") from e
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    cols = list(ds.column_names)
    col = "text" if "text" in cols else None
    for row in ds:
        if col is None:      # else the first column that holds text (e.g. glue's 'sentence' after 'idx')
            col = next((c for c in cols if isinstance(row[c], str)), None)
            if col is None:
                raise ValueError(f"data 'hf:{spec}': no text column (columns {cols})")
        t = row[col]
        if not isinstance(t, str):
            raise ValueError(f"data 'hf:{spec}': column {col!r} holds {type(t).__name__}, not text")
        t = t.strip()
        if t:
            yield t


def source_signature(source: str, split: str = "train") -> str:
    """A string that changes when the source's content may have changed (path, size, mtime)."""
    if source == "bundled":
        p = bundled_corpus_path()
        return f"bundled:{p.stat().st_size}"
    if source.startswith("hf:"):
        return f"{source}:{split}"
    p = Path(source).expanduser().resolve()
    parts = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in _text_files(p)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, lowercase: bool = True,
                    min_frequency: int = 2, kind: str = "wordpiece"):
    """Train a small tokenizer with BERT's normalizer and pre-tokenizer (as LM1B's bert-base-uncased) and the
    specials [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4.

    kind="wordpiece": WordPiece (rare words split into ##pieces). kind="words": one token per word or
    punctuation mark, the vocab_size−5 most frequent ones, [UNK] for the rest (the 2,043 most frequent cover
    94.6% of the KJV's running words; bert-base-uncased's WordPiece on LM1B is likewise almost all whole words)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < len(SPECIALS) + 32:
        raise ValueError(f"vocab_size must be at least {len(SPECIALS) + 32}, got {vocab_size}")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIALS), show_progress=False)
    elif kind == "words":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.decoder = decoders.WordPiece(prefix="##")       # joins words, tidies the spaces before punctuation
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIALS), show_progress=False)
    else:
        raise ValueError(f"kind must be 'wordpiece' or 'words', got {kind!r}")
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


TRAIN_SPECS = {"train": "wordpiece", "words": "words"}


def resolve_tokenizer(spec: str, source: str = "bundled", split: str = "train", cache_dir=None,
                      is_builder: bool = True):
    """'train:<V>' trains a WordPiece of size V on the source, 'words:<V>' a word-level vocabulary; else a
    file, directory or known name (fmlm.engine.tokenizer.load_tokenizer: tokenizer.json, vocab.txt,
    'bert-base-uncased', 'gpt2').

    WordPiece training breaks frequency ties in no fixed order, so a trained tokenizer is saved in cache_dir
    (keyed by source and spec) and reused: DDP ranks (only `is_builder` trains) and resumed runs then share
    one vocabulary."""
    head, _, v = spec.partition(":")
    if head not in TRAIN_SPECS or (v and not v.isdigit()):
        if head in TRAIN_SPECS:
            raise ValueError(f"tokenizer spec {spec!r}: expected '{head}:<vocab size>'")
        from fmlm.engine.tokenizer import load_tokenizer  # noqa: PLC0415

        return load_tokenizer(spec)
    v = v or "2048"
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{source_signature(source, split)}|{spec}".encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"tokenizer-{key}.json"
        if path.is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path))
        if not is_builder:
            raise FileNotFoundError(f"trained tokenizer {path} missing (rank 0 should have written it)")
    tok = train_tokenizer(iter_texts(source, split), int(v), kind=TRAIN_SPECS[head])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return tok


def special_ids(tok, style: str) -> tuple[int, int]:
    """(bos, eos) ids of a packing style: LM1B [CLS] on both sides (the reference's ids, see the module
    docstring); OWT the end-of-text token on both sides."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    vocab = tok.get_vocab()
    if style == "lm1b":
        if "[CLS]" in vocab:
            return vocab["[CLS]"], vocab["[CLS]"]
        raise ValueError("style 'lm1b' needs a [CLS] token in the tokenizer (use style 'owt')")
    for name in ("<|endoftext|>", "[EOS]", "</s>", "[SEP]"):
        if name in vocab:
            return vocab[name], vocab[name]
    raise ValueError("style 'owt' needs an end-of-text token (<|endoftext|>, [EOS], </s> or [SEP])")


def vocab_size_of(tok) -> int:
    """Model vocabulary size for a tokenizer: GPT-2's 50257 gets one [PAD] on top, as the released OWT model."""
    n = tok.get_vocab_size()
    return n + 1 if n == 50257 else n


# ---------------------------------------------------------------------------------------------
# Token stream cache and packing
# ---------------------------------------------------------------------------------------------
def tokenize_stream(texts: Iterable[str], tok, eos: int, batch: int = 4096) -> np.ndarray:
    """ids(text_0) + [eos] + ids(text_1) + [eos] + …, as one 1-D array (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.int32
    parts: list[np.ndarray] = []
    buf: list[str] = []

    def flush():
        for enc in tok.encode_batch(buf, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
        buf.clear()

    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    if not parts:
        raise ValueError("the data source holds no text")
    return np.concatenate(parts)


def _tokenizer_hash(tok) -> str:
    return hashlib.sha1(tok.to_str().encode()).hexdigest()[:16]


def cached_stream(source: str, tok, style: str, cache_dir: Path, split: str = "train",
                  is_builder: bool = True) -> np.ndarray:
    """The source's token stream, built once and memory-mapped from <cache_dir>/<key>.npy.

    The file is written to a temporary name and renamed, so concurrent readers (DDP ranks) never see a
    partial file; only `is_builder` (rank 0) builds, the others must wait for it (a barrier) before calling.
    A cached file that is damaged (unreadable, not the length its .json records, an id outside the vocabulary:
    a truncated copy, a flipped bit, a file from elsewhere under this name) is rebuilt with a warning by the
    builder and refused by the others: embedding an id ≥ V fails far from its cause (a device-side assert on
    CUDA)."""
    _, eos = special_ids(tok, style)
    key = hashlib.sha1(f"{source_signature(source, split)}|{_tokenizer_hash(tok)}|{style}|{eos}".encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokens-{key}.npy"
    meta_path = cache_dir / f"tokens-{key}.json"
    vocab = tok.get_vocab_size()
    if path.exists():
        arr, damage = _load_tokens(path, meta_path, vocab)
        if damage is None:
            return arr
        if not is_builder:
            raise ValueError(f"token cache {path} is damaged ({damage}); rank 0 should have rebuilt it")
        warnings.warn(f"token cache {path} is damaged ({damage}): rebuilding it", stacklevel=2)
        del arr
    elif not is_builder:
        raise FileNotFoundError(f"token cache {path} missing (rank 0 should have built it)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    arr = tokenize_stream(iter_texts(source, split), tok, eos)
    meta = {"source": source, "split": split, "style": style, "tokens": int(arr.size), "vocab": vocab}
    # the record first, then the stream: a stream on disk always has its record (the length it is checked against)
    tmp = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
    arr, damage = _load_tokens(path, meta_path, vocab)
    if damage is not None:
        raise OSError(f"token cache {path} reads back damaged right after it was written ({damage})")
    return arr


def _load_tokens(path: Path, meta_path: Path, vocab: int):
    """(memory-mapped stream, None) or (None, what is wrong with the file)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:         # truncated data, a broken header, not a .npy at all
        return None, f"unreadable: {str(e).splitlines()[0][:160]}"
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        return None, f"a {arr.dtype} array of shape {arr.shape}, not a 1-D id stream"
    try:
        want = json.loads(meta_path.read_text())["tokens"] if meta_path.is_file() else None
    except (ValueError, KeyError, TypeError):
        want = None                                      # a damaged record: the ids are still checked below
    if want is not None and want != arr.shape[0]:
        return None, f"{arr.shape[0]} tokens where its record says {want}"
    if arr.shape[0]:
        lo, hi = int(arr.min()), int(arr.max())          # one pass over the stream, once per run
        if lo < 0 or hi >= vocab:
            return None, f"ids from {lo} to {hi}, outside the vocabulary of {vocab}"
    return arr, None


class PackedBlocks:
    """Blocks [bos] + stream[i·(L−2) : (i+1)·(L−2)] + [eos] over a 1-D id stream (the reference's wrap).
    The stream's tail that does not fill a block is dropped, as the reference does."""

    def __init__(self, stream: np.ndarray, seq_len: int, bos: int, eos: int, index: Optional[np.ndarray] = None):
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3 (bos + one token + eos), got {seq_len}")
        self.stream, self.L, self.bos, self.eos = stream, int(seq_len), int(bos), int(eos)
        n = stream.shape[0] // (self.L - 2)
        if n == 0:
            raise ValueError(f"the data holds {stream.shape[0]} tokens: not enough for one block of L={seq_len}")
        self.index = np.arange(n) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        b = int(self.index[i])
        w = self.L - 2
        out = np.empty(self.L, dtype=np.int64)
        out[0], out[-1] = self.bos, self.eos
        out[1:-1] = self.stream[b * w:(b + 1) * w]
        return out

    def batch(self, idx: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self[int(i)] for i in idx]))

    def split(self, val_every: int = 50) -> tuple["PackedBlocks", "PackedBlocks"]:
        """(train, validation): every val_every-th block is held out (spread over the whole corpus)."""
        held = (self.index % val_every) == 0
        if held.all() or not held.any():
            raise ValueError(f"cannot hold out every {val_every}-th of {len(self)} blocks")
        return (PackedBlocks(self.stream, self.L, self.bos, self.eos, self.index[~held]),
                PackedBlocks(self.stream, self.L, self.bos, self.eos, self.index[held]))


def pack(stream: np.ndarray, seq_len: int, bos: int, eos: int) -> np.ndarray:
    """All blocks of a stream as one (N, L) int64 array (small data and tests)."""
    blocks = PackedBlocks(stream, seq_len, bos, eos)
    return np.stack([blocks[i] for i in range(len(blocks))])


# ---------------------------------------------------------------------------------------------
# Sampler: sharded over DDP ranks, exact resume
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardedSampler:
    """Yields this rank's micro-batches of block indices from a per-epoch permutation (seed + epoch).

    Every rank draws the same permutation and takes the slice [rank::world] of each global batch, as
    DistributedSampler does; the state (epoch, position) is saved in checkpoints for exact resume."""
    n: int
    global_batch: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    pos: int = 0          # index of the next global batch within the epoch

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} not divisible by world size {self.world}")
        if self.n < self.global_batch:
            raise ValueError(f"dataset has {self.n} blocks, fewer than one global batch ({self.global_batch})")
        self._perm_epoch = -1

    def _perm(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm_cache = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = self.epoch
        return self._perm_cache

    def next(self) -> np.ndarray:
        per_epoch = self.n // self.global_batch
        if self.pos >= per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        g = self._perm()[self.pos * self.global_batch:(self.pos + 1) * self.global_batch]
        self.pos += 1
        return g[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n,
                "global_batch": self.global_batch}

    def load_state_dict(self, d: dict):
        if d["n"] != self.n:
            raise ValueError(f"resume: the data has {self.n} blocks, the checkpoint was trained on {d['n']}")
        if d.get("global_batch", self.global_batch) != self.global_batch:   # pos counts global batches
            raise ValueError(f"resume: the checkpoint read batches of {d['global_batch']} blocks, this run asks for "
                             f"{self.global_batch}; resume with the same --batch-size")
        self.epoch, self.pos, self.seed = d["epoch"], d["pos"], d["seed"]


@dataclasses.dataclass
class Corpus:
    """What a training run needs from the data: the tokenizer, the train/validation blocks, the specials."""
    tokenizer: object
    train: PackedBlocks
    val: PackedBlocks
    vocab_size: int
    style: str


def tokens_cache(cache_dir: Optional[str] = None) -> Path:
    """Where tokenized streams and trained tokenizers are cached: cache_dir, else $FMLM_CACHE/tokens, else
    ~/.cache/fmlm/tokens."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("FMLM_CACHE") or Path.home() / ".cache" / "fmlm") / "tokens"


def load_corpus(source: str = "bundled", tokenizer: str = "train:2048", seq_len: int = 64, style: str = "lm1b",
                cache_dir: Optional[str] = None, val_every: int = 50, split: str = "train",
                is_builder: bool = True, barrier=None) -> Corpus:
    """Tokenize (once, cached) and pack a source. In DDP only rank 0 (`is_builder`) trains the tokenizer and
    builds the token cache; `barrier` runs between that and the other ranks' reads of the same files."""
    cache = tokens_cache(cache_dir)
    if is_builder:
        tok = resolve_tokenizer(tokenizer, source, split, cache, True)
        stream = cached_stream(source, tok, style, cache, split, True)
    if barrier is not None:
        barrier()
    if not is_builder:
        tok = resolve_tokenizer(tokenizer, source, split, cache, False)
        stream = cached_stream(source, tok, style, cache, split, False)
    bos, eos = special_ids(tok, style)
    train, val = PackedBlocks(stream, seq_len, bos, eos).split(val_every)
    return Corpus(tok, train, val, vocab_size_of(tok), style)


# ---------------------------------------------------------------------------------------------
# Words (for the word-pair quality measure)
# ---------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lower-cased words (letters and apostrophes) of a text: what the word-pair measure compares."""
    import re

    return re.findall(r"[a-z']+", text.lower())


def word_pairs(texts: Iterable[str], across: bool = True) -> set[tuple[str, str]]:
    """Adjacent word pairs of texts; across=True also pairs the last word of a text with the first of the
    next (packed blocks and their samples run across text boundaries)."""
    out: set[tuple[str, str]] = set()
    prev: Optional[str] = None
    for t in texts:
        w = words(t)
        if not w:
            continue
        if across and prev is not None:
            out.add((prev, w[0]))
        out.update(zip(w, w[1:]))
        prev = w[-1]
    return out
