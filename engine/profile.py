"""`fmlm profile sample`: one sampler run under torch.profiler → a Chrome trace and a per-kernel time table.

    fmlm profile sample --preset owt --batch-size 32 --steps 1 --out prof/
    fmlm profile sample --checkpoint fmlm_owt.ckpt --no-graph       # eager: NVTX/record_function ranges
                                                                     # (embed, step k, block i, head) in the trace

With graphs (the default, what `Sampler` runs) the trace shows each replay's kernels; with --no-graph it
also shows the ranges around embed, every block, the head and every sampler step (NVTX ranges as well, for
Nsight Systems: `nsys profile fmlm profile sample ...`).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

# The released "small" backbone (DESIGN.md §1) at the two datasets' shapes.
PRESETS = {
    "owt": dict(vocab_size=50258, seq_len=1024),
    "lm1b": dict(vocab_size=30522, seq_len=128),
    "tiny": dict(vocab_size=257, seq_len=16, hidden=64, n_blocks=2, n_heads=2, cond_dim=32),
}
SMALL = dict(hidden=768, n_blocks=12, n_heads=12, cond_dim=128, two_time=True)


def build_model(checkpoint=None, preset: str = "owt", device="cpu", seed: int = 0):
    """A checkpoint's model, or the released small FMLM at a preset's shape with random never-zero weights."""
    import fmlm

    if checkpoint:
        return fmlm.load_checkpoint(checkpoint, device=device).eval()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    model = fmlm.FlowLM(fmlm.ModelConfig(**{**SMALL, **PRESETS[preset]}), init="random")
    model.reset_parameters(seed=seed)
    return model.to(device).eval()


def exclusive_us(intervals) -> list[float]:
    """Each (start, end) interval's device time not already covered by an interval that started before it. With
    programmatic dependent launch a kernel starts before its predecessor ends and waits in griddepcontrol.wait:
    its full duration would count that wait (and the predecessor's tail) as its own. The credits sum to busy_us."""
    order = sorted(range(len(intervals)), key=lambda i: intervals[i][0])
    out, reach = [0.0] * len(intervals), float("-inf")
    for i in order:
        a, b = intervals[i]
        out[i] = max(0.0, b - max(a, reach))
        reach = max(reach, b)
    return out


def kernel_table(prof, top: int = 40) -> list[dict]:
    """Per kernel name: calls, total and mean device time, share of all device time (CPU-only runs: the
    self CPU time of each op instead). Device time is exclusive (exclusive_us): overlapping kernels (PDL) are not
    counted twice, and the shares sum to 100 % of the busy time."""
    events = prof.events()
    # device activity only: kernels, memcpy/memset; not the GPU-side copies of our record_function ranges
    dev = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU
           and not getattr(e, "is_user_annotation", False)]
    agg = collections.defaultdict(lambda: [0, 0.0])
    if dev:
        credit = exclusive_us([(e.time_range.start, e.time_range.end) for e in dev])
        for e, t in zip(dev, credit):
            a = agg[e.name]
            a[0] += 1
            a[1] += t
        unit = "device"
    else:
        for e in prof.key_averages():
            agg[e.key] = [e.count, e.self_cpu_time_total]
        unit = "cpu self"
    total = sum(v[1] for v in agg.values()) or 1.0
    rows = [{"kernel": (k[:90] + "…") if len(k) > 91 else k, "calls": n, f"{unit} total µs": t,
             "mean µs": t / max(n, 1), "%": 100.0 * t / total}
            for k, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
    return rows[:top]


def profile_run(sampler, iters: int = 3, seed: int = 0):
    """Run sampler.sample `iters` times under torch.profiler (after two unprofiled runs: JIT, capture,
    allocator) → (the profiler, device busy µs per call (busy_us of every kernel, memset and copy) or None
    without device activity)."""
    from fmlm.engine import nvtx

    cuda = sampler.device.type == "cuda"
    sampler.warmup()
    for _ in range(2):
        sampler.sample(seed)
    if cuda:
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof, nvtx.record_functions():
        for i in range(iters):
            with nvtx.range(f"sample{i}"):
                sampler.sample(seed + i)
        if cuda:
            torch.cuda.synchronize()
    dev = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU
           and not getattr(e, "is_user_annotation", False)]
    per_call = busy_us((e.time_range.start, e.time_range.end) for e in dev) / iters if dev else None
    return prof, per_call


def busy_us(intervals) -> float:
    """Length of the union of (start, end) intervals: the device's busy time. Not the sum of the kernels'
    durations: with programmatic dependent launch a kernel starts before its predecessor ends and waits in
    griddepcontrol.wait, so summed durations count the overlap twice (and the replay's gaps would come out
    too small, even negative)."""
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur is not None else 0.0)


def profile_sample(args) -> int:
    from fmlm.bench.common import markdown_table
    from fmlm.engine.commands import _device
    from fmlm.engine.runner import Sampler

    device = _device(args.device)          # --device cuda without CUDA: a one-line error, not a traceback
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # checked before the run: mkdir failed only after it ("File exists")
        raise ValueError(f"--out {args.out}: exists and is not a directory (the trace and table go into a directory)")
    model = build_model(args.checkpoint, args.preset, device, args.seed)
    method = args.method or ("fmlm" if model.cfg.two_time else "flm")
    sampler = Sampler(model, args.batch_size, args.steps, method, args.renoise, graph=not args.no_graph,
                      kernel_options=args.kernel_options)
    prof, _ = profile_run(sampler, args.iters, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    rows = kernel_table(prof, args.top)
    table = markdown_table(rows)
    head = (f"# fmlm profile sample: {sampler!r}\n\n{args.iters} run(s) of B={args.batch_size}, "
            f"L={model.cfg.seq_len}, V={model.cfg.vocab_size} on {device}\n\n")
    (out / "kernels.md").write_text(head + table)
    print(head + table)
    print(f"wrote {trace} (open in chrome://tracing or ui.perfetto.dev) and {out / 'kernels.md'}", file=sys.stderr)
    return 0


def json_object(text: str) -> dict:
    """argparse type: a JSON object (a clear error for anything else)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"pdl\": true}}', got {text!r}")
    return value


def parser(ap=None):
    from .commands import _positive_int  # noqa: PLC0415
    ap = ap or argparse.ArgumentParser(prog="fmlm profile sample", description=__doc__)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint (default: random weights at --preset's shape)")
    ap.add_argument("--preset", default="owt", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=_positive_int, default=8)
    ap.add_argument("--steps", type=_positive_int, default=1)
    ap.add_argument("--method", choices=("flm", "fmlm"), default=None)
    ap.add_argument("--renoise", type=float, default=0.0)
    ap.add_argument("--no-graph", action="store_true", help="run eagerly (shows the per-block ranges)")
    ap.add_argument("--kernel-options", type=json_object, default=None, metavar="JSON",
                    help="opt-in kernel variants (Sampler kernel_options, the candidates `fmlm bench e2e` times), "
                         """e.g. '{"gemm_impl": "triton_small", "pdl": true}'""")
    ap.add_argument("--iters", type=_positive_int, default=3)
    ap.add_argument("--top", type=_positive_int, default=40, help="rows of the kernel table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="profile_out")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def register_cli(sub, bench_sub) -> None:
    p = sub.add_parser("profile", help="profile a sampler run (Chrome trace + kernel table)")
    psub = p.add_subparsers(dest="profile_command", metavar="WHAT")
    p.set_defaults(func=lambda a: p.print_help() or 2)
    s = psub.add_parser("sample", help="torch.profiler around Sampler.sample", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser(s)
    s.set_defaults(func=profile_sample)
