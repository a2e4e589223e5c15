PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The same venv with the project's `bench` extra (orjson, for the aiohttp floor, which runs on
# the project's own aiohttp and uvloop): `make bench` and the bench smoke tests in test-all.

.PHONY: install test test-all test-postgres lint demo demo-transfer doctor-demo fleet clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Tests run on $(WORKERS) pytest-xdist workers: they mostly wait on real-time audio, so more
# workers than cores pays (measured on 2 cores). Each worker starts its own PostgreSQL server.
WORKERS ?= 4
PYTEST := $(BIN)/pytest -q -p no:cacheprovider -n $(WORKERS)
# The fast tier leaves out the tests marked `slow` (long real-time tests, bench smoke) and `soak`.
FAST := not slow and not soak

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The fast tier (under 3 min on 2 cores): lint, the fast tests on SQLite, then the fast tests
# marked `database` again on a real PostgreSQL server that the tests start themselves
# (tests/pgserver.py; binaries from scripts/ensure-postgres.sh; Caddy for the reverse-proxy test
# from scripts/ensure-caddy.sh; Chromium for the console's browser tests from
# scripts/ensure-chromium.sh). The PostgreSQL pass of the fast
# tier leaves out the fault matrix (each cell writes the same two records; `make test-all` runs
# all of it on both backends).
test: lint
	scripts/ensure-postgres.sh
	scripts/ensure-caddy.sh
	scripts/ensure-chromium.sh
	$(PYTEST) -m "$(FAST)"
	$(PYTEST) -m "database and $(FAST)" --db=postgresql --ignore=tests/test_fault_matrix.py

# Everything (CI, .ci/run): lint, the whole suite on SQLite (soak smoke and bench smoke
# included), then every test marked `database` on PostgreSQL.
test-all: lint
	scripts/ensure-postgres.sh
	scripts/ensure-caddy.sh
	scripts/ensure-chromium.sh
	$(PYTEST)
	$(PYTEST) -m database --db=postgresql

test-postgres: $(STAMP)
	scripts/ensure-postgres.sh
	$(PYTEST) -m database --db=postgresql

# `make demo DEMO_ARGS=--keep`: the server stays up after the call, for the web console.
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/callbridge demo $(DEMO_ARGS)

# Two instances on one PostgreSQL, on this machine: calls on both, a hang-up through the other
# instance, one instance killed and its calls closed by the survivor (scripts/fleet_demo.py).
fleet: $(STAMP)
	scripts/ensure-postgres.sh
	$(BIN)/python scripts/fleet_demo.py

# The README's first real call, rehearsed on the emulators: serve, doctor (one deliberate
# problem, then fixed), numbers connect, a call; exits 0 only if each step held.
doctor-demo: $(STAMP)
	$(BIN)/python scripts/doctor_demo.py

# The second demo: keypad digits to the agent, then the agent hands the caller to a person.
demo-transfer: $(STAMP)
	$(BIN)/callbridge demo --transfer

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
