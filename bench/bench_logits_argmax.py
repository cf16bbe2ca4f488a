"""logits_argmax (argmax over V of h·Wᵀ+b, fused: logits never written) beside the reference in one process.

Shapes (bf16, V = 50258 passed as a weight padded to 50304 with n_valid = 50258, D = 768): the OWT final sampler
step h 16384×768 (B=16, L=1024), and B=1-ish 1024 and 128 rows. Rows: the Triton op (default config, which the
label names: the TMA kernel above 2048 rows, the pointer kernel below), the previous epilogue ("pairs") at the
default tile, the pointer configs of kernels/logits_argmax.py BENCH_CONFIGS (the first, GPU_CONFIG, is the
previous default) and the other TMA configs (TMA_BENCH_CONFIGS) at the OWT shape, each checked against the
default; the CUDA C++ kernel of csrc/ (backend='cuda') and the TMA kernel at the smaller row counts (opt-in
there); the default, the previous default and cuBLAS at 32768 rows (the B=32 sampler's final step);
reference.logits_argmax_ref eager; torch.compile(reference) at the OWT shape in a child process; the cuBLAS GEMM
h·Wᵀ of the padded weight with no epilogue (the matmul ceiling), and beside it a plain Triton GEMM at the
argmax's tile storing the logits (diagnostic: how much of the gap to cuBLAS is Triton's main loop, how much the
argmax epilogue). Every row is timed with its host launch (the TMA path also encodes two descriptors per call on
the host); at ≤ GRAPH_MAX_ROWS rows, where that launch is most of the time (run5: 0.13 ms per call at 128 rows for
~37 µs of kernels), the op's rows are also timed as CUDA-graph replays (graph_ms, the device time, as the sampler
runs them), and their speedup_vs_default compares those (host_speedup_vs_default: the launched calls).

FLOPs (useful, V = 50258): 2·rows·V·D. GB/s, against the copy ceiling: compulsory traffic (W and h read, indices
written), except for the rows that store the logits (the cuBLAS GEMM and the Triton GEMM diagnostic), which count
what they move: W and h read and the (rows × 50304) logits written.
Target (issue 4): ≥ 600 TFLOP/s at 16384×768×50258.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from fmlm.bench.common import (ceilings, child_json_row, graphed, markdown_table, optional_budget, optional_rows,
                               peak_memory_bytes, time_fn, time_left, write_rows)

V, VP, D = 50258, 50304, 768
SHAPES = (16384, 1024, 128)
LARGE_ROWS = 32768       # B=32 × L=1024: timed for the default, the first TMA config and cuBLAS only
DEVICE = "cuda"          # a CPU smoke run (TRITON_INTERPRET=1, tiny V/D/SHAPES) sets "cpu"
TARGET_TFLOPS = 600.0
PROCESS_LIMIT_S = 61.0   # gpu-check gives the whole process 75 s (imports, CUDA init, ceilings)
BUDGET_S = 40.0          # optional rows start only before this
LOGITS_NOTE = "matmul ceiling; GB/s counts h, W read and the rows×VP logits written"
GRAPH_MAX_ROWS = 2048    # the batch-1 row counts: also timed as CUDA-graph replays


def _inputs(rows: int, seed: int = 0, dtype=None):
    dtype = dtype or (torch.bfloat16 if DEVICE == "cuda" else torch.float32)   # interpreter: no bf16 math
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(rows, D, device=DEVICE, generator=g).to(dtype)
    W = (torch.randn(VP, D, device=DEVICE, generator=g) * (3.0 / D ** 0.5)).to(dtype)
    b = torch.randn(VP, device=DEVICE, generator=g).to(dtype)
    W[V:], b[V:] = 0, 0
    return h, W, b


def _cfg_label(cfg: dict) -> str:
    if cfg.get("impl") == "cuda":
        return "csrc/logits_argmax.cu: mma.sync 128x128x64, 4 stages, split reduced by the last CTA"
    kernel = "TMA" if cfg.get("tma") else "pointer"
    split = ("" if not cfg.get("splits") else "_one_V_tile_per_program" if cfg["splits"] >= 1 << 20
             else f"_split{cfg['splits']}")
    epilogue = f", {cfg['epilogue']} epilogue" if cfg.get("epilogue") else ""
    return (f"{kernel} bm{cfg['BLOCK_M']}_bn{cfg['BLOCK_N']}_bk{cfg['BLOCK_K']}"
            f"_w{cfg['num_warps']}_s{cfg['num_stages']}{split}{epilogue}")


def run(quick: bool = False) -> list[dict]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return []
    import importlib

    from fmlm.kernels import reference as ref
    LA = importlib.import_module("fmlm.kernels.logits_argmax")

    t_start = time.time()
    budget = optional_budget(t_start, BUDGET_S, PROCESS_LIMIT_S - BUDGET_S)
    ceil = ceilings()
    iters = 10 if quick else 30
    rows: list[dict] = []
    h_all, W, b = _inputs(max(SHAPES))
    dev = torch.device(DEVICE)

    def default_label(n):
        return f"triton default [{_cfg_label(LA.default_config(n, dev, D, V, h_all.dtype))}]"

    esz = h_all.element_size()

    def add(impl, n, fn, note="", mem=True, it=iters, logits_written=False, graph=False):
        """logits_written: the row stores the (n × VP) logits (a GEMM without the argmax), and its GB/s counts them.
        graph (at ≤ GRAPH_MAX_ROWS rows): fn is also timed as CUDA-graph replays (graph_ms; a capture that fails is
        said in the note)."""
        tm = time_fn(fn, warmup=2, iters=it, device=DEVICE)
        f = 2 * n * V * D
        nbytes = VP * D * esz + n * D * esz + (n * VP * esz if logits_written else n * 8)
        rows.append({"op": "logits_argmax", "impl": impl, "rows": n, "V": V, "D": D,
                     "dtype": str(h_all.dtype).replace("torch.", ""),
                     "ms": tm["ms"], "p20_ms": tm["p20_ms"], "p80_ms": tm["p80_ms"],
                     "tflops": f / tm["ms"] / 1e9, "pct_bf16_ceiling": 100 * f / tm["ms"] / 1e9 / ceil["bf16_tflops"],
                     "gbs": nbytes / tm["ms"] / 1e6,
                     "pct_copy_ceiling": 100 * nbytes / tm["ms"] / 1e6 / ceil["copy_gbs"],
                     "peak_extra_mb": peak_memory_bytes(fn, DEVICE) / 2**20 if mem else float("nan"), "note": note})
        if graph and n <= GRAPH_MAX_ROWS:
            try:
                tg = time_fn(graphed(fn), warmup=2, iters=it, device=DEVICE)
                rows[-1].update(graph_ms=tg["ms"], graph_p20_ms=tg["p20_ms"], graph_p80_ms=tg["p80_ms"],
                                graph_tflops=f / tg["ms"] / 1e9)
            except Exception as e:  # the launched timing stands; say why there is no graph one
                rows[-1]["note"] = (f"{note}; " if note else "") + f"graph capture failed: {e!r}"[:160]
        return rows[-1]

    def speedups(r, base):
        """speedup_vs_default from the graph replays where both rows have them (the device time), else from the
        launched calls; host_speedup_vs_default: always the launched calls."""
        r["host_speedup_vs_default"] = base["ms"] / r["ms"]
        both = "graph_ms" in r and "graph_ms" in base
        r["speedup_vs_default"] = base["graph_ms"] / r["graph_ms"] if both else r["host_speedup_vs_default"]

    mains = {}
    for n in SHAPES:
        h = h_all[:n]
        idx = LA.logits_argmax(h, W, b, V, backend="triton")
        r = add(default_label(n), n, lambda h=h: LA.logits_argmax(h, W, b, V, backend="triton"), "default config",
                graph=True)
        r["agree_with_ref"] = (idx == ref.logits_argmax_ref(h, W[:V], b[:V])).float().mean().item()
        mains[n] = (r, idx)
    main = mains[SHAPES[0]][0]
    main["target"] = f">= {TARGET_TFLOPS:.0f} TFLOP/s"
    main["meets_target"] = main["tflops"] >= TARGET_TFLOPS

    for n in SHAPES:
        h = h_all[:n]
        rr = add("reference.logits_argmax_ref (eager)", n, lambda h=h: ref.logits_argmax_ref(h, W[:V], b[:V]),
                 "logits materialized", it=max(3, iters // 2))
        mains[n][0]["speedup_vs_ref"] = rr["ms"] / mains[n][0]["ms"]

    n = SHAPES[0]
    h = h_all[:n]
    gemm = add("cuBLAS h·Wᵀ (padded V, no epilogue)", n, lambda: h @ W.T, LOGITS_NOTE, mem=False,
               logits_written=True)
    main["pct_of_cublas_gemm"] = 100 * gemm["ms"] / main["ms"]
    # Diagnostic (optional: `make gpu-check` times the targets only, and this row compiles a kernel of its own): a
    # plain Triton GEMM (kernels/linear.py) at the pointer kernel's tile, logits stored like the cuBLAS row. Beside
    # cuBLAS it is the Triton main loop's own rate; beside the argmax, the epilogue's cost.
    lin = importlib.import_module("fmlm.kernels.linear")
    tile = {k: LA.GPU_CONFIG[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
    try:
        if optional_rows():
            add(f"triton GEMM h·Wᵀ [{_cfg_label(LA.GPU_CONFIG)}] (logits stored; diagnostic)", n,
                lambda: lin.linear_fwd(h, W, None, None, None, tile),
                "the argmax's tile, no argmax epilogue; GB/s counts the logits written", mem=False,
                logits_written=True)
    except Exception as e:   # a diagnostic that fails is a row, not fatal
        rows.append({"op": "logits_argmax", "impl": "triton GEMM h·Wᵀ (diagnostic)", "rows": n,
                     "note": f"failed: {e!r}"[:200]})

    launcher_base = {}

    def try_config(n, cfg, h, ref_idx):
        """Time one config (the TMA kernel checked to be the one launched); a failure is a row, not fatal."""
        impl = (f"cuda [{_cfg_label(cfg)}] (opt-in)" if cfg.get("impl") == "cuda" else
                f"triton [{_cfg_label(cfg)}]" + (" (the previous default)" if cfg == LA.GPU_CONFIG
                                                 else " (opt-in)" if cfg.get("tma") else ""))
        if cfg.get("tma") and not LA.tma_usable(h, W, cfg["BLOCK_K"]):
            rows.append({"op": "logits_argmax", "impl": impl, "rows": n, "note": "skipped: TMA not usable here"})
            return None
        try:
            idx1 = LA.logits_argmax_fwd(h, W, b, V, cfg)
            r = add(impl, n, lambda: LA.logits_argmax_fwd(h, W, b, V, cfg), str(cfg), mem=False, graph=True)
            r["agree_with_default"] = (idx1 == ref_idx).float().mean().item()
            if n not in launcher_base:      # the default through the same launcher call: no op-dispatch gap
                launcher_base[n] = add(default_label(n) + " via the launcher, as the candidates", n,
                                       lambda: LA.logits_argmax_fwd(h, W, b, V), "baseline of speedup_vs_default",
                                       mem=False, graph=True)
            speedups(r, launcher_base[n])
            return r
        except Exception as e:  # a config that fails to compile or launch is reported, not fatal
            rows.append({"op": "logits_argmax", "impl": impl, "rows": n, "note": f"failed: {e!r}"[:200]})
            return None

    tried = [main]
    # first the previous default epilogue (tl.max with indices) at the default tile: a speedup below 1 there
    # means the two-pass epilogue (the default since the fifth session of 2026-11-27) still wins (H100 run5: 0.90)
    default = LA.default_config(n, dev, D, V, h.dtype)
    for cfg in [dict(default, epilogue="pairs"), *LA.BENCH_CONFIGS.values(), *LA.TMA_BENCH_CONFIGS.values()]:
        if cfg == default or time.time() - t_start > budget:
            continue
        r = try_config(n, cfg, h, mains[n][1])
        if r is not None:
            tried.append(r)
    # the TMA kernel at the smaller row counts' default configs (the V-split path); then one V tile per program
    # (GPU_CONFIG_ONE_TILE: more programs in flight at batch 1, a longer reduction); then the large-row default (TMA,
    # 128×256: 673 TFLOP/s at 16384 rows in run5) with the V split, where the default's 128×128 pointer tile ran the
    # 1024-row call at ~43 % of the tensor rate in the run5 profile (201 µs)
    for m in SHAPES[1:]:
        for cfg in ({**LA.default_config(m, dev, D, V, h_all.dtype), "tma": True}, LA.GPU_CONFIG_ONE_TILE,
                    LA.GPU_CONFIG_LARGE_M):
            if time.time() - t_start < budget:
                try_config(m, cfg, h_all[:m], mains[m][1])
    # the B=32 sampler's final step: default, the previous default (the pointer kernel at the same tile), cuBLAS
    if LARGE_ROWS and time.time() - t_start < budget:
        hl = torch.cat([h_all, _inputs(LARGE_ROWS - h_all.shape[0], seed=1)[0]]) if LARGE_ROWS > h_all.shape[0] \
            else h_all[:LARGE_ROWS]
        idx_l = LA.logits_argmax(hl, W, b, V, backend="triton")
        add(default_label(LARGE_ROWS), LARGE_ROWS, lambda: LA.logits_argmax(hl, W, b, V, backend="triton"),
            "default config", mem=False)
        try_config(LARGE_ROWS, LA.GPU_CONFIG, hl, idx_l)
        add("cuBLAS h·Wᵀ (padded V, no epilogue)", LARGE_ROWS, lambda: hl @ W.T, LOGITS_NOTE, mem=False,
            logits_written=True)
        del hl
    # the CUDA C++ kernel (csrc/, LA.CUDA_CONFIG: one launch, no separate reduction kernel; not measured yet) at the
    # small row counts, last: new CUDA code that faulted would leave this process's context unusable for later rows
    for m in SHAPES[1:] if DEVICE == "cuda" else ():
        if time.time() - t_start < budget:
            try_config(m, LA.CUDA_CONFIG, h_all[:m], mains[m][1])
    best = min(tried, key=lambda r: r["ms"])
    rows.append({**best, "impl": f"best measured: {best['impl']}", "note": "min over the configs above",
                 "meets_target": best["tflops"] >= TARGET_TFLOPS})

    left = time_left(t_start, PROCESS_LIMIT_S)
    r = child_json_row("fmlm.bench.bench_logits_argmax", "--compiled-reference", left) if DEVICE == "cuda" else {"note": "skipped on CPU"}
    rows.append({"op": "logits_argmax", "impl": "torch.compile(reference)", "rows": SHAPES[0], **r})
    if "ms" in r:
        main["speedup_vs_compiled_ref"] = r["ms"] / main["ms"]
    for r in rows:
        r["bf16_ceiling_tflops"] = ceil["bf16_tflops"]
    return rows


def _compiled_reference() -> dict:
    """Child process: torch.compile(reference.logits_argmax_ref) at the OWT shape."""
    from fmlm.kernels import reference as ref

    n = SHAPES[0]
    h, W, b = _inputs(n)
    compiled = torch.compile(ref.logits_argmax_ref, dynamic=False)
    t0 = time.time()
    compiled(h, W[:V], b[:V])
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    tm = time_fn(lambda: compiled(h, W[:V], b[:V]), warmup=2, iters=10)
    f = 2 * n * V * D
    return {"V": V, "D": D, "dtype": "bf16", "ms": tm["ms"], "p20_ms": tm["p20_ms"], "p80_ms": tm["p80_ms"],
            "tflops": f / tm["ms"] / 1e9,
            "peak_extra_mb": peak_memory_bytes(lambda: compiled(h, W[:V], b[:V]), "cuda") / 2**20,
            "note": f"compile {compile_s:.0f} s"}


def main() -> None:
    if "--compiled-reference" in sys.argv:
        print(json.dumps(_compiled_reference()))
        return
    rows = run()
    if not rows:
        print("bench_logits_argmax: needs CUDA, skipped")
        return
    print(markdown_table(rows))
    write_rows("bench_logits_argmax", rows)


if __name__ == "__main__":
    main()
