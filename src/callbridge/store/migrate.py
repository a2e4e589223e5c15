"""The schema's migrations (Alembic, `callbridge/migrations`), applied under a lock: a
PostgreSQL advisory lock, or a `flock` beside a SQLite file, so that instances (or
workers) starting together never race to create or alter the table."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text as sql_text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["MIGRATIONS", "migrate"]

log = logging.getLogger("callbridge.store")

_LOCK_KEY = 0x63616C6C  # pg_advisory_lock key of the schema migration ("call")
MIGRATIONS = "callbridge:migrations"


async def migrate(engine: AsyncEngine, url: str) -> str:
    """Upgrade the schema to the head revision under the migration lock; the revision."""
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            # Polled, not waited for: a blocking pg_advisory_lock would count against the
            # driver's command timeout while another instance migrates (the caller bounds
            # the whole opening instead).
            while True:
                got = await conn.execute(sql_text("SELECT pg_try_advisory_lock(:key)"), {"key": _LOCK_KEY})
                await conn.commit()
                if got.scalar():
                    break
                await asyncio.sleep(0.05)
            try:
                revision = await conn.run_sync(_upgrade_sync)
                await conn.commit()
            finally:
                await conn.execute(sql_text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
                await conn.commit()
            return revision
    async with _file_lock(url):
        async with engine.connect() as conn:
            revision = await conn.run_sync(_upgrade_sync)
            await conn.commit()
            return revision


def _upgrade_sync(conn: Connection) -> str:
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = conn
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None and sa_inspect(conn).has_table("calls"):
        # Made by a release before migrations: its schema is revision 0001.
        command.stamp(config, "0001")
        log.warning("store: existing calls table (no schema version) taken as revision 0001; upgrading")
    command.upgrade(config, "head")
    revision = MigrationContext.configure(conn).get_current_revision()
    return revision or "base"


@contextlib.asynccontextmanager
async def _file_lock(url: str) -> Any:
    """Serialize migrations of one SQLite file between processes (`--workers N`)."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:" or path.startswith("file:"):
        yield
        return
    lock_path = os.path.join(os.getcwd(), path) + ".migrate-lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)
