# Two commands on a fresh machine: `make test` and `make bench`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := $(VENV)/.package-built
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test test-gpu-image bench bench-scale bench-sync-bn bench-micro gpu-suite lint typecheck format clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(STAMP) setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

# One pytest-xdist worker per core (tests/conftest.py: one torch thread per worker, two for
# the C++ ops' tests); worksteal balances the minute-long compile tests across the workers.
test: build lint typecheck
	$(PY) -m pytest -q -n auto --dist worksteal tests

# Naive vs efficient on this machine (CPU when there is no GPU), then the step times that
# differ by a few percent again in paired rounds (bench/paired.py: the fastest naive peers
# against the efficient models; bench/compile_vs_eager.py: compiled vs eager): bench/README.md.
PAIRED_PEERS = naive-channels_last,naive-compile,efficient-cpp-min,efficient-cpp-bottleneck
bench: build
	$(PY) -m bench.run
	$(PY) -m bench.paired --model densenet_bc_100 --batch 16 --rounds 30 \
		--variants $(PAIRED_PEERS) --out bench/results
	$(PY) -m bench.paired --model densenet121 --batch 4 --rounds 20 \
		--variants $(PAIRED_PEERS) --out bench/results
	$(PY) -m bench.compile_vs_eager --steps 60 --out bench/results

# DenseNet-BC-1000 at batch 64 (one measured step), naive estimated, and the deepest
# DenseNet-BC whose activations fit 4 GiB; estimated 6-10 minutes on a quiet 2-core CPU
# (bench/README.md).
bench-scale: build
	$(PY) -m bench.run --suites scale

# Activation memory per process of a 2-process DDP run with sync BN against one process
# (about 3 minutes on the 2-core CPU; bench/README.md, "Sync BN").
bench-sync-bn: build
	$(PY) -m bench.sync_bn

# pytest-benchmark microbenchmarks of one block forward+backward per backend.
bench-micro: build
	$(PY) -m pytest bench/ --benchmark-only

# On a GPU machine without network: builds in place against the installed torch, runs the
# CUDA and compiled-Triton tests, a profile and the benchmarks into $(DIR); STEPS picks steps,
# PACK packs $(DIR) there (bench/README.md, "GPU suite": which steps in which call).
DIR ?= bench/scratch/gpu-suite
STEPS ?= env,build,backends,tests,profile,bench-main,bench-imagenet,bench-depth,bench-scale,micro,roofline,merge
gpu-suite:
	bash bench/gpu_suite.sh $(DIR) $(STEPS) $(PACK)

# The Triton backend against the GPU image's torch 2.11.0 + triton 3.6.0 on this machine (a
# throwaway venv from PyPI, ~3 GB download, ~15 min): AOT compile check + interpreter tests.
test-gpu-image:
	bash tools/triton_gpu_image_check.sh

PY_SOURCES := dense_ext python_models tests bench setup.py
C_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

# Style checks (ruff lint + format, clang-format for csrc); `make format` rewrites in place.
lint: venv
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(C_SOURCES)

# Static types of the package (config: [tool.mypy] in pyproject.toml).
typecheck: venv
	$(PY) -m mypy

format: venv
	$(PY) -m ruff format $(PY_SOURCES)
	$(PY) -m ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(C_SOURCES)

clean:
	rm -rf build *.egg-info dense_ext/*.so $(BUILD_STAMP)
