"""Soak: many concurrent calls with random faults against a real `callbridge serve` process.

CI runs a small size; by hand, a large one, e.g.:

    SOAK_CALLS=2000 SOAK_CONCURRENCY=250 SOAK_TALK_SECONDS=10 SOAK_AGENT_IDLE_SECONDS=6 \
        .venv/bin/pytest -q -m soak tests/test_soak.py -s

For every call: exactly one end reason and the expected one, the emulated Twilio call not
left in progress, the agent socket closed. For the process: open descriptors back to
their baseline, memory back near it, and /metrics in agreement with the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    Close,
    Drop,
    EndCall,
    Garbage,
    Say,
    Stall,
    WaitForUser,
)
from callbridge.emulators.twilio import EmulatedCall, TwilioEmulator
from tests.serverkit import API_TOKEN, clean_env, free_port, serve_cli

CALLS = int(os.environ.get("SOAK_CALLS", "24"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "8"))
SEED = int(os.environ.get("SOAK_SEED", "20261125"))
TALK = float(os.environ.get("SOAK_TALK_SECONDS", "0.4"))  # how long each call talks before its fault
# How fast a stalled agent is detected. The load generator (both emulators, one process) can
# itself pause for over a second at 200+ calls: by hand, use a few seconds.
AGENT_IDLE = os.environ.get("SOAK_AGENT_IDLE_SECONDS", "1.5")
# Calls placed per second: a burst of hundreds of creates at once would only measure how
# slowly the emulated Twilio API answers (the bridge gives up a create after 5 s: 502).
RATE = float(os.environ.get("SOAK_CALLS_PER_SECOND", "25"))
# Milliseconds between an emulated caller's media frames. Twilio sends one every 20 ms; the load
# generator of 200+ such calls and the server together need more than this machine's two cores
# (bench/: ~1.3 cores for the server alone), so the large soak sends a frame every 100 ms.
FRAME_MS = float(os.environ.get("SOAK_FRAME_MS", "20"))
# Drop idle connections before uvicorn does (5 s): reusing one it is closing is a ReadError.
API_LIMITS = httpx.Limits(keepalive_expiry=2.0)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(120 + int(CALLS * (TALK + 3)))]


@dataclass(frozen=True)
class Fault:
    name: str
    agent_steps: tuple[Any, ...]  # what the agent does after its greeting
    caller: str | None  # what the caller does ~1 s into the call: "hangup" | "close" | "drop"
    expected: str


FAULTS = [
    Fault(
        "normal", (WaitForUser(0.5), EndCall("Goodbye!", seconds=0.5, close_delay=0.05)), None, "agent_ended"
    ),
    Fault(
        "garbage_then_normal",
        (Garbage("{oops"), WaitForUser(0.3), EndCall("Bye.", seconds=0.4, close_delay=0.05)),
        None,
        "agent_ended",
    ),
    Fault("agent_1011", (Close(1011, ""),), None, "agent_error"),
    Fault(
        "agent_1002",
        (Close(1002, "", error={"error_type": "llm_error", "message": "x"}),),
        None,
        "agent_error",
    ),
    Fault("agent_drop", (Drop(),), None, "agent_error"),
    Fault("agent_stall", (Stall(),), None, "agent_error"),
    Fault("caller_hangup", (Say("Let me explain at length.", seconds=20.0),), "hangup", "caller_hung_up"),
    Fault("caller_close_no_stop", (Say("Let me explain.", seconds=20.0),), "close", "telephony_error"),
    Fault("caller_tcp_drop", (Say("Let me explain.", seconds=20.0),), "drop", "telephony_error"),
]


def script_for(fault: Fault) -> AgentScript:
    return AgentScript(
        steps=[Say("Hello, thanks for calling.", seconds=TALK), *fault.agent_steps],
        realtime_factor=1.0,
        ping_interval=0.5,
        chunk_ms=200,
    )


def proc_stats(pid: int) -> tuple[int, int]:
    """(resident memory in KiB, open descriptors) of a process."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN", "04": "FIN_WAIT1"}


def _tcp_sockets(pid: int) -> dict[str, str]:
    """socket inode -> "local_port->remote_port STATE" for the process's TCP sockets."""
    out = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                lport, rport = int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)
                out[inode] = f"{lport}->{rport} {_TCP_STATES.get(state, state)}"
    return out


def open_files(pid: int) -> list[str]:
    """The process's descriptors; TCP sockets named by ports and state."""
    tcp = _tcp_sockets(pid)
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            target = "tcp " + tcp[target[8:-1]] if target[8:-1] in tcp else target
        out.append(f"{fd}->{target}")
    return out


def write_report(summary: dict[str, Any]) -> None:
    out = os.environ.get("SOAK_REPORT")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))


FAULT_BY_AGENT = {f"soak-{fault.name}": fault for fault in FAULTS}


def scripts(agent_id: str, n: int) -> AgentScript:
    """The agent emulator plays the fault named by the agent id the call asked for."""
    return script_for(FAULT_BY_AGENT[agent_id])


class Dialer:
    """Places outbound calls through the server's API; each call's `agent_id` names its fault."""

    def __init__(self, twilio: TwilioEmulator, api: httpx.AsyncClient, rng: random.Random) -> None:
        self.twilio, self.api, self.rng = twilio, api, rng
        self.placed = 0

    async def call(self, fault: Fault) -> tuple[EmulatedCall, Fault]:
        self.placed += 1
        body = {"to": f"+1555{self.placed:07d}", "from": "+15550000000", "agent_id": f"soak-{fault.name}"}
        resp = await self.api.post("/calls", json=body)
        assert resp.status_code == 201, resp.text
        call = self.twilio.calls[resp.json()["call_sid"]]
        if fault.caller is not None:
            stream = await call.wait_stream(30)
            await asyncio.sleep(TALK + 0.4 + self.rng.random() * 0.6)
            action = {"hangup": stream.hangup, "close": stream.close_without_stop, "drop": stream.drop}
            await action[fault.caller]()
        await call.wait_ended(TALK + 30)
        return call, fault


async def test_soak(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    plan = [rng.choice(FAULTS) for _ in range(CALLS)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async with (
        TwilioEmulator(record_media=False, media_frame_interval=FRAME_MS / 1000) as twilio,
        AgentEmulator(script_factory=scripts) as agent,
    ):
        twilio_port = int(twilio.base_url.rsplit(":", 1)[1])
        env = clean_env() | {
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_API_BASE_URL": twilio.base_url,
            "ELEVENLABS_AGENT_ID": "agent_soak",
            "ELEVENLABS_API_BASE_URL": agent.base_url,
            "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "CALLBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'calls.db'}",
            "CALLBRIDGE_API_TOKEN": API_TOKEN,
            "CALLBRIDGE_AGENT_IDLE_TIMEOUT_SECONDS": AGENT_IDLE,
            "CALLBRIDGE_FINAL_AUDIO_TIMEOUT_SECONDS": "3",
            "CALLBRIDGE_MAX_CALL_SECONDS": "60",
            "CALLBRIDGE_MAX_CONCURRENT_CALLS": str(max(CONCURRENCY * 2, 50)),
        }
        proc = await serve_cli(env, port)
        assert proc.pid is not None
        api = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30, limits=API_LIMITS
        )
        dialer = Dialer(twilio, api, rng)
        results: list[tuple[EmulatedCall, Fault]] = []
        sampler: asyncio.Future[None] | None = None
        try:
            # Warm up with one wave at full concurrency (imports; the database and HTTP
            # connection pools grow to their working size), then take the baseline.
            warmup = []
            for _ in range(CONCURRENCY):
                warmup.append(asyncio.ensure_future(dialer.call(FAULTS[0])))
                await asyncio.sleep(1 / RATE)
            live: set[asyncio.Task[tuple[EmulatedCall, Fault]]] = set(warmup)
            results.extend(await asyncio.gather(*warmup))
            await asyncio.sleep(0.5)
            # Our own API client's keep-alive connections into the server are not the
            # server's: close them before each measurement.
            await dialer.api.aclose()
            dialer.api = api = httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30, limits=API_LIMITS
            )
            # uvicorn closes idle HTTP keep-alive connections after 5 s: after 6 s, only
            # sockets in real use are left (a leaked media stream would be among them).
            await asyncio.sleep(6.0)
            base_rss, base_fds = proc_stats(proc.pid)
            base_files = open_files(proc.pid)
            peak_rss = base_rss
            started = time.monotonic()

            peak_live = 0

            async def sample_live() -> None:
                nonlocal peak_live
                async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
                    while True:
                        text = (await probe.get("/metrics")).text
                        line = next(x for x in text.splitlines() if x.startswith("callbridge_active_calls "))
                        peak_live = max(peak_live, int(float(line.split()[1])))
                        await asyncio.sleep(1.0)

            sampler = asyncio.ensure_future(sample_live())
            live = set()
            for fault in plan:
                while len(live) >= CONCURRENCY:
                    done, live = await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
                    results.extend(t.result() for t in done)
                    peak_rss = max(peak_rss, proc_stats(proc.pid)[0])
                live.add(asyncio.ensure_future(dialer.call(fault)))
                await asyncio.sleep(1 / RATE)
            while live:
                done, live = await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
                results.extend(t.result() for t in done)
                peak_rss = max(peak_rss, proc_stats(proc.pid)[0])
            elapsed = time.monotonic() - started
            # Stopped before the final snapshot: its keep-alive connection is not the server's.
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {API_TOKEN}"},
                timeout=30,
            ) as reader:
                records: dict[str, dict[str, Any]] = {}
                for _ in range(100):
                    offset: int | None = 0
                    while offset is not None:
                        page = (await reader.get("/calls", params={"limit": 200, "offset": offset})).json()
                        records.update({r["call_sid"]: r for r in page["calls"]})
                        offset = page["next_offset"]
                    if len(records) >= len(results) and all(r["status"] == "ended" for r in records.values()):
                        break
                    await asyncio.sleep(0.2)
                metrics = (await reader.get("/metrics")).text
            await api.aclose()
            await asyncio.sleep(6.0)  # as before the baseline: idle keep-alives closed
            end_rss, end_fds = proc_stats(proc.pid)
            end_files = open_files(proc.pid)
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            for task in live:
                task.cancel()
            await asyncio.gather(*live, return_exceptions=True)
            await api.aclose()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        conversations = list(agent.conversations)
        for conv in conversations:
            await asyncio.wait_for(conv.closed.wait(), 5)

    # Every call: one record, the expected reason, the phone call over, the agent socket closed.
    wrong = []
    for call, fault in results:
        record = records.get(call.sid)
        assert record is not None, f"no record for {call.sid} ({fault.name})"
        assert record["status"] == "ended"
        if record["end_reason"] != fault.expected:
            wrong.append((fault.name, record["end_reason"], record["end_detail"]))
        assert call.status == "completed", (fault.name, call.status)
    assert not wrong, wrong
    assert len(records) == len(results) == CALLS + CONCURRENCY
    assert all(c.closed.is_set() for c in conversations)

    # /metrics agrees with the database.
    in_db = Counter(r["end_reason"] for r in records.values())
    for reason, count in in_db.items():
        assert f'callbridge_calls_ended_total{{reason="{reason}"}} {float(count)}' in metrics, reason
    assert "callbridge_active_calls 0.0" in metrics

    # The process returns to its baseline.
    # Back to the baseline: every socket but the two connection pools exactly as before.
    # The pools (SQLAlchemy's to the database, bound 5 + 10 overflow; aiohttp's keep-alive
    # to the Twilio API, bound 100) may grow under load but never past their bounds.
    rest_port = twilio_port

    def kinds(files: list[str]) -> tuple[list[str], list[str], list[str]]:
        targets = [f.split("->", 1)[1] for f in files]
        db = [t for t in targets if t.endswith("calls.db")]
        rest = [t for t in targets if t.startswith("tcp ") and f"->{rest_port} " in t]
        other = [t for t in targets if t not in db and t not in rest]
        return other, db, rest

    (base_other, _, _), (end_other, end_db, end_rest) = kinds(base_files), kinds(end_files)
    assert sorted(end_other) == sorted(base_other), f"descriptors: {base_files} before, {end_files} after"
    assert len(end_db) <= 15 and len(end_rest) <= 100, end_files
    growth_mib = (end_rss - base_rss) / 1024
    summary = {
        "calls": CALLS,
        "concurrency": CONCURRENCY,
        "talk_seconds": TALK,
        "media_frame_ms": FRAME_MS,
        "agent_idle_timeout_s": float(AGENT_IDLE),
        "peak_live_calls_on_server": peak_live,
        "seconds": round(elapsed, 1),
        "faults": dict(Counter(f.name for _, f in results)),
        "end_reasons": dict(in_db),
        "rss_mib": {
            "baseline": round(base_rss / 1024, 1),
            "peak": round(peak_rss / 1024, 1),
            "after": round(end_rss / 1024, 1),
        },
        "fds": {
            "baseline": base_fds,
            "after": end_fds,
            "database_pool_after": len(end_db),
            "twilio_keepalive_after": len(end_rest),
        },
    }
    print("\nsoak:", json.dumps(summary))
    write_report(summary)
    # Allocator arenas are not always given back to the OS; a per-call leak would show as
    # growth proportional to the calls (e.g. 1 MiB per call: CALLS MiB).
    assert growth_mib < 16 + CALLS * 0.02, summary
