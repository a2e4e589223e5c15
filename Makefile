PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole suite on SQLite, then the tests marked `database` again on a real PostgreSQL server
# that the tests start themselves (tests/pgserver.py; binaries from scripts/ensure-postgres.sh).
test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	scripts/ensure-postgres.sh
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m database --db=postgresql

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/callbridge demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# Benchmarks (bench/, BENCHMARKS.md). The peer systems live in their own venv.
PEERS := bench/.venv-peers
.PHONY: bench bench-smoke bench-peers

$(PEERS)/.installed: bench/requirements-peers.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet --upgrade pip
	$(PEERS)/bin/pip install --quiet -r bench/requirements-peers.txt
	touch $@

bench-peers: $(PEERS)/.installed

bench: $(STAMP) $(PEERS)/.installed
	$(BIN)/python bench/run.py

bench-smoke: $(STAMP)
	$(BIN)/python bench/run.py --smoke
