"""Shared fixtures: the Twilio emulator, the database backends, and a leak check after every test
(helpers, such as `make_bridge`, are in tests/serverkit.py)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from callbridge.emulators.twilio import TwilioEmulator
from tests.pgserver import BINARY_GLOB, ENSURE_SCRIPT, PostgresServer, find_bindir
from tests.serverkit import ACCOUNT_SID, AUTH_TOKEN


def _open_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Runs outside the event loop: after the loop is closed, no thread of ours is left."""
    before = {t.ident for t in threading.enumerate()}
    yield
    for t in threading.enumerate():
        if t.ident not in before:
            t.join(timeout=2)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, f"threads left behind: {left}"


@pytest.fixture(autouse=True)
async def no_leaked_tasks_or_sockets() -> AsyncIterator[None]:
    fds_before = _open_fds()
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not tasks, f"tasks left behind: {tasks}"
    sockets = {f for f in _open_fds() - fds_before if "socket:" in f}
    assert not sockets, f"sockets left open: {_name_sockets(sockets)}"


def _name_sockets(sockets: set[str]) -> list[str]:
    """fd:socket:[inode] -> with the TCP ports and state, for a readable failure."""
    table: dict[str, str] = {}
    for name in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{name}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                local, remote = (int(c.rsplit(":", 1)[1], 16) for c in cols[1:3])
                table[cols[9]] = f"{local}->{remote} state {cols[3]}"
    return [f"{s} {table.get(s.split('[')[1].rstrip(']'), '')}" for s in sorted(sockets)]


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioEmulator]:
    async with TwilioEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN) as tw:
        yield tw


# -- database backends --------------------------------------------------------------------
#
# Tests marked `database` take the `db_url` fixture: a SQLite file in tmp_path, or a fresh
# database of a real PostgreSQL server, by `--db=sqlite|postgresql` (or CALLBRIDGE_TEST_DB).
# Tests that need PostgreSQL itself take `pg_url` / `pg_server` (tests/pgserver.py).

DB_BACKENDS = ("sqlite", "postgresql")
_PG_SERVER = pytest.StashKey[PostgresServer]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=DB_BACKENDS,
        default=None,
        help="database backend of the tests marked `database` (default: $CALLBRIDGE_TEST_DB or sqlite)",
    )


def db_backend(config: pytest.Config) -> str:
    chosen: str | None = config.getoption("--db")
    if chosen is None:
        chosen = os.environ.get("CALLBRIDGE_TEST_DB", "").strip().lower() or "sqlite"
    if chosen not in DB_BACKENDS:
        raise pytest.UsageError(f"CALLBRIDGE_TEST_DB={chosen!r}: expected one of {', '.join(DB_BACKENDS)}")
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "database: runs against each database backend (--db=sqlite|postgresql, takes db_url)"
    )
    db_backend(config)  # a bad CALLBRIDGE_TEST_DB stops the run before any test


def pytest_report_header(config: pytest.Config) -> str:
    return f"database backend (tests marked `database`): {db_backend(config)}"


def _postgres_required() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
        for name in ("CI", "CALLBRIDGE_REQUIRE_POSTGRES")
    )


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (stopped and removed at the end)."""
    bindir = find_bindir()
    if bindir is None:
        msg = (
            f"PostgreSQL server binaries not found ({BINARY_GLOB}): run {ENSURE_SCRIPT} "
            "(as root it installs the Debian package `postgresql`)"
        )
        if _postgres_required():
            pytest.fail(
                msg + " [CI / CALLBRIDGE_REQUIRE_POSTGRES is set: PostgreSQL is required]", pytrace=False
            )
        pytest.skip(msg)
    server = PostgresServer.create(bindir)
    request.config.stash[_PG_SERVER] = server
    try:
        yield server
    finally:
        del request.config.stash[_PG_SERVER]
        server.close()


@pytest.fixture(autouse=True)
def pg_server_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test may stop, kill or pause the session's server: the next one finds it running."""
    yield
    server = request.config.stash.get(_PG_SERVER, None)
    if server is not None:
        server.ensure_running()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """URL (postgresql+asyncpg) of a fresh, empty database of the session's server."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of the backend chosen for the run (see `--db`)."""
    if db_backend(request.config) == "postgresql":
        url: str = request.getfixturevalue("pg_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path}/calls.db"
