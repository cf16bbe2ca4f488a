"""bench/ncu_kernels.py's failure rows and command paths that tests/test_ncu_kernels.py does not take: ncu past its
limit, a report that cannot be read back (an error, or too slow), a report without kernels, and `--child` / `--out`."""
import os
import stat
import subprocess

import pytest

from fmlm.bench import common, gpu_check
from fmlm.bench import ncu_kernels as nk

pytestmark = pytest.mark.skipif(os.name != "posix", reason="a /bin/sh stand-in for ncu")


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
