"""Nsight Compute counters of the kernels behind the open targets, at their benchmarks' shapes: where each one's
time goes (tensor pipe, instruction issue, MUFU, L2, DRAM, warp stalls), so that the next change is aimed at the
measured limiter instead of a napkin. `make gpu-ncu` (one device call, ~4 minutes) or
`python -m fmlm.bench.ncu_kernels [--case NAME ...]`.

Each case runs in a process of its own under `ncu` (a case that runs out of time loses only itself). The process
builds the case's inputs (bf16, random, never zero), runs it twice (Triton compiles, caches warm), synchronizes and
runs it once more between cudaProfilerStart and cudaProfilerStop: `ncu --profile-from-start off` profiles exactly
the kernels of that third call, in kernel replay (caches flushed before each pass), with `--clock-control none`, so
the clocks are those the benchmarks run at (ncu's default locks them to base). The full section set is collected
(`--set full`: ~40 replay passes per kernel); the report is exported and read back as the raw page in CSV
(bench/results/ncu_<case>.csv, every metric), and one row per kernel keeps the metrics of COLUMNS and the three
largest warp-stall reasons (bench/results/ncu_kernels.{csv,md}).

How to read a row: tensor % near 100 is the MMA-bound ideal; issue % near 100 means instruction issue is the
limiter (fewer instructions per element help); xu % is the MUFU pipe (tanh, exp2, rcp; 16 lanes per clock per SM);
l2 % / dram % near 100 mean the memory hierarchy limits; the stalls say what the warps wait on (long_scoreboard:
global memory; barrier: __syncthreads; wait / math_pipe_throttle: a busy pipe; mio_throttle / lg_throttle: the
load-store queues; dispatch_stall, no_instruction: the front end).

Kernel durations under ncu are single launches with flushed caches: use the benchmarks for times, this for why.
"""
from __future__ import annotations

import argparse
import csv
import glob
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fmlm.bench import common

V, VP, D = 50258, 50304, 768
CASE_LIMIT_S = 75.0          # one case's ncu process (imports, CUDA init, compiling, the profiled passes)
MAX_KERNELS = 24             # kernels profiled per case (fwd+bwd cases launch a few, plus torch's small ones)
# (row column, metric names: the first present in the raw page wins, then a substring: the largest value of the
# columns holding it and ending in .pct_of_peak_sustained_active, for the pipe metrics whose names differ by chip)
COLUMNS = (
    ("duration_ms", ("gpu__time_duration.sum",), None),
    ("sm_pct", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",), None),
    ("tensor_pct", ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",     # wgmma and mma
                    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"), "pipe_tensor"),
    ("issue_pct", ("smsp__issue_active.avg.pct_of_peak_sustained_active",
                   "sm__instruction_throughput.avg.pct_of_peak_sustained_active"), None),
    ("xu_pct", ("sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",), "pipe_xu"),
    ("fma_pct", ("sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
                 "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active"), "pipe_fma"),
    ("alu_pct", ("sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
                 "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active"), "pipe_alu"),
    ("l2_pct", ("lts__throughput.avg.pct_of_peak_sustained_elapsed",), None),
    ("dram_pct", ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
                  "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"), None),
    ("l1_pct", ("l1tex__throughput.avg.pct_of_peak_sustained_active",), None),
    ("occupancy_pct", ("sm__warps_active.avg.pct_of_peak_sustained_active",), None),
    ("regs", ("launch__registers_per_thread",), None),
    ("smem_kb", ("launch__shared_mem_per_block_dynamic", "launch__shared_mem_per_block"), None),
    ("grid", ("launch__grid_size",), None),
    ("block", ("launch__block_size",), None),
    ("warp_cycles_per_issue", ("smsp__average_warp_latency_per_inst_issued.ratio",), None),
)
PIPE_SUFFIX = ".pct_of_peak_sustained_active"
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


# ---------------------------------------------------------------------------------------------------------------
# cases: name → (what it runs, the target it bears on); each builder returns a zero-argument callable
# ---------------------------------------------------------------------------------------------------------------
def _gen(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, scale, g, device, dtype):
    return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)


def _head(rows, device, dtype, w_scale, b_scale, v, vp, d):
    """h (rows, d), a weight and a bias padded from v to vp rows with zeros (as the engine pads them)."""
    g = _gen(device)
    h = _randn((rows, d), 1.0, g, device, dtype)
    W = _randn((vp, d), w_scale / d ** 0.5, g, device, dtype)
    b = _randn((vp,), b_scale, g, device, dtype)
    W[v:], b[v:] = 0, 0
    return h, W, b, g


def case_logits_argmax(device, dtype, small=False):
    rows, v, vp, d = (40, 97, 128, 64) if small else (16384, V, VP, D)
    h, W, b, _ = _head(rows, device, dtype, 3.0, 1.0, v, vp, d)
    from fmlm.kernels.logits_argmax import logits_argmax as fn
    return lambda: fn(h, W, b, n_valid=v, backend="triton")


def case_logits_argmax_two_ctas(device, dtype, small=False):
    """The opt-in one-warpgroup 128×128 tile (BENCH_CONFIGS bm128_bn128_w4_s3: two CTAs per SM, so one CTA's
    epilogue can overlap the other's MMAs): its counters beside the default's."""
    rows, v, vp, d = (40, 97, 128, 64) if small else (16384, V, VP, D)
    h, W, b, _ = _head(rows, device, dtype, 3.0, 1.0, v, vp, d)
    la = importlib.import_module("fmlm.kernels.logits_argmax")
    cfg = la.BENCH_CONFIGS["bm128_bn128_w4_s3"]
    return lambda: la.logits_argmax(h, W, b, n_valid=v, backend="triton", config=cfg)


def case_linear_cross_entropy_fwd_two_ctas(device, dtype, small=False):
    """The opt-in two-CTA forward (FWD_TWO_CTAS: 128-register cap) alone; the fwd+bwd case holds the default's."""
    rows, v, vp, d = (40, 97, 128, 64) if small else (16384, V, VP, D)
    h, W, b, g = _head(rows, device, dtype, 4.0, 0.1, v, vp, d)
    t = torch.randint(0, v, (rows,), device=device, generator=g)
    lce = importlib.import_module("fmlm.kernels.linear_cross_entropy")
    return lambda: lce.linear_cross_entropy_fwd(h, W, b, t, 30.0, -100, v, config=dict(lce.FWD_TWO_CTAS))


def case_linear_cross_entropy(device, dtype, small=False):
    rows, v, vp, d = (40, 97, 128, 64) if small else (16384, V, VP, D)
    h, W, b, g = _head(rows, device, dtype, 4.0, 0.1, v, vp, d)
    t = torch.randint(0, v, (rows,), device=device, generator=g)
    leaves = [x.requires_grad_() for x in (h, W, b)]
    lce = importlib.import_module("fmlm.kernels.linear_cross_entropy")

    def step():
        for x in leaves:
            x.grad = None
        lce.linear_cross_entropy(h, W, b, t, n_valid=v, reduction="mean", backend="triton").backward()
    return step


def case_vocab_attention(device, dtype, small=False):
    rows, v, vp, d = (40, 97, 128, 64) if small else (16384, V, VP, D)
    h, W, b, g = _head(rows, device, dtype, 4.0, 0.5, v, vp, d)
    E = _randn((vp, d), 0.05, g, device, dtype)
    E[v:] = 0
    va = importlib.import_module("fmlm.kernels.vocab_attention")
    return lambda: va.vocab_attention(h, W, b, E, 30.0, v, backend="triton")


def case_softcap_attention(device, dtype, small=False):
    """The OWT B=32 trunk's attention (12 heads of 64, L = 1024, rotary on load, softcap 50): 26 % of the B=32
    sample in the run2 profile."""
    B, L, H, hd = (2, 40, 2, 32) if small else (32, 1024, 12, 64)
    from fmlm.kernels import reference as ref
    from fmlm.kernels.attention import softcap_attention
    qkv = _randn((B, L, 3, H, hd), 2.0, _gen(device), device, dtype)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    cos, sin = (x.to(dtype).contiguous() for x in ref.rotary_cos_sin(L, inv_freq))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return lambda: softcap_attention(q, k, v, 50.0, cos, sin, backend="triton")


def case_interp_embed_hidden(device, dtype, small=False):
    B, L, v, vp, d = (2, 24, 97, 128, 64) if small else (16, 1024, V, VP, D)
    ie = importlib.import_module("fmlm.kernels.interp_embed")
    g = _gen(device)
    tokens = torch.randint(0, v, (B, L), device=device, generator=g)
    gamma = torch.rand(B, device=device, generator=g)
    E = _randn((vp, d), 0.02, g, device, dtype)
    E[v:] = 0
    up = _randn((B, L, d), 1.0, g, device, dtype)
    C = ie.embed_cholesky(E, v).to(dtype)
    E.requires_grad_()

    def step():
        E.grad = None
        ie.interp_embed(tokens, gamma, E, "hidden", seed=1, chol=C, backend="triton").backward(up)
    return step


def case_gate_residual(device, dtype, small=False):
    """The trunk's residual update fused with the next adaLN (x fp32, y bf16): memory-bound, 11.6 % of the OWT B=32
    sample in the run2 profile; dram % says how close it runs to the copy ceiling."""
    B, L, d = (2, 24, 64) if small else (32, 1024, D)
    from fmlm.kernels import adaln
    g = _gen(device)
    x = _randn((B, L, d), 1.0, g, device, torch.float32)
    y = _randn((B, L, d), 1.0, g, device, dtype)
    gate, shift, scale = (_randn((B, d), 0.1, g, device, torch.float32) for _ in range(3))
    w = _randn((d,), 1.0, g, device, torch.float32)
    x_out = torch.empty_like(x)
    return lambda: adaln.gate_residual(x, gate, y, w, shift, scale, out_dtype=dtype, x_out=x_out, backend="triton")


CASES: dict[str, tuple[Callable, str]] = {
    "logits_argmax": (case_logits_argmax, "issue 4: >= 600 TFLOP/s at 16384x768x50258 (673 measured, TMA default)"),
    "linear_cross_entropy": (case_linear_cross_entropy, "issue 4: fwd+bwd >= 550 TFLOP/s (441-479 measured)"),
    "softcap_attention": (case_softcap_attention, "issue 5: OWT B=32 <= 0.6 ms/sample (0.70); 26 % of it"),
    "interp_embed_hidden": (case_interp_embed_hidden,
                            "issue 4: hidden fwd+bwd >= 50x dense x.E (52x graphed, 20x eager)"),
    "gate_residual": (case_gate_residual, "issue 5: OWT B=32; 11.6 % of it, memory-bound"),
    "vocab_attention": (case_vocab_attention, "issue 4: >= 450 TFLOP/s (467 measured; met)"),
    "logits_argmax_two_ctas": (case_logits_argmax_two_ctas, "issue 4: opt-in argmax tile, beside the default"),
    "linear_cross_entropy_fwd_two_ctas": (case_linear_cross_entropy_fwd_two_ctas,
                                          "issue 4: opt-in LCE forward, beside the default's"),
}


# ---------------------------------------------------------------------------------------------------------------
# ncu: the command, the raw page, the rows
# ---------------------------------------------------------------------------------------------------------------
def find_ncu() -> Optional[str]:
    """ncu on the PATH, else the newest under /usr/local/cuda*/bin or /opt/nvidia/nsight-compute/*/."""
    found = shutil.which("ncu")
    if found:
        return found
    cands = glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute/*/ncu")
    # by version numbers, not text: cuda-12.10 is newer than cuda-12.9
    return max(cands, key=lambda c: [int(x) for x in re.findall(r"\d+", c)], default=None)


def ncu_command(ncu: str, report: Path, case: str, max_kernels: int = MAX_KERNELS) -> list[str]:
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--replay-mode", "kernel",
           "--launch-count", str(max_kernels), "--set", "full", "--force-overwrite", "--export", str(report)]
    return cmd + [sys.executable, "-m", "fmlm.bench.ncu_kernels", "--child", case]


def import_command(ncu: str, report: Path) -> list[str]:
    """The exported report back as the raw page (every metric a column, one row per kernel), base units."""
    return [ncu, "--import", str(report), "--csv", "--page", "raw", "--print-units", "base"]


def _num(s: str) -> Optional[float]:
    s = (s or "").strip().replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def parse_raw_csv(text: str) -> tuple[list[dict], dict]:
    """ncu's raw page as CSV → (one dict per kernel: column → cell, {column: unit}). The header is the first row
    holding 'Kernel Name'; a units row (empty ID cell) may follow; lines ncu prints around the table (==PROF==,
    ==WARNING==) are skipped."""
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith("==")]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        return [], {}
    header = rows[start]
    units, body = {}, rows[start + 1:]
    if body and (body[0][0] if body[0] else "").strip() == "":
        units = dict(zip(header, body[0]))
        body = body[1:]
    return [dict(zip(header, r)) for r in body if len(r) == len(header)], units


def _scaled(value: Optional[float], unit: str, col: str) -> Optional[float]:
    """Durations to ms and shared memory to KiB, whatever unit the page used."""
    if value is None:
        return None
    unit = (unit or "").strip().lower()
    if col == "duration_ms":
        return value * {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
                        "second": 1e3, "s": 1e3}.get(unit, 1e-6)
    if col == "smem_kb":
        return value / {"byte": 1024.0, "kbyte": 1.0, "kibyte": 1.0, "mbyte": 1 / 1024}.get(unit, 1024.0)
    return value


def kernel_rows(case: str, records: list[dict], units: dict) -> list[dict]:
    """One row per profiled kernel: the COLUMNS metrics (the first name present) and the top three stalls."""
    out = []
    for rec in records:
        name = rec.get("Kernel Name", "?")
        row = {"case": case, "kernel": name if len(name) <= 60 else name[:57] + "..."}
        for col, names, part in COLUMNS:
            key = next((n for n in names if n in rec and _num(rec[n]) is not None), None)
            if key is None and part:
                hits = [k for k in rec if part in k and k.endswith(PIPE_SUFFIX) and _num(rec[k]) is not None]
                key = max(hits, key=lambda k: _num(rec[k]), default=None)
            row[col] = _scaled(_num(rec[key]), units.get(key, ""), col) if key else None
        stalls = sorted(((k[len(STALL_PREFIX):-len(STALL_SUFFIX)], _num(v)) for k, v in rec.items()
                         if k.startswith(STALL_PREFIX) and k.endswith(STALL_SUFFIX) and _num(v)),
                        key=lambda kv: -kv[1])
        row["top_stalls"] = ", ".join(f"{k} {v:.2f}" for k, v in stalls[:3]) if stalls else ""
        out.append(row)
    return out


def profile_case(ncu: str, case: str, out_dir: Path, timeout_s: float) -> list[dict]:
    """Run one case under ncu, keep its raw CSV, return its rows (or one row that says why there are none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"ncu_{case}.ncu-rep"
    log = out_dir / f"ncu_{case}.log"              # ncu's and the profiled process's output
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    from fmlm.bench.gpu_check import run_group     # killed as a group: the profiled process must not outlive ncu
    try:
        with open(log, "w") as f:
            try:
                rc = run_group(ncu_command(ncu, report, case), timeout_s, stdout=f, stderr=subprocess.STDOUT,
                               env=env)
            except subprocess.TimeoutExpired:
                return [{"case": case, "kernel": "", "note": f"ncu did not finish within {timeout_s:.0f} s"}]
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        if rc != 0 or not report.exists():
            return [{"case": case, "kernel": "", "note": f"ncu exit {rc}: {' / '.join(tail)[:300]}"}]
        import_s = max(5.0, min(90.0, common.bench_deadline() - time.time()))   # never past the step's deadline
        try:
            q = subprocess.run(import_command(ncu, report), capture_output=True, text=True, timeout=import_s)
        except subprocess.TimeoutExpired:
            return [{"case": case, "kernel": "", "note": f"reading the report back took over {import_s:.0f} s"}]
    finally:
        # the CSV holds every metric; the report is large (results.tar.gz must stay under the device tool's 16 MiB),
        # so it goes whatever happened (a failed or interrupted case too)
        report.unlink(missing_ok=True)
    if q.returncode != 0:
        err = (q.stderr or q.stdout).strip().splitlines()[-3:]
        return [{"case": case, "kernel": "", "note": f"ncu --import exit {q.returncode}: {' / '.join(err)[:300]}"}]
    (out_dir / f"ncu_{case}.csv").write_text(q.stdout)
    records, units = parse_raw_csv(q.stdout)
    if not records:
        return [{"case": case, "kernel": "", "note": f"no kernel in the report: {' / '.join(tail)[:300]}"}]
    rows = kernel_rows(case, records, units)
    for r in rows:
        r["case_s"] = round(time.time() - t0, 1)
    return rows


def child(case: str) -> int:
    """Inside ncu: build, run twice, synchronize, run once between cudaProfilerStart/Stop."""
    fn = CASES[case][0](torch.device("cuda"), torch.bfloat16)
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def run(quick: bool = False, cases=None) -> list[dict]:
    """Every case (or `cases`) under ncu, in CASES order, each while time is left before gpu_check's deadline."""
    if not torch.cuda.is_available():
        return []
    ncu = find_ncu()
    if ncu is None:
        return [{"case": "", "kernel": "", "note": "ncu not found (PATH, /usr/local/cuda*/bin, /opt/nvidia)"}]
    deadline = common.bench_deadline()
    rows = []
    for case in cases or CASES:
        left = deadline - time.time()
        if left < 25:
            rows.append({"case": case, "kernel": "", "note": "skipped: no time left"})
            continue
        got = profile_case(ncu, case, common.RESULTS_DIR, min(CASE_LIMIT_S, left - 5))
        for r in got:
            r["target"] = CASES[case][1]
        rows += got
        print(common.markdown_table(got), flush=True)
    return rows


def parser(ap: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="fmlm bench ncu", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(CASES), help="a case to profile (repeatable; default all)")
    ap.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--out", default=None, help="results folder (default: $FMLM_RESULTS_DIR, else bench/results in "
                    "a source checkout, ./fmlm_results when installed)")
    return ap


def cli(a) -> int:
    if a.child:
        return child(a.child)
    if a.list:
        for name, (_, target) in CASES.items():
            print(f"{name}: {target}")
        return 0
    if not torch.cuda.is_available():
        print("fmlm bench ncu: needs a CUDA device (and Nsight Compute's ncu)", file=sys.stderr)
        return 2
    if a.out:
        common.RESULTS_DIR = Path(a.out)
    rows = run(cases=a.case)
    print(common.write_rows("ncu_kernels", rows).read_text())
    return 0


def register_cli(sub, bench_sub) -> None:
    common.add_bench_command(bench_sub, "ncu", "Nsight Compute counters of the target kernels (where their time goes)",
                             __doc__, parser, cli)


def main(argv=None) -> int:
    return cli(parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
