# The two commands that matter: `make run` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/gateway.yaml
STAMP  := $(VENV)/.installed

.PHONY: install run test lint unit e2e bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve -c $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q --ignore=tests/e2e $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(if $(BASELINE),--baseline '$(BASELINE)') $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
