"""bench/compile_check: every compile spec of fmlm.kernels builds for sm_90a without a GPU.

Runs `python -m fmlm.bench.compile_check` in a subprocess without TRITON_INTERPRET (under the interpreter
@triton.jit yields interpreted functions, which cannot be compiled).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fmlm.bench.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def full_run() -> subprocess.CompletedProcess:
    return _run()


def test_compile_check_all_kernels(full_run):
    r = full_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in ("_logits_argmax_fwd_kernel", "_logits_argmax_reduce_kernel", "_vocab_attention_fwd_kernel",
                 "_vocab_attention_combine_kernel"):
        assert name in r.stdout, f"{name} missing from the compile table:\n{r.stdout[-3000:]}"


def test_default_configs_do_not_spill(full_run):
    """The Hopper defaults of logits_argmax and vocab_attention keep everything in registers."""
    r = full_run
    assert r.returncode == 0, r.stderr[-4000:]
    rows = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[1].startswith("_"):
            rows[cells[1]] = cells
    for name in ("_logits_argmax_fwd_kernel[bm128_bn256]", "_vocab_attention_fwd_kernel[n16]"):
        assert name in rows, r.stdout[-3000:]
        assert rows[name][3] == "0" and rows[name][4] == "0", f"{name} spills: {rows[name]}"


BAD_KERNEL = """
import sys
import triton
import triton.language as tl
from fmlm.bench import compile_check as cc

@triton.jit
def bad(x_ptr, N: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, N), tl.load(x_ptr + tl.arange(0, N)) @ 1)

spec = dict(name="bad", fn=bad, signature={"x_ptr": "*fp32", "N": "constexpr"}, constexprs={"N": 16})
try:
    cc.compile_one(spec)
except triton.compiler.errors.CompilationError:
    sys.exit(3)
"""


def test_compile_error_raises(tmp_path):
    """A kernel that cannot compile raises a CompilationError (run() turns that into exit status 1)."""
    script = tmp_path / "bad_kernel.py"       # @triton.jit needs the source in a file
    script.write_text(BAD_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]


PDL_PTX = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from fmlm.bench import compile_check as cc

def ptx(mod, name):
    spec = next(s for s in importlib.import_module(mod).compile_specs() if s["name"] == name)
    src = triton.compiler.ASTSource(spec["fn"], spec["signature"], spec["constexprs"], cc._attrs(spec))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"])).asm["ptx"]

for mod, base in (("fmlm.kernels.linear", "_linear_kernel[small,partial]"),
                  ("fmlm.kernels.adaln", "_gate_residual_adaln_kernel[res+norm+4partials]")):
    on, off = ptx(mod, base[:-1] + ",pdl]"), ptx(mod, base)
    assert "griddepcontrol.wait" in on and "griddepcontrol.launch_dependents" in on, base
    assert "griddepcontrol" not in off, base
    assert "prefetch" not in on and "prefetch" not in off, base
# the 'pdl_prefetch' option: L2 prefetches of the weights, issued before the wait (and only there)
for mod, name, plain in (("fmlm.kernels.linear", "_linear_kernel[small,partial,pdl_prefetch]",
                          "_linear_kernel[small,partial,pdl]"),
                         ("fmlm.kernels.linear", "_linear_kernel[large,gelu,pdl_prefetch]",
                          "_linear_kernel[large,gelu]"),
                         ("fmlm.kernels.logits_argmax", "_logits_argmax_fwd_kernel[bm64_bn128_w4_split_pdl_prefetch]",
                          "_logits_argmax_fwd_kernel[bm64_bn128_w4_split_pdl]")):
    pf, no = ptx(mod, name), ptx(mod, plain)
    wait = pf.index("griddepcontrol.wait")
    assert 0 < pf.find("prefetch.global.L2") < wait and pf.find("prefetch.global.L2", wait) < 0, name
    assert "prefetch" not in no, plain
print("ok")
"""


def test_pdl_variants_emit_griddepcontrol(tmp_path):
    """The 'pdl' kernel option's kernels (USE_PDL) wait on the predecessor grid and release the dependents in their
    sm_90a PTX; the default launch carries no griddepcontrol at all; with 'pdl_prefetch' the weight-reading kernels
    issue their L2 prefetches before the wait, none after it."""
    script = tmp_path / "pdl_ptx.py"
    script.write_text(PDL_PTX)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


# Kernel tests that inspect compiled sm_90a code (wgmma, pipelined or TMA copies, tanh.approx, no spills) skip
# themselves under the interpreter, which conftest turns on without a GPU: they run here, in a process with
# TRITON_INTERPRET=0, so that CPU CI runs them too.
COMPILE_ONLY_TESTS = ("tests/test_linear_cross_entropy.py::test_compile_specs_build",
                      "tests/test_interp_embed.py::test_compile_specs_build",
                      "tests/test_attention.py::test_compiles_for_sm90_without_spills",
                      "tests/test_attention.py::test_tma_kernel_compiles_to_bulk_tensor_copies_and_wgmma",
                      "tests/test_adaln.py::test_compiles_for_sm90_without_spills",
                      "tests/test_runner.py::test_randn_philox_compiles_for_sm90")


def test_compile_only_kernel_tests_run_without_the_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *COMPILE_ONLY_TESTS],
                       env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{len(COMPILE_ONLY_TESTS)} passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_csrc_kernels_compile_without_spills(full_run):
    """Where nvcc is present, the compile table also holds the csrc/ CUDA kernels (nvcc for sm_90a), with
    registers, no spills, and their dynamic shared memory counted (above the 48 KiB a launch gets by default)."""
    from fmlm.kernels import _cuda

    if _cuda.find_nvcc() is None:
        pytest.skip("no nvcc")
    rows = {}
    for line in full_run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].startswith("csrc/"):
            rows[cells[1]] = cells
    assert set(rows) == set(_cuda.KERNELS), full_run.stdout[-3000:]
    for name, cells in rows.items():
        assert 0 < int(cells[2]) <= 255 and cells[3] == "0" and cells[4] == "0", cells
        assert 48 * 1024 < int(cells[5]) <= 232448, cells
