# The few commands people run. `make bench` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pool tests benchmarks scripts noxfile.py

.PHONY: bench bench-full bench-scaling bench-requests bench-serving bench-quick test lint typecheck pythons format models clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

models: $(STAMP)
	$(PY) -m pool.reference_models

# The answer in a few minutes (docs/benchmarks.md): core scaling on MobileNetV2 alone, 2 rounds,
# then concurrent requests on the text model and the small CNN at 1 and 16 clients, one repeat
# of 3 s windows. Every target these carry is printed; results go to benchmarks/results/short/.
SHORT := benchmarks/results/short
bench: $(STAMP) models
	$(PY) benchmarks/core_scaling.py --workload image --rounds 2 --load-per-call-requests 2 \
		--output-dir $(SHORT)
	$(PY) benchmarks/concurrent_requests.py --workloads text_embedding,small_cnn --clients 1,16 \
		--repeats 1 --seconds 3 --warmup-seconds 0.5 --output-dir $(SHORT)

# The full runs behind docs/benchmarks.md, about 25 minutes on 2 cores: core scaling (~12 min),
# then concurrent requests (~13 min); results go to benchmarks/results/.
bench-full: bench-scaling bench-requests

bench-scaling: $(STAMP) models
	$(PY) benchmarks/core_scaling.py

bench-requests: $(STAMP) models
	$(PY) benchmarks/concurrent_requests.py

# python -m pool serve against the same HTTP stack serving a global model (docs/serving.md).
bench-serving: $(STAMP) models
	$(PY) benchmarks/serving.py

bench-quick: $(STAMP) models
	$(PY) benchmarks/core_scaling.py --quick
	$(PY) benchmarks/concurrent_requests.py --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

format: $(STAMP)
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The oldest and newest supported Pythons (noxfile.py): build the wheel, install it alone in a
# fresh venv, smoke-test it there (scripts/smoke_wheel.py), then run the quick test subset.
pythons: $(STAMP)
	$(VENV)/bin/nox --sessions wheel

# Lint, types, the whole suite on this Python, then the wheel on the other supported Pythons.
test: lint typecheck
	$(PY) -m pytest
	$(MAKE) pythons

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .nox
