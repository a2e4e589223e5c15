PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-postgres lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole suite on SQLite, then the tests marked `database` again on a real PostgreSQL server
# that the tests start themselves (tests/pgserver.py; binaries from scripts/ensure-postgres.sh).
# The PostgreSQL pass leaves out the agent- and stream-fault cells of the fault matrix (they
# write the same two records as every other cell and took 2.5 of the pass's 5 min) and its
# media-before-start test (15 s, no database question in it), to keep `make test` near
# 10 min on 2 cores. `make test-postgres PG_PASS_ONLY=` runs every database test on PostgreSQL.
PG_PASS_ONLY ?= -k "not test_agent_fault and not test_twilio_stream_fault and not test_media_before_start"

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	scripts/ensure-postgres.sh
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m database --db=postgresql $(PG_PASS_ONLY)

test-postgres: $(STAMP)
	scripts/ensure-postgres.sh
	$(BIN)/pytest -q -m database --db=postgresql $(PG_PASS_ONLY)

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
