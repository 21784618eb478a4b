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

# The answer in a few minutes (docs/benchmarks.md): core scaling on MobileNetV2 alone, 1 round,
# with PredictionPool(runtime="auto") at 2 workers beside the TensorFlow pool, then concurrent
# requests on the text model and the small CNN at 1 and 16 clients, one repeat of 3 s windows.
# Every target these carry is printed; results go to benchmarks/results/short/.
SHORT := benchmarks/results/short
bench: $(STAMP) models
	@echo "make bench: runtime='auto' converts MobileNetV2 once before anything is timed" \
		"(30-60 s the first time; cached in \$$POOL_RUNTIME_CACHE or ~/.cache/pool/runtimes)"
	$(PY) benchmarks/core_scaling.py --workload image --rounds 1 --load-per-call-requests 2 \
		--runtimes auto --runtime-workers 2 --runtime-baselines none --output-dir $(SHORT)
	$(PY) benchmarks/concurrent_requests.py --workloads text_embedding,small_cnn --clients 1,16 \
		--repeats 1 --seconds 3 --warmup-seconds 0.5 --auto none --output-dir $(SHORT)

# The full runs behind docs/benchmarks.md: core scaling (every workload, every worker count,
# the TensorFlow baselines and every installed runtime with its ceiling and best single
# process), then concurrent requests (with runtime="auto" on the image models); results go to
# benchmarks/results/. Converting each model for each runtime happens once, before timing.
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
