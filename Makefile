# Every target builds on the project's own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test lint fmt bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install etl with its dev tools

demo: $(STAMP)  ## run the real job end to end on a SQLite sample and the local receiver
	$(BIN)/python -m tools.demo

test: $(STAMP)  ## lint, type-check and run the whole test suite
	$(BIN)/ruff check etl tests tools $(wildcard bench)
	$(BIN)/ruff format --check etl tests tools $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)  ## ruff and mypy only
	$(BIN)/ruff check etl tests tools $(wildcard bench)
	$(BIN)/ruff format --check etl tests tools $(wildcard bench)
	$(BIN)/mypy

fmt: $(STAMP)  ## format and auto-fix
	$(BIN)/ruff format etl tests tools $(wildcard bench)
	$(BIN)/ruff check --fix etl tests tools $(wildcard bench)

bench: $(STAMP)  ## benchmark on PostgreSQL (BENCH_USERS=1000000 by default)
	$(BIN)/python -m bench.run

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo
