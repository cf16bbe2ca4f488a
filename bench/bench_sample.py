"""`fmlm bench sample`: the reference sampler and the engine sampler side by side in one process.

Same random (never zero) weights for both; each draws its own noise (the reference a V-space z0, the engine
hidden-space ξ·C). Reports ms/sample (median, p20, p80 of whole `fmlm.sample` calls), samples/s, peak tensor
memory of one call (CUDA allocator peak, or CPU allocator events), and the engine's ratios.

The two rows are not like with like on a GPU: the reference is the published sampler run eagerly in the model's
dtype (fp32 here), the engine (backend auto/triton) the CUDA-graph `Sampler` with its bf16 fused trunk; the
`dtype` and `mode` columns say which ran, and the speedup includes the change of dtype and of launch mode. The
engine's timed `fmlm.sample` call also includes one device-to-host read (the seed drawn from the CUDA generator
and read with int()). On the CPU both run eagerly in the model's dtype.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fmlm.bench import common
from fmlm.bench.common import markdown_table, peak_memory_bytes, time_fn, write_rows


def _model(args, device):
    import fmlm

    cfg = fmlm.ModelConfig(vocab_size=args.vocab, seq_len=args.seq_len, hidden=args.hidden, n_blocks=args.blocks,
                           n_heads=args.heads, cond_dim=args.cond_dim, two_time=args.method == "fmlm")
    model = fmlm.FlowLM(cfg)
    model.reset_parameters(seed=args.seed)
    return model.to(device).eval()


def run(quick: bool = False, argv=None) -> list[dict]:
    args = parser().parse_args(argv or [])
    return bench(args, quick=quick)


def bench(args, quick: bool = False) -> list[dict]:
    import fmlm

    from fmlm.engine.commands import _device

    device = _device(args.device)          # --device cuda without CUDA: a one-line error, not a traceback
    torch.manual_seed(args.seed)
    model = _model(args, device)
    rows = []
    iters = 3 if quick else args.iters
    model_dt = str(model.embed.dtype).replace("torch.", "")
    for backend in ("reference", args.backend):
        def call(backend=backend):
            g = torch.Generator(device=device).manual_seed(args.seed)
            return fmlm.sample(model, args.batch_size, args.steps, args.method, args.renoise, generator=g,
                               backend=backend)
        t = time_fn(call, warmup=1, iters=iters, device=device)
        mem = peak_memory_bytes(call, device)
        # what fmlm.sample runs (engine/sampling.py): the CUDA-graph Sampler (bf16 trunk) on CUDA for auto/triton
        graph = backend != "reference" and torch.device(device).type == "cuda" and backend in ("auto", "triton")
        dtype = "bf16 trunk" if graph else model_dt
        mode = "CUDA graph (fmlm.Sampler)" if graph else "eager"
        rows.append({"path": "reference" if backend == "reference" else f"engine ({backend})",
                     "V": args.vocab, "L": args.seq_len, "hidden": args.hidden, "blocks": args.blocks,
                     "B": args.batch_size, "steps": args.steps, "method": args.method,
                     "ms/sample": t["ms"] / args.batch_size, "p20": t["p20_ms"] / args.batch_size,
                     "p80": t["p80_ms"] / args.batch_size, "samples/s": 1e3 * args.batch_size / t["ms"],
                     "peak MB": mem / 2**20, "dtype": dtype, "mode": mode})
    ref, eng = rows
    eng["speedup"] = ref["ms/sample"] / eng["ms/sample"]
    eng["memory ratio"] = ref["peak MB"] / max(eng["peak MB"], 1e-9)
    if eng["mode"] != ref["mode"] or eng["dtype"] != ref["dtype"]:
        eng["note"] = (f"not like with like: reference {ref['dtype']} {ref['mode']}, engine {eng['dtype']} "
                       f"{eng['mode']} (speedup includes both); the engine's timed fmlm.sample call includes one "
                       "device-to-host read of the seed")
    return rows


def parser(ap=None):
    from fmlm.engine.commands import _positive_int  # noqa: PLC0415
    ap = ap or argparse.ArgumentParser(prog="fmlm bench sample", description=__doc__)
    ap.add_argument("--vocab", type=_positive_int, default=30522)
    ap.add_argument("--seq-len", type=_positive_int, default=128)
    ap.add_argument("--hidden", type=_positive_int, default=256)
    ap.add_argument("--blocks", type=_positive_int, default=4)
    ap.add_argument("--heads", type=_positive_int, default=4)
    ap.add_argument("--cond-dim", type=_positive_int, default=128)
    ap.add_argument("--batch-size", type=_positive_int, default=8)
    ap.add_argument("--steps", type=_positive_int, default=1)
    ap.add_argument("--method", choices=("flm", "fmlm"), default="fmlm")
    ap.add_argument("--renoise", type=float, default=0.0)
    ap.add_argument("--backend", default="auto", help="engine backend: auto | torch | triton")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=_positive_int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default: $FMLM_RESULTS_DIR, else bench/results in "
                    "a source checkout, ./fmlm_results when installed)")
    return ap


def cli(args) -> int:
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        # checked before the run: writing the rows failed only after it ("File exists"), the table on stdout only
        raise ValueError(f"--out {args.out}: exists and is not a directory (the results folder)")
    rows = bench(args)
    print(markdown_table(rows))
    # rows under other columns go to bench_sample-<date>[-n].csv (common.write_rows): name the file that grew
    sizes = {p: p.stat().st_size for p in Path(args.out or common.RESULTS_DIR).glob("bench_sample*.csv")}
    md = write_rows("bench_sample", rows, args.out)
    csv_path = next((p for p in md.parent.glob("bench_sample*.csv") if sizes.get(p) != p.stat().st_size),
                    md.with_suffix(".csv"))
    print(f"rows appended to {csv_path}")
    return 0


def main(argv=None) -> int:
    return cli(parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
