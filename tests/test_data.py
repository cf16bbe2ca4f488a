"""Data: bundled corpus, tokenizer training, the reference's wrap packing, the on-disk cache, the sharded sampler."""
import gzip
import warnings

import numpy as np
import pytest
import torch

import fmlm.data
from fmlm.engine import data as D
from fmlm.engine import metrics as M


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (spin-waiting threads cost 50x on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_tok():
    texts = [ln for _, ln in zip(range(3000), D.iter_texts("bundled"))]
    return D.train_tokenizer(texts, vocab_size=300)


def test_bundled_corpus():
    text = fmlm.data.bundled_corpus()
    lines = text.splitlines()
    assert len(lines) == 31102
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert lines[-1].startswith("The grace of our Lord Jesus Christ")
    assert (D.bundled_corpus_path().parent / "README.md").read_text().lower().count("public domain") >= 1


def test_tokenizer_specials_and_roundtrip(small_tok):
    vocab = small_tok.get_vocab()
    assert [vocab[s] for s in D.SPECIALS] == [0, 1, 2, 3, 4]
    assert 250 <= small_tok.get_vocab_size() <= 300
    enc = small_tok.encode("And God said, Let there be light", add_special_tokens=False)
    assert small_tok.decode(enc.ids) == "and god said, let there be light"
    assert D.special_ids(small_tok, "lm1b") == (2, 2)          # [CLS] both sides, as the reference's ids
    assert D.special_ids(small_tok, "owt") == (3, 3)
    with pytest.raises(ValueError, match="style"):
        D.special_ids(small_tok, "bogus")


def test_word_level_tokenizer():
    texts = [ln for _, ln in zip(range(3000), D.iter_texts("bundled"))]
    tok = D.train_tokenizer(texts, vocab_size=300, kind="words")
    vocab = tok.get_vocab()
    assert [vocab[s] for s in D.SPECIALS] == [0, 1, 2, 3, 4] and tok.get_vocab_size() == 300
    enc = tok.encode("And God said, Let there be", add_special_tokens=False)
    assert enc.tokens == ["and", "god", "said", ",", "let", "there", "be"]
    assert tok.decode(enc.ids) == "and god said, let there be"
    assert tok.encode("Zerubbabel", add_special_tokens=False).tokens == ["[UNK]"]
    with pytest.raises(ValueError, match="kind"):
        D.train_tokenizer(texts, 300, kind="bpe")
    with pytest.raises(ValueError, match="vocab size"):
        D.resolve_tokenizer("words:many")


def test_wrap_packing_like_reference():
    stream = np.arange(100, 123, dtype=np.uint16)          # 23 ids; L=7 → blocks of 5 ids, 4 blocks, tail 3 dropped
    blocks = D.pack(stream, 7, bos=2, eos=3)
    assert blocks.shape == (4, 7) and blocks.dtype == np.int64
    assert (blocks[:, 0] == 2).all() and (blocks[:, -1] == 3).all()
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), np.arange(100, 120))
    with pytest.raises(ValueError, match="seq_len"):
        D.pack(stream, 2, 2, 3)
    with pytest.raises(ValueError, match="not enough"):
        D.pack(stream[:3], 7, 2, 3)


def test_tokenize_stream_separates_texts(small_tok):
    s = D.tokenize_stream(["in the beginning", "and god said"], small_tok, eos=3)
    ids_a = small_tok.encode("in the beginning", add_special_tokens=False).ids
    ids_b = small_tok.encode("and god said", add_special_tokens=False).ids
    assert s.tolist() == ids_a + [3] + ids_b + [3]
    assert s.dtype == np.uint16


def test_text_sources_and_cache(tmp_path, small_tok):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("in the beginning god created the heaven\n\nand the earth\n")
    with gzip.open(d / "b.gz", "wt") as f:
        f.write("and god said let there be light\n")
    assert list(D.iter_texts(str(d))) == ["in the beginning god created the heaven", "and the earth",
                                          "and god said let there be light"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(D.iter_texts(str(tmp_path / "missing")))
    cache = tmp_path / "cache"
    arr = D.cached_stream(str(d), small_tok, "lm1b", cache)
    assert isinstance(arr, np.memmap)                       # memory-mapped, not loaded
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".npy")]) == 1 and not [f for f in files if ".tmp" in f]
    mtime = next(cache.glob("*.npy")).stat().st_mtime_ns
    again = D.cached_stream(str(d), small_tok, "lm1b", cache)
    assert next(cache.glob("*.npy")).stat().st_mtime_ns == mtime   # reused, not rebuilt
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(again))
    assert int((np.asarray(arr) == 2).sum()) == 3                    # one [CLS] after each text (lm1b)
    with pytest.raises(FileNotFoundError, match="rank 0"):
        D.cached_stream(str(d), small_tok, "owt", cache, is_builder=False)


def test_a_damaged_token_cache_is_rebuilt_or_refused(tmp_path, small_tok):
    """A truncated .npy, one whose length is not its record's, one holding an id ≥ V, one that is not a .npy: the
    builder warns and rebuilds it (the same ids as a fresh build), another rank refuses it with the reason."""
    src = tmp_path / "a.txt"
    src.write_text("in the beginning god created the heaven\nand the earth\n")
    cache = tmp_path / "cache"
    want = np.asarray(D.cached_stream(str(src), small_tok, "lm1b", cache)).copy()
    npy = next(cache.glob("tokens-*.npy"))
    good = npy.read_bytes()
    big = np.asarray(want).copy()
    big[3] = small_tok.get_vocab_size()
    longer = np.concatenate([want, want[:2]])
    for damage, why in ((good[:-6], "unreadable"), (None, "tokens where its record says"),
                        (None, "outside the vocabulary"), (b"not a numpy file", "unreadable")):
        if damage is not None:
            npy.write_bytes(damage)
        else:
            np.save(npy, longer if "record" in why else big)
        with pytest.raises(ValueError, match=f"token cache .* is damaged \\(.*{why}.*\\); rank 0"):
            D.cached_stream(str(src), small_tok, "lm1b", cache, is_builder=False)
        with pytest.warns(UserWarning, match=f"is damaged \\(.*{why}.*\\): rebuilding it"):
            got = D.cached_stream(str(src), small_tok, "lm1b", cache)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert npy.read_bytes() == good and not list(cache.glob("*.tmp*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # an intact cache: read as it is, no warning
        np.testing.assert_array_equal(np.asarray(D.cached_stream(str(src), small_tok, "lm1b", cache)), want)


def test_split_holds_out_disjoint_blocks():
    blocks = D.PackedBlocks(np.arange(1000, dtype=np.uint16), 12, 1, 2)
    tr, va = blocks.split(val_every=10)
    assert len(tr) + len(va) == len(blocks) == 100
    assert set(tr.index.tolist()).isdisjoint(va.index.tolist())
    assert (va.index % 10 == 0).all()
    b = tr.batch([0, 1])
    assert b.shape == (2, 12) and b.dtype == torch.int64


def test_sharded_sampler_partitions_and_resumes():
    n, gb, world = 103, 8, 2
    ranks = [D.ShardedSampler(n, gb, r, world, seed=3) for r in range(world)]
    seen = []
    for _ in range(n // gb):
        parts = [s.next() for s in ranks]
        assert all(len(p) == gb // world for p in parts)
        assert set(parts[0].tolist()).isdisjoint(parts[1].tolist())
        seen += parts[0].tolist() + parts[1].tolist()
    assert len(set(seen)) == len(seen) == (n // gb) * gb            # one epoch: no index twice
    e1 = ranks[0].next()                                            # next epoch: a new permutation
    assert ranks[0].epoch == 1
    # resume: a fresh sampler loaded with the state continues identically
    a = D.ShardedSampler(n, gb, 0, 1, seed=5)
    for _ in range(17):
        a.next()
    b = D.ShardedSampler(n, gb, 0, 1, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        np.testing.assert_array_equal(a.next(), b.next())
    assert len(e1) == gb // world
    with pytest.raises(ValueError, match="divisible"):
        D.ShardedSampler(n, 9, 0, 2)
    c = D.ShardedSampler(n, 16, 0, 1, seed=5)                      # pos counts batches of 8: refused
    with pytest.raises(ValueError, match="same --batch-size"):
        c.load_state_dict(a.state_dict())


def test_lm1b_separator_is_the_references(tmp_path):
    """The reference takes its LM1B ids as tokenizer.encode(token)[0] with BERT's [CLS]-first encode, so [CLS]
    separates sentences and frames blocks (id 101 in bert-base-uncased), not [SEP] (102)."""
    from fmlm.engine.tokenizer import load_tokenizer

    tok = load_tokenizer("bert-base-uncased")
    assert D.special_ids(tok, "lm1b") == (101, 101)
    f = tmp_path / "c.txt"
    f.write_text("the cat sat\non the mat\n")
    corpus = D.load_corpus(str(f), "bert-base-uncased", 6, "lm1b", cache_dir=str(tmp_path / "cache"), val_every=1000)
    ids = np.asarray(corpus.train.stream).tolist()
    assert ids.count(101) == 2 and 102 not in ids


def test_binary_files_are_refused(tmp_path):
    """A compressed or binary file used to be decoded with replacement characters and trained on."""
    import lzma

    xz = tmp_path / "c.txt.xz"
    xz.write_bytes(lzma.compress(b"in the beginning\n" * 50))
    with pytest.raises(ValueError, match="xz data"):
        list(D.iter_texts(str(xz)))
    raw = tmp_path / "ids.bin"
    raw.write_bytes(np.arange(300, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match="NUL bytes"):
        list(D.iter_texts(str(raw)))
    gz = tmp_path / "named.txt"                                      # gzip content under a text name: read
    with gzip.open(gz, "wt") as fh:
        fh.write("and god said\n")
    assert list(D.iter_texts(str(gz))) == ["and god said"]
    d = tmp_path / "dir"                                             # inside a directory, by content too
    d.mkdir()
    (d / "a.txt").write_text("let there be light\n")
    (d / "b.txt").write_bytes(lzma.compress(b"garbage\n" * 50))
    with pytest.raises(ValueError, match="xz data"):
        list(D.iter_texts(str(d)))


def test_quality_measures():
    pairs = D.word_pairs(["In the beginning God", "created the heaven"])
    assert ("god", "created") in pairs                                # across texts
    assert ("in", "the") in pairs and ("the", "the") not in pairs
    wp = M.word_pair_precision(["in the beginning", "the the the", "x"], pairs)
    assert wp[0] == 1.0 and wp[1] == 0.0 and np.isnan(wp[2])
    ent = M.sample_entropy(torch.tensor([[5, 5, 5, 5], [1, 2, 3, 4], [1, 1, 2, 2]]))
    np.testing.assert_allclose(ent, [0.0, np.log(4), np.log(2)], atol=1e-12)
    r = M.random_token_ids(3, 7, 50, n_special=5)
    assert r.shape == (3, 7) and int(r.min()) >= 5 and int(r.max()) < 50


# -- branches the tests above do not reach (coverage review) ---------------------------------------------------

def _corpus_file(path, n=300):
    path.write_text("\n".join(ln for _, ln in zip(range(n), D.iter_texts("bundled"))) + "\n")
    return path


def test_directory_without_text_files(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ids.bin").write_bytes(b"\x00\x01")
    with pytest.raises(FileNotFoundError, match=r"no text files \(.txt, .gz, .text, .md\) under"):
        list(D.iter_texts(str(tmp_path)))


class _FakeDataset:
    def __init__(self, rows, columns):
        self.rows, self.column_names = rows, columns

    def __iter__(self):
        return iter(self.rows)


def test_hf_source_through_datasets(monkeypatch):
    """'hf:<name>[:<config>]' goes to datasets.load_dataset(name, config or None, split=...), reads the 'text'
    column (else the first column holding text), strips and skips empty rows; a dataset without text is a clear
    error; without `datasets` it says what to install."""
    import sys
    import types
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "lm1b":
            return _FakeDataset([{"id": 1, "text": " a cat \n"}, {"id": 2, "text": "  "}, {"id": 3, "text": "sat"}],
                                ["id", "text"])
        if name == "ints":
            return _FakeDataset([{"idx": 0, "label": 1}], ["idx", "label"])
        if name == "mixed":
            return _FakeDataset([{"text": "fine"}, {"text": None}], ["text"])
        return _FakeDataset([{"idx": 0, "sentence": "first"}, {"idx": 1, "sentence": ""},
                             {"idx": 2, "sentence": " second "}], ["idx", "sentence"])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(D.iter_texts("hf:lm1b")) == ["a cat", "sat"]
    assert list(D.iter_texts("hf:glue:sst2", split="validation")) == ["first", "second"]
    assert calls == [("lm1b", None, "train"), ("glue", "sst2", "validation")]
    with pytest.raises(ValueError, match=r"'hf:ints': no text column \(columns \['idx', 'label'\]\)"):
        list(D.iter_texts("hf:ints"))
    with pytest.raises(ValueError, match="'hf:mixed': column 'text' holds NoneType, not text"):
        list(D.iter_texts("hf:mixed"))
    # the cache key of an hf source is its name and split (nothing on disk to stat)
    assert D.source_signature("hf:lm1b") == "hf:lm1b:train"
    assert D.source_signature("hf:lm1b", "test") != D.source_signature("hf:lm1b")
    monkeypatch.setitem(sys.modules, "datasets", None)                # not installed
    with pytest.raises(RuntimeError, match=r"'hf:lm1b' needs the optional package `datasets`"):
        list(D.iter_texts("hf:lm1b"))


def test_train_tokenizer_refuses_a_tiny_vocabulary():
    with pytest.raises(ValueError, match="vocab_size must be at least 37, got 36"):
        D.train_tokenizer(["in the beginning"], vocab_size=36)


def test_trained_tokenizer_is_cached_and_shared_with_other_ranks(tmp_path):
    """A trained tokenizer is saved under cache_dir and read back (resumed runs, DDP ranks): the same
    vocabulary, the same token cache key; a non-builder rank never trains, and says so when the file is missing.
    load_corpus: a non-builder rank reads only after the barrier (here the barrier is where rank 0 builds)."""
    src = str(_corpus_file(tmp_path / "c.txt"))
    cache = tmp_path / "cache"
    tok = D.resolve_tokenizer("words:300", src, cache_dir=cache)
    files = list(cache.glob("tokenizer-*.json"))
    assert len(files) == 1
    again = D.resolve_tokenizer("words:300", src, cache_dir=cache, is_builder=False)
    assert again.to_str() == tok.to_str() and D._tokenizer_hash(again) == D._tokenizer_hash(tok)
    with pytest.raises(FileNotFoundError, match="rank 0 should have written it"):
        D.resolve_tokenizer("words:300", src, cache_dir=tmp_path / "other", is_builder=False)
    order = []

    def barrier():
        order.append("barrier")
        built.append(D.load_corpus(src, "train:300", 12, "lm1b", cache_dir=str(tmp_path / "c2"), val_every=10))
    built = []
    other = D.load_corpus(src, "train:300", 12, "lm1b", cache_dir=str(tmp_path / "c2"), val_every=10,
                          is_builder=False, barrier=barrier)
    assert order == ["barrier"] and len(built) == 1
    assert other.tokenizer.to_str() == built[0].tokenizer.to_str()
    np.testing.assert_array_equal(np.asarray(other.train.stream), np.asarray(built[0].train.stream))
    np.testing.assert_array_equal(other.val.index, built[0].val.index)


def _word_tok(words):
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))


def test_special_ids_need_the_style_tokens():
    with pytest.raises(ValueError, match="style 'lm1b' needs a \\[CLS\\] token"):
        D.special_ids(_word_tok(["a", "[SEP]"]), "lm1b")
    with pytest.raises(ValueError, match="style 'owt' needs an end-of-text token"):
        D.special_ids(_word_tok(["a", "[CLS]"]), "owt")
    assert D.special_ids(_word_tok(["[SEP]", "</s>", "a"]), "owt") == (2, 2)      # </s> before [SEP]
    assert D.special_ids(_word_tok(["[SEP]", "<|endoftext|>"]), "owt") == (2, 2)


def test_a_source_without_text(tmp_path, small_tok):
    f = tmp_path / "blank.txt"
    f.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="the data source holds no text"):
        D.cached_stream(str(f), small_tok, "lm1b", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_split_and_sampler_refusals():
    blocks = D.PackedBlocks(np.arange(100, dtype=np.uint16), 12, 1, 2)          # 10 blocks
    with pytest.raises(ValueError, match="cannot hold out every 1-th of 10 blocks"):
        blocks.split(val_every=1)                                               # all held out
    tr, _ = blocks.split(val_every=10)
    with pytest.raises(ValueError, match="cannot hold out every 10-th of 9 blocks"):
        tr.split(val_every=10)                                                  # none held out
    with pytest.raises(ValueError, match="dataset has 7 blocks, fewer than one global batch \\(8\\)"):
        D.ShardedSampler(7, 8)
    a = D.ShardedSampler(100, 8, seed=1)
    with pytest.raises(ValueError, match="the data has 120 blocks, the checkpoint was trained on 100"):
        D.ShardedSampler(120, 8, seed=1).load_state_dict(a.state_dict())
