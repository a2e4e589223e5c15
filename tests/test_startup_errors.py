"""A database that cannot be opened is one line naming the problem and the fix: never a
traceback, never a password. `explain` is checked against real causes (a refused port, a
port that never answers, a real PostgreSQL refusing a password or a database, unwritable
SQLite paths, missing drivers), then the `callbridge` command itself as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from callbridge.config import Settings
from callbridge.dberrors import DatabaseError, describe_database, explain
from tests.pgserver import PostgresServer

CALLBRIDGE = str(Path(sys.executable).parent / "callbridge")  # the console script
SECRET = "s3cret-db-pass"
SERVE_SECRETS = ("serve-auth-token-xyz", "serve-api-token-xyz")


# -- helpers ----------------------------------------------------------------------------------


async def open_error(url: str, **engine_args: Any) -> BaseException:
    """What opening `url` really raises: engine creation, then a first connection."""
    try:
        engine = create_async_engine(url, **engine_args)
    except Exception as exc:
        return exc
    try:
        async with engine.connect() as conn:
            await conn.execute(text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)"))
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError(f"{url} opened")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_line(message: str, *must: str) -> None:
    assert "\n" not in message, message
    assert SECRET not in message, message
    for part in must:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# -- explain: PostgreSQL ------------------------------------------------------------------------


async def test_refused_port_names_host_port_and_asks_whether_postgres_runs() -> None:
    port = free_port()
    url = f"postgresql+asyncpg://callbridge:{SECRET}@127.0.0.1:{port}/calls"
    message = explain(await open_error(url), url)
    one_line(message, f"127.0.0.1:{port}", "connection refused", "is PostgreSQL running", ":***@")


async def test_a_port_that_never_answers_is_a_timeout(listener: int) -> None:
    url = f"postgresql+asyncpg://callbridge:{SECRET}@127.0.0.1:{listener}/calls"
    exc = await open_error(url, connect_args={"timeout": 0.3})
    message = explain(exc, url)
    one_line(message, f"127.0.0.1:{listener}", "timed out", "CALLBRIDGE_DATABASE_URL")


async def test_wrong_password_on_a_real_postgres(pg_server: PostgresServer) -> None:
    url = pg_server.url("postgres", password=SECRET)
    message = explain(await open_error(url), url)
    one_line(message, f"127.0.0.1:{pg_server.port}", "password", "'callbridge'", "CALLBRIDGE_DATABASE_URL")
    assert pg_server.password not in message


async def test_missing_role_on_a_real_postgres(pg_server: PostgresServer) -> None:
    # scram-sha-256 refuses an unknown role exactly like a wrong password (no user enumeration).
    url = f"postgresql+asyncpg://nobody_here:{SECRET}@127.0.0.1:{pg_server.port}/postgres"
    message = explain(await open_error(url), url)
    one_line(message, "'nobody_here'", "does not exist is refused the same way")


async def test_missing_database_on_a_real_postgres_says_createdb(pg_server: PostgresServer) -> None:
    url = pg_server.url("no_such_calls_db")
    message = explain(await open_error(url), url)
    one_line(
        message,
        "'no_such_calls_db' does not exist",
        f"createdb -h 127.0.0.1 -p {pg_server.port} -U callbridge no_such_calls_db",
    )
    assert pg_server.password not in message


def test_name_resolution_failure() -> None:
    # Only loopback in the tests: the resolver's own error, as getaddrinfo raises it.
    url = f"postgresql+asyncpg://callbridge:{SECRET}@db.example.invalid/calls"
    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    one_line(explain(exc, url), "cannot resolve the database host 'db.example.invalid'")


# -- explain: URLs and drivers -------------------------------------------------------------------


async def test_unparsable_url_shows_what_a_valid_one_looks_like() -> None:
    for url in ("not a database url", f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:port/calls"):
        message = explain(await open_error(url), url)
        one_line(message, "cannot parse the database URL", "postgresql://USER:PASSWORD@HOST:5432/DBNAME")


async def test_unsupported_dialect() -> None:
    url = "oracle9://u@h/x"
    message = explain(await open_error(url), url)
    one_line(message, "unsupported database URL", "sqlite:///")


async def test_a_driver_that_is_not_installed() -> None:
    url = f"postgresql+psycopg://callbridge:{SECRET}@127.0.0.1/calls"
    message = explain(await open_error(url), url)
    one_line(message, "'psycopg' is not installed", "postgresql://USER")


async def test_a_sync_driver_is_refused_with_the_async_form() -> None:
    url = "sqlite+pysqlite:////tmp/x.db"
    message = explain(await open_error(url), url)
    one_line(message, "not async", "sqlite:///")


@pytest.mark.slow
def test_missing_asyncpg_gives_the_install_command_from_a_checkout() -> None:
    # A real import failure: asyncpg blocked in a fresh interpreter, then opened through the CLI.
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from callbridge.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    url = f"postgresql://callbridge:{SECRET}@127.0.0.1:{free_port()}/calls"
    result = subprocess.run(
        [sys.executable, "-c", code, "calls", "list", "--database-url", url],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert_one_error_line(result, "asyncpg is not installed", "pip install -e '.[postgres]'", ".venv/bin/pip")


# -- explain: SQLite -----------------------------------------------------------------------------


async def test_sqlite_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"sqlite+aiosqlite:///{blocker}/calls.db"
    message = explain(await open_error(url), url)
    one_line(message, f"{blocker}/calls.db", f"{blocker} is a file, not a folder", "CALLBRIDGE_DATABASE_URL")


async def test_sqlite_in_a_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "no" / "such"
    url = f"sqlite+aiosqlite:///{folder}/calls.db"
    message = explain(await open_error(url), url)
    one_line(message, f"the folder {folder} does not exist", f"mkdir -p {folder}")


async def test_sqlite_in_an_unwritable_folder() -> None:
    url = "sqlite+aiosqlite:////proc/calls.db"
    message = explain(await open_error(url), url)
    one_line(message, "/proc/calls.db", "/proc is not writable")


async def test_sqlite_path_that_is_a_folder(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}"
    message = explain(await open_error(url), url)
    one_line(message, f"{tmp_path} is a folder, not a SQLite file")


async def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "calls.db"
    junk.write_bytes(b"this is not a database file, only a long enough line of text" * 4)
    url = f"sqlite+aiosqlite:///{junk}"
    message = explain(await open_error(url), url)
    one_line(message, f"{junk} is not a SQLite database")


def test_fallback_names_the_type_is_bounded_and_hides_the_password() -> None:
    url = f"postgresql+asyncpg://callbridge:{SECRET}@127.0.0.1:5432/calls"
    exc = RuntimeError(f"something odd with {SECRET} " + "x" * 1000 + "\nsecond line")
    message = explain(exc, url)
    one_line(message, "RuntimeError", ":***@")
    assert len(message) < 400


def test_database_error_carries_the_line() -> None:
    err = DatabaseError("one line")
    assert str(err) == "one line" and err.message == "one line"


def test_sqlite_default_path_is_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env(env={}, require=())
    relative = Settings.from_env(env={"CALLBRIDGE_DATABASE_URL": "sqlite:///data/calls.db"}, require=())
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path}/callbridge.db"
    assert describe_database(settings.database_url) == f"SQLite file {tmp_path}/callbridge.db"
    assert relative.database_url == f"sqlite+aiosqlite:///{tmp_path}/data/calls.db"
    pg = Settings.from_env(env={"CALLBRIDGE_DATABASE_URL": f"postgresql://u:{SECRET}@db/calls"}, require=())
    assert pg.database_url == f"postgresql+asyncpg://u:{SECRET}@db/calls"
    assert SECRET not in describe_database(pg.database_url)


# -- the `callbridge` command --------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ELEVENLABS_", "CALLBRIDGE_"))
    }


def serve_env(port: int, database_url: str | None) -> dict[str, str]:
    env = clean_env() | {
        "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
        "TWILIO_AUTH_TOKEN": SERVE_SECRETS[0],
        "ELEVENLABS_AGENT_ID": "agent_startup",
        "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CALLBRIDGE_API_TOKEN": SERVE_SECRETS[1],
    }
    if database_url is not None:
        env["CALLBRIDGE_DATABASE_URL"] = database_url
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CALLBRIDGE, *args],
        env=clean_env() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *must: str) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("callbridge: "), line
    assert "Traceback" not in result.stderr + result.stdout
    for secret in (SECRET, *SERVE_SECRETS):
        assert secret not in result.stderr + result.stdout
    for part in must:
        assert part in line, f"{part!r} not in {line!r}"
    return line


def serve(port: int, database_url: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CALLBRIDGE, "serve", "--host", "127.0.0.1", "--port", str(port), *extra],
        env=serve_env(port, database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_with_postgres_refused_is_one_line_and_exit_2() -> None:
    port = free_port()
    result = serve(port, f"postgresql://callbridge:{SECRET}@127.0.0.1:{free_port()}/calls")
    assert result.returncode == 2
    assert_one_error_line(result, "connection refused", "is PostgreSQL running")


@pytest.mark.slow
def test_serve_with_workers_checks_the_database_once_in_the_parent() -> None:
    port = free_port()
    result = serve(port, f"postgresql://callbridge:{SECRET}@127.0.0.1:{free_port()}/calls", "--workers", "2")
    assert result.returncode == 2
    assert_one_error_line(result, "connection refused")


@pytest.mark.slow
def test_serve_with_a_wrong_password(pg_server: PostgresServer) -> None:
    result = serve(free_port(), pg_server.url("postgres", password=SECRET))
    assert result.returncode == 2
    assert_one_error_line(result, "rejected the password for role 'callbridge'")
    assert pg_server.password not in result.stderr


@pytest.mark.slow
def test_serve_with_a_missing_database(pg_server: PostgresServer) -> None:
    result = serve(free_port(), pg_server.url("calls_not_created"))
    assert result.returncode == 2
    assert_one_error_line(result, "createdb", "calls_not_created")
    assert pg_server.password not in result.stderr


def test_serve_with_an_unwritable_sqlite_path(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    result = serve(free_port(), f"sqlite:///{blocker}/calls.db")
    assert result.returncode == 2
    assert_one_error_line(result, f"{blocker} is a file, not a folder")


@pytest.mark.slow
def test_serve_with_an_unparsable_url() -> None:
    result = serve(free_port(), f"postgresql://callbridge:{SECRET}@127.0.0.1:notaport/calls")
    assert result.returncode == 2
    assert_one_error_line(
        result, "cannot parse the database URL", "postgresql://USER:PASSWORD@HOST:5432/DBNAME"
    )


@pytest.mark.slow
def test_serve_with_a_driver_that_is_not_installed() -> None:
    result = serve(free_port(), f"postgresql+psycopg://callbridge:{SECRET}@127.0.0.1/calls")
    assert result.returncode == 2
    assert_one_error_line(result, "'psycopg' is not installed")


@pytest.mark.slow
async def test_serve_logs_the_absolute_path_of_the_default_sqlite_file(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        CALLBRIDGE,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=serve_env(port, None),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("server.started" in line for line in seen):
                line = await proc.stderr.readline()
                if not line:
                    break
                seen.append(line.decode())
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
        seen.append(rest.decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = "".join(seen)
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    assert f"SQLite file {tmp_path}/callbridge.db" in log, log
    assert (tmp_path / "callbridge.db").exists()


@pytest.mark.slow
def test_calls_list_elsewhere_never_creates_a_database(tmp_path: Path) -> None:
    for args in (["calls", "list"], ["calls", "show", "CA" + "0" * 32]):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2
        assert_one_error_line(
            result, f"no call records at {tmp_path}/callbridge.db", "the default", "CALLBRIDGE_DATABASE_URL"
        )
    assert list(tmp_path.iterdir()) == []
    given = cli("calls", "list", "--database-url", f"sqlite:///{tmp_path}/other.db", cwd=tmp_path)
    assert_one_error_line(given, f"no call records at {tmp_path}/other.db", "--database-url")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_calls_list_only_reads(tmp_path: Path) -> None:
    """A reading command neither migrates nor replays a spool it happens to find: a file
    with no records table is one line; a spool in the working directory is left alone."""
    (tmp_path / "empty.db").touch()
    spool = tmp_path / "callbridge-unsaved-records.jsonl"
    op = {"op": "close", "call_sid": "CA" + "1" * 32, "reason": "shutdown", "detail": "x"}
    spool.write_text(json.dumps(op) + "\n")
    result = cli("calls", "list", "--database-url", "sqlite:///empty.db", cwd=tmp_path)
    assert_one_error_line(result, f"{tmp_path}/empty.db", "callbridge db upgrade")
    assert (tmp_path / "empty.db").stat().st_size == 0 and spool.exists()
    made = cli("db", "upgrade", "--database-url", f"sqlite:///{tmp_path}/empty.db")
    assert made.returncode == 0, made.stderr
    listed = cli("calls", "list", "--database-url", "sqlite:///empty.db", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "CA" + "1" * 32 not in listed.stdout and spool.exists()


@pytest.mark.slow
def test_serve_with_a_missing_spool_folder(tmp_path: Path) -> None:
    port = free_port()
    env = serve_env(port, f"sqlite:///{tmp_path}/calls.db") | {"CALLBRIDGE_SPOOL_DIR": str(tmp_path / "nope")}
    result = subprocess.run(
        [CALLBRIDGE, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert_one_error_line(result, f"spool folder {tmp_path}/nope", "CALLBRIDGE_SPOOL_DIR")


@pytest.mark.slow
def test_calls_list_with_a_refused_postgres() -> None:
    url = f"postgresql://callbridge:{SECRET}@127.0.0.1:{free_port()}/calls"
    result = cli("calls", "list", env=clean_env() | {"CALLBRIDGE_DATABASE_URL": url})
    assert result.returncode == 2
    assert_one_error_line(result, "connection refused")


@pytest.mark.slow
def test_calls_list_since_yesterday_is_one_line(tmp_path: Path) -> None:
    result = cli("calls", "list", "--since", "yesterday", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result, "--since takes an ISO 8601", "'yesterday'")


@pytest.mark.slow
def test_version() -> None:
    from callbridge import __version__

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"callbridge {__version__}"


@pytest.mark.slow
def test_db_upgrade_on_a_fresh_sqlite_file_then_calls_list_reads_it(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    result = cli("db", "upgrade", "--database-url", f"sqlite:///{db}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"SQLite file {db}: schema at revision "), result.stdout
    assert db.exists()
    again = cli(
        "db", "upgrade", cwd=tmp_path, env=clean_env() | {"CALLBRIDGE_DATABASE_URL": f"sqlite:///{db}"}
    )
    assert again.returncode == 0 and again.stdout == result.stdout
    listed = cli("calls", "list", "--database-url", f"sqlite:///{db}")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("CALL SID")


@pytest.mark.slow
def test_db_upgrade_errors_are_one_line(tmp_path: Path) -> None:
    result = cli("db", "upgrade", "--database-url", "sqlite:////proc/calls.db", cwd=tmp_path)
    assert_one_error_line(result, "/proc is not writable")
    refused = cli(
        "db", "upgrade", "--database-url", f"postgresql://callbridge:{SECRET}@127.0.0.1:{free_port()}/calls"
    )
    assert_one_error_line(refused, "is PostgreSQL running")


def test_db_upgrade_on_a_real_postgres(pg_url: str) -> None:
    result = cli("db", "upgrade", "--database-url", pg_url)
    assert result.returncode == 0, result.stderr
    assert "schema at revision" in result.stdout
    password = make_url(pg_url).password
    assert password and password not in result.stdout + result.stderr


# -- settings refused at start: one line naming the variable and what would be valid -------------


def test_several_workers_on_sqlite_are_refused_naming_postgresql(tmp_path: Path) -> None:
    port = free_port()
    args = ("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2")
    result = cli(*args, env=serve_env(port, None), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result, "--workers 2 needs PostgreSQL", "CALLBRIDGE_DATABASE_URL=postgresql")
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_serve_refuses_fewer_than_one_worker(tmp_path: Path, workers: str) -> None:
    port = free_port()
    args = ("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", workers)
    result = cli(*args, env=serve_env(port, None), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result, "--workers must be 1 or more", f"got {workers}")
    assert list(tmp_path.iterdir()) == []  # refused before the database is opened


def test_a_public_url_without_a_scheme_is_one_line_with_the_fix(tmp_path: Path) -> None:
    port = free_port()
    env = serve_env(port, None) | {"CALLBRIDGE_PUBLIC_URL": "bridge.example.com"}
    result = cli("serve", "--host", "127.0.0.1", "--port", str(port), env=env, cwd=tmp_path)
    assert result.returncode == 2
    line = assert_one_error_line(result, "CALLBRIDGE_PUBLIC_URL", "did you mean https://bridge.example.com")
    assert "required but not set" not in line
    flag = cli(
        "serve",
        "--port",
        str(port),
        "--public-url",
        "bridge.example.com",
        env=serve_env(port, None),
        cwd=tmp_path,
    )
    assert flag.returncode == 2
    assert_one_error_line(flag, "--public-url", "did you mean https://bridge.example.com")


@pytest.mark.parametrize(
    ("agent_id", "hint"),
    [
        ("my agent", "letters, digits, '_' and '-' only"),
        ("https://elevenlabs.io/app/agents/agents/agent_01jx9abc?tab=widget", "did you mean agent_01jx9abc"),
    ],
)
def test_an_agent_id_of_the_wrong_shape_says_use_the_agent_id(
    tmp_path: Path, agent_id: str, hint: str
) -> None:
    port = free_port()
    env = serve_env(port, None) | {"ELEVENLABS_AGENT_ID": agent_id}
    result = cli("serve", "--host", "127.0.0.1", "--port", str(port), env=env, cwd=tmp_path)
    assert result.returncode == 2
    line = assert_one_error_line(result, "ELEVENLABS_AGENT_ID", "use the agent ID, e.g. agent_...", hint)
    assert "required but not set" not in line


def test_fallback_twiml_that_is_not_well_formed_xml(tmp_path: Path) -> None:
    port = free_port()
    for twiml, must in (
        ("<Response><Say>Sorry</Response>", "well-formed XML"),
        ("<Response><Say>Sorry</Say>", "well-formed XML"),
        ("<Say>Sorry</Say>", "root element is <Response>"),
    ):
        env = serve_env(port, None) | {"CALLBRIDGE_FALLBACK_TWIML": twiml}
        result = cli("serve", "--host", "127.0.0.1", "--port", str(port), env=env, cwd=tmp_path)
        assert result.returncode == 2
        assert_one_error_line(result, "CALLBRIDGE_FALLBACK_TWIML", must)


def test_well_formed_settings_of_those_kinds_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "TWILIO_AUTH_TOKEN": "t",
            "ELEVENLABS_AGENT_ID": "agent_01jx9abc-DEF",
            "CALLBRIDGE_PUBLIC_URL": "https://bridge.example.com/",
            "CALLBRIDGE_FALLBACK_TWIML": '<?xml version="1.0"?><Response><Dial>+15550001</Dial></Response>',
        },
        require=("twilio", "agent", "public_url"),
    )
    assert settings.elevenlabs_agent_id == "agent_01jx9abc-DEF"
    assert settings.public_url == "https://bridge.example.com"


# -- the listening address -----------------------------------------------------------------------


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        pg = f"postgresql+asyncpg://callbridge:{SECRET}@127.0.0.1:{free_port()}/calls"
        for extra, database in (((), None), (("--workers", "2"), pg)):
            args = ("serve", "--host", "127.0.0.1", "--port", str(port), *extra)
            result = cli(*args, env=serve_env(port, database), cwd=tmp_path)
            assert result.returncode == 2
            assert_one_error_line(
                result, f"cannot listen on 127.0.0.1:{port}", "address already in use", "--port"
            )
    assert list(tmp_path.iterdir()) == []  # refused before the database is opened


async def test_the_listening_address_is_logged_once_bound(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        CALLBRIDGE,
        *("serve", "--host", "127.0.0.1", "--port", str(port), "--json-logs"),
        env=serve_env(port, None),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(30):
            while not any(e.get("event") == "server.listening" for e in events):
                line = await proc.stderr.readline()
                if not line:
                    break
                events.append(json.loads(line))
        # Bound and served: a connection is taken now.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    names = [e.get("event") for e in events]
    assert "server.listening" in names, events
    listening = events[names.index("server.listening")]
    assert listening["host"] == "127.0.0.1" and listening["port"] == port
    assert names.index("server.started") < names.index("server.listening")
    assert proc.returncode == 0
