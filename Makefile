# The few commands people run. `make bench` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench bench-quick test lint format models clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

models: $(STAMP)
	$(PY) -m pool.reference_models

bench: $(STAMP) models
	$(PY) benchmarks/core_scaling.py

bench-quick: $(STAMP) models
	$(PY) benchmarks/core_scaling.py --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check pool tests benchmarks
	$(VENV)/bin/ruff format --check pool tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format pool tests benchmarks
	$(VENV)/bin/ruff check --fix pool tests benchmarks

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
