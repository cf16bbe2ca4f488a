"""The `fmlm` command line end to end on a checkpoint laid out as the reference code writes it."""
import json

import pytest
import torch

import fmlm
from fmlm.engine.cli import main
from ckpt_builders import ema_like, small_model, write_reference_ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = small_model(two_time=True)
    path = tmp_path_factory.mktemp("ck") / "fmlm.ckpt"
    write_reference_ckpt(path, m, ema_like(m))
    return path


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["info", "--help"], ["convert", "--help"],
                                  ["bench", "sample", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_info_convert_sample(ckpt, tmp_path, capsys):
    assert main(["info", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["vocab_size"] == 131 and info["config"]["two_time"] is True

    out_dir = tmp_path / "conv"
    assert main(["convert", str(ckpt), str(out_dir)]) == 0
    a, b = fmlm.load_checkpoint(ckpt), fmlm.load_checkpoint(out_dir)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n

    jsonl = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(out_dir), "--steps", "2", "--batch-size", "3", "--seed", "4",
                 "--renoise", "0.8", "--out", str(jsonl), "--batches", "2"]) == 0
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(recs) == 6 and all(len(r["tokens"]) == 9 and r["method"] == "fmlm" for r in recs)
    assert "text" in recs[0]                       # the checkpoint carried its tokenizer
    # same seed → same samples; the samples are fmlm.sample's on the loaded weights
    jsonl2 = tmp_path / "s2.jsonl"
    main(["sample", "--checkpoint", str(ckpt), "--steps", "2", "--batch-size", "3", "--seed", "4",
          "--renoise", "0.8", "--out", str(jsonl2), "--batches", "2"])
    assert [r["tokens"] for r in recs] == [json.loads(x)["tokens"] for x in jsonl2.read_text().splitlines()]
    g = torch.Generator().manual_seed(4)
    expect = fmlm.sample(b, 3, 2, "fmlm", 0.8, generator=g)
    assert expect.tolist() == [r["tokens"] for r in recs[:3]]


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmlm: error:") and "missing.ckpt" in err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["sample", "--checkpoint", str(bad)]) == 1
    assert "fmlm: error:" in capsys.readouterr().err


def test_bench_sample_runs_small(capsys, tmp_path):
    assert main(["bench", "sample", "--vocab", "517", "--seq-len", "8", "--hidden", "32", "--blocks", "1",
                 "--batch-size", "2", "--iters", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "engine" in out and (tmp_path / "bench_sample.csv").exists()


def test_bench_sample_rows_say_dtype_and_mode(monkeypatch):
    """Each bench sample row says the dtype and launch mode it ran in; on CUDA (auto/triton) the engine row is the
    bf16 CUDA-graph Sampler beside the eager fp32 reference, and its note says so (and names the seed's read)."""
    from fmlm.bench import bench_sample

    small = ["--vocab", "517", "--seq-len", "8", "--hidden", "32", "--blocks", "1", "--batch-size", "2",
             "--iters", "1", "--device", "cpu"]
    ref, eng = bench_sample.run(quick=True, argv=small)
    assert (ref["dtype"], ref["mode"]) == (eng["dtype"], eng["mode"]) == ("float32", "eager") and "note" not in eng
    # the CUDA labels, without a GPU: the row logic only (fmlm.sample and the timing stubbed)
    monkeypatch.setattr(bench_sample, "time_fn", lambda fn, **k: {"ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})
    monkeypatch.setattr(bench_sample, "peak_memory_bytes", lambda fn, device="cpu": 0)
    make = bench_sample._model
    monkeypatch.setattr(bench_sample, "_model", lambda args, device: make(args, "cpu"))
    ref, eng = bench_sample.bench(bench_sample.parser().parse_args(small[:-2] + ["--device", "cuda"]), quick=True)
    assert (ref["dtype"], ref["mode"]) == ("float32", "eager")
    assert (eng["dtype"], eng["mode"]) == ("bf16 trunk", "CUDA graph (fmlm.Sampler)")
    assert "not like with like" in eng["note"] and "device-to-host read of the seed" in eng["note"]


def test_sample_refuses_bad_counts_and_keeps_an_existing_out_file(ckpt, tmp_path, capsys):
    """--steps/--batch-size/--batches must be positive ints (argparse says so), and a run that fails in its first
    batch (renoise out of range, refused by the sampler) keeps an existing --out file whole: it used to be
    truncated before the first batch ran."""
    out = tmp_path / "samples.jsonl"
    out.write_text("keep me\n")
    for flag in ("--steps", "--batch-size", "--batches"):
        with pytest.raises(SystemExit):
            main(["sample", "--checkpoint", str(ckpt), flag, "0", "--out", str(out)])
        assert "expected a positive int" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--renoise", "1.5", "--out", str(out)]) == 1
    assert "renoise" in capsys.readouterr().err
    assert out.read_text() == "keep me\n" and not (tmp_path / "samples.jsonl.tmp").exists()
    assert main(["sample", "--checkpoint", str(ckpt), "--batch-size", "2", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.fixture
def no_loading(monkeypatch):
    """Checks that must come before any work: loading the checkpoint fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")
    monkeypatch.setattr(fmlm, "load_checkpoint", load)


def test_sample_refuses_a_directory_as_out_before_any_work(ckpt, tmp_path, capsys, no_loading):
    d = tmp_path / "outdir"
    d.mkdir()
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmlm: error: --out") and "is a directory" in err
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "nodir" / "s.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["outdir"] and not any(d.iterdir())


def test_os_errors_are_one_line_and_exit_1(ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "conv"              # FileExistsError on mkdir: an OSError for the user to fix
    assert main(["convert", str(ckpt), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmlm: error:") and "afile" in err and "Traceback" not in err
    with pytest.raises(OSError):
        main(["convert", str(ckpt), str(out), "--debug"])


def test_sample_bf16_on_cpu(ckpt, tmp_path):
    """A bf16 model on the CPU runs the plain-PyTorch paths under bf16 autocast, as the published code does (its fp32
    LayerNorm output used to meet bf16 weights and fail in the first matmul)."""
    for extra in ([], ["--backend", "torch"], ["--backend", "reference"]):
        out = tmp_path / f"s{len(extra)}{extra[-1] if extra else ''}.jsonl"
        assert main(["sample", "--checkpoint", str(ckpt), "--dtype", "bfloat16", "--device", "cpu", "--batch-size",
                     "2", "--out", str(out), *extra]) == 0
        assert len(out.read_text().splitlines()) == 2


def test_tokenizer_that_is_not_a_tokenizer_json(ckpt, tmp_path, capsys, no_loading):
    (tmp_path / "vocab.txt").write_text("[PAD]\nhello\n")
    assert main(["sample", "--checkpoint", str(ckpt), "--tokenizer", str(tmp_path / "vocab.txt")]) == 1
    assert "vocab.txt: not a tokenizer.json (Hugging Face `tokenizers` format)" in capsys.readouterr().err
    out = tmp_path / "conv"
    assert main(["convert", str(ckpt), str(out), "--tokenizer", str(tmp_path / "vocab.txt")]) == 1
    assert "not a tokenizer.json" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(out), "--tokenizer", "bogus"]) == 1
    assert "tokenizer 'bogus'" in capsys.readouterr().err
    assert not out.exists() and sorted(f.name for f in tmp_path.iterdir()) == ["vocab.txt"]


def test_convert_with_a_tokenizer_and_into_the_working_directory(ckpt, tmp_path, monkeypatch, capsys):
    """The tokenizer is stored unpadded beside the weights; converting into the working directory is a one-line
    error that leaves it as it was."""
    tokenizers = pytest.importorskip("tokenizers")
    from ckpt_builders import word_level_tokenizer
    tok = word_level_tokenizer(131)
    tok.enable_padding(length=32)
    tok.save(str(tmp_path / "tok.json"))
    d = tmp_path / "conv"
    d.mkdir()
    monkeypatch.chdir(d)
    assert main(["convert", str(ckpt), ".", "--tokenizer", str(tmp_path / "tok.json")]) == 1
    assert "working directory" in capsys.readouterr().err and not any(d.iterdir())
    assert main(["convert", str(ckpt), "out", "--tokenizer", str(tmp_path / "tok.json")]) == 0
    assert sorted(f.name for f in (d / "out").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    saved = tokenizers.Tokenizer.from_file("out/tokenizer.json")
    assert saved.get_vocab_size() == 131 and saved.padding is None
    a, b = fmlm.load_checkpoint(ckpt), fmlm.load_checkpoint("out")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_info_on_a_bare_safetensors_file(tmp_path, capsys):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    assert main(["info", str(tmp_path / "w.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "a safetensors file" in err and "config.json" in err and "not a torch checkpoint" not in err
