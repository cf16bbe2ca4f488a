"""engine/profile.py (`fmlm profile sample`) paths the CPU suite did not take: a checkpoint instead of a preset,
the argument checks, and the per-kernel table's device branch (what a GPU run takes), on real profiler events."""
import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import fmlm
from ckpt_builders import small_model
from fmlm.engine import cli, profile


def test_profile_sample_of_a_checkpoint(tmp_path, capsys):
    """--checkpoint: the checkpoint's model (its shape in the table's heading, whatever --preset says), sampled by
    its own method (an FLM: flm, without --method)."""
    ck = tmp_path / "flm"
    fmlm.save_checkpoint(small_model(vocab_size=131, seq_len=9), ck)
    out = tmp_path / "prof"
    assert cli.main(["profile", "sample", "--checkpoint", str(ck), "--preset", "tiny", "--batch-size", "1",
                     "--iters", "1", "--device", "cpu", "--out", str(out)]) == 0
    head = (out / "kernels.md").read_text().split("\n\n")[:2]
    assert head[0].startswith("# fmlm profile sample: Sampler(method='flm', steps=1,")
    assert head[1] == "1 run(s) of B=1, L=9, V=131 on cpu"
    assert capsys.readouterr().out.startswith(head[0])


def test_an_out_that_is_a_file_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    """--out names the directory of the trace and the table: a file there failed with "File exists" only after the
    whole profiled run; it is refused first (the run never starts) and the file is kept."""
    out = tmp_path / "keep.txt"
    out.write_text("mine\n")
    monkeypatch.setattr(profile, "build_model", lambda *a, **k: pytest.fail("the run started"))
    assert cli.main(["profile", "sample", "--preset", "tiny", "--device", "cpu", "--out", str(out)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err and out.read_text() == "mine\n"


def test_build_model_refuses_an_unknown_preset():
    with pytest.raises(ValueError, match=r"preset must be one of \['lm1b', 'owt', 'tiny'\], got 'gpt'"):
        profile.build_model(None, "gpt")


def test_kernel_options_must_be_a_json_object(tmp_path, capsys):
    base = ["profile", "sample", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)]
    for bad in ('["pdl"]', "true", "3"):
        with pytest.raises(SystemExit) as e:
            cli.main(base + ["--kernel-options", bad])
        assert e.value.code == 2
        assert f"""expected a JSON object such as '{{"pdl": true}}', got {bad!r}""" in capsys.readouterr().err
    assert profile.json_object('{"pdl": true}') == {"pdl": True}
    assert not any(tmp_path.iterdir())


class _Prof:
    def __init__(self, events):
        self._events = events

    def events(self):
        return self._events

    def key_averages(self):
        raise AssertionError("with device events the table is built from them, not from the CPU ops")


def _ev(name, start, end, device=DeviceType.CUDA, **kw):
    return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device, **kw)


def test_kernel_table_from_device_events():
    """With device activity (a GPU run): one row per kernel name, calls counted, each kernel credited its exclusive
    time (a PDL launch is not charged the wait beside its predecessor), shares of the busy time; CPU ops and the
    GPU-side copies of record_function ranges are left out; long names are cut to 90 characters."""
    long = "k" * 100
    prof = _Prof([_ev("gemm", 0.0, 100.0), _ev("argmax", 60.0, 110.0), _ev("gemm", 200.0, 300.0),
                  _ev("Memset (Device)", 300.0, 310.0), _ev(long, 400.0, 430.0),
                  _ev("aten::mm", 0.0, 1000.0, device=DeviceType.CPU),
                  _ev("step0", 0.0, 500.0, is_user_annotation=True)])
    rows = profile.kernel_table(prof)
    assert [r["kernel"] for r in rows] == ["gemm", long[:90] + "…", "argmax", "Memset (Device)"]
    assert [r["calls"] for r in rows] == [2, 1, 1, 1]
    assert [r["device total µs"] for r in rows] == [200.0, 30.0, 10.0, 10.0]
    assert rows[0]["mean µs"] == 100.0
    assert sum(r["%"] for r in rows) == pytest.approx(100.0) and rows[0]["%"] == pytest.approx(80.0)
    assert [r["kernel"] for r in profile.kernel_table(prof, top=2)] == ["gemm", long[:90] + "…"]


def test_kernel_table_without_device_events_reads_the_cpu_ops():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(4, 4) @ torch.ones(4, 4)
    rows = profile.kernel_table(prof)
    assert "aten::matmul" in [r["kernel"] for r in rows] and all("cpu self total µs" in r for r in rows)
