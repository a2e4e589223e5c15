"""`callbridge`: serve, place calls, read call records, run the offline demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from callbridge import __version__
from callbridge.config import ConfigError, Settings, sqlite_path
from callbridge.dberrors import DatabaseError, describe_database, explain
from callbridge.logs import JsonFormatter, TextFormatter, log_event, set_instance

if TYPE_CHECKING:
    from callbridge.store import CallStore

__all__ = ["main"]


class CliError(Exception):
    """One clear line for the user, no traceback."""


def configure_logging(level: str = "info", json_logs: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The twilio SDK logs request headers and bodies at INFO/DEBUG: keep them out.
    logging.getLogger("twilio").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl ..." at every start


def _settings(args: argparse.Namespace, require: tuple[str, ...]) -> Settings:
    overrides = {
        "public_url": getattr(args, "public_url", None),
        "database_url": getattr(args, "database_url", None),
        "max_call_seconds": getattr(args, "max_call_seconds", None),
        "max_concurrent_calls": getattr(args, "max_concurrent_calls", None),
    }
    try:
        return Settings.from_env(overrides=overrides, require=require)
    except ConfigError as exc:
        raise CliError("configuration: " + "; ".join(exc.problems)) from None


# -- the database -----------------------------------------------------------------


def _database_problem(exc: BaseException, url: str) -> CliError:
    """The store's one line (`DatabaseError`), or one made from whatever else it raised."""
    if isinstance(exc, DatabaseError):
        return CliError(exc.message)
    return CliError(explain(exc, url))


def _require_existing(url: str, args: argparse.Namespace) -> None:
    """Reading commands never create a database: a SQLite file must already be there."""
    path = sqlite_path(url)
    if path is None or os.path.exists(path):
        return
    given = getattr(args, "database_url", None) or os.environ.get("CALLBRIDGE_DATABASE_URL", "").strip()
    if not given:
        where = f" (the default: callbridge.db in the working directory, {os.getcwd()})"
    elif sqlite_path(given) is not None and given.partition(":///")[2][:1] != "/":
        where = f" (a relative path: resolved against the working directory, {os.getcwd()})"
    else:
        where = ""
    raise CliError(
        f"no call records at {path}{where}: set CALLBRIDGE_DATABASE_URL or --database-url "
        "to the database `callbridge serve` writes to"
    )


async def _open_store(
    url: str,
    *,
    instance: str | None = None,
    spool_path: str | None = None,
    read_only: bool = False,
    start: bool = True,
) -> CallStore:
    """A store whose `init()` has run, or a CliError with one line saying why not."""
    from callbridge.store import CallStore

    try:
        store = CallStore(url, instance=instance, spool_path=spool_path)
    except Exception as exc:  # e.g. the engine cannot be made: a missing driver, a bad URL
        raise _database_problem(exc, url) from None
    try:
        await store.init(read_only=read_only, start=start)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await store.close()
        raise _database_problem(exc, url) from None
    return store


def _preflight(settings: Settings, check_instance: bool = True) -> None:
    """Open the database, set it up, close it: before uvicorn starts, so that a database
    that cannot be opened is one line and exit status 2, not a traceback from the lifespan.
    `check_instance`: refuse an instance id held by a live instance (one line too)."""

    async def check() -> None:
        store = await _open_store(
            settings.database_url,
            instance=settings.instance_id,
            spool_path=settings.spool_path(),
            start=False,  # the server takes the spool back itself, before crash recovery
        )
        try:
            if check_instance:
                await _check_instance_free(store, settings.instance_id)
        finally:
            await store.close()

    asyncio.run(check())
    log_event(
        logging.getLogger("callbridge.server"),
        "server.database",
        database=describe_database(settings.database_url),
    )


async def _check_instance_free(store: Any, instance_id: str) -> None:
    """An instance id (named by the operator) whose lease another live process holds."""
    from callbridge.server.fleet import host_key, pid_alive
    from callbridge.store.fleet import FleetTables

    tables = FleetTables(store.engine, timeout=store.timeout)
    now, leases = await tables.leases()
    for lease in leases:
        if lease.instance_id != instance_id or lease.expires_at < now or lease.reconciled_by is not None:
            continue
        if lease.host == host_key() and not pid_alive(lease.pid):
            continue  # this instance's previous run, gone: the server closes its calls
        raise CliError(
            f"instance id {instance_id!r} is in use by a live instance (host {lease.host.split('/')[0]}, "
            f"pid {lease.pid}, lease until {lease.expires_at:%H:%M:%S} UTC): give every instance its own "
            "CALLBRIDGE_INSTANCE_ID, or leave it unset (each process then names itself)"
        )


# -- serve ------------------------------------------------------------------------


def _serve_settings(args: argparse.Namespace | None) -> Settings:
    if args is None:  # a worker process: the parent put every flag in the environment
        try:
            return Settings.from_env(require=("twilio", "agent", "public_url"))
        except ConfigError as exc:
            raise CliError("configuration: " + "; ".join(exc.problems)) from None
    return _settings(args, ("twilio", "agent", "public_url"))


# Exit status of `serve` when call records were left in the spool file (the log names it).
EXIT_RECORDS_UNWRITTEN = 3


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts: a port in use is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if isinstance(exc, socket.gaierror):
            raise CliError(f"cannot listen on {where}: cannot resolve the host {host!r} (--host)") from None
        reason = (exc.strerror or type(exc).__name__).lower()
        if exc.errno == errno.EADDRINUSE:
            fix = "another process listens there: stop it or choose another --port"
        elif exc.errno == errno.EACCES:
            fix = "ports below 1024 need privileges: choose --port 1024 or more"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "this machine has no such address: use --host 0.0.0.0 or one of its addresses"
        else:
            fix = "check --host and --port"
        raise CliError(f"cannot listen on {where}: {reason} ({fix})") from None
    sock.set_inheritable(True)
    return sock


def _check_sqlite_free(url: str) -> None:
    """A second process on one SQLite file is refused before it starts (the running
    server holds `<file>.instance-lock`: server/fleet.py)."""
    from callbridge.server.fleet import FleetError, sqlite_lock

    try:
        fd = sqlite_lock(url)
    except FleetError as exc:
        raise CliError(str(exc)) from None
    if fd is not None:
        os.close(fd)


def _run_server(settings: Settings, host: str, port: int, sockets: list[Any] | None = None) -> int:
    from callbridge.server.app import create_app
    from callbridge.server.run import GracefulServer, make_config

    app = create_app(settings)
    server = GracefulServer(make_config(app, host, port), app.state.callbridge)
    server.run(sockets=sockets)
    return EXIT_RECORDS_UNWRITTEN if app.state.callbridge.unwritten else 0


def worker_app() -> Any:
    """The app of one gunicorn worker (`--workers N`), built in the worker from the
    environment the parent filled from its flags. Each worker is its own instance."""
    from callbridge.server.app import create_app
    from callbridge.server.workers import WORKER_AGE

    named = os.environ.get("CALLBRIDGE_INSTANCE_ID")
    if named:  # an operator's name: one instance per worker, named after it
        os.environ["CALLBRIDGE_INSTANCE_ID"] = f"{named}-w{os.environ.get(WORKER_AGE, '0')}"
    configure_logging(
        os.environ.get("CALLBRIDGE_LOG_LEVEL", "info"), os.environ.get("CALLBRIDGE_JSON_LOGS") == "1"
    )
    try:
        settings = _serve_settings(None)
    finally:
        if named:
            os.environ["CALLBRIDGE_INSTANCE_ID"] = named
    return create_app(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise CliError(f"--workers must be 1 or more (one per CPU core is typical), got {args.workers}")
    settings = _serve_settings(args)
    set_instance(settings.instance_id)  # every log line names its process (workers: their own)
    if args.workers > 1 and not settings.database_url.startswith("postgresql"):
        raise CliError(
            f"--workers {args.workers} needs PostgreSQL: SQLite is for one process "
            "(set CALLBRIDGE_DATABASE_URL=postgresql+asyncpg://user:password@host/db, or use --workers 1)"
        )
    sock = _bind(args.host, args.port)  # before any log line: a port in use is the only line
    try:
        _check_sqlite_free(settings.database_url)  # a second process on one SQLite file
    except CliError:
        sock.close()
        raise
    configure_logging(args.log_level, args.json_logs)
    if not settings.api_token:
        logging.getLogger("callbridge").warning(
            "CALLBRIDGE_API_TOKEN is not set: the /calls API answers 503 until it is"
        )
    try:
        _preflight(settings, check_instance=args.workers <= 1)  # once, also when there are workers
        if args.workers <= 1:
            return _run_server(settings, args.host, args.port, [sock])
    except BaseException:
        sock.close()
        raise
    # gunicorn supervises the workers (server/workers.py); each builds its own app from
    # the environment (flags are put there first) and drains its calls on SIGTERM.
    from callbridge.config import ENV_VARS
    from callbridge.server.workers import run_workers

    for name in ("public_url", "database_url", "max_call_seconds", "max_concurrent_calls"):
        value = getattr(args, name, None)
        if value is not None:
            os.environ[ENV_VARS[name]] = str(value)
    os.environ["CALLBRIDGE_LOG_LEVEL"] = args.log_level
    os.environ["CALLBRIDGE_JSON_LOGS"] = "1" if args.json_logs else "0"
    # gunicorn takes the descriptor over (and closes it when it stops).
    run_workers(sock.detach(), args.workers, settings.shutdown_grace_seconds, args.log_level)
    return 0


# -- call -------------------------------------------------------------------------


def _parse_vars(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--var takes NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def cmd_call(args: argparse.Namespace) -> int:
    import httpx

    body: dict[str, Any] = {"to": args.to, "from": args.from_}
    if args.var:
        body["dynamic_variables"] = _parse_vars(args.var)
    if args.agent_id:
        body["agent_id"] = args.agent_id
    if args.machine_detection != "off":
        body["machine_detection"] = args.machine_detection
    token = os.environ.get("CALLBRIDGE_API_TOKEN")
    if not token:
        raise CliError("CALLBRIDGE_API_TOKEN is required to place a call through the server's API")
    url = args.server.rstrip("/") + "/calls"
    try:
        resp = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=15)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the callbridge server at {args.server}: {type(exc).__name__}") from None
    if resp.status_code != 201:
        try:
            message = resp.json().get("error", resp.text)
        except ValueError:
            message = resp.text
        raise CliError(f"call not placed: HTTP {resp.status_code}: {message}")
    record = resp.json()
    print(f"calling {args.to} from {args.from_}: call {record['call_sid']}")
    return 0


# -- calls list / show --------------------------------------------------------------


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _short_time(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def _parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    from callbridge.since import SinceError, parse_since

    try:
        return parse_since(text)
    except SinceError as exc:
        raise CliError(str(exc)) from None


async def _calls(args: argparse.Namespace) -> int:
    settings = _settings(args, ())
    since = _parse_since(getattr(args, "since", None))
    _require_existing(settings.database_url, args)
    store = await _open_store(settings.database_url, read_only=True)
    try:
        if args.calls_cmd == "show":
            record = await store.get(args.call_sid)
            if record is None:
                raise CliError(f"no call {args.call_sid} in {describe_database(settings.database_url)}")
            if args.json:
                print(json.dumps(record, indent=2))
                return 0
            print(_render_record(record))
            return 0
        page = await store.list_calls(
            status=args.status, end_reason=args.end_reason, since=since, limit=args.limit
        )
        if args.json:
            print(json.dumps(page.items, indent=2))
            return 0
        rows = [
            [
                r["call_sid"],
                _short_time(r["started_at"]),
                r["direction"],
                r["from"] or "-",
                r["to"] or "-",
                r["status"],
                r["end_reason"] or "-",
                f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else "-",
            ]
            for r in page.items
        ]
        print(_table(rows, ["CALL SID", "STARTED", "DIR", "FROM", "TO", "STATUS", "END REASON", "DURATION"]))
        if page.next_offset is not None:
            print(f"(more: --limit {args.limit * 2})")
        return 0
    finally:
        await store.close()


def _render_record(r: dict[str, Any]) -> str:
    m = r.get("metrics") or {}
    lines = [
        f"call {r['call_sid']}  ({r['direction']}, {r['from'] or '?'} -> {r['to'] or '?'})",
        f"  status        {r['status']}  end reason: {r['end_reason'] or '-'}  "
        f"{r['end_detail'] or ''}".rstrip(),
        f"  started       {_short_time(r['started_at'])}   ended {_short_time(r['ended_at'])}"
        f"   duration {r['duration_s'] if r['duration_s'] is not None else '-'} s",
        f"  conversation  {r['conversation_id'] or '-'}",
        f"  agent connect {m.get('agent_connect_ms', '-')} ms   hang-up after last mark "
        f"{m.get('hangup_latency_ms', '-')} ms   interruptions {m.get('interruptions', 0)}",
        "  transcript:",
    ]
    for entry in r.get("transcript") or []:
        lines.append(f"    [{entry['t']:7.2f}] {entry['role']:>6}: {entry['text']}")
    lines[4:4] = [f"  answered by   {r['answered_by']}"] if r.get("answered_by") else []
    lines.extend(_render_analysis(r.get("analysis")))
    return "\n".join(lines)


def _render_analysis(a: dict[str, Any] | None) -> list[str]:
    """The post-call analysis as ElevenLabs reported it (`calls show`)."""
    if not a:
        return ["  analysis: none yet"]

    def shown(key: str) -> Any:
        value = a.get(key)
        return "-" if value is None or value == "" else value

    title = f"{a.get('call_summary_title')}: " if a.get("call_summary_title") else ""
    lines = [
        f"  analysis ({shown('source')}, {shown('conversation_status')}):",
        f"    call successful  {shown('call_successful')}",
        f"    summary          {title}{shown('transcript_summary')}",
        f"    cost {shown('cost')}   duration {shown('call_duration_secs')} s   "
        f"termination {shown('termination_reason')}",
    ]
    for kind in ("data_collection_results", "evaluation_criteria_results"):
        for name, item in (a.get(kind) or {}).items():
            value = item.get("value", item.get("result")) if isinstance(item, dict) else item
            lines.append(f"    {kind.split('_')[0]:<16} {name}: {value}")
    return lines


def cmd_calls(args: argparse.Namespace) -> int:
    return asyncio.run(_calls(args))


# -- db upgrade ---------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args, ())
    url = settings.database_url
    try:
        from callbridge.store import upgrade_database
    except ImportError:
        raise CliError(
            "this callbridge has no schema migrations to apply (no store.upgrade_database)"
        ) from None
    try:
        revision = asyncio.run(upgrade_database(url))
    except Exception as exc:
        raise _database_problem(exc, url) from None
    print(f"{describe_database(url)}: schema at revision {revision}")
    return 0


# -- doctor, numbers (doctor.py, numbers.py) ----------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from callbridge.doctor import main_doctor

    return main_doctor(_settings(args, ("twilio", "agent")), as_json=args.json)


def cmd_numbers(args: argparse.Namespace) -> int:
    from callbridge.numbers import NumbersError, run_numbers

    require = ("twilio", "public_url") if args.numbers_cmd == "connect" else ("twilio",)
    try:
        return run_numbers(_settings(args, require), args.numbers_cmd, getattr(args, "number", None))
    except NumbersError as exc:
        raise CliError(str(exc)) from None


# -- demo -------------------------------------------------------------------------


def _keep_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes seconds, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("--keep takes a number of seconds above 0")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from callbridge.demo import EXIT_INTERRUPTED, run_demo_interruptible

    configure_logging("warning" if not args.verbose else "info")
    try:
        code: int = asyncio.run(
            run_demo_interruptible(
                verbose=args.verbose, transfer=getattr(args, "transfer", False), keep=args.keep
            )
        )
    except KeyboardInterrupt:  # a press as the event loop closes: the demo already said so
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        # Interrupted and said so: a further Ctrl-C until the process is gone changes nothing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


# -- main -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbridge",
        description="Bridge Twilio phone calls to a voice AI agent, and never leave a call dangling.",
    )
    parser.add_argument("--version", action="version", version=f"callbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server a Twilio number points at")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--public-url", help="the https URL Twilio reaches (CALLBRIDGE_PUBLIC_URL)")
    serve.add_argument("--database-url", help="SQLAlchemy URL of the records (CALLBRIDGE_DATABASE_URL)")
    serve.add_argument(
        "--max-call-seconds", type=float, help="max call duration (CALLBRIDGE_MAX_CALL_SECONDS)"
    )
    serve.add_argument(
        "--max-concurrent-calls", type=int, help="calls one process takes (CALLBRIDGE_MAX_CONCURRENT_CALLS)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--json-logs", action="store_true", help="one JSON object per log line")
    serve.set_defaults(func=cmd_serve)

    call = sub.add_parser("call", help="place an outbound call through the running server's API")
    call.add_argument("to", help="number to call, E.164 (+15551234567)")
    call.add_argument("--from", dest="from_", required=True, help="your Twilio number, E.164")
    call.add_argument("--var", action="append", default=[], help="dynamic variable NAME=VALUE (repeatable)")
    call.add_argument("--agent-id", help="another agent than ELEVENLABS_AGENT_ID for this call")
    call.add_argument(
        "--machine-detection",
        choices=["off", "hangup", "agent"],
        default="off",
        help="answering machines: hang up (end reason voicemail), or let the agent leave a message",
    )
    call.add_argument("--server", default="http://127.0.0.1:8000", help="the callbridge server's URL")
    call.set_defaults(func=cmd_call)

    calls = sub.add_parser("calls", help="read call records from the database")
    calls_sub = calls.add_subparsers(dest="calls_cmd", required=True)
    lst = calls_sub.add_parser("list", help="recent calls, newest first")
    lst.add_argument("--status", choices=["active", "ended"])
    lst.add_argument("--end-reason")
    lst.add_argument("--since", help="ISO 8601 date/time (UTC if no zone) or a duration: 30m, 2h, 1d")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--database-url")
    show = calls_sub.add_parser("show", help="one call with its transcript and timings")
    show.add_argument("call_sid")
    show.add_argument("--json", action="store_true")
    show.add_argument("--database-url")
    calls.set_defaults(func=cmd_calls)

    db = sub.add_parser("db", help="the call-records database")
    db_sub = db.add_subparsers(dest="db_cmd", required=True)
    upgrade = db_sub.add_parser(
        "upgrade", help="apply the schema migrations now (serve also applies them at start)"
    )
    upgrade.add_argument("--database-url", help="SQLAlchemy URL of the records (CALLBRIDGE_DATABASE_URL)")
    upgrade.set_defaults(func=cmd_db)

    doctor = sub.add_parser("doctor", help="check the agent, the Twilio numbers and the public URL")
    doctor.add_argument("--json", action="store_true", help="the checks as JSON (exit 1 on a failure)")
    doctor.add_argument("--public-url", help="the https URL Twilio reaches (CALLBRIDGE_PUBLIC_URL)")
    doctor.set_defaults(func=cmd_doctor)

    numbers = sub.add_parser("numbers", help="the Twilio account's numbers and where their calls go")
    numbers_sub = numbers.add_subparsers(dest="numbers_cmd", required=True)
    numbers_list = numbers_sub.add_parser("list", help="each number and its voice webhook")
    numbers_list.add_argument("--public-url", help="this server's URL (CALLBRIDGE_PUBLIC_URL)")
    connect = numbers_sub.add_parser("connect", help="point a number's voice webhook here (before/after)")
    connect.add_argument("number", help="the number, E.164 (+15551234567)")
    connect.add_argument("--public-url", help="this server's URL (CALLBRIDGE_PUBLIC_URL)")
    numbers.set_defaults(func=cmd_numbers)

    demo = sub.add_parser("demo", help="an offline end-to-end call on the built-in emulators")
    demo.add_argument("--verbose", action="store_true", help="show the bridge's log lines too")
    demo.add_argument(
        "--transfer",
        action="store_true",
        help="the keypad-and-transfer call: digits to the agent, then a handover to a person",
    )
    demo.add_argument(
        "--keep",
        nargs="?",
        const=float("inf"),
        default=0.0,
        type=_keep_seconds,
        metavar="SECONDS",
        help="after the call, keep serving the web console (printed with its URL) until Ctrl-C, "
        "or for SECONDS",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from callbridge.envfile import EnvFileError, load_env_file

        try:
            load_env_file()  # the lowest layer: flags > environment > .env
        except EnvFileError as exc:
            raise CliError(str(exc)) from None
        code: int = args.func(args)
        return code
    except (CliError, DatabaseError) as exc:
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
