"""Data: bundled corpus, tokenizer training, the reference's wrap packing, the on-disk cache, the sharded sampler."""
import gzip

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
