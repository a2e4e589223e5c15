"""Nothing left dangling, nothing lost: crash recovery and an unwritable database."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest

from callbridge.call import Call, CallHooks, CallRecord
from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, EndCall, Say
from callbridge.emulators.twilio import TwilioEmulator
from callbridge.store import CallStore
from tests.serverkit import (
    API_TOKEN,
    clean_env,
    free_port,
    running_server,
    serve_cli,
    settings_for,
    wait_until,
    wait_until_async,
)

FAST = float("inf")


@pytest.mark.slow
@pytest.mark.database
async def test_restart_after_sigkill_reconciles_calls_left_open(db_url: str) -> None:
    """SIGKILL with a live inbound call and an outbound call still ringing; the restart of
    the same instance asks Twilio about both at once, hangs up the one still up, and closes
    both records `instance_lost`."""
    port = free_port()
    talk = AgentScript(steps=[Say("I will keep talking.", seconds=60.0)], realtime_factor=1.0)
    async with (
        TwilioEmulator(answer_delay=60.0) as twilio,  # outbound calls ring for a minute
        AgentEmulator(talk) as agent,
    ):
        env = clean_env() | {
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_API_BASE_URL": twilio.base_url,
            "ELEVENLABS_AGENT_ID": "agent_crash",
            "ELEVENLABS_API_BASE_URL": agent.base_url,
            "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "CALLBRIDGE_DATABASE_URL": db_url,
            "CALLBRIDGE_API_TOKEN": API_TOKEN,
            "CALLBRIDGE_INSTANCE_ID": "bridge-a",
        }
        proc = await serve_cli(env, port)
        try:
            inbound = await twilio.place_inbound_call(f"http://127.0.0.1:{port}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=10)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_TOKEN}"}
            ) as api:
                resp = await api.post("/calls", json={"to": "+15550003333", "from": "+15550004444"})
                assert resp.status_code == 201, resp.text
                outbound_sid = resp.json()["call_sid"]

                async def both_recorded() -> bool:  # the inbound call's start record is written
                    calls = (await api.get("/calls")).json()["calls"]
                    return {inbound.sid, outbound_sid} <= {r["call_sid"] for r in calls}

                await wait_until_async(both_recorded, 10, "both calls' start records")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        # The kill dropped the inbound stream (Twilio then ends that call by itself); the
        # outbound call is still ringing with nobody to bridge it.
        await inbound.wait_ended(5)
        assert twilio.calls[outbound_sid].status == "ringing"

        # The same instance starts again: its previous run's process is gone from this host,
        # so its calls are closed at once (before a lease period), as any instance would.
        proc = await serve_cli(env, port)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_TOKEN}"}
            ) as api:

                async def both_closed() -> bool:
                    records = (await api.get("/calls")).json()["calls"]
                    return len(records) == 2 and all(r["status"] == "ended" for r in records)

                await wait_until_async(both_closed, 10, "both records closed by the restart")
                records = (await api.get("/calls")).json()["calls"]
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
    by_sid = {r["call_sid"]: r for r in records}
    assert by_sid[inbound.sid]["end_reason"] == "instance_lost", by_sid[inbound.sid]
    assert "previous run" in by_sid[inbound.sid]["end_detail"]
    assert "carrier reported it completed" in by_sid[inbound.sid]["end_detail"]
    assert by_sid[outbound_sid]["end_reason"] == "instance_lost", by_sid[outbound_sid]
    assert "ringing: hung up" in by_sid[outbound_sid]["end_detail"]
    assert twilio.calls[outbound_sid].status == "canceled"


async def test_record_saved_while_the_database_is_locked_is_written_later(
    twilio: TwilioEmulator, tmp_path: Path
) -> None:
    db = tmp_path / "calls.db"
    locker: list[sqlite3.Connection] = []

    async def lock_database(call: Call) -> None:
        # Another writer holds the database at the moment the call ends (taken when our
        # writer is idle: this hook blocks the loop while it waits for the lock).
        assert await store.wait_written(10)
        con = sqlite3.connect(db, isolation_level=None, timeout=0)
        con.execute("BEGIN EXCLUSIVE")
        locker.append(con)

    ended: list[CallRecord] = []
    script = AgentScript(steps=[Say("Hi", seconds=0.3), EndCall("Bye", seconds=0.3)], realtime_factor=FAST)
    async with AgentEmulator(script) as agent:
        settings = settings_for(twilio, agent, db)
        store = CallStore(settings.database_url, busy_timeout=0.2, spool_path=str(tmp_path / "spool.jsonl"))
        hooks = CallHooks(on_agent_end_call=[lock_database], on_call_end=[ended.append])
        async with running_server(settings, hooks=hooks, store=store) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await srv.wait_records(1)
            await wait_until(lambda: store.saves_failed > 0, 10, "the locked write failed")
            assert store.pending == 1
            # ... and is already on disk, in case the process dies before the lock goes
            assert call.sid in (tmp_path / "spool.jsonl").read_text()
            locker[0].rollback()
            locker[0].close()
            for _ in range(100):
                if store.pending == 0:
                    break
                await asyncio.sleep(0.05)
            record = await srv.call_record(call.sid)
    assert record["status"] == "ended" and record["end_reason"] == "agent_ended"
    assert record["transcript"][-1]["text"] == "Bye"
    assert ended[0].end_reason == "agent_ended"


async def test_records_unwritable_at_close_are_spooled_and_written_at_next_start(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    url = f"sqlite+aiosqlite:///{db}"
    spool = tmp_path / "spool.jsonl"
    store = CallStore(url, busy_timeout=0.1, spool_path=str(spool))
    await store.init()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    record = CallRecord(call_sid="CA" + "5" * 32, status="ended", end_reason="caller_hung_up", duration_s=3.0)
    await store.save(record)  # returns at once: the database is not on the call's path
    await wait_until(lambda: not store.healthy, 10, "the locked write failed")
    assert store.pending == 1 and "caller_hung_up" in spool.read_text()  # on disk at once
    assert await store.close(0.2) == 1  # still locked: left in the spool file
    con.rollback()
    con.close()
    assert spool.exists() and "caller_hung_up" in spool.read_text()
    again = CallStore(url, spool_path=str(spool))
    await again.init()
    saved = await again.get("CA" + "5" * 32)
    await again.close()
    assert saved is not None and saved["end_reason"] == "caller_hung_up"
    assert not spool.exists()
