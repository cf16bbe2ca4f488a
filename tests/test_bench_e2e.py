"""bench/bench_e2e.py (`fmlm bench e2e`) without a GPU: the command's output and files, a checkpoint's rows, the
rows of a candidate that fails, the plot's absences. The timing itself is CUDA-only; the CPU smoke tests in
tests/test_runner.py set DEVICE = "cpu" and the tiny preset, as these do."""
import math
import re
import time

import pytest
import torch

import fmlm
from ckpt_builders import small_model
from fmlm.bench import bench_e2e as bench
from fmlm.bench import common
from fmlm.engine import runner


@pytest.fixture
def on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.delenv("FMLM_BENCH_DEADLINE", raising=False)


SMALL = ["--batch-sizes", "1", "--steps", "1", "--reference", "none", "--iters", "1", "--no-candidates"]


def test_cli_prints_the_table_and_names_the_csv_it_appended_to(on_cpu, tmp_path, capsys, monkeypatch):
    """`fmlm bench e2e`: the markdown table, then the CSV the rows went to and the plot. Rows with other columns
    (here a 'note' column: every point skipped at the deadline) go to bench_e2e-<date>.csv, and the line names that
    file (it named bench_e2e.csv, which did not hold them)."""
    args = bench.parser().parse_args(SMALL + ["--out", str(tmp_path / "out")])
    args.datasets = ["tiny"]
    assert bench.cli(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("| dataset | path | B | steps | ms/sample |") and "| tiny | engine graph | 1 | 1 |" in out
    first = tmp_path / "out" / "bench_e2e.csv"
    assert out.rstrip().endswith(f"rows appended to {first}; plot {tmp_path / 'out' / 'bench_e2e.png'}")
    assert (tmp_path / "out" / "bench_e2e.png").stat().st_size > 0 and len(first.read_text().splitlines()) == 3

    monkeypatch.setenv("FMLM_BENCH_DEADLINE", "0")
    assert bench.cli(args) == 0
    line = capsys.readouterr().out.rstrip().splitlines()[-1]
    dated = re.fullmatch(r"rows appended to (.*/bench_e2e-\d{4}-\d\d-\d\d\.csv)", line)     # nothing timed: no plot
    assert dated, line
    text = open(dated.group(1)).read()
    assert text.count("skipped: time limit") == 2 and len(first.read_text().splitlines()) == 3
    monkeypatch.delenv("FMLM_BENCH_DEADLINE")          # the first columns again: back to bench_e2e.csv
    assert bench.cli(args) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(f"rows appended to {first}; plot ")
    assert len(first.read_text().splitlines()) == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_without_cuda_the_command_says_so_and_writes_nothing(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 2          # as `fmlm bench ncu`: a script sees no success
    captured = capsys.readouterr()
    assert captured.out == "" and "bench e2e: no CUDA device, skipped" in captured.err
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_is_named_by_its_shape_and_an_flm_is_refused(on_cpu, tmp_path):
    """--checkpoint: the rows are named lm1b / owt when the checkpoint has that shape, else 'checkpoint'; a one-time
    FLM checkpoint is refused before any timing (its engine rows failed, and its reference row timed the flow map
    sampler on a model that has none)."""
    for name, (V, L) in (("lm1b", (30522, 128)), ("checkpoint", (131, 9))):
        ck = tmp_path / name
        fmlm.save_checkpoint(small_model(vocab_size=V, seq_len=L, two_time=True, n_blocks=1), ck)
        args = bench.parser().parse_args(SMALL + ["--checkpoint", str(ck)])
        rows = bench.bench(args, quick=True)
        assert [(r["dataset"], r["path"], r["V"], r["L"]) for r in rows] == [
            (name, "engine eager", V, L), (name, "engine graph", V, L)]
        assert all(r["ms/sample"] > 0 for r in rows)
    flm = tmp_path / "flm"
    fmlm.save_checkpoint(small_model(two_time=False), flm)
    timed = []
    args = bench.parser().parse_args(["--reference", "all", "--checkpoint", str(flm)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "time_fn", lambda *a, **k: timed.append(a) or {})
        with pytest.raises(ValueError, match=f"bench e2e times the FMLM .* {re.escape(str(flm))} is a one-time FLM"):
            bench.bench(args, quick=True)
    assert timed == []


class _Sampler:
    """Stands in for runner.Sampler: kernel_options {"fail": "init"} fails to build, {"fail": "sample"} to run."""

    def __init__(self, model, batch_size, steps, graph=True, kernel_options=None, **kw):
        if (kernel_options or {}).get("fail") == "init":
            raise ValueError("needs sm_90\nsecond line of the message")
        self.fail = (kernel_options or {}).get("fail") == "sample"

        self.wrong = (kernel_options or {}).get("wrong", 0.0)

    def sample(self, seed, batch_size):
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access")
        tok = torch.zeros(batch_size, 8, dtype=torch.long)
        tok.view(-1)[:int(self.wrong * tok.numel())] = 7      # kernel_options {"wrong": f}: that share differs
        return tok


def test_candidate_rows_say_how_many_tokens_equal_the_defaults(on_cpu, monkeypatch):
    """A candidate's row carries the share of its tokens equal to the default graph path's at the same point and
    seed; one below MIN_TOKEN_AGREEMENT is no winner however fast, and a winners row below it meets no target. No
    column without a default to compare with, and none on the default rows themselves."""
    monkeypatch.setattr(runner, "Sampler", _Sampler)
    fake = {"same": {"x": 1}, "near": {"wrong": 0.25}, "other": {"wrong": 1.0}}
    monkeypatch.setattr(bench, "CANDIDATES", fake)
    monkeypatch.setattr(bench, "ALL_CANDIDATES", fake)
    cfg = small_model(two_time=True).cfg
    args = bench.parser().parse_args(["--iters", "1"])
    rows, tokens = [], {}
    bench._time_paths(rows, None, "tiny", cfg, 1, [("engine graph [same]", dict(kernel_options={}), [2])], args, 1,
                      float("nan"), float("inf"), tokens)
    assert bench.TOKENS_COL not in rows[0] and tokens == {}          # no default timed yet: nothing to compare
    rows = []
    paths = [("engine graph", dict(graph=True), [2]), *((f"engine graph [{c}]", dict(kernel_options=o), [2])
                                                         for c, o in bench.CANDIDATES.items())]
    bench._time_paths(rows, None, "tiny", cfg, 1, paths, args, 1, float("nan"), float("inf"), tokens)
    assert [r.get(bench.TOKENS_COL) for r in rows] == [None, 1.0, 0.75, 0.0]
    assert list(tokens) == [("tiny", 2, 1)]
    for r, ms in zip(rows, (1.0, 0.5, 0.6, 0.1)):                 # every candidate faster than the default
        r["ms/sample"] = ms
    label, merged = bench.combine_winners(rows, "tiny", 2)
    assert label == "winners: same, near" and merged == {"x": 1, "wrong": 0.25}
    monkeypatch.setitem(bench.TARGETS, ("tiny", 2, 1), 10.0)
    won = [dict(rows[0], path="engine graph [winners: other]", **{bench.TOKENS_COL: 0.0}),
           dict(rows[0], path="engine graph [winners: same]", **{bench.TOKENS_COL: 1.0})]
    bench._annotate(won)
    assert [r["meets target"] for r in won] == ["NO (opt-in)", "yes (opt-in)"]


def test_a_candidate_that_fails_is_a_row_and_a_default_that_fails_raises(on_cpu, monkeypatch):
    monkeypatch.setattr(runner, "Sampler", _Sampler)
    cfg = small_model(two_time=True).cfg
    args = bench.parser().parse_args(["--iters", "1"])
    rows = []
    paths = [("engine graph [a]", dict(graph=True, kernel_options={"fail": "init"}), [1, 2]),
             ("engine graph [b]", dict(graph=True, kernel_options={"fail": "sample"}), [1, 2]),
             ("engine graph", dict(graph=True), [1])]
    bench._time_paths(rows, None, "tiny", cfg, 1, paths, args, 1, float("nan"), float("inf"))
    assert [(r["path"], r["B"], r.get("note")) for r in rows] == [
        ("engine graph [a]", 1, "failed: ValueError: needs sm_90\nsecond line of the message"),
        ("engine graph [b]", 1, "failed: RuntimeError: CUDA error: an illegal memory access"),
        ("engine graph [b]", 2, "failed: RuntimeError: CUDA error: an illegal memory access"),
        ("engine graph", 1, None)]
    assert all(math.isnan(r["ms/sample"]) for r in rows[:3]) and rows[3]["ms/sample"] > 0
    assert "second line" in common.markdown_table(rows, bench.COLUMNS).splitlines()[2]     # one line per row
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench._time_paths([], None, "tiny", cfg, 1, [("engine graph", dict(kernel_options={"fail": "sample"}), [1])],
                          args, 1, float("nan"), float("inf"))
    with pytest.raises(ValueError, match="needs sm_90"):            # a default that cannot even be built
        bench._time_paths([], None, "tiny", cfg, 1, [("engine graph", dict(kernel_options={"fail": "init"}), [1])],
                          args, 1, float("nan"), float("inf"))
    rows = []               # the compiled blocks (--compile) are optional: an inductor failure is a row, not fatal
    compiled = dict(graph=True, compile_blocks=True, kernel_options={"fail": "sample"})
    bench._time_paths(rows, None, "tiny", cfg, 1, [("engine graph + compile", compiled, [1])],
                      args, 1, float("nan"), float("inf"))
    assert [(r["path"], r.get("note")) for r in rows] == [
        ("engine graph + compile", "failed: RuntimeError: CUDA error: an illegal memory access")]


def _row(ms, path="engine graph", B=1, dataset="tiny"):
    return {"dataset": dataset, "path": path, "steps": 1, "B": B, "ms/sample": ms, "floor ms/sample": 0.1, "L": 9,
            "V": 131}


def test_plot_leaves_out_points_that_were_not_timed(tmp_path):
    """Skipped or failed points (ms/sample nan) and the 'candidates aborted' row are not plotted: a dataset whose
    points were all skipped at gpu_check's deadline failed the log axes ('Data cannot be log-scaled'), the aborted
    row (no L, V or floor) raised KeyError, both after every row was measured, so run() lost them."""
    pytest.importorskip("matplotlib")
    nan = float("nan")
    aborted = {"dataset": "", "path": "candidates aborted", "B": 0, "steps": 0, "ms/sample": nan, "note": "x"}
    rows = [_row(1.0), _row(nan, "engine graph [pdl]"), _row(nan, dataset="lm1b"), _row(nan, B=8, dataset="lm1b"),
            aborted]
    png = bench.plot(rows, tmp_path / "e2e.png")
    assert png == tmp_path / "e2e.png" and png.stat().st_size > 1000
    assert bench.plot([_row(nan), aborted], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_plot_without_rows_or_matplotlib_is_none(tmp_path, monkeypatch):
    row = _row(1.0)
    assert bench.plot([], tmp_path / "e2e.png") is None
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert bench.plot([row], tmp_path / "e2e.png") is None
    assert not any(tmp_path.iterdir())


def test_run_plots_its_rows_into_out(tmp_path, monkeypatch):
    """run() (gpu_check's entry) writes the plot of its rows beside the results."""
    pytest.importorskip("matplotlib")
    row = _row(1.0)
    monkeypatch.setattr(bench, "bench", lambda args, quick=False: [row])
    assert bench.run(quick=True, argv=["--out", str(tmp_path)]) == [row]
    assert (tmp_path / "bench_e2e.png").stat().st_size > 0
    monkeypatch.setattr(bench, "bench", lambda args, quick=False: [])
    assert bench.run(quick=True, argv=["--out", str(tmp_path / "none")]) == [] and not (tmp_path / "none").exists()


def test_canary_leaves_out_what_raised_or_killed_the_child(monkeypatch):
    """canary(): the candidates a child reports as failed, and the first one it had not reported on when it died or
    hung, are left out with the reason; a new child goes on with the rest; what the children report ok is kept."""
    import subprocess

    calls = []

    def fake_run(cmd, capture_output, text, timeout):
        names = cmd[cmd.index("--canary") + 1:cmd.index("--datasets")]
        calls.append(names)
        if names[0] == "a":        # a passes, b kills the child (no line for it)
            return subprocess.CompletedProcess(cmd, -11, "CANARY ok a\n", "Segmentation fault\n")
        if names[0] == "c":        # c raises, d hangs
            raise subprocess.TimeoutExpired(cmd, timeout, output=b"CANARY fail c: RuntimeError: no kernel image\n")
        if names[0] == "e":        # e breaks the context: the child reports it and stops (exit 3) before f
            return subprocess.CompletedProcess(cmd, 3, "CANARY fail e: RuntimeError: illegal memory access\n", "")
        return subprocess.CompletedProcess(cmd, 0, "".join(f"CANARY ok {n}\n" for n in names), "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    bad = bench.canary(["a", "b", "c", "d", "e", "f", "g"], ["owt"], 0, timeout_s=60)
    assert calls == [["a", "b", "c", "d", "e", "f", "g"], ["c", "d", "e", "f", "g"], ["e", "f", "g"], ["f", "g"]]
    assert bad == {"b": "killed the canary child (exit -11): Segmentation fault",
                   "c": "failed in the canary child: RuntimeError: no kernel image",
                   "d": "hung in the canary child (killed at the time limit)",
                   "e": "failed in the canary child: RuntimeError: illegal memory access"}
    # a child that fails as Python before any candidate (exit 1, no line) breaks the canary, not a candidate:
    # nothing is left out and no second child is started
    calls.clear()
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "Traceback ...\nImportError: x\n"))
    assert bench.canary(["a", "b"], ["owt"], 0, timeout_s=60) == {} and len(calls) == 1


def test_canary_child_and_point(monkeypatch, capsys):
    """The child samples each candidate at its smallest headline point (rows B·L within the candidate's range) and
    prints a line per candidate; a candidate that raises is reported and the next one still runs."""
    assert set(bench.UNMEASURED) <= set(bench.CANDIDATES)          # a misspelt name would go unguarded
    assert bench.canary_point("attention 4 stages", ["owt", "lm1b"]) == ("owt", 32)       # ≥ 4096 rows
    assert bench.canary_point("attention kv split 8", ["owt", "lm1b"]) == ("owt", 1)      # 1024–4096 rows
    assert bench.canary_point("gemm triton fused + pdl", ["lm1b", "owt"]) == ("lm1b", 1)
    assert bench.canary_point("attention kv split 8", ["lm1b"]) is None
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setitem(bench.HEADLINE_B, "tiny", (2,))
    monkeypatch.setitem(bench.ALL_CANDIDATES, "broken", {"no_such_option": True})
    assert bench._canary_child(["broken", "pdl"], ["tiny"], 0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1] == "CANARY ok pdl", lines
    assert lines[0].startswith("CANARY fail broken: ValueError: unknown kernel option 'no_such_option'"), lines
    assert bench.main(["--canary", "pdl", "--datasets", "owt-none"]) == 0     # no headline point there: ok
    assert capsys.readouterr().out == "CANARY ok pdl (acts at no headline point)\n"


def test_candidates_left_out_by_the_canary_are_rows(on_cpu, monkeypatch):
    """A candidate the canary left out gets one row saying why and is not timed; the others are."""
    monkeypatch.setattr(bench, "_canary_left_out", lambda chosen, datasets, seed, deadline: {"pdl": "killed the child"})
    args = bench.parser().parse_args(["--batch-sizes", "1", "--steps", "1", "--reference", "none", "--iters", "1",
                                      "--candidate", "pdl", "--candidate", "gemm triton small"])
    args.datasets = ["tiny"]
    rows = bench.bench(args, quick=True)
    assert [r.get("note") for r in rows if r["path"] == "engine graph [pdl]"] == ["left out: killed the child"]
    assert [r["B"] for r in rows if r["path"] == "engine graph [gemm triton small]"] == [1]


def test_candidates_leave_the_winners_rows_their_time_and_retired_ones_run_only_when_named(on_cpu, monkeypatch):
    """No candidate starts within WINNERS_RESERVE_S of the deadline (its row says skipped), while the winners row of
    what had won still runs; the retired candidates are not in the default list but `--candidate` takes them."""
    assert not set(bench.RETIRED) & set(bench.CANDIDATES) and "pdl" in bench.RETIRED
    assert bench.parser().parse_args(["--candidate", "pdl"]).candidate == ["pdl"]
    monkeypatch.setattr(runner, "Sampler", _Sampler)
    fake = {"x": {"a": 1}, "y": {"b": 2}}
    monkeypatch.setattr(bench, "CANDIDATES", fake)
    monkeypatch.setattr(bench, "ALL_CANDIDATES", fake)
    monkeypatch.setattr(bench, "WINNERS_RESERVE_S", 1e6)
    model = small_model(two_time=True)
    cfg = model.cfg
    base = dict(dataset="tiny", B=2, steps=1, V=cfg.vocab_size, L=cfg.seq_len)
    rows = [dict(base, path="engine graph", **{"ms/sample": 1.0}), dict(base, path="engine graph [x]",
                                                                         **{"ms/sample": 0.5})]
    args = bench.parser().parse_args(["--iters", "1"])
    args.candidate = ["y"]
    bench._time_candidates(rows, ["tiny"], lambda name: ("tiny", model, (2,)), [1], args, 1, float("nan"),
                           time.time() + 600)
    y = [r for r in rows if r["path"] == "engine graph [y]"]
    assert [r.get("note") for r in y] == ["skipped: time limit"]
    won = [r for r in rows if r["path"] == "engine graph [winners: x]"]
    assert [(r["steps"], r["ms/sample"] > 0) for r in won] == [(1, True)]
