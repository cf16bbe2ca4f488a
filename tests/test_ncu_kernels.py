"""bench/ncu_kernels.py without a GPU: the raw-page parser, the ncu command, the subprocess plumbing through a
stand-in `ncu` script (and its failure rows: ncu past its limit, a report that cannot be read back, a report without
kernels), `--child` / `--out`, and every case's op calls at small shapes under the Triton interpreter."""
import os
import stat
import subprocess
import time

import pytest
import torch

from fmlm.bench import common, gpu_check
from fmlm.bench import ncu_kernels as nk
from fmlm.kernels._backend import triton_available

# The shape of ncu's `--page raw --csv` output: header, units, one row per kernel (numbers with thousands
# separators); lines ncu prints around it are skipped.
RAW = '''==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active","sm__pipe_tensor_subpipe_cycles_active.avg.pct_of_peak_sustained_active","sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active","launch__shared_mem_per_block_dynamic","launch__registers_per_thread","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
"","","","","","","","nsecond","%","%","%","%","byte","register/thread","inst","inst","inst","inst"
"0","1234","python3","h","_logits_argmax_fwd_kernel","1","7","5,030,125","71.5","12.5","40.25","0.5","147,456","255","0.80","2.10","0.30","1.20"
"1","1234","python3","h","_logits_argmax_reduce_kernel","1","7","3,500","5.1","0","0","0","0","32","","","",""
==PROF== Disconnected from process 1234
'''


def test_parse_raw_csv_rows():
    records, units = nk.parse_raw_csv(RAW)
    assert [r["Kernel Name"] for r in records] == ["_logits_argmax_fwd_kernel", "_logits_argmax_reduce_kernel"]
    assert units["gpu__time_duration.sum"] == "nsecond"
    rows = nk.kernel_rows("logits_argmax", records, units)
    r = rows[0]
    assert r["duration_ms"] == pytest.approx(5.030125)
    assert r["sm_pct"] == pytest.approx(71.5)
    assert r["tensor_pct"] == pytest.approx(40.25)     # no listed name: the largest pipe_tensor column
    assert r["xu_pct"] == pytest.approx(0.5)
    assert r["smem_kb"] == pytest.approx(144.0) and r["regs"] == 255
    assert r["top_stalls"] == "gmma 2.10, wait 1.20, barrier 0.80"
    assert r["dram_pct"] is None                        # absent from the page: left empty, not invented
    assert rows[1]["top_stalls"] == "" and rows[1]["duration_ms"] == pytest.approx(0.0035)


def test_parse_raw_csv_without_table_or_units():
    assert nk.parse_raw_csv("==PROF== nothing profiled\n") == ([], {})
    records, units = nk.parse_raw_csv('"ID","Kernel Name","gpu__time_duration.sum"\n"0","k","2.5"\n')
    assert units == {} and records == [{"ID": "0", "Kernel Name": "k", "gpu__time_duration.sum": "2.5"}]
    # a page in milliseconds (no --print-units base) still gives ms
    rows = nk.kernel_rows("c", records, {"gpu__time_duration.sum": "msecond"})
    assert rows[0]["duration_ms"] == pytest.approx(2.5)


def test_ncu_command(tmp_path):
    cmd = nk.ncu_command("/x/ncu", tmp_path / "r.ncu-rep", "softcap_attention")
    joined = " ".join(cmd)
    for part in ("--profile-from-start off", "--clock-control none", "--set full", f"--export {tmp_path / 'r.ncu-rep'}",
                 "-m fmlm.bench.ncu_kernels --child softcap_attention"):
        assert part in joined, part
    assert cmd[0] == "/x/ncu"
    assert nk.import_command("/x/ncu", tmp_path / "r.ncu-rep")[1:3] == ["--import", str(tmp_path / "r.ncu-rep")]


def _fake_ncu(tmp_path, exit_code=0):
    """A stand-in ncu: profiling writes the --export file (or fails), --import prints RAW."""
    raw = tmp_path / "raw.csv"
    raw.write_text(RAW)
    script = tmp_path / "ncu"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "--import" ]; then cat {raw}; exit 0; fi
while [ $# -gt 0 ]; do
  if [ "$1" = "--export" ]; then touch "$2"; fi
  shift
done
echo "==ERROR== stand-in failure" >&2
exit {exit_code}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.skipif(os.name != "posix", reason="a /bin/sh stand-in")
def test_profile_case_through_a_stand_in_ncu(tmp_path):
    out = tmp_path / "results"
    rows = nk.profile_case(_fake_ncu(tmp_path), "logits_argmax", out, timeout_s=30)
    assert [r["kernel"] for r in rows] == ["_logits_argmax_fwd_kernel", "_logits_argmax_reduce_kernel"]
    assert (out / "ncu_logits_argmax.csv").read_text() == RAW           # every metric kept
    assert not (out / "ncu_logits_argmax.ncu-rep").exists()
    bad = nk.profile_case(_fake_ncu(tmp_path, exit_code=3), "logits_argmax", out, timeout_s=30)
    assert len(bad) == 1 and bad[0]["note"].startswith("ncu exit 3") and "stand-in failure" in bad[0]["note"]
    # a failed case leaves no report behind (one could pass the device tool's 16 MiB and sink the archive)
    assert not (out / "ncu_logits_argmax.ncu-rep").exists()


def test_find_ncu_takes_the_newest_by_version(monkeypatch):
    monkeypatch.setattr(nk.shutil, "which", lambda name: None)
    paths = ["/usr/local/cuda-12.9/bin/ncu", "/usr/local/cuda-12.10/bin/ncu", "/usr/local/cuda-11.8/bin/ncu"]
    monkeypatch.setattr(nk.glob, "glob", lambda pat: [p for p in paths if p.startswith("/usr/local")]
                        if pat.startswith("/usr/local") else [])
    assert nk.find_ncu() == "/usr/local/cuda-12.10/bin/ncu"


def test_run_without_ncu_or_time(monkeypatch):
    monkeypatch.setattr(nk.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nk, "find_ncu", lambda: None)
    assert nk.run()[0]["note"].startswith("ncu not found")
    monkeypatch.setattr(nk, "find_ncu", lambda: "/x/ncu")
    monkeypatch.setattr(common, "bench_deadline", lambda: time.time() + 10)
    called = []
    monkeypatch.setattr(nk, "profile_case", lambda *a, **k: called.append(a) or [])
    rows = nk.run(cases=["logits_argmax", "gate_residual"])
    assert called == [] and [r["note"] for r in rows] == ["skipped: no time left"] * 2


@pytest.mark.skipif(not triton_available(), reason="needs triton (interpreter)")
@pytest.mark.parametrize("case", list(nk.CASES))
def test_case_runs_small_on_cpu(case):
    """Each case's op calls, as the profiled child makes them, at small shapes in fp32 under the interpreter."""
    fn = nk.CASES[case][0](torch.device("cpu"), torch.float32, small=True)
    fn()
    out = fn()
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(out, torch.Tensor):
        assert torch.isfinite(out.float()).all()


def test_cli(capsys):
    """`fmlm bench ncu --list` names every case; without CUDA the command says what it needs and exits 2."""
    from fmlm.engine import cli

    assert cli.main(["bench", "ncu", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in nk.CASES)
    if not torch.cuda.is_available():
        assert cli.main(["bench", "ncu", "--case", "logits_argmax"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def _ncu(tmp_path, import_script):
    """A stand-in ncu: profiling writes the --export report; --import runs import_script."""
    script = tmp_path / "ncu"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "--import" ]; then {import_script}; fi
while [ $# -gt 0 ]; do
  if [ "$1" = "--export" ]; then touch "$2"; fi
  shift
done
echo "profiled"
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_ncu_past_its_limit_is_a_row_and_leaves_no_report(tmp_path, monkeypatch):
    out = tmp_path / "results"

    def slow(cmd, timeout, **kw):
        (out / "ncu_gate_residual.ncu-rep").write_bytes(b"partial report")
        raise subprocess.TimeoutExpired(cmd, timeout)
    monkeypatch.setattr(gpu_check, "run_group", slow)
    rows = nk.profile_case("/x/ncu", "gate_residual", out, timeout_s=42.4)
    assert rows == [{"case": "gate_residual", "kernel": "", "note": "ncu did not finish within 42 s"}]
    assert not (out / "ncu_gate_residual.ncu-rep").exists()


def test_a_report_that_cannot_be_read_back_is_a_row(tmp_path):
    out = tmp_path / "results"
    ncu = _ncu(tmp_path, 'echo "==ERROR== first" >&2; echo "==ERROR== the report is corrupt" >&2; exit 4')
    rows = nk.profile_case(ncu, "gate_residual", out, timeout_s=30)
    assert rows == [{"case": "gate_residual", "kernel": "",
                     "note": "ncu --import exit 4: ==ERROR== first / ==ERROR== the report is corrupt"}]
    assert not (out / "ncu_gate_residual.ncu-rep").exists() and not (out / "ncu_gate_residual.csv").exists()


def test_a_report_without_kernels_is_a_row(tmp_path):
    out = tmp_path / "results"
    ncu = _ncu(tmp_path, 'echo "==PROF== No kernels were profiled."; exit 0')
    rows = nk.profile_case(ncu, "gate_residual", out, timeout_s=30)
    assert rows == [{"case": "gate_residual", "kernel": "", "note": "no kernel in the report: profiled"}]
    assert (out / "ncu_gate_residual.csv").read_text() == "==PROF== No kernels were profiled.\n"


def test_reading_back_past_the_deadline_is_a_row(tmp_path, monkeypatch):
    out = tmp_path / "results"
    ncu = _ncu(tmp_path, "exit 0")
    monkeypatch.setattr(common, "bench_deadline", lambda: 0.0)          # past it: the import gets the 5 s floor
    seen = []

    def run(cmd, capture_output, text, timeout):
        seen.append(timeout)
        raise subprocess.TimeoutExpired(cmd, timeout)
    monkeypatch.setattr(nk.subprocess, "run", run)
    rows = nk.profile_case(ncu, "gate_residual", out, timeout_s=30)
    assert rows == [{"case": "gate_residual", "kernel": "", "note": "reading the report back took over 5 s"}]
    assert seen == [5.0] and not (out / "ncu_gate_residual.ncu-rep").exists()


def test_cli_child_and_out(tmp_path, monkeypatch, capsys):
    """--child CASE runs the case in this process (what ncu launches); --out puts the rows there."""
    calls = []
    monkeypatch.setattr(nk, "child", lambda case: calls.append(case) or 0)
    assert nk.main(["--child", "gate_residual"]) == 0 and calls == ["gate_residual"]
    monkeypatch.setattr(nk.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "default")     # restored after the test
    monkeypatch.setattr(common, "meta", lambda: {"date": "2026-11-27 12:00", "git": "abc"})
    monkeypatch.setattr(nk, "run", lambda cases=None: [{"case": c, "kernel": "k", "duration_ms": 1.5} for c in cases])
    assert nk.main(["--case", "gate_residual", "--out", str(tmp_path / "r")]) == 0
    assert common.RESULTS_DIR == tmp_path / "r"
    assert "| gate_residual | k | 1.5 | 2026-11-27 12:00 | abc |" in (tmp_path / "r" / "ncu_kernels.md").read_text()
    assert "| gate_residual | k | 1.5 | 2026-11-27 12:00 | abc |" in capsys.readouterr().out


def test_run_labels_each_case_with_its_target_and_needs_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nk.torch.cuda, "is_available", lambda: False)
    assert nk.run() == []
    monkeypatch.setattr(nk.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nk, "find_ncu", lambda: "/x/ncu")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("FMLM_BENCH_DEADLINE", raising=False)
    seen = []

    def profile_case(ncu, case, out_dir, timeout_s):
        seen.append((ncu, case, out_dir, timeout_s))
        return [{"case": case, "kernel": "k1"}, {"case": case, "kernel": "k2"}]
    monkeypatch.setattr(nk, "profile_case", profile_case)
    rows = nk.run(cases=["gate_residual", "vocab_attention"])
    assert seen == [("/x/ncu", c, tmp_path, nk.CASE_LIMIT_S) for c in ("gate_residual", "vocab_attention")]
    assert [(r["case"], r["kernel"], r["target"]) for r in rows] == [
        (c, k, nk.CASES[c][1]) for c in ("gate_residual", "vocab_attention") for k in ("k1", "k2")]
    assert capsys.readouterr().out.count("| case | kernel | target |") == 2       # each case's table as it ends
