"""Shared benchmark plumbing: event timing (median, p20, p80), device ceilings, result rows → CSV + markdown.

Rules (STYLE.md §8): time with device events after warm-up, median of many runs, never on zero-filled
inputs; every op row sits beside its reference measured in the same process.
"""
from __future__ import annotations

import csv
import datetime
import functools
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

def _default_results_dir(here: Optional[Path] = None) -> Path:
    """bench/results/ of a source checkout (an editable install: what make runs); ./fmlm_results for an installed
    package, whose folder is site-packages and no place for results."""
    here = Path(__file__).resolve().parent if here is None else here
    if (here.parent / "setup.py").is_file() and (here.parent / "kernels").is_dir():
        return here / "results"
    return Path.cwd() / "fmlm_results"


RESULTS_DIR = Path(os.environ.get("FMLM_RESULTS_DIR") or _default_results_dir())


def sync(device=None):
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 3, iters: int = 20, device: str = "cuda",
            min_time_s: float = 0.0) -> dict:
    """Median / p20 / p80 in ms: CUDA events on a GPU, perf_counter on the CPU (after synchronizing)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - t_start) < min_time_s:
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * iters:
            break
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "n": len(times)}


def graphed(fn: Callable[[], object], warmup: int = 2) -> Callable[[], None]:
    """fn captured in a CUDA graph (after `warmup` eager calls on a side stream); returns the replay. Timing a
    replay measures the device work of fn without its host-side launch cost (Python, autograd, dispatch),
    which for sub-millisecond ops can exceed the kernels' time. Raises if fn cannot be captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_deadline() -> float:
    """time.time() by which a benchmark that gpu_check runs must have returned its rows (FMLM_BENCH_DEADLINE, set a
    little before gpu_check would kill the process, shorter when its total budget runs low), else inf."""
    return float(os.environ.get("FMLM_BENCH_DEADLINE", "inf"))


def optional_rows() -> bool:
    """False in gpu_check's defaults-only mode (`make gpu-check`, FMLM_BENCH_OPTIONAL=0): the benchmarks then time
    the defaults, the targets and their baselines, and start no optional row (opt-in candidates, config sweeps,
    previous defaults), so that every benchmark fits the 5-minute check. `make gpu-check-full` and a benchmark run
    on its own time them."""
    return os.environ.get("FMLM_BENCH_OPTIONAL", "1") != "0"


def optional_budget(t_start: float, budget_s: float, tail_s: float = 0.0) -> float:
    """Seconds after t_start during which a benchmark may still start optional rows: its own budget_s, or less when
    gpu_check's deadline, minus tail_s for what must run after those rows, comes first (none in the defaults-only
    mode, see optional_rows). Without it a benchmark started on a shortened limit was killed with every row
    unwritten."""
    if not optional_rows():
        return 0.0
    return min(budget_s, bench_deadline() - tail_s - t_start)


def time_left(t_start: float, limit_s: float) -> float:
    """Seconds left of a benchmark's own limit_s (counted from t_start) or of gpu_check's deadline, whichever
    ends first."""
    return min(limit_s - (time.time() - t_start), bench_deadline() - time.time())


@functools.lru_cache(maxsize=1)
def ceilings() -> dict:
    """Measured device ceilings: bf16 GEMM TFLOP/s and copy GB/s (read + write), on random data."""
    if not torch.cuda.is_available():
        return {"bf16_tflops": float("nan"), "copy_gbs": float("nan")}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, warmup=3, iters=10)["ms"]
    x = torch.randn(256 * 2**20, device="cuda")   # 1 GiB
    y = torch.empty_like(x)
    tc = time_fn(lambda: y.copy_(x), warmup=3, iters=10)["ms"]
    return {"bf16_tflops": 2 * n ** 3 / t / 1e9, "copy_gbs": 2 * x.numel() * 4 / tc / 1e6}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit the rows were measured at: FMLM_GIT_SHA when set (the device machine's copy of the tree has no
    usable git: pass the sha on the command line, `FMLM_GIT_SHA=<sha> make gpu-check`), else git's."""
    if os.environ.get("FMLM_GIT_SHA"):
        return os.environ["FMLM_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def meta() -> dict:
    import importlib.util
    tv = "none"
    if importlib.util.find_spec("triton"):
        import triton
        tv = triton.__version__
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device_name(),
            "torch": torch.__version__, "triton": tv, "git": git_sha()}


def write_rows(name: str, rows: list[dict], out_dir: Optional[Path] = None) -> Path:
    """Append rows (with meta columns) to <out>/<name>.csv and rewrite <out>/<name>.md; returns the md path."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    m = meta()
    rows = [{**r, **m} for r in rows]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    # append to the first of <name>.csv, <name>-<date>.csv, <name>-<date>-2.csv, … that is new or has these columns
    # (rows under another header would land in the wrong columns)
    day = m["date"][:10]
    for i in range(1, 1000):
        path = out / (f"{name}.csv" if i == 1 else f"{name}-{day}.csv" if i == 2 else f"{name}-{day}-{i - 1}.csv")
        new = not path.exists()
        if new:
            break
        with open(path) as f:
            if next(csv.reader(f), []) == keys:
                break
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        if new:
            w.writeheader()
        w.writerows(rows)
    md = out / f"{name}.md"
    md.write_text(markdown_table(rows))
    return md


def fmt(v) -> str:
    """A markdown cell: floats to 4 significant digits (nan as —); text on one line, without the column bar (an
    exception's message can hold both, and would break the table and gpu_check's reading of it)."""
    if isinstance(v, float):
        if v != v:
            return "—"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return " ".join(str(v).split("\n")).replace("|", "/")


def markdown_table(rows: Iterable[dict], keys: Optional[list[str]] = None) -> str:
    rows = list(rows)
    if not rows:
        return ""
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensor memory allocated while fn() runs, above what was live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: the profiler's allocator events ([memory] events carry +/-
    nbytes with a timestamp); the running sum's maximum is the peak of live tensor bytes. Run it apart from
    timing: profiling slows the run."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    import logging

    from torch.profiler import ProfilerActivity, profile

    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def child_json_row(module: str, flag: str, timeout_s: float) -> dict:
    """Run `python -m <module> <flag>` (e.g. torch.compile of a reference, whose compile time and memory
    stay out of this process) and return the last JSON line it prints, or a row noting why there is none."""
    import json
    import sys

    if timeout_s < 10:
        return {"note": f"skipped: {timeout_s:.0f} s left"}
    try:
        res = subprocess.run([sys.executable, "-m", module, flag], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"note": f"did not finish in {timeout_s:.0f} s"}
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {"note": f"failed: {res.stderr[-300:]!r}"}


def add_bench_command(bench_sub, name: str, help: str, doc: str, parser, func) -> None:
    """`fmlm bench <name>`: a benchmark module's subcommand (its argparse setup `parser(p)` and handler `func`)."""
    import argparse

    p = bench_sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser(p)
    p.set_defaults(func=func)
