"""The fast trunk's blocks with and without torch.compile, one process, CUDA graphs on (issue 5's "measured both
ways"). Sampler(compile_blocks=True) compiles engine/model.py `_fast_block` (the Triton ops stay opaque custom
ops; inductor fuses what is left between them), off by default.

Points: one-step OWT B=32 and LM1B B=1 (the headline batch sizes of bench_e2e), random never-zero weights of the
released small model. The cold compile takes tens of seconds, so this is its own process in `make gpu-check`: a
timeout here loses only these rows, and a point that would start less than POINT_S before gpu_check's deadline
is reported as skipped. Columns as bench_e2e, plus the compile time and the ratio.
"""
from __future__ import annotations

import gc
import sys
import time

import torch

from fmlm.bench import bench_e2e
from fmlm.bench.bench_e2e import _row
from fmlm.bench.common import bench_deadline, ceilings, markdown_table, optional_rows, time_fn, write_rows

POINTS = (("owt", 32), ("lm1b", 1))
POINT_S = 45.0           # seconds a point needs at most (napkin: two samplers, one cold inductor compile of the block)
DEVICE = "cuda"          # the CPU smoke test sets "cpu" (there the reference trunk runs and compile_blocks is moot)


def run(quick: bool = False) -> list[dict]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_e2e_compile: needs CUDA, skipped", file=sys.stderr)
        return []
    if not optional_rows():
        # the compiled blocks are an opt-in variant (off by default): gpu-check's defaults-only mode leaves them to
        # gpu-check-full, and bench_e2e already times the plain graph rows
        return [{"dataset": name, "path": "engine graph + compile", "B": B, "steps": 1,
                 "note": "skipped: defaults-only mode (make gpu-check-full times it)"} for name, B in POINTS]
    bench_e2e.DEVICE = DEVICE
    rate = ceilings()["bf16_tflops"]
    iters = 5 if quick else 20
    rows = []
    need_s = POINT_S
    for name, B in POINTS:
        if time.time() + need_s > bench_deadline():
            rows += [{"dataset": name, "path": path, "B": B, "steps": 1, "note": "skipped: time limit"}
                     for path in ("engine graph", "engine graph + compile")]
            continue
        t_point = time.perf_counter()
        rows += _point(name, B, iters, rate)
        need_s = max(POINT_S, time.perf_counter() - t_point)    # the next point needs about as long as this one
        if bench_deadline() != float("inf"):
            write_rows("bench_e2e_compile_points", rows[-2:])  # under gpu_check: on disk before a later kill
    return rows


def _point(name: str, B: int, iters: int, rate: float) -> list[dict]:
    """The plain and the compiled blocks at one point; a path that fails (a torch.compile error, a capture of
    compiled code that breaks) is a row with the reason, and the other path's row stays."""
    from fmlm.engine.profile import build_model
    from fmlm.engine.runner import Sampler

    model = build_model(None, name, DEVICE, 0)
    cfg = model.cfg
    rows, plain, plain_tokens = [], None, None
    for path, compile_blocks in (("engine graph", False), ("engine graph + compile", True)):
        try:
            sampler = Sampler(model, B, 1, compile_blocks=compile_blocks)

            def call(sampler=sampler):
                return sampler.sample(0, batch_size=B)
            t0 = time.perf_counter()
            peak = bench_e2e._peak(call)    # first call: warm-up (and the compile), capture
            first_s = time.perf_counter() - t0
            t = time_fn(call, warmup=1, iters=iters, device=DEVICE)
            r = _row(name, path, cfg, B, 1, t, peak, rate)
            r["first call s"] = first_s
            tokens = call()
            if plain is not None:
                r["vs engine graph"] = plain["ms/sample"] / r["ms/sample"]
                r["tokens equal to engine graph"] = (tokens == plain_tokens).float().mean().item()
            else:
                plain, plain_tokens = r, tokens
        except Exception as exc:
            r = {"dataset": name, "path": path, "B": B, "steps": 1,
                 "note": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
        rows.append(r)
        sampler = call = None      # the graphs and their pool go before the next path's capture
        gc.collect()
        bench_e2e._empty_cache()
    del model
    gc.collect()
    bench_e2e._empty_cache()
    return rows


def main() -> None:
    rows = run()
    if rows:
        print(markdown_table(rows))
        write_rows("bench_e2e_compile", rows)


if __name__ == "__main__":
    main()
