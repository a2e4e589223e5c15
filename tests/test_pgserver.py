"""The test PostgreSQL server (tests/pgserver.py) does what the database tests rely on."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.pgserver import PostgresServer


async def _query(url: str, sql: str = "SELECT 1", timeout: float = 5.0) -> object:
    """One query on a new connection through SQLAlchemy + asyncpg, within `timeout`."""
    engine = create_async_engine(url, pool_size=1, connect_args={"timeout": timeout})
    try:
        async with asyncio.timeout(timeout), engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar_one()
    finally:
        await engine.dispose()


async def _execute(url: str, *statements: str) -> None:
    engine = create_async_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            for sql in statements:
                await conn.execute(text(sql))
    finally:
        await engine.dispose()


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """`kind` anywhere in the chain (SQLAlchemy wraps the driver's errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_a_fresh_database_accepts_connections_with_the_password(
    pg_server: PostgresServer, pg_url: str
) -> None:
    assert pg_url.startswith(
        f"postgresql+asyncpg://callbridge:{pg_server.password}@127.0.0.1:{pg_server.port}/"
    )
    dbname = pg_url.rsplit("/", 1)[1]
    assert await _query(pg_url, "SELECT current_database()") == dbname
    assert await _query(pg_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    assert await _query(pg_url, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is True
    # Databases are distinct, and the password is really checked (scram-sha-256 over TCP).
    other = pg_server.create_database()
    assert other != pg_url and await _query(other, "SELECT current_database()") == other.rsplit("/", 1)[1]
    with pytest.raises(Exception) as refused:
        await _query(pg_server.url(dbname, password="wrong-" + pg_server.password))
    assert _caused_by(refused.value, asyncpg.InvalidPasswordError), repr(refused.value)
    method = await _query(pg_url, "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' LIMIT 1")
    assert method == "scram-sha-256"
    pg_server.drop_database(other)


async def test_stop_refuses_connections_and_start_serves_the_same_data(
    pg_server: PostgresServer, pg_url: str
) -> None:
    await _execute(pg_url, "CREATE TABLE kept (n int)", "INSERT INTO kept VALUES (42)")
    port = pg_server.port
    pg_server.stop()
    assert not pg_server.running
    with pytest.raises(Exception) as refused:
        await _query(pg_url)
    assert _caused_by(refused.value, ConnectionRefusedError), repr(refused.value)
    pg_server.start()
    assert pg_server.port == port
    assert await _query(pg_url, "SELECT n FROM kept") == 42


async def test_kill_is_a_crash_and_start_recovers(pg_server: PostgresServer, pg_url: str) -> None:
    await _execute(pg_url, "CREATE TABLE kept (n int)", "INSERT INTO kept VALUES (7)")
    pid = pg_server.pid
    pg_server.kill()
    with pytest.raises(Exception) as refused:
        await _query(pg_url)
    assert _caused_by(refused.value, ConnectionRefusedError), repr(refused.value)
    pg_server.start()
    assert pg_server.pid != pid
    assert await _query(pg_url, "SELECT n FROM kept") == 7


async def test_pause_hangs_every_query_and_resume_answers_them(
    pg_server: PostgresServer, pg_url: str
) -> None:
    engine = create_async_engine(pg_url, pool_size=1)
    pending: asyncio.Future[object] | None = None
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            pg_server.pause()
            assert pg_server.paused
            # Resumed later, a query sent to the hung server now is answered then.
            pending = asyncio.ensure_future(_query(pg_url, "SELECT 3", timeout=15))
            # A connection already open: its backend never answers.
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    await conn.execute(text("SELECT 2"))
            assert time.monotonic() - started >= 0.9
            await conn.invalidate()
        # A new connection: the kernel accepts it, then nothing comes back.
        with pytest.raises(TimeoutError):
            await _query(pg_url, timeout=1)
        assert not pending.done()
        pg_server.resume()
        assert not pg_server.paused
        assert await pending == 3
        assert await _query(pg_url, "SELECT 4") == 4
    finally:
        pg_server.resume()
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await engine.dispose()


def test_ensure_running_resumes_a_paused_server_and_restarts_a_dead_one(pg_server: PostgresServer) -> None:
    pg_server.pause()
    pg_server.ensure_running()
    assert pg_server.running and not pg_server.paused
    pid = pg_server.pid
    pg_server.kill()
    assert not pg_server.running
    pg_server.ensure_running()
    assert pg_server.running and pg_server.pid != pid
    pg_server.psql(["SELECT 1"])


def test_a_test_may_leave_the_server_stopped(pg_server: PostgresServer) -> None:
    pg_server.stop()
    assert not pg_server.running and pg_server.pid is None


async def test_the_next_test_finds_it_running_again(pg_server: PostgresServer) -> None:
    """Runs after the one above (file order): the autouse finalizer restarted the server."""
    assert pg_server.running and not pg_server.paused
    url = pg_server.create_database()
    assert await _query(url, "SELECT 5") == 5
