"""Several instances on one PostgreSQL: leases, dead instances' calls, commands that reach
the instance holding a call, fleet-wide token use and cap, gunicorn workers.

Instances are real processes (`callbridge serve`) where a process must die or hang, and
servers in this process otherwise; each test has a fresh database of the session's
PostgreSQL server (`pg_url`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say
from callbridge.emulators.twilio import TwilioEmulator, twilio_signature
from callbridge.transfer import parse_allow_list
from tests.pgserver import PostgresServer
from tests.serverkit import (
    API_TOKEN,
    RunningServer,
    clean_env,
    free_port,
    running_server,
    serve_cli,
    settings_for,
    wait_until,
    wait_until_async,
)

Pair = tuple[TwilioEmulator, AgentEmulator, RunningServer, RunningServer]
LEASE = 3.0  # short leases: a dead instance is found within seconds


def talkative(seconds: float = 60.0) -> AgentScript:
    return AgentScript(steps=[Say("I can talk for a long time.", seconds=seconds)], realtime_factor=1.0)


async def query(url: str, sql: str) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql))).all())
    finally:
        await engine.dispose()


def env_for(
    twilio: TwilioEmulator, agent: AgentEmulator, url: str, port: int, **extra: str
) -> dict[str, str]:
    return clean_env() | {
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_API_BASE_URL": twilio.base_url,
        "ELEVENLABS_AGENT_ID": "agent_fleet",
        "ELEVENLABS_API_BASE_URL": agent.base_url,
        "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CALLBRIDGE_DATABASE_URL": url,
        "CALLBRIDGE_API_TOKEN": API_TOKEN,
        "CALLBRIDGE_INSTANCE_LEASE_SECONDS": str(LEASE),
        "CALLBRIDGE_SHUTDOWN_GRACE_SECONDS": "1",
        **extra,
    }


def api(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
    )


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def record_of(port: int, sid: str) -> dict[str, Any]:
    """The record as the instance on `port` shows it ({} while there is none yet: a killed
    instance's queued writes are lost, and the call's record is made by whoever closes it)."""
    async with api(port) as http:
        resp = await http.get(f"/calls/{sid}")
        assert resp.status_code in (200, 404), resp.text
        data: dict[str, Any] = resp.json() if resp.status_code == 200 else {}
        return data


async def place_ringing(port: int) -> str:
    """An outbound call from the instance on `port`, ringing (nobody answers for a minute)."""
    async with api(port) as http:
        resp = await http.post("/calls", json={"to": "+15550003333", "from": "+15550004444"})
        assert resp.status_code == 201, resp.text
        sid: str = resp.json()["call_sid"]
        return sid


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[TwilioEmulator, AgentEmulator]]:
    async with (
        TwilioEmulator(answer_delay=60.0) as twilio,  # outbound calls ring for a minute
        AgentEmulator(talkative()) as agent,
    ):
        yield twilio, agent


# -- processes ------------------------------------------------------------------------------


async def test_three_instances_start_together_and_leave_cleanly(
    pg_url: str, emulators: tuple[TwilioEmulator, AgentEmulator]
) -> None:
    twilio, agent = emulators
    ports = [free_port() for _ in range(3)]
    procs = await asyncio.gather(*(serve_cli(env_for(twilio, agent, pg_url, p), p) for p in ports))
    try:
        ids = []
        for port in ports:
            async with api(port) as http:
                ready = (await http.get("/readyz")).json()
            assert ready["status"] == "ready" and ready["lease"] == "held"
            ids.append(ready["instance"])
        assert len(set(ids)) == 3  # unique by default, on one host
        rows = await query(pg_url, "SELECT instance_id, pid FROM instances")
        assert sorted(r[0] for r in rows) == sorted(ids)
        assert sorted(r[1] for r in rows) == sorted(p.pid for p in procs)
    finally:
        await asyncio.gather(*(stop_process(p) for p in procs))
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert await query(pg_url, "SELECT instance_id FROM instances") == []  # clean stops leave no lease


async def test_killed_instance_calls_are_closed_by_a_survivor_and_a_restart_leaves_others_alone(
    pg_url: str, emulators: tuple[TwilioEmulator, AgentEmulator]
) -> None:
    """A is SIGKILLed with an outbound call ringing: B (same host, sees A's process gone)
    hangs it up and closes it `instance_lost`. B's own live call is untouched, also when a
    new instance starts. An instance that hangs (SIGSTOP) loses its calls once its lease
    expires, and joins again when it comes back."""
    twilio, agent = emulators
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    a = await serve_cli(env_for(twilio, agent, pg_url, port_a), port_a)
    b = await serve_cli(env_for(twilio, agent, pg_url, port_b), port_b)
    c: asyncio.subprocess.Process | None = None
    try:
        on_b = await twilio.place_inbound_call(f"http://127.0.0.1:{port_b}/twilio/inbound")
        await agent.wait_for_conversations(1, timeout=10)
        ringing = await place_ringing(port_a)
        a.send_signal(signal.SIGKILL)
        await a.wait()

        async def closed() -> bool:
            return (await record_of(port_b, ringing)).get("status") == "ended"

        await wait_until_async(closed, LEASE * 5, "A's call closed by B")
        record = await record_of(port_b, ringing)
        assert record["end_reason"] == "instance_lost", record
        assert "ringing: hung up" in record["end_detail"]
        assert twilio.calls[ringing].status == "canceled"

        # A new instance starts; B's live call goes on.
        c = await serve_cli(env_for(twilio, agent, pg_url, port_c), port_c)
        async with api(port_c) as http:
            assert (await http.get("/readyz")).status_code == 200
        await asyncio.sleep(LEASE)  # heartbeats of both run; nothing may touch B's call
        assert twilio.calls[on_b.sid].status == "in-progress"
        assert (await record_of(port_c, on_b.sid))["status"] == "active"

        # C hangs (SIGSTOP) with a call ringing: once its lease expires, a live instance closes it.
        ringing_c = await place_ringing(port_c)
        c.send_signal(signal.SIGSTOP)
        stopped_at = asyncio.get_running_loop().time()

        async def closed_c() -> bool:
            return (await record_of(port_b, ringing_c)).get("status") == "ended"

        await wait_until_async(closed_c, LEASE * 5, "C's call closed after its lease expired")
        waited = asyncio.get_running_loop().time() - stopped_at
        # Not before its lease expired: its process lives (expiry is at least 2L/3 - L/6 after
        # the stop; how soon after is measured by bench/fleet_times.py, not asserted here).
        assert waited >= LEASE / 2 * 0.9, waited
        assert (await record_of(port_b, ringing_c))["end_reason"] == "instance_lost"

        async def canceled_c() -> bool:  # the record is written first, then the call is canceled
            return twilio.calls[ringing_c].status == "canceled"

        await wait_until_async(canceled_c, 5.0, "C's ringing call canceled after its record")
        c.send_signal(signal.SIGCONT)
        async with api(port_c) as http:

            async def c_ready_again() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await wait_until_async(c_ready_again, LEASE * 5, "C joined again")
        assert twilio.calls[on_b.sid].status == "in-progress"
    finally:
        await asyncio.gather(*(stop_process(p) for p in (a, b, c) if p is not None))


async def test_a_killed_worker_is_replaced_and_its_calls_reconciled(
    pg_url: str, emulators: tuple[TwilioEmulator, AgentEmulator], tmp_path: Path
) -> None:
    twilio, agent = emulators
    port = free_port()
    log = tmp_path / "serve.log"
    proc = await serve_cli(env_for(twilio, agent, pg_url, port), port, log=log, args=("--workers", "2"))
    try:

        async def two_workers() -> bool:
            return len(await query(pg_url, "SELECT pid FROM instances")) == 2

        await wait_until_async(two_workers, 20, "two workers joined")
        pids_before = {r[0] for r in await query(pg_url, "SELECT pid FROM instances")}
        ringing = await place_ringing(port)
        owner = await query(pg_url, f"SELECT instance FROM fleet_calls WHERE call_sid = '{ringing}'")
        owner_pid = next(
            r[0]
            for r in await query(pg_url, f"SELECT pid FROM instances WHERE instance_id = '{owner[0][0]}'")
        )
        os.kill(owner_pid, signal.SIGKILL)

        async def replaced_and_closed() -> bool:
            pids = {r[0] for r in await query(pg_url, "SELECT pid FROM instances")}
            ended = await query(pg_url, f"SELECT end_reason FROM calls WHERE call_sid = '{ringing}'")
            return len(pids) == 2 and owner_pid not in pids and ended[0][0] == "instance_lost"

        await wait_until_async(replaced_and_closed, 20, "worker replaced and its call reconciled")
        # The record is written first, then the call is canceled.
        await wait_until(lambda: twilio.calls[ringing].status == "canceled", 5.0, "canceled at Twilio")
        pids_after = {r[0] for r in await query(pg_url, "SELECT pid FROM instances")}
        assert len(pids_after - pids_before) == 1
        # A live call on a worker when SIGTERM arrives: drained (1 s grace), then ended.
        live = await twilio.place_inbound_call(f"http://127.0.0.1:{port}/twilio/inbound")
        await agent.wait_for_conversations(1, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 40)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert await query(pg_url, "SELECT instance_id FROM instances") == []  # both workers left cleanly
    rows = await query(pg_url, f"SELECT end_reason, end_detail FROM calls WHERE call_sid = '{live.sid}'")
    assert rows[0][0] == "shutdown" and "grace" in rows[0][1], rows
    assert twilio.calls[live.sid].status == "completed"


# -- servers in this process ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_instances(url: str, **settings: Any) -> AsyncIterator[Pair]:
    """The emulators (an agent that talks for a minute) and two servers in this process,
    instances `a` and `b`, on one database."""
    async with (
        TwilioEmulator() as twilio,
        AgentEmulator(talkative()) as agent,
        running_server(settings_for(twilio, agent, url, instance_id="a", **settings)) as a,
        running_server(settings_for(twilio, agent, url, instance_id="b", **settings)) as b,
    ):
        yield twilio, agent, a, b


async def test_hangup_and_status_callbacks_reach_the_instance_holding_the_call(pg_url: str) -> None:
    async with two_instances(pg_url) as (twilio, agent, a, b):
        first = await twilio.place_inbound_call(f"{a.url}/twilio/inbound")
        await agent.wait_for_conversations(1, timeout=10)
        resp = await b.api.post(f"/calls/{first.sid}/hangup")
        assert resp.status_code == 200, resp.text
        assert resp.json()["end_reason"] == "hangup_requested" and resp.json()["ended_by_instance"] == "a"
        await a.wait_records(1)
        assert a.records[0].end_reason == "hangup_requested"
        await first.wait_ended(5)
        assert twilio.calls[first.sid].status == "completed"

        second = await twilio.place_inbound_call(f"{a.url}/twilio/inbound")
        await agent.wait_for_conversations(2, timeout=10)
        form = {
            "AccountSid": twilio.account_sid,
            "CallSid": second.sid,
            "CallStatus": "completed",
            "Direction": "inbound",
            "From": "+15550001111",
            "To": "+15550002222",
        }
        url = f"{b.url}/twilio/status"
        async with httpx.AsyncClient() as http:
            resp = await http.post(
                url, data=form, headers={"X-Twilio-Signature": twilio_signature(twilio.auth_token, url, form)}
            )
        assert resp.status_code in (200, 204), resp.text
        await a.wait_records(2)
        assert a.records[1].end_reason == "caller_hung_up"
        assert "received by b" in (a.records[1].end_detail or "")
        assert b.records == []  # nothing ran on b
        assert b.state.fleet is not None and b.state.fleet.commands_sent == 2


async def test_a_stream_token_is_used_once_across_the_fleet(pg_url: str) -> None:
    async with two_instances(pg_url) as (twilio, agent, a, b):
        call = await twilio.place_inbound_call(f"{a.url}/twilio/inbound")
        await agent.wait_for_conversations(1, timeout=10)
        params = {"cb_ref": call.sid, "cb_token": a.state.stream_token(call.sid)}
        ws_url = b.url.replace("http://", "ws://") + "/twilio/media-stream"
        headers = {"x-twilio-signature": twilio_signature(twilio.auth_token, ws_url)}
        async with connect(ws_url, additional_headers=headers) as ws:
            stream_sid = "MZ" + call.sid[2:]
            start = {
                "streamSid": stream_sid,
                "accountSid": twilio.account_sid,
                "callSid": call.sid,
                "tracks": ["inbound"],
                "customParameters": params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            }
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(
                json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid})
            )
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        await asyncio.sleep(0.3)  # an agent session would have been opened by now
        assert len(agent.conversations) == 1  # the replay opened none
        assert twilio.calls[call.sid].status == "in-progress"  # the genuine call goes on
        assert a.state.bridge.find(call.sid) is not None


async def test_the_fleet_cap_counts_every_instance(pg_url: str) -> None:
    async with two_instances(pg_url, fleet_max_concurrent_calls=1) as (twilio, agent, a, b):
        first = await twilio.place_inbound_call(f"{a.url}/twilio/inbound")
        await agent.wait_for_conversations(1, timeout=10)
        busy = await twilio.place_inbound_call(f"{b.url}/twilio/inbound")
        await busy.wait_ended(10)
        assert busy.said and "busy" in " ".join(busy.said).lower(), busy.said  # the polite busy message
        assert len(agent.conversations) == 1
        resp = await b.api.post("/calls", json={"to": "+15550003333", "from": "+15550004444"})
        assert resp.status_code == 503 and "FLEET_MAX" in resp.text
        # Once the first call ends, the fleet has room again.
        await a.api.post(f"/calls/{first.sid}/hangup")
        await a.wait_records(1)

        async def room() -> bool:
            return b.state.fleet is not None and await b.state.fleet.room()

        await wait_until_async(room, 5, "the ended call freed its place")
        again = await twilio.place_inbound_call(f"{b.url}/twilio/inbound")
        await agent.wait_for_conversations(2, timeout=10)
        assert twilio.calls[again.sid].status == "in-progress"


# -- refusals at start ----------------------------------------------------------------------


async def serve_refused(env: dict[str, str], port: int, cwd: Path | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        env=env, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_a_second_process_on_one_sqlite_file_is_refused_naming_postgresql(
    emulators: tuple[TwilioEmulator, AgentEmulator], tmp_path: Path
) -> None:
    twilio, agent = emulators
    url = f"sqlite+aiosqlite:///{tmp_path}/calls.db"
    first_port, second_port = free_port(), free_port()
    first = await serve_cli(env_for(twilio, agent, url, first_port), first_port)
    try:
        code, err = await serve_refused(env_for(twilio, agent, url, second_port), second_port)
    finally:
        await stop_process(first)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "already served by another callbridge process" in lines[0] and "PostgreSQL" in lines[0]
    assert first.returncode == 0


async def test_an_instance_id_held_by_a_live_instance_is_refused(
    pg_url: str, emulators: tuple[TwilioEmulator, AgentEmulator]
) -> None:
    twilio, agent = emulators
    first_port, second_port = free_port(), free_port()
    named = {"CALLBRIDGE_INSTANCE_ID": "bridge-east"}
    first = await serve_cli(env_for(twilio, agent, pg_url, first_port, **named), first_port)
    try:
        code, err = await serve_refused(env_for(twilio, agent, pg_url, second_port, **named), second_port)
        async with api(first_port) as http:
            assert (await http.get("/readyz")).json()["instance"] == "bridge-east"  # untouched
    finally:
        await stop_process(first)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "'bridge-east' is in use by a live instance" in lines[0] and f"pid {first.pid}" in lines[0]


async def test_a_database_outage_longer_than_a_lease_hangs_up_nobody(
    pg_url: str, pg_server: PostgresServer
) -> None:
    """Every lease expires while PostgreSQL hangs; when it answers again, each instance renews
    its own before judging the others', so no live call is taken for a dead instance's."""
    lease = 2.0
    async with two_instances(pg_url, instance_lease_seconds=lease) as (twilio, agent, a, b):
        on_a = await twilio.place_inbound_call(f"{a.url}/twilio/inbound")
        on_b = await twilio.place_inbound_call(f"{b.url}/twilio/inbound")
        await agent.wait_for_conversations(2, timeout=10)
        pg_server.pause()
        try:
            await asyncio.sleep(lease * 3)  # every lease has expired by the database's clock
            assert a.state.fleet is not None and b.state.fleet is not None
            await wait_until(lambda: not a.state.fleet.lease_ok, lease * 2, "a reports its lease not held")
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{a.url}/readyz")).status_code == 503
        finally:
            pg_server.resume()
        fleets = (a.state.fleet, b.state.fleet)
        await wait_until(lambda: all(f.lease_ok for f in fleets), lease * 3, "leases renewed")
        await asyncio.sleep(lease * 2)  # heartbeats (and their judgement of each other) run
        assert twilio.calls[on_a.sid].status == "in-progress"
        assert twilio.calls[on_b.sid].status == "in-progress"
        assert a.state.bridge.find(on_a.sid) is not None and b.state.bridge.find(on_b.sid) is not None
        assert a.state.fleet.reconciled_runs == 0 and b.state.fleet.reconciled_runs == 0


async def test_a_transfer_through_another_instance_runs_on_the_holder(pg_url: str) -> None:
    desk = "+15550003333"
    async with two_instances(pg_url, transfer_allow=parse_allow_list("+1555000*")) as (twilio, agent, a, b):
        call = await twilio.place_inbound_call(f"{a.url}/twilio/inbound")
        await agent.wait_for_conversations(1, timeout=10)
        refused = await b.api.post(f"/calls/{call.sid}/transfer", json={"to": "+19005550000"})
        assert refused.status_code == 403  # the allow-list is checked where the request lands
        resp = await b.api.post(f"/calls/{call.sid}/transfer", json={"to": desk, "reason": "a person"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["end_reason"] == "transferred" and body["ended_by_instance"] == "a"
        assert desk in body["end_detail"]
        await a.wait_records(1)
        assert a.records[0].end_reason == "transferred"
        await wait_until(lambda: bool(twilio.calls[call.sid].dials), 10, "Twilio dialled the desk")
        assert [d.target for d in twilio.calls[call.sid].dials] == [desk]
        assert b.records == []


async def test_a_reconciliation_that_fails_is_taken_up_again(pg_url: str) -> None:
    """Instance a stops renewing (its heartbeat stopped: as good as dead) with a call ringing;
    b claims it, and its first attempt fails (Twilio's API raises); b's next heartbeat goes on
    with its own claim rather than leaving the run claimed and its call open for ever."""
    short = {"instance_lease_seconds": LEASE}
    async with (
        TwilioEmulator(answer_delay=60.0) as twilio,
        AgentEmulator(talkative()) as agent,
        running_server(settings_for(twilio, agent, pg_url, instance_id="a", **short)) as a,
        running_server(settings_for(twilio, agent, pg_url, instance_id="b", **short)) as b,
    ):
        control = b.state.control
        real_fetch = control.fetch_status
        failures: list[str] = []

        async def fetch_failing_once(call_sid: str) -> str | None:
            if not failures:
                failures.append(call_sid)
                raise RuntimeError("injected: the first fetch fails")
            return await real_fetch(call_sid)

        control.fetch_status = fetch_failing_once  # type: ignore[method-assign]
        resp = await a.api.post("/calls", json={"to": "+15550003333", "from": "+15550004444"})
        ringing = resp.json()["call_sid"]
        assert a.state.fleet is not None and b.state.fleet is not None
        await a.state.fleet.stop()  # a's lease is no longer renewed

        async def closed() -> bool:
            record = await b.state.store.get(ringing)
            return record is not None and record["status"] == "ended"

        await wait_until_async(closed, LEASE * 5, "a's call closed by b after a failed first attempt")
        record = await b.state.store.get(ringing)
        assert record is not None and record["end_reason"] == "instance_lost", record
        assert failures == [ringing]  # the first attempt did fail
        # The record is closed (and written) before the hang-up is asked for.
        await wait_until(lambda: twilio.calls[ringing].status == "canceled", LEASE, "hung up at Twilio")

        async def released() -> bool:
            return await query(pg_url, "SELECT instance_id FROM instances WHERE instance_id = 'a'") == []

        await wait_until_async(released, LEASE * 2, "a's lease row removed once its calls are closed")
