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

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -q

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
