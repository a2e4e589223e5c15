"""Shared test support: a real callbridge server (uvicorn on 127.0.0.1) wired to the emulators,
`callbridge serve` as a subprocess, a clean environment for it, free ports, and `wait_until`.

Test modules import their helpers from here (or tests/pgserver.py), never from one another."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from callbridge.agents.elevenlabs.session import ElevenLabsConfig, session_factory
from callbridge.bridge import Bridge
from callbridge.call import CallHooks, CallOptions, CallRecord, Tool
from callbridge.config import Settings
from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, EndCall, Say, WaitForUser
from callbridge.emulators.twilio import TwilioEmulator
from callbridge.server.app import AppState, create_app
from callbridge.server.run import GracefulServer, make_config
from callbridge.store import CallStore
from callbridge.telephony.twilio.control import RetryPolicy, TwilioCallControl

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "test-auth-token"
API_TOKEN = "test-api-token-0123456789"


@dataclass
class Harness:
    """A bridge wired to the Twilio emulator (REST + streams) and the agent emulator."""

    bridge: Bridge
    control: TwilioCallControl
    twilio: TwilioEmulator
    records: list[CallRecord] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add_record(self, record: CallRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_records(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.records) < n:
                self._changed.clear()
                await self._changed.wait()


def make_bridge(
    twilio: TwilioEmulator,
    agent_base_url: str,
    options: CallOptions | None = None,
    hooks: CallHooks | None = None,
    tools: dict[str, Tool] | None = None,
    agent_id: str = "agent_test",
    api_key: str | None = None,
    retry: RetryPolicy | None = None,
) -> Harness:
    control = TwilioCallControl(
        ACCOUNT_SID,
        AUTH_TOKEN,
        twilio.base_url,
        retry=retry
        or RetryPolicy(attempts=4, base_delay=0.05, max_delay=1.5, deadline=6.0, request_timeout=2.0),
    )
    hooks = hooks or CallHooks()
    harness = Harness(bridge=None, control=control, twilio=twilio)  # type: ignore[arg-type]
    hooks.on_call_end.append(harness.add_record)
    factory = session_factory(
        ElevenLabsConfig(agent_id=agent_id, api_key=api_key, api_base_url=agent_base_url)
    )
    harness.bridge = Bridge(factory, control, options or CallOptions(), hooks, tools)
    return harness


@dataclass
class RunningServer:
    url: str
    settings: Settings
    state: AppState
    server: GracefulServer
    api: httpx.AsyncClient
    records: list[CallRecord] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add_record(self, record: CallRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_records(self, n: int, timeout: float = 20) -> list[CallRecord]:
        async with asyncio.timeout(timeout):
            while len(self.records) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.records

    async def call_record(self, call_sid: str) -> dict[str, Any]:
        resp = await self.api.get(f"/calls/{call_sid}")
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data


def settings_for(twilio: TwilioEmulator, agent: AgentEmulator, db: str | Path, **overrides: Any) -> Settings:
    """Settings of a server wired to the emulators. `db` is a database URL (the `db_url` fixture:
    SQLite or PostgreSQL by `--db`), or the path of a SQLite file."""
    base = Settings(
        twilio_account_sid=twilio.account_sid,
        twilio_auth_token=twilio.auth_token,
        twilio_api_base_url=twilio.base_url,
        elevenlabs_agent_id="agent_test",
        elevenlabs_api_base_url=agent.base_url,
        public_url="http://127.0.0.1:1",  # replaced with the bound port
        database_url=db if isinstance(db, str) and "://" in db else f"sqlite+aiosqlite:///{db}",
        api_token=API_TOKEN,
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings,
    hooks: CallHooks | None = None,
    tools: dict[str, Tool] | None = None,
    store: CallStore | None = None,
    control: TwilioCallControl | None = None,
) -> AsyncIterator[RunningServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    settings = replace(settings, public_url=url)
    hooks = hooks or CallHooks()
    app = create_app(settings, hooks=hooks, tools=tools, store=store, control=control)
    state: AppState = app.state.callbridge
    server = GracefulServer(make_config(app, "127.0.0.1", port), state)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    api = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)
    handle = RunningServer(url, settings, state, server, api)
    hooks.on_call_end.append(handle.add_record)
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if serving.done():
                    serving.result()
                await asyncio.sleep(0.01)
        yield handle
    finally:
        await api.aclose()
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
        sock.close()


async def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds.
    `interval=0` only yields to the loop between checks (for waits on this very loop)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if predicate():
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def wait_until_async(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """`wait_until` for a condition that takes I/O to check (an HTTP request, a query)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await predicate():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def clean_env() -> dict[str, str]:
    """This process's environment without any callbridge setting a developer may have set."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ELEVENLABS_", "CALLBRIDGE_"))
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server in a subprocess)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(log: Path) -> str:
    return log.read_text()[-2000:] if log.exists() else ""


def _log_path(log: Path | None) -> Path:
    """Where the server's stderr goes: `log`, or SERVE_LOG=path, or a fresh temporary file
    (so that a server that does not come up always says why)."""
    if log is not None:
        return log
    given = os.environ.get("SERVE_LOG")
    return Path(given) if given else Path(tempfile.mkdtemp(prefix="callbridge-serve-")) / "serve.log"


def _server_log(log: Path) -> Any:
    return open(log, "ab")  # the child writes it


async def serve_cli(
    env: dict[str, str],
    port: int,
    cwd: Path | None = None,
    log: Path | None = None,
    args: tuple[str, ...] = (),
) -> asyncio.subprocess.Process:
    """`callbridge serve` on 127.0.0.1:`port` (and `args`) in a subprocess, returned once
    /healthz answers 200."""
    log = _log_path(log)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbridge.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=_server_log(log),
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(300):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    raise AssertionError(f"callbridge serve did not come up: {_tail(log)}")


def short_script(seconds: float = 0.4) -> AgentScript:
    """An agent that greets, listens briefly and says goodbye (as fast as the caller hears)."""
    return AgentScript(
        steps=[
            Say("Hello!", seconds=seconds),
            WaitForUser(seconds * 0.75),
            EndCall("Goodbye!", seconds=seconds, close_delay=0.05),
        ],
        realtime_factor=float("inf"),
    )


def start_demo(*args: str, until: str, what: str) -> tuple[subprocess.Popen[str], str]:
    """`callbridge demo` (and `args`) in a subprocess, returned once it has printed `until`
    (with what it printed so far); killed if it ends before, naming `what` did not happen."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "callbridge.cli", "demo", *args],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen = ""
    try:
        while until not in seen:  # bounded by the test's timeout
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the demo ended before {what}: {seen!r}")
            seen += line
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, seen
