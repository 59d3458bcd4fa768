# Every target installs what it needs into .venv first, so a fresh clone
# needs nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m batchexec serve

# On every core (pytest-xdist), each worker taking the next test as it finishes one;
# `.venv/bin/python -m pytest tests/test_x.py` runs some of them in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist worksteal

# The web page's linters (package.json) need npm; CI has it, and a machine without it
# says so and lints the Python alone.
NODE_STAMP := node_modules/.installed
ifneq ($(shell command -v npm 2>/dev/null),)
PAGE_LINT := lint-page
else
PAGE_LINT := lint-page-skipped
endif

lint: $(STAMP) $(PAGE_LINT)
	$(BIN)/ruff check batchexec tests
	$(BIN)/ruff format --check batchexec tests

$(NODE_STAMP): package-lock.json
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

.PHONY: lint-page lint-page-skipped
lint-page: $(NODE_STAMP)
	npx eslint batchexec/web/static
	npx stylelint "batchexec/web/static/*.css"

lint-page-skipped:
	@echo "Front-end lint skipped: npm is not on this machine (it lints batchexec/web/static)."

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

format: $(STAMP)
	$(BIN)/ruff format batchexec tests
	$(BIN)/ruff check --fix batchexec tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Benchmarks (BENCHMARKS.md): not tests, not run in CI. BENCH_RUNS=5 for more runs a figure.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

.PHONY: bench hostile stress stress-cluster cluster
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks

# The hardening issue's defects replayed against a real server, with peak RSS and /health latency.
hostile: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.hostile

# SIGKILLs of a real server during batches: rows lost (must be 0) and calls sent twice.
stress: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.stress

# The same for replicas on PostgreSQL: kill -9 of a replica, a database restart, shared limits.
stress-cluster: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.cluster_stress

# Three replicas on one PostgreSQL database (the local `test` unless DATABASE_URL says).
cluster: $(STAMP)
	$(BIN)/python tools/cluster.py
