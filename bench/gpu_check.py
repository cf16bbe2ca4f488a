"""`make gpu-check`: one script on one GPU — the GPU tests, then every bench/bench_*.py run(quick=True),
each in its own process under a time limit; rows go to bench/results/ (and to $OUT when set), and a
summary table is printed last.

Two modes. The default (`make gpu-check`, 5 minutes) times the defaults only: each benchmark's headline rows,
targets and baselines, no optional row (common.optional_rows), so that the targets' benchmarks all fit.
--full (`make gpu-check-full`, 9 minutes) adds every opt-in candidate, config sweep and previous-default row.
bench_e2e_compile (issue 5's blocks under torch.compile, measured both ways in the 2026-11-27 run5: 0.98x / 1.00x)
comes after the kernel benchmarks that time the open candidates."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import torch

from fmlm.bench import common

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"bench_e2e": 200, "bench_attention": 75, "bench_e2e_compile": 120, "bench_linear": 90,
          "bench_vocab_attention": 75, "bench_logits_argmax": 75,
          "ncu_kernels": 260}   # seconds per benchmark process; others get --limit. ncu_kernels: `make gpu-ncu` only
# the benchmarks that carry the issues' targets first, then the diagnostic ones (attention sweep, profile) and the
# extras: when the total budget runs out, the ones at the end are skipped (and reported so)
# FMLM_BENCH_DEADLINE this long before the kill: time to finish what was started and write the rows. bench_e2e needs
# more (a candidate's first capture compiles its kernels); the kernel benchmarks only stop starting optional rows
# (common.optional_budget) and cut their torch.compile(reference) child short (common.time_left)
DEADLINE_MARGIN_S = {"bench_e2e": 40}
DEFAULT_DEADLINE_MARGIN_S = 12
INTERRUPT_GRACE_S = 8.0     # run_group: SIGINT, then this long before SIGKILL
ORDER = ("bench_e2e", "bench_logits_argmax", "bench_interp_embed", "bench_linear_cross_entropy",
         "bench_vocab_attention", "bench_attention", "bench_profile", "bench_e2e_compile", "bench_linear",
         "bench_sample", "bench_train")
# --full: the same order (the compiled blocks, measured once in run5, no longer go second); kept as a hook
FULL_FIRST = ("bench_e2e",)


def bench_modules(full: bool = False) -> list[str]:
    import fmlm.bench as pkg
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_")]
    order = (*FULL_FIRST, *(n for n in ORDER if n not in FULL_FIRST)) if full else ORDER
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def archive(out: str | None) -> None:
    """All results so far as $OUT/results.tar.gz (the device tool returns at most 8 files), rewritten after every
    step, so that a run killed at the command's time limit still returns what it measured."""
    if out and common.RESULTS_DIR.exists():
        tmp = Path(out) / "results.tar.gz.tmp"        # then renamed: a kill mid-write leaves the previous archive
        with tarfile.open(tmp, "w:gz") as tar:
            # an Nsight Compute report left by a failed case can pass the device tool's 16 MiB per file, and then
            # no archive would come back: the reports' CSV pages are what the rows are read from
            tar.add(common.RESULTS_DIR, arcname="results",
                    filter=lambda ti: None if ti.name.endswith(".ncu-rep") else ti)
        os.replace(tmp, Path(out) / "results.tar.gz")


def _md_rows(path: Path) -> list[dict]:
    """Rows of a markdown table written by common.write_rows (cells as strings)."""
    lines = [x for x in path.read_text().splitlines() if x.startswith("|")]
    if len(lines) < 2:
        return []
    keys = [k.strip() for k in lines[0].strip("|").split("|")]
    return [dict(zip(keys, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]


def _run_rows(names):
    """(benchmark, row) for every row of the named benchmarks' markdown tables in the results folder."""
    for name in names:
        md = common.RESULTS_DIR / f"{name}.md"
        if md.exists():
            yield from ((name, r) for r in _md_rows(md))


def _where(r: dict, keys) -> str:
    return " ".join(f"{k}={r[k]}" for k in keys if r.get(k))


def candidate_table(names) -> str:
    """Every row of this run's benchmarks that compares an opt-in variant with the default it would replace
    (columns speedup_vs_default or "vs engine graph": the default's time over the variant's, > 1 = faster)."""
    out = []
    for name, r in _run_rows(names):
        sp = r.get("speedup_vs_default") or r.get("vs engine graph") or ""
        if sp in ("", "—"):
            continue
        out.append({"benchmark": name, "variant": r.get("impl") or r.get("path", ""),
                    "where": _where(r, ("shape", "dataset", "rows", "B", "pass")),
                    "ms": r.get("ms") or r.get("ms/sample", ""), "speedup vs default": sp,
                    # bench_e2e: the share of the default's tokens a candidate reproduces (bench_e2e.TOKENS_COL)
                    "tokens = default": r.get("tokens = default", "")})
    return common.markdown_table(out) if out else "(no candidate rows)\n"


# the columns a benchmark's target rows use (the first present one is shown)
TARGET_VALUE_KEYS = ("eff_tflops", "tflops", "speedup_vs_dense_xE", "ms/sample")


def targets_table(names) -> str:
    """Every row of this run's benchmarks that carries an issue target (a meets_target / "meets target" cell: the
    defaults' headline rows and the "best measured" rows), one line each: what it measured, the target, met or
    not. Printed last with the summary, so that the tail of the output answers the issues by itself."""
    out = []
    for name, r in _run_rows(names):
        met = r.get("meets_target") or r.get("meets target") or ""
        if met in ("", "—"):
            continue
        key = next((k for k in TARGET_VALUE_KEYS if r.get(k) not in (None, "", "—")), None)
        value = f"{key} {r[key]}" if key else ""
        if r.get("4-step/1-step") not in (None, "", "—"):
            value += f", 4-step/1-step {r['4-step/1-step']}"
        out.append({"benchmark": name, "row": r.get("impl") or r.get("path", ""),
                    "where": _where(r, ("shape", "dataset", "rows", "N", "B", "steps", "pass")), "measured": value,
                    "target": r.get("target") or r.get("target ms/sample", ""), "met": met})
    return common.markdown_table(out) if out else "(no target rows)\n"


def xdist_args(workers: int) -> list[str]:
    """pytest arguments that spread the GPU tests over `workers` processes, one test file per process at a time
    (its kernels compile once there), or none when xdist is missing or workers < 2."""
    if workers < 2 or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(workers, os.cpu_count() or 1)), "--dist", "loadfile"]


def run_group(cmd: list[str], timeout: float, **kw) -> int:
    """Run cmd in a process group of its own and return its exit status. On timeout, kill the whole group, then
    raise subprocess.TimeoutExpired: killing only the child (what subprocess.run does) left pytest-xdist workers
    or torch.compile's worker processes running on the GPU beside the next benchmark. After a normal exit,
    whatever the child left behind in its group is killed too. At the limit the group first gets SIGINT and
    INTERRUPT_GRACE_S to react (pytest then prints which tests passed and failed so far), then SIGKILL."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        _kill_group(proc.pid)


def _kill_group(pgid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def plan(names: list[str], budget: float, tests_limit: float, default_limit: float, full: bool) -> str:
    """The steps main() would run, each with its time limit (a step starts only with ≥ 20 s of the budget left,
    and its limit is cut to what is left), as a markdown table; the last line compares the worst case (every
    step using its whole limit) with the budget and says which steps would then be skipped."""
    rows, t = [], 0.0
    steps = ([("gpu tests", tests_limit)] if tests_limit else []) + [(n, LIMITS.get(n, default_limit)) for n in names]
    for name, limit in steps:
        left = budget - t
        tests = name == "gpu tests"
        if not tests and left < 20:      # the tests always start; a benchmark with < 20 s left is skipped
            rows.append({"step": name, "limit s": limit, "worst-case start s": round(t), "if every step ran long":
                         "skipped"})
            continue
        run = limit if tests else min(limit, left - INTERRUPT_GRACE_S)
        rows.append({"step": name, "limit s": limit, "worst-case start s": round(t),
                     "if every step ran long": "runs" if run == limit else f"cut to {run:.0f} s"})
        t += run
    mode = "full (defaults and every optional row)" if full else "defaults only"
    return (f"mode: {mode}; budget {budget:.0f} s\n" + common.markdown_table(rows)
            + f"worst case {t:.0f} s of the budget's {budget:.0f} s\n")


def _step_log(step: str):
    """The file a step's stdout and stderr go to (inside the results, so the archive carries every step's full
    output: the device tool returns only the tail of the command's own output)."""
    d = common.RESULTS_DIR / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return open(d / f"{step.replace(' ', '_')}.log", "w")


def _tail(path: str, n: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _failures(path: str, n: int = 40) -> list[str]:
    """pytest's -rfE summary lines (FAILED / ERROR) of a step's log."""
    with open(path, errors="replace") as f:
        return [x.rstrip() for x in f if x.startswith(("FAILED ", "ERROR "))][:n]


def run_one(name: str) -> int:
    mod = importlib.import_module(f"fmlm.bench.{name}")
    rows = mod.run(quick=True)
    if rows:
        md = common.write_rows(name, rows)
        print(md.read_text())
    return 0


def _start_csrc_build() -> threading.Thread:
    """nvcc builds csrc/ for this GPU (into the cache kernels/_cuda.py reads) on a thread while the ceilings and the
    GPU tests run, so that neither the tests nor the benchmarks wait ~10 s for it; a failure here is left for the
    tests that use the library to report."""
    def build():
        from fmlm.kernels import _cuda
        try:
            if _cuda.find_nvcc() is not None:
                _cuda.build(_cuda.device_arch(torch.cuda.current_device()), quiet=True)
        except Exception as e:  # reported again, with nvcc's output, by the first test that loads the library
            print(f"note: building csrc/ failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    t = threading.Thread(target=build, daemon=True)
    t.start()
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=60, help="seconds per benchmark")
    ap.add_argument("--tests-limit", type=int, default=150)
    ap.add_argument("--tests-workers", type=int, default=3,
                    help="pytest-xdist processes for the GPU tests where xdist is installed (0: one process); they "
                         "check, they do not time, and most of their time is Triton compiling kernels on the CPU")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--full", action="store_true",
                    help="also every optional row (opt-in candidates, config sweeps, previous defaults), with "
                         "bench_e2e_compile second; without it the benchmarks time the defaults only")
    ap.add_argument("--only", nargs="*", help="benchmark module names (default: all bench_*)")
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds for the whole check (tests + benchmarks), counted once torch is imported (the "
                         "editable install, python's start and that import took 12 s more on the H100 run of "
                         "2026-11-27, 259 s in all at a 265 s budget: 280 keeps `make gpu-check` within 5 "
                         "minutes); a benchmark that would start with less than 20 s left is skipped and reported so")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (mode, order, each step's time limit, the worst case against the budget) "
                         "and exit; needs no GPU")
    a = ap.parse_args(argv)
    if a.one:
        return run_one(a.one)
    if a.dry_run:
        print(plan(a.only or bench_modules(a.full), a.budget, 0.0 if a.skip_tests else a.tests_limit, a.limit, a.full))
        return 0
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device", file=sys.stderr)
        return 2
    t_begin = time.time()
    csrc_build = _start_csrc_build()
    print(f"device: {common.device_name()}  torch {torch.__version__}  meta {common.meta()}", flush=True)
    print(f"ceilings: {common.ceilings()}", flush=True)
    torch.cuda.empty_cache()       # the ceilings' ~2 GB of buffers, cached in this parent for the whole run otherwise
    status = {}
    out = os.environ.get("OUT")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FMLM_BENCH_OPTIONAL": "1" if a.full else "0"}
    names = a.only or bench_modules(a.full)
    print(f"mode: {'full (defaults and every optional row)' if a.full else 'defaults only'}; order: {' '.join(names)}",
          flush=True)
    failures = []
    if not a.skip_tests:
        t0 = time.time()
        with _step_log("gpu tests") as log:
            try:
                rc = run_group([sys.executable, "-m", "pytest", str(ROOT / "tests"), "-q", "-m", "gpu",
                                "-p", "no:cacheprovider", "-rfE", "--continue-on-collection-errors",
                                # the slowest tests in the log: where the 5-minute budget goes (run4: 113 s of
                                # tests left too little for bench_vocab_attention)
                                "--durations=20", *xdist_args(a.tests_workers)], a.tests_limit, cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
                status["gpu tests"] = ("pass" if rc == 0 else f"FAIL rc={rc}", time.time() - t0)
            except subprocess.TimeoutExpired:
                status["gpu tests"] = ("TIMEOUT", time.time() - t0)
        print(_tail(log.name), flush=True)
        failures = _failures(log.name)
        archive(out)
    csrc_build.join()
    started = {}
    for name in names:
        t0 = started[name] = time.time()
        left = a.budget - (t0 - t_begin)
        if left < 20:
            status[name] = ("SKIPPED (budget)", 0.0)
            continue
        # the last step's kill comes INTERRUPT_GRACE_S after its limit: keep that inside the budget too
        limit = min(LIMITS.get(name, a.limit), left - INTERRUPT_GRACE_S)
        # a benchmark that reads it (bench_e2e) skips what it has no time for and still returns its rows
        margin = DEADLINE_MARGIN_S.get(name, DEFAULT_DEADLINE_MARGIN_S)
        env_one = {**env, "FMLM_BENCH_DEADLINE": str(time.time() + max(limit - margin, limit / 2))}
        with _step_log(name) as log:
            try:
                rc = run_group([sys.executable, "-m", "fmlm.bench.gpu_check", "--one", name], limit, cwd=ROOT,
                               env=env_one, stdout=log, stderr=subprocess.STDOUT)
                status[name] = ("ok" if rc == 0 else f"FAIL rc={rc}", time.time() - t0)
            except subprocess.TimeoutExpired:
                status[name] = ("TIMEOUT", time.time() - t0)
        if status[name][0] != "ok":      # the tables come in the summary below; a failure's tail shows here
            print(f"### {name}: {status[name][0]}, the end of its log (results/logs/{name}.log)\n{_tail(log.name)}",
                  flush=True)
        archive(out)
    # printed last, so that a tail of the output (what a remote runner returns) holds the summaries
    # a table written by this run: a step that wrote no rows would otherwise show an earlier run's (or the tree's)
    ran = [n for n in names if status.get(n, ("",))[0] == "ok" and (common.RESULTS_DIR / f"{n}.md").exists()
           and (common.RESULTS_DIR / f"{n}.md").stat().st_mtime >= started[n] - 1.0]
    for name in [n for n in names if status.get(n, ("",))[0] == "ok" and n not in ran]:
        print(f"### {name}: ok, but it wrote no rows")
    for name in ran:
        print(f"### {name}\n{(common.RESULTS_DIR / f'{name}.md').read_text()}")
    print("## opt-in candidates vs the defaults they would replace (speedup > 1: the candidate is faster)")
    print(candidate_table(ran))
    print("## issue targets: the rows that carry one (defaults, best measured)")
    print(targets_table(ran))
    if failures:
        print("## GPU test failures (all of them in results/logs/gpu_tests.log)")
        print("\n".join(failures))
    print(f"## gpu-check summary ({time.time() - t_begin:.0f} s)")
    print(common.markdown_table([{"step": k, "status": v[0], "seconds": round(v[1], 1)} for k, v in status.items()]))
    return 0 if all(v[0] in ("ok", "pass") or v[0].startswith("SKIPPED") for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
