"""linear_cross_entropy forward+backward at the OWT training shape, beside the reference head in one process.

Shape: h 16384×768 (B=16, L=1024), V = 50258 padded to 50304 (the engine pads V to a multiple of 128), bf16.
Rows: the fused Triton op (fwd, fwd+bwd); then, through the launchers and while the optional budget lasts, the
default config, the previous defaults (online-softmax forward, bf16 dS·W partials), the opt-in two-CTA forward,
the "gemm" implementation, the TMA candidates of kernels/linear_cross_entropy.py TMA_CANDIDATES and the VARIANTS,
each fwd+bwd (and forward alone for a forward change) with its speedup over the default; the reference head as
published (logits materialized in bf16, cap, fp32 log_softmax, one-hot product); the spec
reference.linear_cross_entropy_ref (gather) eager and under torch.compile (a child process, started at once,
waits idle until the other rows are measured, then compiles and times it alone, so neither its compile nor its
first GPU calls overlap another row's timing; it is killed at the time budget, so a slow inductor compile
cannot cost the other rows); a cuBLAS GEMM of the same shape (the matmul ceiling for this problem); the
soft-target (FMLM) form.

FLOPs (V = 50258, padding not counted). `eff_tflops` and `pct_bf16_ceiling` count the work the row executes:
forward 2·N·V·D (one logit GEMM); forward+backward 8·N·V·D for the recomputing Triton kernels (forward 2 +
backward recompute 2 + dh 2 + dW 2; the "gemm" implementation recomputes too) and 6·N·V·D for the references,
which keep the logits for the backward (eager and compiled: no recompute). `useful_tflops` is the same count
for every implementation, so it compares times: 6·N·V·D for forward+backward (what a materializing
implementation needs), 2·N·V·D forward. The soft form reads three logit streams: forward 6·N·V·D,
forward+backward 16·N·V·D executed, 10·N·V·D useful. GB/s: the compulsory traffic only, against the copy
ceiling — it shows the op is not bandwidth-bound: forward h, W read and the loss written; forward+backward
h, W read and dh, dW, db written (~0.3 GB); the soft form also reads h1, h2. The cuBLAS GEMM row counts what it
moves: h, W read and the (N × VP) logits written.
"""
from __future__ import annotations

import importlib

import json
import subprocess
import sys
import time

import torch

from fmlm.bench.common import (ceilings, markdown_table, optional_budget, peak_memory_bytes, time_fn, time_left,
                               write_rows)

lce = importlib.import_module("fmlm.kernels.linear_cross_entropy")   # the module, not the re-exported op

N, V, D, VP = 16384, 50258, 768, 50304
DEVICE = "cuda"          # a CPU smoke run (TRITON_INTERPRET=1, tiny N/V/D) sets "cpu"
PROCESS_LIMIT_S = 46.0   # from run(): gpu-check gives the whole process 60 s (imports, CUDA init, ceilings)
BUDGET_S = 26.0          # optional rows (config variants, soft form) start only before this
# Alternative pointer-kernel configs measured before (label, forward overrides, backward overrides), timed last.
VARIANTS = [
    # 167 registers and 74 KB: three CTAs fit per SM, so one CTA's tanh/exp epilogue overlaps another's MMA
    ("fwd BLOCK_M 64, 4 warps, 3 CTAs/SM", dict(lce.FWD_PREVIOUS, BLOCK_M=64, num_warps=4, ctas_per_sm=3), {}),
    # 128-deep K steps: 6 per tile at D = 768 instead of 12, so half the per-step CTA barriers and stage waits
    # (a 128×128×64 step is only ~512 tensor-core cycles); no spills on sm_90a with triton 3.6 or 3.7.1 (fwd 172 /
    # 171 registers, 192 KiB shared; bwd 255 / 210, 160 KiB)
    ("BLOCK_K 128 (fwd 3 stages, bwd 2)", dict(lce.FWD_PREVIOUS, BLOCK_K=128), dict(BLOCK_K=128, num_stages=2)),
    ("no loop flattening", dict(FLATTEN=False), dict(FLATTEN=False, persistent=False)),
    ("bwd v_chunk 16384", {}, dict(v_chunk=16384)),
]


def _inputs(dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(N, D, device=DEVICE, generator=g).to(dtype)
    W = (torch.randn(VP, D, device=DEVICE, generator=g) * (4.0 / D ** 0.5)).to(dtype)
    b = (torch.randn(VP, device=DEVICE, generator=g) * 0.1).to(dtype)
    W[V:] = 0
    b[V:] = 0
    t = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    h1 = torch.randn(N, D, device=DEVICE, generator=g).to(dtype)
    h2 = torch.randn(N, D, device=DEVICE, generator=g).to(dtype)
    lam = torch.rand(N, device=DEVICE, generator=g)
    return h, W, b, t, h1, h2, lam


def _published_head(h, W, b, t, cap=30.0):
    """The published loss head: bf16 logits over V, cap, fp32 log_softmax, one-hot product, mean."""
    logits = torch.nn.functional.linear(h, W[:V], b[:V]).float()
    lp = (cap * torch.tanh(logits / cap)).log_softmax(-1)
    return -(lp * torch.nn.functional.one_hot(t, V)).sum(-1).mean()


# FLOPs / (N·V·D) per pass: (executed by the recomputing Triton kernels, useful = what a materializing
# implementation needs); the references execute REF_EXECUTED for forward+backward (logits kept, no recompute)
FLOPS = {"fwd": (2, 2), "fwd+bwd": (8, 6), "soft fwd": (6, 6), "soft fwd+bwd": (16, 10)}
REF_EXECUTED = 6
REF_FLOPS_NOTE = "eff_tflops counts the 6·N·V·D it executes (logits kept for the backward, no recompute)"


def compulsory_bytes() -> dict:
    """Per pass, the compulsory traffic in bytes (bf16 h, W; fp32 loss and db): forward h, W read + loss written;
    forward+backward h, W read + dh, dW, db written; the soft form also reads h1, h2."""
    fwd = (N * D + VP * D) * 2 + N * 4
    fwd_bwd = 2 * (N * D + VP * D) * 2 + VP * 4
    soft_extra = 2 * N * D * 2
    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "soft fwd": fwd + soft_extra, "soft fwd+bwd": fwd_bwd + soft_extra}


def _gemm_bytes() -> int:
    """What the cuBLAS h·Wᵀ row moves: h and the padded W read, the (N × VP) bf16 logits written."""
    return (N * D + VP * D + N * VP) * 2


def _fwd_bwd(loss_fn, leaves):
    def step():
        for x in leaves:
            x.grad = None
        loss_fn().backward()
    return step


def run(quick: bool = False) -> list[dict]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return []
    t_start = time.time()
    child = _start_compiled_reference() if DEVICE == "cuda" else None
    try:
        return _measure(quick, t_start, child)
    finally:
        if child is not None and child.poll() is None:
            child.kill()


def _measure(quick: bool, t_start: float, child) -> list[dict]:
    budget = optional_budget(t_start, BUDGET_S, PROCESS_LIMIT_S - BUDGET_S)
    from fmlm.kernels import reference as ref

    ceil = ceilings()
    h, W, b, t, h1, h2, lam = _inputs()
    leaves = [x.requires_grad_() for x in (h, W, b)]
    iters = 10 if quick else 30
    # (executed by the recomputing kernels, useful = what a materializing implementation needs), × N·V·D
    flops = FLOPS
    nbytes_of = compulsory_bytes()

    rows = []

    def add(impl, what, fn, note="", mem=True, executed=None, nbytes=None):
        """executed: the row's own FLOPs / (N·V·D) where it differs from the recomputing kernels' (the references);
        nbytes: the bytes the row moves where they differ from the compulsory traffic (the cuBLAS GEMM)."""
        tm = time_fn(fn, warmup=2, iters=iters, device=DEVICE)
        f, useful = (k * N * V * D for k in flops[what])
        if executed is not None:
            f = executed * N * V * D
        nb = nbytes_of[what] if nbytes is None else nbytes
        rows.append({"op": "linear_cross_entropy", "impl": impl, "pass": what, "N": N, "V": V, "D": D,
                     "dtype": "bf16", "ms": tm["ms"], "p20_ms": tm["p20_ms"], "p80_ms": tm["p80_ms"],
                     "eff_tflops": f / tm["ms"] / 1e9, "useful_tflops": useful / tm["ms"] / 1e9,
                     "pct_bf16_ceiling": 100 * f / tm["ms"] / 1e9 / ceil["bf16_tflops"],
                     "gbs": nb / tm["ms"] / 1e6,
                     "pct_copy_ceiling": 100 * nb / tm["ms"] / 1e6 / ceil["copy_gbs"],
                     "peak_extra_mb": peak_memory_bytes(fn, DEVICE) / 2**20 if mem else float("nan"), "note": note})
        return rows[-1]

    def triton_loss():
        return lce.linear_cross_entropy(h, W, b, t, n_valid=V, reduction="mean", backend="triton")

    main = add("triton", "fwd+bwd", _fwd_bwd(triton_loss, leaves), "default config")
    from fmlm.kernels._backend import ADDMM_FP32_OUT      # probed by the backward above
    main["note"] += f"; dh += dS·W in fp32 by addmm(out_dtype): {ADDMM_FP32_OUT.get(str(h.device), False)}"
    with torch.no_grad():
        add("triton", "fwd", lambda: lce.linear_cross_entropy(h, W, b, t, n_valid=V, backend="triton"))
    ref_head = add("reference head (published: one-hot product)", "fwd+bwd",
                   _fwd_bwd(lambda: _published_head(h, W, b, t), leaves),
                   "bf16 logits materialized; " + REF_FLOPS_NOTE, executed=REF_EXECUTED)
    spec = add("reference.linear_cross_entropy_ref (gather)", "fwd+bwd",
               _fwd_bwd(lambda: ref.linear_cross_entropy_ref(h, W[:V], b[:V], t, reduction="mean"), leaves),
               REF_FLOPS_NOTE, executed=REF_EXECUTED)
    with torch.no_grad():
        hd, Wd = h.detach(), W.detach()
        gemm = add("cuBLAS h·Wᵀ (padded V, no epilogue)", "fwd", lambda: hd @ Wd.T,
                   "matmul ceiling; GB/s counts h, W read and the N×VP logits written", mem=False,
                   nbytes=_gemm_bytes())
    main["speedup_vs_ref_head"] = ref_head["ms"] / main["ms"]
    main["speedup_vs_spec_ref"] = spec["ms"] / main["ms"]
    main["target"] = ">= 550 eff TFLOP/s and >= 4x ref head"
    main["meets_target"] = main["eff_tflops"] >= 550 and main["speedup_vs_ref_head"] >= 4
    gemm["note"] += f"; fwd kernel at {rows[1]['ms'] / gemm['ms']:.2f}x its time"

    # Alternative configs through the launchers (fwd then bwd, as the op does), each checked against the default.
    with torch.no_grad():
        loss0, stats0 = lce.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V)
        g = torch.full((N,), 1.0 / N, device=DEVICE)
        dh0, _, db0 = lce.linear_cross_entropy_bwd(g, h, W, b, t, stats0, 30.0, -100, V)
    # First the default config through the same direct launcher calls (what each candidate is compared with:
    # speedup_vs_default = the default's time / its time, both without autograd), then the TMA candidates (the open question;
    # each compiles a forward and/or a backward kernel, ~2-4 s, and times ~0.3 s: within the budget below), then
    # the pointer-kernel variants while time allows.
    candidates = [("default config", {}, {})]
    # the backward at the forward's 128×256 tile, 16 warps (lce.BWD_WIDE: the spill-free shape on sm_90a), first
    # among the candidates: the dS kernel is the largest part of fwd+bwd left at a 128×128 tile
    candidates += [("bwd 128x256, 16 warps, 2 stages, db from the dW GEMM", {}, dict(lce.BWD_WIDE))]
    # TMA loads at the forward's default 128×256 tile (255 registers, no spills on sm_90a): logits_argmax's TMA
    # kernel ran 1.35x its pointer kernel at the same tile in run5 (673 against 499 TFLOP/s), and the forward is
    # ~2.7 of the 10.6 ms; then with the wide backward, the one row that times both changes together
    candidates += [("fwd TMA at the default 128x256 tile", dict(tma=True), {}),
                   ("fwd TMA at 128x256 + bwd 128x256, 16 warps, 2 stages, db from the dW GEMM", dict(tma=True),
                    dict(lce.BWD_WIDE))]
    # the forward's previous default tile (128×128, 3 stages; the default is 128×256 in 4 stages since H100 run5):
    # a speedup above 1 here would mean the promotion lost
    candidates += [("fwd BLOCK_N 128, 3 stages (the previous default)", dict(lce.FWD_PREVIOUS), {})]
    # the forward's softmax before the fixed shift became its default (unmeasured change): < 1 means the change won
    candidates += [("online-softmax forward (the previous default)", {"fixed_shift": False}, {})]
    # the backward's dh += dS·W[chunk] as a bf16 product plus an add (before session 4 of 2026-11-27; now one cuBLAS
    # GEMM accumulating in fp32 where torch has addmm(out_dtype=float32)): < 1 means the change won
    candidates += [("bf16 dS·W partials + add in the backward (the previous default)", {}, {"fp32_addmm": False})]
    # the backward without its per-tile db column sums (a cross-warp reduction and a store per tile; sm_90a PTX
    # 8059 → 4855 lines, shfl.sync 217 → 1, bar.sync 15 → 5, registers 213 → 181 with triton 3.7.1, 255 either
    # way with 3.6, the device's): db from the dW GEMM's ones column instead; then the same with 4 stages (181
    # registers, 160 KiB, no spills)
    candidates += [("bwd db from the dW GEMM", {}, {"db_gemm": True}),
                   ("bwd db from the dW GEMM, 4 stages", {}, {"db_gemm": True, "num_stages": 4})]
    # the backward's dS kernel is most of fwd+bwd (run5: ~7.8 of 10.6 ms, of which ~3.7 are the two cuBLAS GEMMs),
    # and the forward gained 1.31x from 256-wide V tiles; the backward spills at 128×256 (724 B with triton 3.7.1),
    # so two shapes that compile without spills on sm_90a (triton 3.7.1): 4 stages (213 registers, 160 KiB), and
    # 64×256 tiles with 8 warps (255 registers, 136 KiB)
    candidates += [("bwd 4 stages", {}, dict(num_stages=4)),
                   ("bwd BLOCK_M 64, BLOCK_N 256", {}, dict(BLOCK_M=64, BLOCK_N=256))]
    # two 8-warp CTAs per SM with a 128-register cap (FWD_TWO_CTAS; no spills on sm_90a with triton 3.6 or 3.7.1),
    # pointer loads, then TMA loads
    candidates += [("fwd 2 CTAs/SM, maxnreg 128", dict(lce.FWD_TWO_CTAS), {}),
                   ("fwd TMA, 2 CTAs/SM, maxnreg 128", dict(lce.FWD_TWO_CTAS, tma=True), {})]
    # cuBLAS writes each chunk's logits (bf16), memory-bound Triton passes read them (impl "gemm", IMPLS)
    candidates += [("gemm: cuBLAS logits + Triton passes", {"impl": "gemm"}, {"impl": "gemm"})]
    candidates += [(f"TMA candidate: {label}", fcfg, bcfg) for label, (fcfg, bcfg) in lce.TMA_CANDIDATES.items()]
    tma_ok = lce.tma_usable(h, W, lce.FWD_CONFIG["BLOCK_K"])
    tried = [main]
    fwd_timed = set()
    base = {}
    for name, fcfg, bcfg in candidates + VARIANTS:
        if time.time() - t_start > budget:
            break
        impl = f"triton [{name}]"
        if fcfg.get("tma") and not tma_ok:
            rows.append({"op": "linear_cross_entropy", "impl": impl, "note": "skipped: TMA not usable here"})
            continue
        try:
            with torch.no_grad():
                def step(fcfg=fcfg, bcfg=bcfg):
                    _, st = lce.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config=fcfg)
                    return lce.linear_cross_entropy_bwd(g, h, W, b, t, st, 30.0, -100, V, config=bcfg)
                loss1, _ = lce.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V, config=fcfg)
                dh1, _, db1 = step()
                note = "launchers called directly (no autograd)"
                if fcfg.get("tma"):
                    note = f"opt-in candidate, not the default (fwd {fcfg}, bwd {bcfg}); " + note
                r = add(impl, "fwd+bwd", step, note)
                r["max_loss_diff_vs_default"] = (loss1 - loss0).abs().max().item()
                r["max_dh_diff_vs_default"] = (dh1.float() - dh0.float()).abs().max().item()
                r["max_db_diff_vs_default"] = (db1.float() - db0.float()).abs().max().item()
                if name == "default config":
                    base["fwd+bwd"] = r["ms"]
                elif "fwd+bwd" in base:
                    r["speedup_vs_default"] = base["fwd+bwd"] / r["ms"]
                tried.append(r)
                key = tuple(sorted(fcfg.items()))
                if (name == "default config" or fcfg) and key not in fwd_timed:     # a forward change: alone too
                    fwd_timed.add(key)       # the forward alone (compiled already): ~0.1 s
                    rf = add(impl, "fwd", lambda fcfg=fcfg: lce.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, V,
                                                                                         config=fcfg),
                             note.replace("launchers called", "launcher called") + "; forward only", mem=False)
                    if name == "default config":
                        base["fwd"] = rf["ms"]
                    elif "fwd" in base:
                        rf["speedup_vs_default"] = base["fwd"] / rf["ms"]
        except Exception as e:
            rows.append({"op": "linear_cross_entropy", "impl": impl, "note": f"failed: {e!r}"[:200]})
    best = min(tried, key=lambda r: r["ms"])      # fwd+bwd rows only
    rows.append({**best, "impl": f"best measured: {best['impl']}", "note": "min over the configs above",
                 "speedup_vs_ref_head": ref_head["ms"] / best["ms"], "meets_target":
                 best["eff_tflops"] >= 550 and ref_head["ms"] / best["ms"] >= 4})

    if time.time() - t_start < budget:
        def soft_loss():
            return lce.soft_linear_cross_entropy(h, W, b, h1, h2, lam, n_valid=V, backend="triton").mean()
        add("triton soft-target", "soft fwd+bwd", _fwd_bwd(soft_loss, leaves), "FMLM distillation form")
    # the soft backward without its per-tile db column sums (db from the dW GEMM; registers 252 → 215 on sm_90a with
    # triton 3.7.1), launcher beside launcher
    if time.time() - t_start < budget:
        soft = []
        for label, bcfg in (("soft launchers, default", {}), ("soft launchers, bwd db from the dW GEMM",
                                                              {"db_gemm": True})):
            try:
                with torch.no_grad():
                    def soft_step(bcfg=bcfg):
                        _, st = lce.soft_linear_cross_entropy_fwd(h, W, b, h1, h2, lam, 30.0, V)
                        return lce.soft_linear_cross_entropy_bwd(g, h, W, b, h1, h2, lam, st, 30.0, V, bcfg)
                    db = soft_step()[2]
                    soft.append((add(f"triton [{label}]", "soft fwd+bwd", soft_step,
                                     "launchers called directly (no autograd)", mem=False), db))
            except Exception as e:
                rows.append({"op": "linear_cross_entropy", "impl": f"triton [{label}]", "note": f"failed: {e!r}"[:200]})
        if len(soft) == 2:
            soft[1][0]["speedup_vs_default"] = soft[0][0]["ms"] / soft[1][0]["ms"]
            soft[1][0]["max_db_diff_vs_default"] = (soft[1][1].float() - soft[0][1].float()).abs().max().item()
    # torch.compile(reference): a cold inductor compile of fwd+bwd takes ~15-40 s, so a child process compiles
    # it while the rows above are measured and times it now; it is killed at the budget, never this process.
    left = time_left(t_start, PROCESS_LIMIT_S)
    r = _finish_compiled_reference(child, left) if child is not None else {"note": "skipped on CPU"}
    r = {"op": "linear_cross_entropy", "impl": "torch.compile(reference)", "pass": "fwd+bwd", **r}
    rows.append(r)
    if "ms" in r:
        main["speedup_vs_compiled_ref"] = r["ms"] / main["ms"]
    for r in rows:
        r["bf16_ceiling_tflops"] = ceil["bf16_tflops"]
    return rows


def _start_compiled_reference():
    """Child process, started at once so its Python start and imports overlap the parent's rows; it waits for a
    line on stdin before it touches the GPU (inputs, compile, first call, timing), so nothing it does overlaps a
    row the parent times."""
    return subprocess.Popen([sys.executable, "-m", "fmlm.bench.bench_linear_cross_entropy", "--compiled-reference"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_compiled_reference(proc, timeout_s: float) -> dict:
    try:
        out, err = proc.communicate("go\n", timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"note": f"compile + timing did not finish within the {PROCESS_LIMIT_S:.0f} s budget"}
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {"note": f"failed: {err[-300:]!r}"}


def _compiled_reference() -> dict:
    """Child process: torch.compile(reference.linear_cross_entropy_ref) fwd+bwd at the same shape."""
    from fmlm.kernels import reference as ref

    try:                                 # CPU only: inductor's imports, while the parent measures
        import torch._inductor.compile_fx  # noqa: F401
    except Exception:
        pass
    sys.stdin.readline()                 # the parent's measurements are done: from here on the GPU is ours
    h, W, b, t, *_ = _inputs()
    leaves = [x.requires_grad_() for x in (h, W, b)]
    compiled = torch.compile(ref.linear_cross_entropy_ref)
    t0 = time.time()
    step = _fwd_bwd(lambda: compiled(h, W[:V], b[:V], t, reduction="mean"), leaves)
    step()
    compile_s = time.time() - t0
    tm = time_fn(step, warmup=2, iters=10, device=DEVICE)
    f = REF_EXECUTED * N * V * D         # executed = useful: the compiled graph keeps the logits, no recompute
    return {"ms": tm["ms"], "p20_ms": tm["p20_ms"], "p80_ms": tm["p80_ms"], "eff_tflops": f / tm["ms"] / 1e9,
            "useful_tflops": f / tm["ms"] / 1e9,
            "peak_extra_mb": peak_memory_bytes(step, DEVICE) / 2**20,
            "note": f"compile {compile_s:.0f} s (after the other rows); " + REF_FLOPS_NOTE}


def main() -> None:
    if "--compiled-reference" in sys.argv:
        print(json.dumps(_compiled_reference()))
        return
    rows = run()
    if not rows:
        print("bench_linear_cross_entropy: needs CUDA, skipped")
        return
    print(markdown_table(rows))
    write_rows("bench_linear_cross_entropy", rows)


if __name__ == "__main__":
    main()
