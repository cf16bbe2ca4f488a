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
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # --device cuda is checked against it
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


def test_no_command_prints_help_and_exits_2(capsys):
    """`fmlm`, `fmlm bench` and `fmlm profile` without a subcommand print their usage and exit 2."""
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: fmlm") and "sample" in out and "bench" in out
    assert main(["bench"]) == 2
    assert "usage: fmlm bench" in capsys.readouterr().out
    assert main(["profile"]) == 2
    assert "usage: fmlm profile" in capsys.readouterr().out


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    """Ctrl-C inside a command: 'interrupted' on stderr and exit status 130 (128 + SIGINT), no traceback, also with
    --debug."""
    from fmlm.engine import commands

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "cmd_info", interrupted)
    for extra in ([], ["--debug"]):
        assert main(["info", "x.ckpt", *extra]) == 130
        assert capsys.readouterr().err == "interrupted\n"


def test_a_missing_cli_module_is_skipped(monkeypatch):
    """A module of CLI_MODULES that is not installed contributes no command; the others still register."""
    from fmlm.engine import cli

    monkeypatch.setattr(cli, "CLI_MODULES", ("fmlm.engine.no_such_module", "fmlm.engine.commands"))
    ap = cli.build_parser()
    assert ap.parse_args(["info", "x"]).func.__name__ == "cmd_info"
    with pytest.raises(SystemExit):
        ap.parse_args(["train", "--help"])


def test_counts_that_are_not_ints_are_refused(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(ckpt), "--steps", "two"])
    assert e.value.code == 2 and "expected a positive int, got 'two'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(ckpt, tmp_path, capsys, no_loading):
    """--device cuda where torch sees no CUDA: one line and exit 1 before any work, for sample, profile, demo and
    train (profile, demo and train raised torch's AssertionError 'Torch not compiled with CUDA enabled' with a
    traceback; train/distill/demo check in setup_distributed)."""
    for argv in (["sample", "--checkpoint", str(ckpt), "--device", "cuda"],
                 ["sample", "--checkpoint", str(ckpt), "--device", "cuda:1"],
                 ["profile", "sample", "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "prof")],
                 ["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "demo")],
                 ["train", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "train")]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("fmlm: error: --device cuda") and "torch sees no CUDA device" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_sample_prints_text_or_ids_without_out(ckpt, tmp_path, capsys):
    """Without --out each sample is printed (its text when a tokenizer is known, else its token ids), each followed
    by a line of 80 dashes; they are fmlm.sample's tokens for the seed."""
    from fmlm.engine.tokenizer import decode, default_tokenizer

    assert main(["sample", "--checkpoint", str(ckpt), "--batch-size", "2", "--seed", "3"]) == 0
    model = fmlm.load_checkpoint(ckpt)
    want = fmlm.sample(model, 2, 1, "fmlm", 0.0, generator=torch.Generator().manual_seed(3))
    tok = default_tokenizer(131, str(ckpt), model)
    assert capsys.readouterr().out == "".join(f"{decode(tok, r)}\n{'-' * 80}\n" for r in want.tolist())

    bare = tmp_path / "bare"                      # a checkpoint without a tokenizer: the ids
    fmlm.save_checkpoint(small_model(two_time=True), bare)
    assert main(["sample", "--checkpoint", str(bare), "--batch-size", "2", "--seed", "3"]) == 0
    want = fmlm.sample(fmlm.load_checkpoint(bare), 2, 1, "fmlm", 0.0, generator=torch.Generator().manual_seed(3))
    assert capsys.readouterr().out == "".join(f"{' '.join(map(str, r))}\n{'-' * 80}\n" for r in want.tolist())


def test_sample_that_cannot_rename_into_out_leaves_no_temporary_file(ckpt, tmp_path, monkeypatch, capsys):
    """The samples go to OUT.tmp, renamed onto --out at the end; when that rename fails (here a directory appeared
    at --out while sampling) the error is one line and OUT.tmp is removed."""
    out = tmp_path / "s.jsonl"
    real = fmlm.sample

    def sample_then_block_out(*args, **kwargs):
        out.mkdir(exist_ok=True)
        return real(*args, **kwargs)
    monkeypatch.setattr(fmlm, "sample", sample_then_block_out)
    assert main(["sample", "--checkpoint", str(ckpt), "--batch-size", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmlm: error:") and "s.jsonl" in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["s.jsonl"] and out.is_dir() and not any(out.iterdir())


def test_sample_out_through_a_symlink_a_stream_and_beside_a_users_tmp_file(ckpt, tmp_path, capsys):
    """--out through a symlink writes the link's target and keeps the link (the rename replaced the link by a
    file); --out naming something that is not a regular file (a FIFO here; /dev/stdout, /dev/null) is written
    directly (renaming over it replaced the node: as root, /dev/full became a file); a user's own OUT.tmp file
    is neither overwritten nor deleted (the temporary file was OUT.tmp itself); --device mps is refused in one
    line (torch printed a 55-line operator dump)."""
    import os
    import threading

    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    notes = tmp_path / "link.jsonl.tmp"
    notes.write_text("my notes\n")
    assert main(["sample", "--checkpoint", str(ckpt), "--batch-size", "2", "--out", str(link)]) == 0
    assert link.is_symlink() and len(target.read_text().splitlines()) == 2
    assert notes.read_text() == "my notes\n"
    assert main(["sample", "--checkpoint", str(ckpt), "--renoise", "1.5", "--out", str(link)]) == 1
    assert notes.read_text() == "my notes\n" and len(target.read_text().splitlines()) == 2
    assert sorted(f.name for f in tmp_path.iterdir()) == ["link.jsonl", "link.jsonl.tmp", "real.jsonl"]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    assert main(["sample", "--checkpoint", str(ckpt), "--batch-size", "3", "--out", str(fifo)]) == 0
    reader.join(timeout=60)
    assert len(got[0].splitlines()) == 3 and fifo.is_fifo()
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(ckpt), "--device", "mps"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device mps" in err


def test_sample_refuses_a_tokenizer_of_another_vocabulary(ckpt, tmp_path, capsys):
    """A tokenizer whose size is neither the model's V nor V − 1 (OWT: GPT-2 + [PAD]) decoded to unrelated words or
    dropped most ids without a word; it is refused before sampling. V and V − 1 are accepted."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models

    def tok_file(n):
        path = tmp_path / f"tok{n}.json"
        Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0")).save(str(path))
        return str(path)
    V = 131                                                     # small_model's vocabulary
    assert main(["sample", "--checkpoint", str(ckpt), "--tokenizer", tok_file(40)]) == 1
    err = capsys.readouterr().err
    assert "has 40 tokens, the model's vocabulary 131" in err and err.count("\n") == 1
    for n in (V, V - 1):
        assert main(["sample", "--checkpoint", str(ckpt), "--batch-size", "1", "--tokenizer", tok_file(n)]) == 0


def test_bench_profile_and_demo_refuse_bad_counts_in_one_line(capsys):
    """Zero or negative counts ended in "no median for empty data", a reshape error, an empty table with exit 0,
    or a demo with a negative budget; `bench train --device cuda` without CUDA raised torch's assertion."""
    for argv in (["bench", "sample", "--iters", "0"], ["bench", "train", "--iters", "0"],
                 ["bench", "train", "--batch", "-2"], ["profile", "sample", "--iters", "0"],
                 ["profile", "sample", "--top", "-3"], ["demo", "--time-budget", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "expected a positive" in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        assert main(["bench", "train", "--device", "cuda", "--iters", "1", "--no-write"]) == 1
        err = capsys.readouterr().err
        assert "torch sees no CUDA device" in err and err.count("\n") == 1
