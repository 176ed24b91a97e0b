# The README's commands. `make test` and `make demo` each build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU machines install the CPU build of torch first; anything else would pull a multi-GB CUDA build.
# PyPI's torch wheel for Linux is that CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu takes
# the CPU one from PyTorch's index. Empty (the default) installs from pip's configured index or wheelhouse.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# pytest-xdist workers of `make test`, each running whole test files (the suite's torchrun tests start
# 2-4 processes of their own, so more workers than cores only queue them).
TEST_WORKERS ?= 2

.PHONY: setup test test-durations lint demo bench aot gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet torch; \
		else $(PIP) install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)" )"$(TORCH_SPEC)"; fi; \
	fi
	$(PIP) install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --timeout=600 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Measure the seconds of each test file (tests/file_durations.json), the order `make test` queues them in.
test-durations: setup
	$(PY) -m pytest -q --timeout=600 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests \
		--junitxml=.test-durations.xml
	$(PY) -m tests.file_durations .test-durations.xml

# Train the tiny preset on the Python standard library's own sources (a few minutes on 2 CPU cores),
# then serve it, stream one completion and keep serving until Ctrl-C.
DEMO_DIR ?= runs/demo
demo: setup
	$(PY) -m retnet.train --config tiny --train.output_dir=$(DEMO_DIR)
	$(PY) -m retnet.serve.demo --model $(DEMO_DIR)/export

bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/inplace_decode.py
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/lora.py
	$(PY) benchmarks/speculative.py
	$(PY) benchmarks/assisted.py --out benchmarks/results/assisted-cpu.json
	$(PY) benchmarks/pooling.py
	$(PY) benchmarks/loss.py
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/distill_draft.py
	$(PY) benchmarks/context_parallel.py
	$(PY) benchmarks/tensor_parallel.py

# Compile every kernel launch and autotune config for sm_90, sm_89 and sm_80 through Triton and ptxas: registers,
# spills, shared memory, tensor-core path. Needs no GPU (~12 minutes on 2 cores).
aot: setup
	$(PY) -m retnet.kernels.aot --arch 90 89 80 --head-dims 64 128 256 --layouts packed --json benchmarks/results/aot-compile.json

# The GPU machine reaches no package index: flash-linear-attention (the kernel benchmark's baseline) travels
# there as pure-Python wheels in benchmarks/wheels (git-ignored; `run` carries it), which gpu_check.sh unpacks.
# The pinned release is the one whose chunk_retention the benchmark's setup was checked against.
FLA_WHEELS ?= flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2
gpu-wheels: setup
	$(PIP) download --quiet --no-deps --only-binary=:all: --dest benchmarks/wheels $(FLA_WHEELS)

# Only the demo's run: runs/ also holds the models of the README's own walkthrough (runs/mine, runs/base ...).
clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache .test-durations.xml
