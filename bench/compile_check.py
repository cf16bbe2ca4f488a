"""Compile every Triton kernel of fmlm.kernels and every csrc/ CUDA kernel for sm_90a without a GPU; print
registers, shared memory, spills.

Each module of fmlm.kernels may define `compile_specs() -> list[dict]`, one dict per kernel config:
    name (str), fn (the @triton.jit kernel), signature (dict arg → "*bf16" / "i32" / "fp32" / "constexpr"),
    constexprs (dict), num_warps, num_stages; optional: divisible_by_16 (arg names whose runtime values
    are multiples of 16: the JIT specializes on that, and it decides vectorized and pipelined loads;
    default: every pointer argument, as torch allocations are aligned) or attrs (raw ASTSource attrs).
Registers and spills come from `ptxas -v` on the generated PTX (the same ptxas Triton ships), shared memory
from Triton's metadata; the csrc/ .cu files go through nvcc (cuda_rows). Exit status 1 on any compile error or a
shared-memory need above the device limit (such a kernel compiles but fails at launch).
Usage: `python -m fmlm.bench.compile_check [-k substr]`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_ARCH = 90
# Opt-in dynamic shared memory per block (bytes): a kernel above it compiles but cannot launch.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def discover(pattern: str = "") -> list[tuple[str, dict]]:
    """(module name, spec) for every compile spec in fmlm.kernels whose 'module.name' contains pattern."""
    import fmlm.kernels as pkg

    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        fn = getattr(mod, "compile_specs", None)
        if not callable(fn):
            continue
        for spec in fn():
            if pattern in f"{info.name}.{spec['name']}":
                out.append((info.name, spec))
    return out


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton ships (the accessor moved between Triton releases)."""
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):
        try:
            return nv.get_ptxas(arch).path
        except TypeError:
            return nv.get_ptxas().path
    return nv._path_to_binary("ptxas")[0]


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from `ptxas -v` (Triton's ptxas), parsed from its info lines."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    return {"registers": int(regs[-1]) if regs else -1,
            "spill_stores": int(stores[-1]) if stores else 0,
            "spill_loads": int(loads[-1]) if loads else 0}


def _attrs(spec: dict) -> dict:
    if "attrs" in spec:
        return spec["attrs"]
    sig = spec["signature"]
    names = spec.get("divisible_by_16")
    if names is None:
        names = [n for n, t in sig.items() if t.startswith("*")]
    order = list(sig)
    return {(order.index(n),): [["tt.divisibility", 16]] for n in names}


def compile_one(spec: dict, arch: int = TARGET_ARCH) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    src = triton.compiler.ASTSource(spec["fn"], spec["signature"], spec.get("constexprs", {}), _attrs(spec))
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    if spec.get("maxnreg"):
        options["maxnreg"] = spec["maxnreg"]
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    usage = _ptxas_usage(k.asm["ptx"], arch)
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and k.metadata.shared > limit:
        raise RuntimeError(f"needs {k.metadata.shared} B of shared memory, sm_{arch} allows {limit}: cannot launch")
    return {"kernel": spec["name"], **usage, "shared_bytes": int(k.metadata.shared),
            "num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3),
            "compile_s": time.perf_counter() - t0}


def _compile_indexed(mod: str, index: int, arch: int) -> dict:
    """Worker: compile spec number `index` of fmlm.kernels.<mod> (kernels are not picklable; indices are)."""
    spec = importlib.import_module(f"fmlm.kernels.{mod}").compile_specs()[index]
    return {"module": mod, **compile_one(spec, arch)}


def run(pattern: str = "", arch: int = TARGET_ARCH, jobs: int = 1) -> tuple[list[dict], list[str]]:
    """Compile every matching spec; `jobs` > 1 spreads them over worker processes (specs are independent)."""
    keyed = [(mod, spec, _spec_index(mod, spec)) for mod, spec in discover(pattern)]
    rows, errors = [], []

    def record(mod, spec, result):
        try:
            rows.append(result())
        except Exception as e:  # report every failing kernel, not only the first
            errors.append(f"{mod}.{spec['name']}: {type(e).__name__}: {str(e).strip()[:2000]}")

    if jobs <= 1 or len(keyed) <= 1:
        for mod, spec, _ in keyed:
            record(mod, spec, lambda mod=mod, spec=spec: {"module": mod, **compile_one(spec, arch)})
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child would inherit the parent's Triton/MLIR state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = [(mod, spec, pool.submit(_compile_indexed, mod, i, arch)) for mod, spec, i in keyed]
            for mod, spec, fut in futs:
                record(mod, spec, fut.result)
    return rows, errors


def cuda_rows(pattern: str = "", arch: int = TARGET_ARCH) -> tuple[list[dict], list[str]]:
    """The csrc/ CUDA C++ kernels, compiled by nvcc for sm_{arch}a (DESIGN.md §5 tier 3): registers and spills from
    `ptxas -v`, shared memory = ptxas's static bytes + the dynamic bytes the launcher asks for (read from the
    library's ABI, which loads without a GPU). No rows and a note when nvcc is missing."""
    from fmlm.kernels import _cuda

    if not any(pattern in f"csrc.{k}" for k in _cuda.KERNELS):
        return [], []
    if _cuda.find_nvcc() is None:
        print("note: no nvcc (PATH, FMLM_NVCC, CUDA_HOME): the csrc/ CUDA kernels were not compiled")
        return [], []
    rows, errors = [], []
    try:
        t0 = time.perf_counter()
        report = [r for r in _cuda.ptxas_report(f"{arch}a") if pattern in f"csrc.{r['name']}"]
        dynamic = _cuda.library(str(arch)).fmlm_logits_argmax_smem_bytes() if report else 0
        secs = (time.perf_counter() - t0) / max(1, len(report))
    except Exception as e:
        return [], [f"csrc: {type(e).__name__}: {str(e).strip()[:2000]}"]
    limit = SMEM_LIMIT.get(arch)
    for r in report:
        shared = r["static_smem"] + (dynamic if r["name"].startswith("logits_argmax_kernel") else 0)
        if limit is not None and shared > limit:
            errors.append(f"csrc.{r['name']}: needs {shared} B of shared memory, sm_{arch} allows {limit}")
        rows.append({"module": f"csrc/{r['source']}", "kernel": r["name"], "registers": r["registers"],
                     "spill_stores": r["spill_stores"], "spill_loads": r["spill_loads"], "shared_bytes": shared,
                     "num_warps": 8, "num_stages": 3, "compile_s": secs})
    return rows, errors


def _spec_index(mod: str, spec: dict) -> int:
    specs = importlib.import_module(f"fmlm.kernels.{mod}").compile_specs()
    return [s["name"] for s in specs].index(spec["name"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", "--pattern", default="", help="only specs whose 'module.name' contains this")
    ap.add_argument("--arch", type=int, default=TARGET_ARCH, help="compute capability, e.g. 90")
    ap.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes (default: CPU count, at most 8)")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("triton") is None:
        print("compile_check: triton is not installed; nothing to compile")
        return 0
    from fmlm.bench.common import markdown_table

    rows, errors = run(args.pattern, args.arch, args.jobs)
    more_rows, more_errors = cuda_rows(args.pattern, args.arch)
    rows, errors = rows + more_rows, errors + more_errors
    keys = ["module", "kernel", "registers", "spill_stores", "spill_loads", "shared_bytes", "num_warps",
            "num_stages", "compile_s"]
    print(markdown_table(rows, keys) if rows else "no compile specs found")
    for err in errors:
        print("COMPILE ERROR", err, file=sys.stderr)
    spills = [r["kernel"] for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spills:
        print(f"note: {len(spills)} kernel config(s) spill registers: {', '.join(spills)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
