"""Shared Triton helper: L2 prefetch of a kernel's weight rows before its programmatic-dependent-launch wait.

Why (napkin, H100, not yet measured): at batch 1 the trunk's kernels are short (LM1B B=1, run5 profile: 48
Triton GEMMs of ~5 µs each, 4.9 µs on average, against ~1.2 µs to stream their 1.2–4.7 MB of weights at
HBM rate); with programmatic dependent launch (_backend.pdl_launches) a kernel's programs are resident and
waiting (griddepcontrol.wait) while their predecessor runs, and the weights they will read do not depend on that
predecessor. `prefetch.global.L2` of those lines before the wait moves the weights' DRAM latency and transfer
under the predecessor's run; after the wait the GEMM's loads hit L2. A hint only: it changes no value and
faults on no address (PTX ISA: prefetch), so results are bit-identical with and without it.
"""
from __future__ import annotations

from ._backend import triton_available

L2_LINE_BYTES = 128

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_rows_l2(base, rows, row_ok, stride, k_start, k_end, k_step):
        """Issue prefetch.global.L2 for the line of base[r, k] for each r of `rows` (those not row_ok read row 0:
        a hint needs no mask, only an address inside the tensor) and k in range(k_start, k_end, k_step); the
        caller steps k by one L2 line of elements (L2_LINE_BYTES / element size) times the number of programs
        that share the rows, so each line is asked for once. CUDA only (inline PTX): never under the interpreter
        (the callers prefetch only under USE_PDL, which the interpreter never sets)."""
        r = base + tl.where(row_ok, rows, 0).to(tl.int64) * stride
        for k in range(k_start, k_end, k_step):
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [r + k],
                                      dtype=tl.int32, is_pure=False, pack=1)
