"""The CUDA C++ kernels of csrc/ behind their C ABI: built with nvcc on first use, loaded with ctypes.

DESIGN.md §4: the .cu bodies are torch-free (raw pointers, strides, a stream) and export plain C functions, so a
C/C++ stack can link them as they are; this module is the only torch-aware layer. The build is one `nvcc -shared`
per (sources, target, nvcc version), cached under $FMLM_CUDA_CACHE (default ~/.cache/fmlm/csrc) and written
atomically (a temporary name, then a rename), so parallel test workers share it. The CUDA runtime is linked
statically: the library loads on a machine without a GPU (its calls then return the driver error), which is how
the CPU tests check the ABI. nvcc is $FMLM_NVCC, else the one on PATH, else $CUDA_HOME/bin/nvcc.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ABI_VERSION = 1
SOURCES = ("logits_argmax.cu",)
HEADER = "fmlm_csrc.h"        # the C ABI's declarations (the sources include it)
KERNELS = ("logits_argmax_kernel<__half>", "logits_argmax_kernel<__nv_bfloat16>")   # as ptxas_report names them


class CudaBuildError(RuntimeError):
    """nvcc is missing or failed on csrc/."""


def source_dir() -> Path:
    """csrc/: the installed package's copy (fmlm.csrc), else the repository's."""
    try:
        from importlib.resources import files
        d = Path(str(files("fmlm.csrc")))
        if (d / SOURCES[0]).exists():
            return d
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "csrc"


def find_nvcc() -> Optional[str]:
    for cand in (os.environ.get("FMLM_NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def gencode(arch: str) -> list[str]:
    """nvcc target flags for arch "90", "90a", "80", ...: machine code for it, and its PTX for later GPUs."""
    base = arch.rstrip("a")
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-gencode=arch=compute_{base},code=compute_{base}"]


def build_flags(arch: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", *gencode(arch)]


def cache_dir() -> Path:
    return Path(os.environ.get("FMLM_CUDA_CACHE") or Path.home() / ".cache" / "fmlm" / "csrc")


@functools.lru_cache(maxsize=4)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout


def build(arch: str, quiet: bool = False) -> tuple[Path, str]:
    """Build (or find in the cache) the shared library of every csrc/ source for `arch`; returns its path and
    nvcc's `-Xptxas -v` log ("" on a cache hit)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("backend='cuda' builds csrc/ with nvcc on first use, and no nvcc was found: put it on "
                             "PATH or set FMLM_NVCC or CUDA_HOME")
    srcs = [source_dir() / s for s in SOURCES]
    flags = build_flags(arch)
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in (*srcs, source_dir() / HEADER)), " ".join(flags).encode(),
                 _nvcc_version(nvcc).encode()):
        key.update(part)
    out = cache_dir() / f"libfmlm_csrc_sm{arch}_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out, ""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fmlm: building {', '.join(SOURCES)} for sm_{arch} with {nvcc} (first use; cached in {out.parent})",
              file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([nvcc, *flags, "-o", tmp, *map(str, srcs)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise CudaBuildError(f"nvcc failed on csrc/ (exit {r.returncode}):\n{r.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out, r.stderr


def ptxas_report(arch: str) -> list[dict]:
    """Compile csrc/ for `arch` (e.g. "90a") to a throwaway cubin and return, per kernel, what `ptxas -v` says:
    name (demangled), registers, spill_stores, spill_loads, static_smem (bytes), stack (bytes)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("no nvcc found (PATH, FMLM_NVCC, CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for src in SOURCES:
            cmd = [nvcc, "-O3", "-std=c++17", "-cubin", "-Xptxas", "-v",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", os.path.join(tmp, "k.cubin"),
                   str(source_dir() / src)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise CudaBuildError(f"nvcc failed on {src} (exit {r.returncode}):\n{r.stderr[-4000:]}")
            rows += [dict(row, source=src) for row in _parse_ptxas(r.stderr)]
    return rows


def _parse_ptxas(log: str) -> list[dict]:
    import re
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = {"name": _demangle(m.group(1)), "registers": 0, "spill_stores": 0, "spill_loads": 0,
                   "static_smem": 0, "stack": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["static_smem"] = int(m.group(1))
    return rows


def _demangle(name: str) -> str:
    """`logits_argmax_kernel<__nv_bfloat16>` from the mangled name (c++filt when present)."""
    tool = shutil.which("c++filt")
    if tool:
        out = subprocess.run([tool, name], capture_output=True, text=True, check=False).stdout.strip()
        # "void (anonymous namespace)::logits_argmax_kernel<__nv_bfloat16>((anonymous namespace)::Params)"
        out = out.replace("(anonymous namespace)::", "")
        if "(" in out:
            return out.split("(")[0].split(" ")[-1]
    return name


_I, _P, _LL = ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong
_ARGTYPES = {       # as declared in csrc/fmlm_csrc.h
    "fmlm_abi_version": ([], _I),
    "fmlm_error_string": ([_I], ctypes.c_char_p),
    "fmlm_logits_argmax_default_splits": ([_I, _I, _I], _I),
    "fmlm_logits_argmax_rows_per_block": ([], _I),
    "fmlm_logits_argmax_smem_bytes": ([], _I),
    # dtype, h, ldh, w, ldw, bias, bias_dtype, M, n_valid, D, splits, part_val, part_idx, counters, out, flags,
    # device, stream
    "fmlm_logits_argmax": ([_I, _P, _LL, _P, _LL, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _I, _P], _I),
}


@functools.lru_cache(maxsize=4)
def library(arch: str) -> ctypes.CDLL:
    """The loaded csrc/ library for `arch` (built on first use), its functions typed."""
    path, _ = build(arch)
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _ARGTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.fmlm_abi_version() != ABI_VERSION:
        raise CudaBuildError(f"{path}: ABI version {lib.fmlm_abi_version()}, this module expects {ABI_VERSION}")
    return lib


def error_string(lib: ctypes.CDLL, code: int) -> str:
    return lib.fmlm_error_string(code).decode()


def device_arch(device) -> str:
    """"90" for an H100 (plain sm_90: the kernels use no sm_90a-only instruction), "80" for an A100, ..."""
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"
