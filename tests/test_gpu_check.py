"""bench/gpu_check.py without a GPU, the paths tests/test_runner.py's driver tests do not take: the child step
(`--one NAME`), the refusal without CUDA, and the summary of steps that time out or fail."""
import os
import subprocess
import sys
import types

import pytest

from fmlm.bench import common, gpu_check


@pytest.fixture
def results(tmp_path, monkeypatch):
    d = tmp_path / "results"
    d.mkdir()
    monkeypatch.setattr(common, "RESULTS_DIR", d)
    monkeypatch.setattr(common, "meta", lambda: {"date": "2026-11-27 12:00", "git": "abc"})
    return d


def test_one_step_runs_the_benchmark_quick_and_writes_its_rows(results, monkeypatch, capsys):
    """`python -m fmlm.bench.gpu_check --one NAME` (what each step's process runs): NAME.run(quick=True), its rows
    to results/NAME.md (+ .csv) and printed; no rows, nothing written."""
    seen = []
    fake = types.ModuleType("fmlm.bench.bench_fake")
    fake.run = lambda quick=False: seen.append(quick) or [{"impl": "default", "ms": 2.0}]
    empty = types.ModuleType("fmlm.bench.bench_empty")
    empty.run = lambda quick=False: []
    monkeypatch.setitem(sys.modules, "fmlm.bench.bench_fake", fake)
    monkeypatch.setitem(sys.modules, "fmlm.bench.bench_empty", empty)
    assert gpu_check.main(["--one", "bench_fake"]) == 0 and seen == [True]
    md = (results / "bench_fake.md").read_text()
    assert md.startswith("| impl | ms | date | git |") and "| default | 2 |" in md
    assert capsys.readouterr().out == md + "\n"
    assert gpu_check.main(["--one", "bench_empty"]) == 0
    assert capsys.readouterr().out == "" and sorted(p.name for p in results.iterdir()) == ["bench_fake.csv",
                                                                                         "bench_fake.md"]


def test_without_cuda_it_refuses(results, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "ceilings", lambda: {})
    monkeypatch.setattr(gpu_check, "run_group", lambda *a, **k: pytest.fail("a step started without CUDA"))
    assert gpu_check.main(["--skip-tests"]) == 2
    assert capsys.readouterr().err == "gpu-check needs a CUDA device\n"


def test_summary_of_steps_that_time_out_or_fail(results, monkeypatch, capsys):
    """A step past its limit is TIMEOUT, a non-zero exit FAIL rc=N, each with the end of its log; only the steps
    that ran (ok, with an md of this run) have their table printed, not an older md of a step that failed or of
    one that wrote no rows; the exit status is 1."""
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "ceilings", lambda: {"bf16_tflops": 1.0, "copy_gbs": 1.0})
    monkeypatch.setattr(common, "device_name", lambda: "fake")
    monkeypatch.delenv("OUT", raising=False)
    for old in ("bench_slow", "bench_norows"):          # an earlier run's tables (bench/results on the device)
        (results / f"{old}.md").write_text("| old | rows |\n|---|---|\n| 1 | 2 |\n")
        os.utime(results / f"{old}.md", (1e9, 1e9))

    def fake_run(cmd, timeout, **kw):
        name = "gpu tests" if cmd[2] == "pytest" else cmd[-1]
        kw["stdout"].write(f"{name} output line\n")
        kw["stdout"].flush()
        if name in ("gpu tests", "bench_slow"):
            raise subprocess.TimeoutExpired(cmd, timeout)
        if name == "bench_bad":
            return 3
        if name == "bench_norows":                       # exits 0 and writes nothing (e.g. every row skipped)
            return 0
        (results / f"{name}.md").write_text("| impl | ms |\n|---|---|\n| default | 1 |\n")
        return 0
    monkeypatch.setattr(gpu_check, "run_group", fake_run)
    assert gpu_check.main(["--budget", "1000", "--only", "bench_ok", "bench_bad", "bench_slow",
                          "bench_norows"]) == 1
    out = capsys.readouterr().out
    assert "### bench_bad: FAIL rc=3, the end of its log (results/logs/bench_bad.log)\nbench_bad output line\n" in out
    assert "### bench_slow: TIMEOUT, the end of its log (results/logs/bench_slow.log)\nbench_slow output line\n" in out
    assert "### bench_ok\n| impl | ms |" in out and "### bench_slow\n" not in out and "| old | rows |" not in out
    assert "### bench_ok:" not in out and "### bench_norows: ok, but it wrote no rows" in out
    summary = out.split("## gpu-check summary")[1]
    for step, status in (("gpu tests", "TIMEOUT"), ("bench_ok", "ok"), ("bench_bad", "FAIL rc=3"),
                         ("bench_slow", "TIMEOUT")):
        assert f"| {step} | {status} |" in summary


def test_candidate_table_skips_an_md_without_a_table(results):
    (results / "bench_x.md").write_text("no rows this time\n")
    (results / "bench_y.md").write_text("| impl |\n")
    assert gpu_check._md_rows(results / "bench_x.md") == [] and gpu_check._md_rows(results / "bench_y.md") == []
    assert gpu_check.candidate_table(["bench_x", "bench_y"]) == "(no candidate rows)\n"


def test_targets_table_lists_the_rows_that_carry_a_target(results):
    """One line per row with a meets_target (kernel benchmarks) or "meets target" (bench_e2e) cell: its label,
    where, the first value column present, the 4-step ratio when there, the target and whether it is met; rows
    without one, and mds without a table, add nothing."""
    (results / "bench_k.md").write_text(
        "| op | impl | rows | tflops | target | meets_target |\n|---|---|---|---|---|---|\n"
        "| la | triton default | 16384 | 673 | >= 600 TFLOP/s | True |\n"
        "| la | triton [other] | 16384 | 500 |  |  |\n"
        "| la | best measured: x | 16384 | 680 | >= 600 TFLOP/s | True |\n")
    (results / "bench_e.md").write_text(
        "| dataset | path | B | steps | ms/sample | target ms/sample | 4-step/1-step | meets target |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| owt | engine graph | 32 | 1 | 0.64 | 0.6 | — | NO |\n"
        "| owt | engine graph | 32 | 4 | 3.1 |  | 4.84 | NO |\n"
        "| owt | reference | 32 | 1 | 6.7 |  | — |  |\n")
    (results / "bench_none.md").write_text("nothing\n")
    table = gpu_check.targets_table(["bench_k", "bench_e", "bench_none", "bench_missing"])
    lines = [x for x in table.splitlines() if x.startswith("| bench_")]
    assert lines == [
        "| bench_k | triton default | rows=16384 | tflops 673 | >= 600 TFLOP/s | True |",
        "| bench_k | best measured: x | rows=16384 | tflops 680 | >= 600 TFLOP/s | True |",
        "| bench_e | engine graph | dataset=owt B=32 steps=1 | ms/sample 0.64 | 0.6 | NO |",
        "| bench_e | engine graph | dataset=owt B=32 steps=4 | ms/sample 3.1, 4-step/1-step 4.84 |  | NO |"], table
    assert gpu_check.targets_table(["bench_none"]) == "(no target rows)\n"
