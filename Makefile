# Two commands on a fresh machine: `make test` and `make bench`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := $(VENV)/.package-built
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test bench lint clean

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

lint: venv
	$(PY) -m ruff check dense_ext python_models tests bench

clean:
	rm -rf build *.egg-info dense_ext/*.so $(BUILD_STAMP)
