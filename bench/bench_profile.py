"""Where a one-step sample's time goes at the points whose targets are open: per-kernel device time of one
`Sampler.sample()` call (torch.profiler; the call replays one CUDA graph), beside the whole call's time measured
with events. The call is more than the graph replay: the seed fill before it, the token clone after it and the
Python around them (the weights check, the dispatch) are inside the timed region.

Points: OWT B=1, LM1B B=1 (latency-bound: the gap between the call's time and the device's busy time is the graph's
launch/dependency overhead plus the host time the device waits for), OWT B=32 (throughput); LM1B B=1 again with
cuBLASLt preferred for the GEMMs (torch.backends.cuda.preferred_blas_library): an H100 profile of OWT B=32 showed
one device memset per cuBLAS GEMM call (49 per sample call), each one more graph node at batch 1, and the other
library may differ; and LM1B B=1 with the opt-in batch-1 kernels (Sampler kernel_options gemm_impl='triton_small'
and pdl: Triton GEMMs without memsets, launches overlapped), to see what remains of the gaps, the same with the
weights prefetched into L2 before each PDL wait and one operand stage per K step (kernel options pdl_prefetch,
gemm_deep_pipeline), with the gate-residual and LayerNorm inside the GEMMs (gemm_impl 'triton_fused': 5
launches per block instead of 7), and with the attention's output projection inside the attention kernel
(kernel option attention_out_proj: one launch fewer per block); OWT B=1 again with the attention's keys split
over 8 programs per query tile (kernel option attention_kv_split: the attention took 34 µs per layer there, a
third of the call).
Rows: the top kernels of each point (µs per call, % of the summed kernel time) and one summary row per point
("sample() call ms": a whole Sampler.sample() call, not the graph replay alone; "kernels ms": the device's busy
time, the union of the kernels' intervals, so that PDL's overlapped launches count once; "gaps ms" = call − busy,
the graph's launch gaps and the host overhead of the call (seed fill, token clone, Python) where the device waits
for it; "kernel launches per call", memsets and copies not counted; "memsets per call"). Random never-zero
weights of the released small model.
"""
from __future__ import annotations

import gc
import sys

import torch

from fmlm.bench.common import markdown_table, optional_rows, time_fn, write_rows

# (preset, B, variant): None (defaults), "cublaslt" (preferred BLAS library) or a VARIANT_OPTIONS key
POINTS = (("lm1b", 1, None), ("lm1b", 1, "cublaslt"), ("lm1b", 1, "triton_small+pdl"),
          ("lm1b", 1, "triton_small+pdl+prefetch+deep"), ("lm1b", 1, "triton_fused+pdl"),
          ("lm1b", 1, "triton_small+pdl+out_proj"), ("owt", 1, None),
          ("owt", 1, "kv_split8"), ("owt", 32, None),
          ("lm1b", 1, "triton_small+pdl+prefetch+argmax_cuda"))     # new CUDA code last (a fault ends the process)
VARIANT_OPTIONS = {"triton_small+pdl": {"gemm_impl": "triton_small", "pdl": True},
                   "triton_small+pdl+prefetch+deep": {"gemm_impl": "triton_small", "pdl": True, "pdl_prefetch": True,
                                                      "gemm_deep_pipeline": True},
                   "triton_fused+pdl": {"gemm_impl": "triton_fused", "pdl": True},
                   # the csrc/ argmax (one launch instead of two, prefetching its W under PDL) in the trace
                   "triton_small+pdl+prefetch+argmax_cuda": {"gemm_impl": "triton_small", "pdl": True,
                                                             "pdl_prefetch": True, "argmax_config": {"impl": "cuda"}},
                   "triton_small+pdl+out_proj": {"gemm_impl": "triton_small", "pdl": True, "attention_out_proj": True},
                   "kv_split8": {"attention_kv_split": 8}}
TOP = 12
DEVICE = "cuda"          # the CPU smoke test sets "cpu" (and the tiny preset)


def run(quick: bool = False) -> list[dict]:
    from fmlm.engine.profile import build_model, kernel_table, profile_run
    from fmlm.engine.runner import Sampler

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_profile: needs CUDA, skipped", file=sys.stderr)
        return []
    rows = []
    iters = 3
    for name, B, variant in POINTS:
        if variant and not optional_rows():          # gpu_check's defaults-only mode
            rows.append({"point": f"{name} B={B} {variant}", "note": "skipped: defaults-only check"})
            continue
        blas = variant if variant not in VARIANT_OPTIONS else None
        before = torch.backends.cuda.preferred_blas_library() if DEVICE == "cuda" else None
        if blas and DEVICE == "cuda":
            try:
                torch.backends.cuda.preferred_blas_library(blas)  # before the capture: the graph keeps its GEMMs
            except RuntimeError as exc:
                rows.append({"point": f"{name} B={B} {blas}", "note": f"skipped: {exc}"[:160]})
                continue
        try:
            model = build_model(None, name, DEVICE, 0)
            sampler = Sampler(model, B, 1, kernel_options=VARIANT_OPTIONS.get(variant))
            prof, kernel_us = profile_run(sampler, iters)
            # the whole call (seed fill, replay, token clone, Python), not the replay alone
            call = time_fn(lambda: sampler.sample(0), warmup=2, iters=10 if quick else 30, device=DEVICE)
        except Exception as exc:      # an opt-in variant that fails is a row; the defaults must work
            if not variant:
                raise
            rows.append({"point": f"{name} B={B} {variant}", "note": f"failed: {exc!r}"[:200]})
            continue
        finally:
            if before is not None:
                torch.backends.cuda.preferred_blas_library(before)
        table = kernel_table(prof, top=1000)
        launches = sum(r["calls"] for r in table if not r["kernel"].lower().startswith(("memset", "memcpy"))) / iters
        point = f"{name} B={B}" + (f" {variant}" if variant else "")
        summary = {"point": point, "kernel": "(one-step call: summary)", "sample() call ms": call["ms"],
                   "kernels ms": (kernel_us or float("nan")) / 1e3, "kernel launches per call": launches,
                   "memsets per call": sum(r["calls"] for r in table if "memset" in r["kernel"].lower()) / iters}
        summary["gaps ms"] = summary["sample() call ms"] - summary["kernels ms"]   # launch gaps + host overhead
        if kernel_us is None:
            summary["note"] = ("no device activity recorded (CPU run, or the profiler saw no kernels in the "
                               "graph replay)")
        rows.append(summary)
        for r in table[:TOP]:
            key = next(k for k in r if k.endswith("total µs"))     # "device total µs" ("cpu self" on a CPU)
            rows.append({"point": point, "kernel": r["kernel"], "calls per call": r["calls"] / iters,
                         "µs per call": r[key] / iters, "% of kernel time": r["%"]})
        del sampler, model, prof
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    rows = run()
    if rows:
        print(markdown_table(rows))
        write_rows("bench_profile", rows)


if __name__ == "__main__":
    main()
