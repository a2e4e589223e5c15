"""One line for the user when the call-records database cannot be opened.

Whatever SQLAlchemy, asyncpg, aiosqlite or the OS raise while a database is
opened (engine created, first connection, schema set up) is turned by `explain`
into one line that names the problem and the fix. The URL is only ever shown
through `config.redact_url`, and the URL's password is blanked out of anything
quoted from the exception.

`DatabaseError` carries that line: the store raises it from `init()`, and the
`callbridge` command prints it and exits 2, with no traceback.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

from callbridge.config import redact_url, sqlite_path

__all__ = ["DatabaseError", "describe_database", "explain"]

SETTING = "CALLBRIDGE_DATABASE_URL (or --database-url)"
VALID_URLS = "sqlite:///path/to/callbridge.db or postgresql://USER:PASSWORD@HOST:5432/DBNAME"
INSTALL_ASYNCPG = "from the checkout run `pip install -e '.[postgres]'` (or `.venv/bin/pip install asyncpg`)"
MAX_QUOTED = 200  # characters of an unexpected exception's message that are quoted back


class DatabaseError(Exception):
    """The database cannot be opened; `str(exc)` is one line for the user, no secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe_database(url: str) -> str:
    """How a database is named in messages: a SQLite file by its absolute path, anything
    else by its URL without the password."""
    path = sqlite_path(url)
    if path is not None:
        return f"SQLite file {path}"
    return redact_url(url)


@dataclass(frozen=True)
class _Target:
    """The parts of the URL a message needs (what the user wrote, not what was resolved)."""

    backend: str  # "postgresql", "sqlite", another dialect name, or "" when unparsable
    driver: str
    host: str
    port: int | None
    user: str
    database: str
    passwords: tuple[str, ...]  # as written and decoded: blanked out of quoted text

    @property
    def where(self) -> str:
        port = self.port or (5432 if self.backend == "postgresql" else None)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}" if port else host


def _target(url: str) -> tuple[_Target, str | None]:
    """The URL's parts, or a reason it cannot be parsed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        return _Target("", "", "", None, "", "", _raw_passwords(url)), _first_line(str(exc))
    host = parsed.host or ""
    if not host:
        query_host = parsed.query.get("host")
        host = query_host if isinstance(query_host, str) else ""
    passwords = _raw_passwords(url)
    if parsed.password:
        passwords = (*passwords, str(parsed.password))
    return (
        _Target(
            parsed.drivername.split("+", 1)[0],
            parsed.drivername.split("+", 1)[1] if "+" in parsed.drivername else "",
            host or "localhost",
            parsed.port,
            parsed.username or "",
            parsed.database or "",
            tuple(p for p in passwords if p),
        ),
        None,
    )


def _raw_passwords(url: str) -> tuple[str, ...]:
    """The password as written in the URL (percent-encoded or not), found without a parser."""
    _, sep, rest = url.partition("://")
    if not sep:
        return ()
    netloc = rest.split("/", 1)[0]
    userinfo, at, _ = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return ()
    password = userinfo.split(":", 1)[1]
    return (password,) if password else ()


def _first_line(text: str) -> str:
    """An exception's message without SQLAlchemy's "(Background on this error ...)" line."""
    text = text.split("\n(Background on this error", 1)[0]
    return " ".join(text.split())


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what it wraps (`orig`), its causes and contexts, and the members of
    an exception group (asyncpg raises one when every address of a host fails)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        orig = getattr(current, "orig", None)
        for nxt in (orig, current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
    return seen


def _find(chain: list[BaseException], kind: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    for item in chain:
        if isinstance(item, kind):
            return item
    return None


def _sqlstate(chain: list[BaseException]) -> tuple[str, str] | None:
    """(SQLSTATE, server message) of a PostgreSQL error anywhere in the chain."""
    for item in chain:
        state = getattr(item, "sqlstate", None)
        if isinstance(state, str) and state:
            return state, _first_line(str(item))
    return None


def explain(exc: BaseException, url: str) -> str:
    """One line naming what went wrong opening the database at `url` and how to fix it."""
    try:
        target, unparsable = _target(url)
        line = _explain(exc, url, target, unparsable)
    except Exception:  # never let the explanation hide the error itself
        target = _Target("", "", "", None, "", "", _raw_passwords(url))
        line = _fallback(exc, [exc], redact_url(url))
    for password in target.passwords:
        if len(password) >= 3:  # a one-letter password would blank out half the line
            line = line.replace(password, "***")
    return line


def _explain(exc: BaseException, url: str, target: _Target, unparsable: str | None) -> str:
    from sqlalchemy.exc import ArgumentError, InvalidRequestError, NoSuchModuleError

    chain = _chain(exc)
    shown = describe_database(url)

    bad_url = _find(chain, ArgumentError)
    if unparsable is None and bad_url is not None and "parse" in str(bad_url):
        unparsable = _first_line(str(bad_url))
    if unparsable is not None:
        if "int()" in unparsable:
            unparsable = "the port is not a number"
        return (
            f"cannot parse the database URL {redact_url(url)!r} ({unparsable}): "
            f"set {SETTING} to a URL like {VALID_URLS}"
        )
    missing = _find(chain, ImportError)
    if missing is not None:
        module = (getattr(missing, "name", None) or "").split(".")[0] or _first_line(str(missing))
        if module == "asyncpg":
            return f"the PostgreSQL driver asyncpg is not installed (database {shown}): {INSTALL_ASYNCPG}"
        if module == "aiosqlite":
            return f"the SQLite driver aiosqlite is not installed (database {shown}): `pip install aiosqlite`"
        return (
            f"the database URL {redact_url(url)} names a driver whose module {module!r} is not installed: "
            f"callbridge uses asyncpg for PostgreSQL and aiosqlite for SQLite, so write {VALID_URLS}"
        )
    if _find(chain, NoSuchModuleError) is not None:
        return (
            f"unsupported database URL {redact_url(url)} (no SQLAlchemy dialect {target.backend!r}"
            f"{'+' + target.driver if target.driver else ''}): set {SETTING} to a URL like {VALID_URLS}"
        )
    not_async = _find(chain, InvalidRequestError)
    if not_async is not None and "async" in str(not_async):
        return (
            f"the database URL {redact_url(url)} names a driver that is not async ({target.driver!r}): "
            f"write {VALID_URLS} (callbridge picks aiosqlite or asyncpg)"
        )
    if target.backend == "sqlite":
        sqlite = _explain_sqlite(chain, url)
        if sqlite is not None:
            return sqlite
    else:
        server = _explain_server(chain, target, shown)
        if server is not None:
            return server
    return _fallback(exc, chain, shown)


def _explain_server(chain: list[BaseException], t: _Target, shown: str) -> str | None:
    """A database server (PostgreSQL) that refused, timed out, or said no."""
    state = _sqlstate(chain)
    if state is not None:
        code, message = state
        role = t.user or "(none given)"
        if code == "28P01":
            return (
                f"PostgreSQL at {t.where} rejected the password for role {role!r} ({message}): check the "
                f"user and password in {SETTING}; a role that does not exist is refused the same way"
            )
        if code == "28000" and "does not exist" in message:
            return (
                f"PostgreSQL at {t.where} has no role {role!r}: create it (`createuser --pwprompt "
                f"-h {t.host} -p {t.port or 5432} {role}`) or fix the user in {SETTING}"
            )
        if code == "28000":
            return (
                f"PostgreSQL at {t.where} refused role {role!r} ({message}): allow it in pg_hba.conf "
                f"or fix {SETTING}"
            )
        if code == "3D000":
            return (
                f"database {t.database!r} does not exist on PostgreSQL at {t.where}: create it with "
                f"`createdb -h {t.host} -p {t.port or 5432} -U {role} {t.database}`"
                f" or fix the database name in {SETTING}"
            )
        if code == "42501":
            return (
                f"role {role!r} may not create or use the callbridge tables in {shown} ({message}): "
                f"grant it, e.g. `GRANT ALL ON SCHEMA public TO {role}` in database {t.database!r}"
            )
        if code == "53300":
            return f"PostgreSQL at {t.where} has too many connections ({message}): raise max_connections"
        if code.startswith("57P0"):
            return f"PostgreSQL at {t.where} is not accepting connections ({message}): try again shortly"
        return None
    refused = _find(chain, ConnectionRefusedError)
    if refused is None:
        for item in chain:
            if isinstance(item, OSError) and (
                item.errno == errno.ECONNREFUSED or "Connect call failed" in str(item)
            ):
                refused = item
                break
    if refused is not None:
        return (
            f"nothing accepts connections at {t.where} (connection refused; database {shown}): "
            f"is PostgreSQL running, and on that host and port? Check {SETTING}"
        )
    if _find(chain, socket.gaierror) is not None:
        return f"cannot resolve the database host {t.host!r} (database {shown}): fix the host in {SETTING}"
    if _find(chain, TimeoutError) is not None:
        return (
            f"connecting to the database at {t.where} timed out (database {shown}): is the host reachable "
            f"(address, firewall) and the server up? Check {SETTING}"
        )
    no_socket = _find(chain, FileNotFoundError)
    if no_socket is not None and t.host.startswith("/"):
        return (
            f"no PostgreSQL socket in {t.host} (database {shown}): is PostgreSQL running, with its "
            f"socket there? Check {SETTING}"
        )
    unreachable = _find(chain, OSError)
    if unreachable is not None and unreachable.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"the database host {t.where} is unreachable (database {shown}): check {SETTING}"
    return None


def _explain_sqlite(chain: list[BaseException], url: str) -> str | None:
    """A SQLite file that cannot be created, opened or written."""
    import sqlite3

    path = sqlite_path(url)
    if path is None:
        return None
    error = _find(chain, (sqlite3.Error, OSError))
    if error is None:
        if _find(chain, TimeoutError) is not None:
            return (
                f"opening the SQLite file {path} timed out: is another process holding a lock on it? "
                f"Stop it, or use PostgreSQL for more than one writer"
            )
        return None
    message = _first_line(str(error)).lower()
    if "readonly" in message or "read-only" in message:
        return (
            f"the SQLite file {path} is read-only for this user: make it and its folder writable "
            f"(`chmod u+w`) or set {SETTING} to another file"
        )
    if "locked" in message or "busy" in message:
        return (
            f"the SQLite file {path} is locked by another process: stop it, or use PostgreSQL for "
            f"more than one writer"
        )
    if "not a database" in message or "malformed" in message:
        return f"{path} is not a SQLite database (or is damaged): set {SETTING} to the records' file"
    if "unable to open" in message or isinstance(error, OSError):
        return _sqlite_cannot_open(path)
    return None


def _sqlite_cannot_open(path: str) -> str:
    """Why a SQLite file cannot be opened or created, found by looking at the path."""
    fix = f"set {SETTING} to a file in a writable folder"
    if os.path.isdir(path):
        return f"{path} is a folder, not a SQLite file: {fix}"
    folder = os.path.dirname(path)
    ancestor = folder
    while ancestor and not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if ancestor != folder and os.path.exists(ancestor) and not os.path.isdir(ancestor):
        return f"cannot create the SQLite file {path}: {ancestor} is a file, not a folder: {fix}"
    if not os.path.exists(folder):
        return (
            f"cannot create the SQLite file {path}: the folder {folder} does not exist: "
            f"create it (`mkdir -p {folder}`) or {fix}"
        )
    if not os.path.isdir(folder):
        return f"cannot create the SQLite file {path}: {folder} is a file, not a folder: {fix}"
    if not os.path.exists(path):
        return f"cannot create the SQLite file {path}: the folder {folder} is not writable: {fix}"
    return f"cannot open the SQLite file {path} (check that it and its folder are writable): {fix}"


def _fallback(exc: BaseException, chain: list[BaseException], shown: str) -> str:
    """The exception's type and first line, bounded; the driver's own error (asyncpg,
    sqlite3) is the most telling, when there is one."""
    inner = next((e for e in chain if type(e).__module__.split(".")[0] in ("asyncpg", "sqlite3")), exc)
    message = _first_line(str(inner)) or "(no message)"
    if len(message) > MAX_QUOTED:
        message = message[: MAX_QUOTED - 3] + "..."
    return f"cannot open the database {shown}: {type(inner).__name__}: {message}"
