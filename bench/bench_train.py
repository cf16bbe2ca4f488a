"""One FLM training step (loss forward + backward) of the released small model at the OWT shape, the published
path beside the engine's, one process, bf16 autocast on CUDA (as the training loop): `python -m fmlm.bench.bench_train`
(gpu-check's bench_train; `fmlm bench train` is the small CPU-sized comparison in engine/train.py) at DESIGN.md §3's
baseline point (B=16, L=1024, V=50258, hidden 768, 12 blocks; there: 149 ms, 110k tok/s, 28.1 GB
peak for the published code on an H100).

reference path: V-space noise, one-hot, dense x·E, materialized logits + log_softmax (kernels/reference.py);
engine path: interp_embed (hidden-space noise ξ·C) and linear_cross_entropy (logits recomputed tile by tile),
the same reference trunk (the fast trunk is inference-only). Columns: ms (median, p20, p80), tok/s, peak MiB
above the weights, memory ratio.
"""
from __future__ import annotations

import sys

import torch

from fmlm.bench.common import markdown_table, write_rows

DEVICE = "cuda"          # the CPU smoke test sets "cpu" with SHAPE shrunk
SHAPE = dict(vocab=50258, seq_len=1024, batch=16, hidden=768, blocks=12, heads=12, cond_dim=128)


def run(quick: bool = False) -> list[dict]:
    from fmlm.engine.train import bench_train

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_train: needs CUDA, skipped", file=sys.stderr)
        return []
    rows = bench_train(**SHAPE, device=DEVICE, iters=3 if quick else 10)
    ref = rows[0]
    for r in rows[1:]:
        r["speedup_vs_ref"] = ref["ms"] / r["ms"]
    return rows


def main() -> None:
    rows = run()
    if rows:
        print(markdown_table(rows))
        write_rows("bench_train", rows)


if __name__ == "__main__":
    main()
