# `make demo` and `make test` set up .venv on first use: torch pinned first (a CPU wheel is on
# the machine's disk; an unpinned torch would pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint bench bench-e2e clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

# ruff (lint and format check), configured in pyproject.toml; .ci/run runs it before the tests
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-enable

# End-to-end memory/time of a coreset step vs its alternatives -> benchmarks/results/e2e/e2e.{json,md,png}
bench-e2e: setup
	$(PY) benchmarks/e2e.py

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
