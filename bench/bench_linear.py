"""The trunk's GEMMs at batch 1: cuBLAS (the default) beside the opt-in Triton GEMMs (kernels/linear.py, Sampler
kernel option gemm_impl='triton_small'), one process, bf16, released small model (D = 768, MLP 3072).

Rows (rows = B·L: 128 is LM1B at B=1, 1024 OWT at B=1), each GEMM as the block uses it:
- qkv:          y·Wqkvᵀ                      cublas: F.linear            triton: linear
- mlp1:         GELU(y·W0ᵀ + b0)             cublas: cuBLASLt GELU epilogue (_linear_gelu_tanh) | triton: linear
- out + resid:  x += g·(o·Woutᵀ); next adaLN cublas: F.linear + gate_residual | triton: split-K partials summed
                                              by gate_residual
- mlp2 + resid: x += g·(m·W2ᵀ + b2); adaLN    the same pair with the bias
- block:        one whole _fast_block (attention included), gemm_impl 'cublas' vs 'triton_small'
- gate_residual alone (a bf16 y, 3 and 8 fp32 partials): its default rows per program vs 4 (the previous default)
Timing: REPS calls captured in one CUDA graph, replayed; ms = replay time / REPS (device time with the graph's
inter-kernel gaps, as the engine's sampler replays its graph; no host launch cost), median of many replays.
speedup_vs_default = cublas ms / triton ms at the same row (> 1: the candidate is faster).
TFLOP/s counts the GEMM FLOPs (2·rows·N·K) only.
Then a sweep ("trunk GEMM sweep" rows): each GEMM with each of kernels/linear.py's three GPU tile configs
(and split counts for the two split-K GEMMs) beside cuBLAS's bare GEMM (y·Wᵀ, bf16 out, no bias, no epilogue),
column "vs cublas" = bare cuBLAS ms / Triton ms: the data to retune linear.pick_config from one GPU run. It is
not like-for-like work everywhere, and the "work" column says what each row does: the mlp1 Triton rows add the
bias + GELU epilogue, the out / mlp2 Triton rows write `split` fp32 partial products (split × rows × N fp32,
summed later by gate_residual) instead of one bf16 output; only the qkv rows do the same work as cuBLAS.
"""
from __future__ import annotations

import importlib
import time

import torch

from fmlm.bench.common import graphed, markdown_table, optional_budget, time_fn, write_rows

DEVICE = "cuda"                       # the CPU smoke test sets "cpu" (interpreter, tiny shapes, eager timing)
D, HEADS, MLP = 768, 12, 3072
ROWS = (128, 1024)
REPS = 20
BUDGET_S = 75.0
SWEEP_SPLITS = (1, 2, 3, 4, 6, 8)
SWEEP_CONFIGS = None      # tag → kernels/linear.py config; None: its three GPU configs (the smoke test sets its own)
# the sweep's "work" column: what each row computes, since "vs cublas" divides by the bare cuBLAS GEMM
SWEEP_WORK = {"bare": "bare GEMM, bf16 out (no bias, no epilogue)",
              "linear": "bare GEMM, bf16 out: same work as cublas (bare)",
              "gelu": "GEMM + bias + GELU epilogue, bf16 out: more work than cublas (bare)",
              "partials": "GEMM, {split} fp32 split-K partials written (summed later): not cublas (bare)'s bf16 out"}


def _sweep_configs() -> dict:
    lin = importlib.import_module("fmlm.kernels.linear")
    return {"small": lin.GPU_CONFIG_SMALL, "mid": lin.GPU_CONFIG_MID, "large": lin.GPU_CONFIG_LARGE}


def _block_inputs(rows: int, seed: int = 0):
    """A one-block released-small model's fast weights and block inputs at B=1, L=rows, random never-zero."""
    import fmlm
    from fmlm.engine import model as model_mod

    cfg = fmlm.ModelConfig(vocab_size=256, seq_len=rows, hidden=D, n_blocks=1, n_heads=HEADS, cond_dim=128,
                           two_time=True)
    m = fmlm.FlowLM(cfg)
    m.reset_parameters(seed=seed)
    m = m.to(DEVICE)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    w = model_mod._fast_weights(m, torch.device(DEVICE), dtype)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = 2 * torch.randn(1, rows, D, device=DEVICE, generator=g)
    y = torch.randn(1, rows, D, device=DEVICE, generator=g).to(dtype)
    mods = (0.3 * torch.randn(1, 7, D, device=DEVICE, generator=g)).to(dtype)
    cos, sin = w.rope(rows)
    return w, x, y, mods, cos, sin, dtype


def run(quick: bool = False) -> list[dict]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return []
    lin = importlib.import_module("fmlm.kernels.linear")
    from fmlm.engine import model as model_mod
    from fmlm.kernels import adaln
    from fmlm.kernels._backend import interpreting

    F = torch.nn.functional
    t_start = time.time()
    budget = optional_budget(t_start, BUDGET_S, 0.0)
    iters = 20 if quick else 50
    global SWEEP_CONFIGS
    SWEEP_CONFIGS = SWEEP_CONFIGS if SWEEP_CONFIGS is not None else _sweep_configs()
    kb = "auto"          # Triton on CUDA; the CPU smoke run takes the ops' torch paths
    rows_out = []
    for rows in ROWS:
        w, x, y, mods, cos, sin, dtype = _block_inputs(rows)
        wb = w.blocks[0]
        g = torch.Generator(device=DEVICE).manual_seed(1)
        att = torch.randn(1, rows, D, device=DEVICE, generator=g).to(dtype)
        hid = torch.randn(1, rows, MLP, device=DEVICE, generator=g).to(dtype)
        gate, sh, sc = mods[:, 0], mods[:, 1], mods[:, 2]
        xo = x.clone()

        def resid_cublas(a, wt, bias):
            o = F.linear(a, wt, bias)
            return adaln.gate_residual(x, gate, o, wb["norm2"], sh, sc, out_dtype=dtype, x_out=xo, backend=kb)

        def resid_triton(a, wt, bias):
            p = lin.linear_partials(a, wt, backend=kb)
            return adaln.gate_residual(x, gate, p, wb["norm2"], sh, sc, out_dtype=dtype, x_out=xo, backend=kb,
                                       y_bias=bias)

        def block(impl):
            return lambda: model_mod._fast_block(x, y, wb, gate, sh, sc, mods[:, 3], wb["norm1"], mods[:, 4],
                                                 mods[:, 5], cos, sin, HEADS, 50.0, False, kb, kb, "load", impl)

        cases = [
            ("qkv", 2 * rows * 3 * D * D, lambda: F.linear(y, wb["wqkv"]),
             lambda: lin.linear(y, wb["wqkv"], backend=kb)),
            ("mlp1 (gelu)", 2 * rows * MLP * D, lambda: model_mod._linear_gelu_tanh(y, wb["w0"], wb["b0"]),
             lambda: lin.linear(y, wb["w0"], wb["b0"], "gelu_tanh", backend=kb)),
            ("out + resid", 2 * rows * D * D, lambda: resid_cublas(att, wb["wout"], None),
             lambda: resid_triton(att, wb["wout"], None)),
            ("mlp2 + resid", 2 * rows * D * MLP, lambda: resid_cublas(hid, wb["w2"], wb["b2"]),
             lambda: resid_triton(hid, wb["w2"], wb["b2"])),
            ("block", 2 * rows * 12 * D * D, block("cublas"), block("triton_small")),
        ]
        dt = str(dtype).replace("torch.", "")
        for what, flops, f_cublas, f_triton in cases:
            if time.time() - t_start > budget:
                rows_out.append({"pass": what, "rows": rows, "note": "skipped: benchmark budget spent"})
                continue
            base_ms = None
            for impl, fn in (("cublas", f_cublas), ("triton_small", f_triton)):
                row = {"op": "trunk GEMM", "pass": what, "rows": rows, "impl": impl, "D": D, "dtype": dt,
                       **_time(fn, iters)}
                if "ms" in row:
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    if impl == "cublas":
                        base_ms = row["ms"]
                    elif base_ms:
                        row["speedup_vs_default"] = base_ms / row["ms"]
                rows_out.append(row)
        # gate_residual alone at its default rows per program (adaln._block_r: 1 at 128 rows, 4 at 1024) beside 4
        # rows per program (the previous default at every row count; speedup_vs_default < 1: the change won), on
        # what the block feeds it: a bf16 y (cuBLAS path) or 3 / 8 fp32 split-K partials (out / mlp2, triton_small)
        for n_y in (1, 3, 8) if DEVICE == "cuda" or interpreting() else ():
            yy = att if n_y == 1 else torch.randn(n_y, 1, rows, D, device=DEVICE, generator=g)
            base_ms = None
            for label, br in (("default", None), ("4 rows per program (the previous default)", 4)):
                def fn(yy=yy, br=br):
                    return adaln.gate_residual_adaln_fwd(x, gate, yy, wb["norm2"], sh, sc, x_out=xo, out_dtype=dtype,
                                                         block_r=br)
                row = {"op": "gate_residual", "pass": f"{n_y} partials" if n_y > 1 else "bf16 y", "rows": rows,
                       "impl": label, "D": D, "dtype": dt, **_time(fn, iters)}
                if "ms" in row and base_ms is None:
                    base_ms = row["ms"]
                elif "ms" in row and base_ms:
                    row["speedup_vs_default"] = base_ms / row["ms"]
                rows_out.append(row)
        # Tile/split sweep of the bare GEMMs (what pick_config could choose), beside cuBLAS's bare GEMM: the data
        # to retune pick_config from one run. Column "vs cublas" (kept out of gpu_check's candidate table).
        for what, N, K, kind in (("qkv", 3 * D, D, "linear"), ("mlp1 (gelu)", MLP, D, "gelu"),
                                 ("out", D, D, "partials"), ("mlp2", D, MLP, "partials")):
            a = y if K == D else hid
            wt = {"qkv": wb["wqkv"], "mlp1 (gelu)": wb["w0"], "out": wb["wout"], "mlp2": wb["w2"]}[what]
            base = _time(lambda a=a, wt=wt: F.linear(a, wt), iters)
            rows_out.append({"op": "trunk GEMM sweep", "pass": what, "rows": rows, "impl": "cublas (bare)",
                             "work": SWEEP_WORK["bare"], "dtype": dt, **base})
            for tag, cfg in SWEEP_CONFIGS.items():
                for split in (SWEEP_SPLITS if kind == "partials" else (None,)):
                    if time.time() - t_start > budget:
                        rows_out.append({"op": "trunk GEMM sweep", "pass": what, "rows": rows,
                                         "impl": f"triton {tag}", "note": "skipped: benchmark budget spent"})
                        break
                    if split is not None and K // split < cfg["BLOCK_K"]:
                        continue
                    if kind == "partials":
                        fn = lambda a=a, wt=wt, c=cfg, sp=split: lin.linear_partials(a, wt, sp, backend=kb, config=c)
                    else:
                        fn = lambda a=a, wt=wt, c=cfg, act=(kind == "gelu"): lin.linear(
                            a, wt, wb["b0"] if act else None, "gelu_tanh" if act else None, backend=kb, config=c)
                    r = {"op": "trunk GEMM sweep", "pass": what, "rows": rows, "dtype": dt,
                         "impl": f"triton {tag}" + (f" split {split}" if split else ""),
                         "work": SWEEP_WORK[kind].format(split=split), **_time(fn, iters)}
                    if "ms" in r:
                        r["tflops"] = 2 * rows * N * K / (r["ms"] * 1e-3) / 1e12
                        if "ms" in base:
                            r["vs cublas"] = base["ms"] / r["ms"]
                    rows_out.append(r)
    return rows_out


def _time(fn, iters: int) -> dict:
    """{ms, p20_ms, p80_ms} per call: on CUDA REPS calls captured in one graph and replayed (device time with
    the graph's gaps, no host launch cost); on the CPU (smoke runs) plain calls. A failure is a note."""
    try:
        if DEVICE == "cuda":
            timed = graphed(lambda: [fn() for _ in range(REPS)])
            t = time_fn(timed, warmup=3, iters=iters, device=DEVICE)
            return {"ms": t["ms"] / REPS, "p20_ms": t["p20_ms"] / REPS, "p80_ms": t["p80_ms"] / REPS}
        t = time_fn(fn, warmup=1, iters=2, device=DEVICE)
        return {"ms": t["ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"]}
    except Exception as exc:       # report, do not hide: the row says why it has no time
        return {"note": f"failed: {type(exc).__name__}: {str(exc)[:120]}"}


COLUMNS = ["op", "pass", "rows", "impl", "work", "dtype", "ms", "p20_ms", "p80_ms", "tflops", "speedup_vs_default",
           "vs cublas", "note"]


def main() -> int:
    rows = run()
    if rows:
        write_rows("bench_linear", rows)
        print(markdown_table(rows, COLUMNS))
    else:
        print("bench_linear needs CUDA")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
