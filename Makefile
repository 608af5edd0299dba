# Two commands for a fresh machine (see README): `make test` and `make run`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test check run setup clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,client,dev]'
	touch $(STAMP)

setup: $(STAMP)

## Format check, lint, strict typing, then the whole test suite.
test: $(STAMP)
	$(BIN)/python scripts/check.py

check: test

## Start the server on the embedded default (SQLite + in-process broker, dev issuer).
run: $(STAMP)
	$(BIN)/medrelay serve --data-dir ./medrelay-data --dev-issuer

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
