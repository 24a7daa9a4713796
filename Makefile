# Every entry point calls these targets; CI calls `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Parallel test processes (pytest-xdist); 0 runs everything in one process.
TEST_WORKERS ?= 4
# The serial part: 0 runs its tests one after another; 2 runs its two queues side by
# side (tests/conftest.py), one test at a time in each: faster, but on a 2-core machine
# under heavy load (load average ~20) the Sentinel failover and the bench report test
# missed their deadlines that way, so it is not the default.
SERIAL_WORKERS ?= 0
# Compiled bytecode is kept (it is git-ignored): with PYTHONDONTWRITEBYTECODE set, as
# some shells do, every test process and every `sluice` subprocess compiles the
# project (and pytest rewrites every test module) again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test test-fast lint format bench docs install clean

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Start everything locally: web chat on http://127.0.0.1:8080
run: $(STAMP)
	$(BIN)/sluice dev

## The whole test suite (real Redis, SQLite, Postgres, headless Chromium)
## TEST_MARK narrows both parts, e.g. TEST_MARK="not slow"; exit code 5 means "none selected".
MARK_AND = $(if $(TEST_MARK),($(TEST_MARK)) and ,)
test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) -m "$(MARK_AND)not serial" $(PYTEST_ARGS)
	$(BIN)/pytest -n $(SERIAL_WORKERS) --dist loadgroup -m "$(MARK_AND)serial" $(PYTEST_ARGS) \
		|| [ $$? -eq 5 ]

## Everything but the slow tests
test-fast: $(STAMP)
	$(MAKE) test TEST_MARK="not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Regenerate docs/configuration.md from the Settings class (a test checks it is current)
docs: $(STAMP)
	$(BIN)/python -m sluice.docgen > docs/configuration.md
	$(BIN)/python -m sluice.docgen --readme

bench: $(STAMP)
	$(BIN)/sluice bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
