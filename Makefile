# Quickstart: `make run` serves on 127.0.0.1:8080 with embedded SQLite; `make test` runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	AGENTBUS_AUTH=$${AGENTBUS_AUTH:-false} $(BIN)/agentbus serve

test: $(STAMP)
	$(BIN)/ruff check agentbus tests bench migrations examples
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis agentbus.db*
