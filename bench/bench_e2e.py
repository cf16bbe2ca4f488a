"""`fmlm bench e2e`: end-to-end sampling of the released small FMLM, reference beside engine, one process.

For the OWT (L=1024, V=50258) and LM1B (L=128, V=30522) shapes of the released small model (hidden 768,
12 blocks, 12 heads, cond 128, two-time), random never-zero weights or a checkpoint (--checkpoint):
- reference: kernels.reference.fmlm_sample_ref under bf16 autocast, as published (V-space z0 drawn
  inside the call, host spline per step, dense x·E, materialized logits);
- engine eager: fmlm.Sampler(graph=False) (fast bf16 trunk, fused head ops);
- engine graph: fmlm.Sampler(graph=True), one CUDA graph replay per call;
- engine graph + compile (with --compile, not with --quick): the blocks under torch.compile as well;
- engine graph [candidate]: the same with one kernel variant (Sampler kernel_options: the rotary
  prepass before attention, the TMA logits_argmax at ≤ 2048 rows (its default above), the blocks' Triton
  split-K GEMMs at ≤ 4096 rows, programmatic dependent launch of the Triton kernels, the attention's online
  softmax (the previous default), the attention output projection inside the attention kernel at ≤ 512 rows)
  at the headline batch sizes, so one run shows whether a candidate should become the default
  (--no-candidates skips them);
- engine graph [winners: ...]: at each headline point, every candidate that beat the default there merged into
  one set of kernel options, at one and four steps: what promoting them together gives, measured in the same run.
  The candidates no GPU has run yet (UNMEASURED) first sample once each in a child process (canary); one that
  raises or kills the child there is left out with a row saying why, so that new kernel code cannot end this
  process's CUDA context and every candidate and winners row after it.
Columns: ms/sample (median, p20, p80 over whole calls), samples/s, tokens/s, peak MB (allocator peak above
the model's weights during a call; for graph rows during the capture, which holds the graph's pool),
speedup over the reference at the same point, tokens = default (the share of a candidate's tokens equal to the
default graph path's at the same seed; below MIN_TOKEN_AGREEMENT it is no winner and meets no target), % of floor
(FLOPs of one sample over the measured bf16 GEMM rate: 292 GFLOP for an OWT one-step sample, DESIGN.md §3), and the
targets of the issue.
The reference is the published sampler, which runs eagerly (a host spline per step): an "engine graph" row's
speedup includes what the CUDA graph saves, as the issue's targets intend; the "engine eager" rows give the
like-with-like ratio. Medians: the reference over 3 calls in --quick (5 otherwise), the engine over 7 (20).

Floor FLOPs per token: steps × 12 blocks × (24·D² + 4·L·D) + (steps−1) × 4·D·V (D·E over the vocabulary)
+ 2·D·V (the final argmax GEMM) + 2·D² (h0 = ξ·C).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from fmlm.bench import common
from fmlm.bench.common import (RESULTS_DIR, add_bench_command, bench_deadline, ceilings, markdown_table, optional_rows,
                               time_fn, write_rows)
from fmlm.kernels.attention import OUT_PROJ_MAX_ROWS
from fmlm.kernels.linear import SMALL_ROWS
from fmlm.kernels.logits_argmax import BENCH_CONFIGS as ARGMAX_CONFIGS
from fmlm.kernels.logits_argmax import CUDA_CONFIG as LA_CUDA
from fmlm.kernels.logits_argmax import GPU_CONFIG_LARGE_M as LA_LARGE_M
from fmlm.kernels.logits_argmax import GPU_CONFIG_ONE_TILE as LA_ONE_TILE
from fmlm.kernels.logits_argmax import SMALL_M as ARGMAX_SMALL_M

DATASETS = {"owt": (1, 8, 32, 64), "lm1b": (1, 64, 512)}
# ms/sample targets of the issue (one step, H100, bf16)
TARGETS = {("owt", 32, 1): 0.6, ("owt", 1, 1): 1.1, ("lm1b", 1, 1): 0.35, ("lm1b", 512, 1): 0.07}
REF_QUICK = {("owt", 1, 1), ("owt", 32, 1), ("lm1b", 1, 1), ("lm1b", 512, 1)}
FOUR_STEP_RATIO = 4.5
# opt-in kernel variants (engine/runner.py KERNEL_OPTIONS) timed beside the defaults at the headline batch sizes
# in priority order (a time limit cuts the last ones): first the unmeasured ones by the gap they aim at (LM1B B=1
# 0.49 merged against 0.35, OWT B=1 1.15 against 1.1, OWT B=32 0.64 against 0.6; the batch-1 Triton GEMMs with pdl
# first, the base the prefetch and deep-pipeline rows build on), then those measured in run5 (kept as checks)
CANDIDATES = {"gemm triton small + pdl": {"gemm_impl": "triton_small", "pdl": True},
              "gemm triton small + pdl + weight prefetch": {"gemm_impl": "triton_small", "pdl": True,
                                                            "pdl_prefetch": True},
              "gemm triton small + pdl + deep pipeline": {"gemm_impl": "triton_small", "pdl": True,
                                                          "gemm_deep_pipeline": True},
              # the gate-residual and LayerNorm inside the GEMMs (kernels/norm_linear.py): 5 launches per block
              "gemm triton fused + pdl": {"gemm_impl": "triton_fused", "pdl": True},
              "gemm triton fused + pdl + weight prefetch + deep pipeline": {
                  "gemm_impl": "triton_fused", "pdl": True, "pdl_prefetch": True, "gemm_deep_pipeline": True},
              "attention kv split 8": {"attention_kv_split": 8},
              "argmax tma 128x256 (the large-row default) at batch 1": {"argmax_config": LA_LARGE_M},
              # run5's attention sweep at OWT B=32 (online softmax): 4 operand stages 1.07x (rotary on load) and
              # 1.21x (rotary prepass) against 3 at the m128 n64 w8 tile
              "attention 4 stages + rotary prepass": {"attention_config": {"num_stages": 4}, "rotary_impl": "prepass"},
              "attention 4 stages": {"attention_config": {"num_stages": 4}},
              "attention poly exp2 + rotary prepass": {"attention_poly_exp2": True, "rotary_impl": "prepass"},
              "attention poly exp2": {"attention_poly_exp2": True},
              # the CUDA C++ kernel (csrc/logits_argmax.cu): one launch where the Triton split path takes two. After
              # the attention candidates: new CUDA code that faults would leave this process's context unusable
              "argmax cuda c++ (csrc)": {"argmax_config": LA_CUDA},
              "argmax one V tile per program": {"argmax_config": LA_ONE_TILE},
              "attention kv split 4": {"attention_kv_split": 4},
              "attention online softmax (the previous default)": {"attention_fixed_shift": False},
              "rotary prepass": {"rotary_impl": "prepass"},
              "argmax tma": {"argmax_config": {"tma": True}}}
# candidates the H100 run of 2026-11-27 (run5) timed and found no faster than the default at any point where they
# act (argmax bm128_bn128_w4 0.91-1.00x, pdl alone 0.94-1.00x, gemm triton small alone 0.87-0.96x, out proj in
# attention 0.99x), or beaten at every such point by "rotary prepass", with which they cannot merge (rotary prepass
# k, rotary prepass + tma). Not timed by default (their rows would take time the winners rows need); `--candidate
# NAME` still times one.
RETIRED = {"gemm triton small + pdl + out proj in attention": {"gemm_impl": "triton_small", "pdl": True,
                                                               "attention_out_proj": True},
           "gemm triton small": {"gemm_impl": "triton_small"}, "pdl": {"pdl": True},
           "argmax bm128_bn128_w4": {"argmax_config": ARGMAX_CONFIGS["bm128_bn128_w4_s3"]},
           "rotary prepass k": {"rotary_impl": "prepass_k"},
           "rotary prepass + tma": {"rotary_impl": "prepass_tma"}}
ALL_CANDIDATES = {**CANDIDATES, **RETIRED}
# rows (B·L) up to which a candidate acts
CANDIDATE_MAX_ROWS = {"gemm triton small": SMALL_ROWS, "gemm triton small + pdl": SMALL_ROWS,
                      "gemm triton small + pdl + weight prefetch": SMALL_ROWS,
                      "gemm triton small + pdl + deep pipeline": SMALL_ROWS,
                      "gemm triton fused + pdl": SMALL_ROWS,
                      "gemm triton fused + pdl + weight prefetch + deep pipeline": SMALL_ROWS,
                      "gemm triton small + pdl + out proj in attention": OUT_PROJ_MAX_ROWS,
                      "argmax tma": ARGMAX_SMALL_M,     # the default above ARGMAX_SMALL_M rows
                      "argmax one V tile per program": ARGMAX_SMALL_M, "argmax cuda c++ (csrc)": ARGMAX_SMALL_M,
                      "argmax tma 128x256 (the large-row default) at batch 1": ARGMAX_SMALL_M,
                      "attention kv split 4": 4096, "attention kv split 8": 4096}
# rows from which a candidate can act: the polynomial exp2 only pays at the attention's m128 tile (napkin in
# kernels/attention.py POLY_COEFFS), which batch 1 never gets
CANDIDATE_MIN_ROWS = {"attention poly exp2 + rotary prepass": 4096, "attention poly exp2": 4096,
                      "attention 4 stages": 4096, "attention 4 stages + rotary prepass": 4096,
                      # the key split is for long key loops at batch 1 (OWT B=1: 16 key tiles; LM1B has 2)
                      "attention kv split 4": 1024, "attention kv split 8": 1024}
HEADLINE_B = {"owt": (1, 32), "lm1b": (1, 512)}
# candidates no GPU has run yet (added by sessions without a device). Before this process times any candidate, each
# of these samples once in a child process (`--canary`, at the smallest headline point where it acts); one that
# raises or kills the child there is left out with a row saying why, so that a fault in new kernel code (an illegal
# address is sticky) cannot end this process's CUDA context, and with it every later candidate and winners row.
# Remove a name once a GPU run has timed it.
UNMEASURED = ("gemm triton small + pdl + weight prefetch", "gemm triton small + pdl + deep pipeline",
              "gemm triton fused + pdl", "gemm triton fused + pdl + weight prefetch + deep pipeline",
              "attention kv split 8", "attention kv split 4", "argmax tma 128x256 (the large-row default) at batch 1",
              "argmax one V tile per program", "attention 4 stages + rotary prepass", "attention 4 stages",
              "attention poly exp2 + rotary prepass", "attention poly exp2", "argmax cuda c++ (csrc)")
CANARY_TIMEOUT_S = 120     # all the canary children together (their kernels compile into the shared Triton cache)
# seconds before the deadline after which no candidate starts, kept for the winners rows (4 headline points × 1 and
# 4 steps: ~1 s each in run5, more where a merged combination compiles a kernel)
WINNERS_RESERVE_S = 25
# a candidate joins the combination timed at a point (the "winners" rows) when it beats the default there by this
WIN_SPEEDUP = 1.02
# ... and when at least this fraction of its tokens equals the default's at the same seed. Not a correctness test
# (the GPU tests hold the kernels to the reference's error budget; sums in another order may flip near-tied
# argmaxes of the random model): a kernel that computes something else agrees on ~1/V of the tokens
TOKENS_COL = "tokens = default"
MIN_TOKEN_AGREEMENT = 0.5
DEVICE = "cuda"          # the CPU smoke test sets "cpu" (tiny preset; peak memory then reads nan)


def flops_per_sample(cfg, steps: int) -> float:
    D, L, V = cfg.hidden, cfg.seq_len, cfg.vocab_size
    trunk = cfg.n_blocks * (2 * (3 * D * D + D * D + 2 * cfg.mlp_ratio * D * D) + 4 * L * D)
    per_token = steps * trunk + (steps - 1) * 4 * D * V + 2 * D * V + 2 * D * D
    return float(per_token * L)


def _peak(fn) -> float:
    if DEVICE != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _reference_call(model, B: int, steps: int, seed: int):
    from fmlm.kernels import reference as ref

    p, cfg = model.params(), model.cfg
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def call():
        with torch.no_grad():
            z0 = torch.randn(B, cfg.seq_len, cfg.vocab_size, device=DEVICE, generator=g)
            return ref.fmlm_sample_ref(p, cfg, z0, steps, 0.0, amp_dtype=torch.bfloat16)
    return call


def _row(name, path, cfg, B, steps, t, peak_mb, rate):
    ms = t["ms"] / B
    floor_ms = flops_per_sample(cfg, steps) / (rate * 1e12) * 1e3 if rate == rate else float("nan")
    return {"dataset": name, "path": path, "V": cfg.vocab_size, "L": cfg.seq_len, "B": B, "steps": steps,
            "ms/sample": ms, "p20": t["p20_ms"] / B, "p80": t["p80_ms"] / B, "ms/call": t["ms"],
            "samples/s": 1e3 / ms, "tokens/s": 1e3 * cfg.seq_len / ms, "peak MB": peak_mb,
            "% of floor": 100.0 * floor_ms / ms, "floor ms/sample": floor_ms}


def _deadline() -> float:
    """Wall-clock time (time.time()) by which the benchmark must have returned its rows: gpu_check sets
    FMLM_BENCH_DEADLINE a little before it would kill the process, so what is left is skipped and reported
    rather than every row being lost."""
    return bench_deadline()


def _nan_row(name, path, cfg, B, steps, rate, note):
    nan = float("nan")
    return {**_row(name, path, cfg, B, steps, {"ms": nan, "p20_ms": nan, "p80_ms": nan}, nan, rate), "note": note}


def _time_paths(rows, model, name, cfg, steps, paths, args, iters, rate, deadline, tokens: Optional[dict] = None):
    """Time each (path, Sampler kwargs, batch sizes) on one model; a path that would start past the deadline is
    reported as skipped; an optional path (a candidate, "[" in its name, or the compiled blocks) that fails is
    reported, a default that fails raises. tokens: (dataset, B, steps) → the default graph path's tokens at
    args.seed, kept here when "engine graph" runs; an optional path's row gets the fraction of its tokens at the
    same seed (the same noise) equal to those (column TOKENS_COL): a kernel computing something else than the
    default shows as a low fraction and cannot be a winner (combine_winners)."""
    from fmlm.engine.runner import Sampler

    for path, kw, path_batches in paths:
        optional = "[" in path or kw.get("compile_blocks", False)
        if time.time() > deadline:
            rows += [_nan_row(name, path, cfg, B, steps, rate, "skipped: time limit") for B in path_batches]
            continue
        try:
            sampler = Sampler(model, max(path_batches), steps, **kw)
        except Exception as exc:       # an optional path that cannot run here is reported, not fatal
            if not optional:
                raise
            rows.append(_nan_row(name, path, cfg, path_batches[0], steps, rate,
                                 f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
            continue
        for B in path_batches:
            def call(B=B, sampler=sampler):
                return sampler.sample(args.seed, batch_size=B)
            try:
                peak = _peak(call)    # graph rows: capture (warm-up runs + pool) on the first call
                t = time_fn(call, warmup=1, iters=iters, device=DEVICE)
                tok = call() if tokens is not None and (optional or path == "engine graph") else None
            except Exception as exc:
                if not optional:      # the defaults must run; only an optional path may fail
                    raise
                rows.append(_nan_row(name, path, cfg, B, steps, rate,
                                     f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
                continue
            rows.append(_row(name, path, cfg, B, steps, t, peak, rate))
            if tok is not None and path == "engine graph":
                tokens[(name, B, steps)] = tok
            elif tok is not None and optional and (name, B, steps) in tokens:
                rows[-1][TOKENS_COL] = (tok == tokens[(name, B, steps)]).double().mean().item()
        del sampler
        gc.collect()
        _empty_cache()


def combine_winners(rows, name: str, B: int, min_speedup: Optional[float] = None, seq_len: Optional[int] = None):
    """(label, kernel_options) merging every candidate that ran faster than the default ("engine graph") at
    (name, B, one step) by min_speedup (default WIN_SPEEDUP), fastest first; a candidate that does not compose with
    what is merged already (_composes), or whose tokens differ from the default's (MIN_TOKEN_AGREEMENT), is left
    out. None when no candidate won there. seq_len: the point's L (rows = B·L decide where the triton_small GEMMs
    act); None: as if they act."""
    one = {r["path"]: r["ms/sample"] for r in rows if r["dataset"] == name and r["B"] == B and r["steps"] == 1
           and not r.get(TOKENS_COL, 1.0) < MIN_TOKEN_AGREEMENT}
    base = one.get("engine graph")
    if not base or base != base:
        return None
    wins = sorted(((base / one[f"engine graph [{c}]"], c) for c in ALL_CANDIDATES
                   if one.get(f"engine graph [{c}]", float("nan")) > 0), reverse=True)
    merged, names = {}, []
    min_speedup = WIN_SPEEDUP if min_speedup is None else min_speedup
    n_rows = B * seq_len if seq_len else 0
    for speedup, c in wins:
        opts = ALL_CANDIDATES[c]
        if speedup < min_speedup or not _composes(merged, opts, n_rows):
            continue
        merged.update(opts)
        names.append(c)
    return (f"winners: {', '.join(names)}", merged) if names else None


def _composes(merged: dict, opts: dict, n_rows: int) -> bool:
    """Whether adding opts to merged times what the label will say: not another value for a merged key (two
    rotary variants); not a rotary variant where the triton_small / triton_fused GEMMs apply the rotary in their
    epilogue (≤ SMALL_ROWS rows)."""
    if any(k in merged and merged[k] != v for k, v in opts.items()):
        return False
    both = {**merged, **opts}
    rotary = both.get("rotary_impl", "load")
    if ((both.get("attention_poly_exp2") or both.get("attention_kv_split", 1) > 1)
            and (rotary == "prepass_tma" or both.get("attention_fixed_shift") is False)):
        return False     # the fixed-shift pointer kernel's options (engine/runner.py refuses the mix)
    return not (rotary != "load" and both.get("gemm_impl") in ("triton_small", "triton_fused")
                and n_rows <= SMALL_ROWS)


def bench(args, quick: bool = False) -> list[dict]:
    """Two passes: first the reference and the engine's defaults at every point of every dataset, then the
    opt-in candidates (one step, headline batch sizes), so a time limit cuts candidates, not the headline.
    The candidates run in CANDIDATES' (priority) order, each on every dataset, so a time limit cuts the last
    candidates everywhere rather than one dataset's. Then each headline point times the merge of the
    candidates that won there (combine_winners) at every step count: what promoting them together gives."""
    from fmlm.engine.profile import build_model

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench e2e: no CUDA device, skipped", file=sys.stderr)
        return []
    deadline = _deadline()
    rate = ceilings()["bf16_tflops"]
    iters = args.iters or (7 if quick else 20)
    steps_list = args.steps or [1, 4]
    rows = []
    tokens: dict = {}        # the default graph path's tokens per point, for the candidates' agreement column

    def load(name):
        model = build_model(args.checkpoint, name or "owt", DEVICE, args.seed)
        cfg = model.cfg
        if not cfg.two_time:     # the engine rows would fail, the reference row would time a meaningless sampler
            raise ValueError(f"bench e2e times the FMLM (flow map) sampler; {args.checkpoint} is a one-time FLM "
                             "(fmlm profile sample --checkpoint times either kind)")
        if name is None:         # a checkpoint: name it by its shape
            name = {(50258, 1024): "owt", (30522, 128): "lm1b"}.get((cfg.vocab_size, cfg.seq_len), "checkpoint")
        _sync()
        return name, model, args.batch_sizes or DATASETS.get(name, (1, 8, 32))

    names = [None] if args.checkpoint else list(args.datasets)
    for name in names:
        t0 = time.perf_counter()
        name, model, batches = load(name)
        _time_defaults(rows, model, name, batches, steps_list, args, iters, quick, rate, deadline, tokens)
        print(f"bench e2e: {name} defaults done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        del model
        gc.collect()
        _empty_cache()
    if bench_deadline() != float("inf"):
        # under gpu_check: the defaults' rows on disk now, so that a later kill (a hung candidate) or a candidate
        # that breaks the CUDA context cannot take them along; gpu_check archives the results after every step
        write_rows("bench_e2e_defaults", [dict(r) for r in rows])
    if args.candidates and 1 in steps_list:
        try:
            _time_candidates(rows, names, load, steps_list, args, iters, rate, deadline, tokens)
        except Exception as exc:     # e.g. an illegal address: sticky, every later CUDA call raises it again
            rows.append({"dataset": "", "path": "candidates aborted", "B": 0, "steps": 0, "ms/sample": float("nan"),
                         "note": f"{type(exc).__name__}: {str(exc)[:200]}; the rows above were measured before"})
    _annotate(rows)
    return rows


def canary_point(c: str, datasets) -> Optional[tuple[str, int]]:
    """The smallest headline point (dataset, B) of `datasets` where candidate c acts, by rows B·L; None if none."""
    from fmlm.engine.profile import PRESETS

    points = sorted(((b * PRESETS[n]["seq_len"], n, b) for n in datasets for b in HEADLINE_B.get(n, ())))
    return next(((n, b) for rows, n, b in points
                 if CANDIDATE_MIN_ROWS.get(c, 0) <= rows <= CANDIDATE_MAX_ROWS.get(c, rows)), None)


def _canary_child(names, datasets, seed: int) -> int:
    """`--canary`: one graph-captured sample (two replays) of each candidate at its canary_point, a line per
    candidate on stdout; exit status 3 as soon as the CUDA context is lost (every later call would fail)."""
    from fmlm.engine.profile import build_model
    from fmlm.engine.runner import Sampler

    models = {}
    for c in names:
        point = canary_point(c, datasets)
        if point is None:
            print(f"CANARY ok {c} (acts at no headline point)", flush=True)
            continue
        name, B = point
        try:
            if name not in models:
                models[name] = build_model(None, name, DEVICE, seed)
            sampler = Sampler(models[name], B, 1, graph=True, kernel_options=ALL_CANDIDATES[c])
            sampler.sample(seed)
            sampler.sample(seed + 1)
            _sync()
            print(f"CANARY ok {c}", flush=True)
        except Exception as exc:
            print(f"CANARY fail {c}: {type(exc).__name__}: {str(exc)[:200]}".replace("\n", " "), flush=True)
            try:
                _sync()
            except Exception:          # a sticky error: nothing more can run in this process
                return 3
    return 0


def canary(names, datasets, seed: int, timeout_s: float = CANARY_TIMEOUT_S) -> dict:
    """{candidate: why it is left out} for the candidates among `names` that raised in a child process
    (_canary_child) or killed it (the first one it had not reported on when it died or hung); a new child goes on
    with the rest. Candidates not reached within timeout_s are not tried (and not left out)."""
    import subprocess

    left, bad, t_end = list(names), {}, time.time() + timeout_s
    while left and time.time() < t_end:
        cmd = [sys.executable, "-m", "fmlm.bench.bench_e2e", "--canary", *left, "--datasets", *datasets,
               "--seed", str(seed)]
        rc = None
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, t_end - time.time()))
            out, err, died, rc = r.stdout, r.stderr, r.returncode != 0, r.returncode
            why = f"killed the canary child (exit {r.returncode}): {err.strip()[-160:]}"
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, died, why = "", True, "hung in the canary child (killed at the time limit)"
        if rc == 1 and "CANARY" not in out:
            # a Python error before any candidate ran (an import, the arguments): the canary itself is broken, not a
            # candidate; leave nothing more out (the candidates then run unguarded, as before the canary)
            print(f"bench e2e: the canary child failed before any candidate: {err.strip()[-300:]}", file=sys.stderr,
                  flush=True)
            break
        reported = set()
        for line in out.splitlines():
            for c in left:
                if line == f"CANARY ok {c}" or line.startswith(f"CANARY ok {c} ("):
                    reported.add(c)
                elif line.startswith(f"CANARY fail {c}: "):
                    reported.add(c)
                    bad[c] = "failed in the canary child: " + line[len(f"CANARY fail {c}: "):]
        rest = [c for c in left if c not in reported]
        if died and rest and rc != 3:      # 3: the child stopped after reporting a candidate that broke its context
            bad.setdefault(rest[0], why)
            rest = rest[1:]
        elif not died:
            rest = []
        left = rest
    return bad


def _canary_left_out(chosen, datasets, seed: int, deadline: float = float("inf")) -> dict:
    """canary() of the UNMEASURED candidates among `chosen` on CUDA (nothing to protect elsewhere; nor with a
    checkpoint, which has no preset datasets), within CANARY_TIMEOUT_S and 40 % of the time left to `deadline`."""
    risky = [c for c in chosen if c in UNMEASURED]
    if DEVICE != "cuda" or not risky or not datasets:
        return {}
    t0 = time.perf_counter()
    bad = canary(risky, datasets, seed, min(CANARY_TIMEOUT_S, max(10.0, 0.4 * (deadline - time.time()))))
    print(f"bench e2e: canary of {len(risky)} candidates in {time.perf_counter() - t0:.1f} s, left out: "
          f"{sorted(bad) or 'none'}", file=sys.stderr, flush=True)
    return bad


def _time_candidates(rows, names, load, steps_list, args, iters, rate, deadline, tokens: Optional[dict] = None):
    """The opt-in candidates at one step (CANDIDATES' order, each on every dataset), then at each headline point
    the merge of those that won there (combine_winners), at every step count. The UNMEASURED ones first pass a
    canary in a child process (canary). No candidate starts within WINNERS_RESERVE_S of the deadline: the winners
    rows (would the targets be met once promoted) come last and must not be the ones a time limit cuts."""
    t0 = time.perf_counter()
    chosen = {c: o for c, o in ALL_CANDIDATES.items() if c in args.candidate} if args.candidate else CANDIDATES
    left_out = _canary_left_out(list(chosen), [n for n in names if n is not None], args.seed, deadline)
    models = [load(name) for name in names]         # small next to the device: every dataset's model at once
    for c, o in chosen.items():
        if c in left_out:
            rows.append({"dataset": "", "path": f"engine graph [{c}]", "B": 0, "steps": 1,
                         "ms/sample": float("nan"), "note": f"left out: {left_out[c]}"[:240]})
            continue
        for name, model, batches in models:
            # the headline batch sizes; a candidate that only acts up to some row count only where it acts
            cb = [b for b in batches if b in HEADLINE_B.get(name, batches)] or list(batches)
            cb = [b for b in cb if CANDIDATE_MIN_ROWS.get(c, 0) <= b * model.cfg.seq_len
                  <= CANDIDATE_MAX_ROWS.get(c, b * model.cfg.seq_len)]
            if cb:
                _time_paths(rows, model, name, model.cfg, 1,
                            [(f"engine graph [{c}]", dict(graph=True, kernel_options=o), cb)],
                            args, iters, rate, deadline - WINNERS_RESERVE_S, tokens)
    for name, model, batches in models:
        for B in [b for b in batches if b in HEADLINE_B.get(name, batches)] or list(batches):
            won = combine_winners(rows, name, B, seq_len=model.cfg.seq_len)
            for steps in (sorted({1, *steps_list}) if won else []):
                _time_paths(rows, model, name, model.cfg, steps,
                            [(f"engine graph [{won[0]}]", dict(graph=True, kernel_options=won[1]), [B])],
                            args, iters, rate, deadline, tokens)
    print(f"bench e2e: candidates done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    del models
    gc.collect()
    _empty_cache()


def _time_defaults(rows, model, name, batches, steps_list, args, iters, quick, rate, deadline,
                   tokens: Optional[dict] = None):
    """The reference (where asked) and the engine's default paths at every batch size and step count."""
    cfg = model.cfg
    ref_iters = 3 if quick else 5          # odd: the median is a measured call, not a mean of two
    for steps in steps_list:
        for B in batches:
            if args.reference == "all" or (args.reference == "headline" and (name, B, steps) in REF_QUICK):
                if time.time() > deadline:
                    rows.append(_nan_row(name, "reference (bf16 autocast)", cfg, B, steps, rate,
                                         "skipped: time limit"))
                    continue
                call = _reference_call(model, B, steps, args.seed)
                t = time_fn(call, warmup=1, iters=ref_iters, device=DEVICE)
                rows.append(_row(name, "reference (bf16 autocast)", cfg, B, steps, t, _peak(call), rate))
                del call
                gc.collect()
                _empty_cache()
        paths = [("engine eager", dict(graph=False), batches), ("engine graph", dict(graph=True), batches)]
        if args.compile and not quick:
            paths.append(("engine graph + compile", dict(graph=True, compile_blocks=True), batches))
        _time_paths(rows, model, name, cfg, steps, paths, args, iters, rate, deadline, tokens)


def _annotate(rows):
    """speedup over the reference at the same point, the issue's targets, four-step / one-step ratio."""
    refs = {(r["dataset"], r["B"], r["steps"]): r["ms/sample"] for r in rows if r["path"].startswith("reference")}
    default = {(r["dataset"], r["B"], r["steps"]): r["ms/sample"] for r in rows if r["path"] == "engine graph"}
    one = {(r["dataset"], r["path"], r["B"]): r["ms/sample"] for r in rows if r["steps"] == 1}
    for r in rows:
        key = (r["dataset"], r["B"], r["steps"])
        r["speedup"] = refs[key] / r["ms/sample"] if key in refs else float("nan")
        r["vs engine graph"] = default[key] / r["ms/sample"] if "[" in r["path"] and key in default else float("nan")
        target = TARGETS.get(key)
        r["target ms/sample"] = target if target else float("nan")
        r["4-step/1-step"] = float("nan")
        if r["steps"] == 4 and (r["dataset"], r["path"], r["B"]) in one:
            r["4-step/1-step"] = r["ms/sample"] / one[(r["dataset"], r["path"], r["B"])]
        meets = []
        judged = r["path"] == "engine graph" or r["path"].startswith("engine graph [winners")
        if target and judged:
            meets.append(r["ms/sample"] <= target)
        if r["4-step/1-step"] == r["4-step/1-step"] and judged:
            meets.append(r["4-step/1-step"] <= FOUR_STEP_RATIO)
        if meets and r.get(TOKENS_COL, 1.0) < MIN_TOKEN_AGREEMENT:
            meets.append(False)      # fast, but not sampling what the default samples
        # a winners row tells whether the target would be met once its candidates are promoted, not that it is
        r["meets target"] = (("yes" if all(meets) else "NO") + (" (opt-in)" if "[" in r["path"] else "")
                             if meets else "")


def plot(rows, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    # timed rows only: a skipped or failed point (ms/sample nan) or the "candidates aborted" row (no L, V, floor)
    # made the log axes or the title fail after the rows were measured
    rows = [r for r in rows if r["ms/sample"] == r["ms/sample"]]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["dataset"] == name]
        for (p, s) in dict.fromkeys((r["path"], r["steps"]) for r in sub):
            pts = sorted((r["B"], r["ms/sample"]) for r in sub if r["path"] == p and r["steps"] == s)
            ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", label=f"{p}, {s} step{'s' if s > 1 else ''}")
        floors = sorted({(r["steps"], r["floor ms/sample"]) for r in sub})
        for s, f in floors:
            ax.axhline(f, ls=":", lw=0.8, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms / sample")
        ax.set_title(f"{name.upper()} (L={sub[0]['L']}, V={sub[0]['V']}); dotted: floor")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = ["dataset", "path", "B", "steps", "ms/sample", "p20", "p80", "samples/s", "tokens/s", "peak MB",
           "speedup", "vs engine graph", TOKENS_COL, "% of floor", "target ms/sample", "4-step/1-step", "meets target",
           "note"]


def run(quick: bool = False, argv=None) -> list[dict]:
    args = parser().parse_args(argv or [])
    args.candidates = args.candidates and optional_rows()     # gpu_check's defaults-only mode: no candidates
    rows = bench(args, quick=quick)
    if rows:
        plot(rows, Path(args.out or RESULTS_DIR) / "bench_e2e.png")
    return rows


def parser(ap=None):
    ap = ap or argparse.ArgumentParser(prog="fmlm bench e2e", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="real weights (default: random, never zero)")
    ap.add_argument("--datasets", nargs="+", default=["owt", "lm1b"], choices=sorted(DATASETS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 32 64 (OWT), 1 64 512 (LM1B)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="default: 1 4")
    ap.add_argument("--reference", choices=("headline", "all", "none"), default="headline",
                    help="where to run the reference sampler (headline: the issue's one-step points)")
    ap.add_argument("--compile", action="store_true", help="also time the blocks under torch.compile")
    ap.add_argument("--no-candidates", dest="candidates", action="store_false",
                    help="skip the opt-in kernel variants (one-step rows at the headline batch sizes)")
    ap.add_argument("--candidate", action="append", choices=list(ALL_CANDIDATES), default=None, metavar="NAME",
                    help="time only this candidate (repeatable; default: all but the retired ones, in priority "
                         "order): " + "; ".join(CANDIDATES) + "; retired: " + "; ".join(RETIRED))
    ap.add_argument("--quick", action="store_true", help="the gpu-check budget (~90 s on an H100)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default: $FMLM_RESULTS_DIR, else bench/results in "
                    "a source checkout, ./fmlm_results when installed)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def cli(args) -> int:
    rows = bench(args, quick=args.quick)
    if not rows:        # no CUDA device (bench said so): nothing timed or written, and a script must not read success
        return 2
    print(markdown_table(rows, COLUMNS))
    # rows under other columns go to bench_e2e-<date>[-n].csv (common.write_rows): name the file that grew
    sizes = {p: p.stat().st_size for p in Path(args.out or common.RESULTS_DIR).glob("bench_e2e*.csv")}
    md = write_rows("bench_e2e", rows, args.out)
    png = plot(rows, md.parent / "bench_e2e.png")
    csv_path = next((p for p in md.parent.glob("bench_e2e*.csv") if sizes.get(p) != p.stat().st_size),
                    md.with_suffix(".csv"))
    print(f"rows appended to {csv_path}" + (f"; plot {png}" if png else ""))
    return 0


def register_cli(sub, bench_sub) -> None:
    add_bench_command(bench_sub, "e2e", "end-to-end sampling: reference vs engine eager vs CUDA graphs", __doc__,
                      parser, cli)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--canary":        # the child of canary(): candidate names, then --datasets, --seed
        ap = argparse.ArgumentParser()
        ap.add_argument("--canary", nargs="+", required=True)
        ap.add_argument("--datasets", nargs="+", required=True)
        ap.add_argument("--seed", type=int, default=0)
        a = ap.parse_args(argv)
        return _canary_child(a.canary, a.datasets, a.seed)
    return cli(parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
