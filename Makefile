# Two commands on a fresh machine: `make test` and `make bench`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := $(VENV)/.package-built
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test bench bench-micro gpu-suite lint clean

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

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) bench/run.py

# pytest-benchmark microbenchmarks of one block forward+backward per backend.
bench-micro: build
	$(PY) -m pytest bench/ --benchmark-only

# On a GPU machine without network: builds in place against the installed torch, runs the
# CUDA and compiled-Triton tests and the benchmarks into $(OUT) (see bench/gpu_suite.sh).
gpu-suite:
	bash bench/gpu_suite.sh $(OUT)

lint: venv
	$(PY) -m ruff check dense_ext python_models tests bench

clean:
	rm -rf build *.egg-info dense_ext/*.so $(BUILD_STAMP)
