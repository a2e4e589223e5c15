"""Records that are never lost, on a real PostgreSQL server started by the tests.

Each fault is real: the server stopped (`pg_ctl stop`), hung (SIGSTOP of the postmaster
and its backends: connections are accepted, nothing is answered), killed, a value it
refuses, instances migrating it together. What is checked is what a user would check:
every call's record ends `ended` with its true end reason and transcript, nothing is
left `active`, and the calls themselves (agent connect, goodbye, hang-up) are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from callbridge.call import CallRecord
from callbridge.emulators.elevenlabs import AgentEmulator
from callbridge.emulators.twilio import TwilioEmulator
from callbridge.logs import JsonFormatter
from callbridge.store import CallStore, iter_spool
from tests.pgserver import PostgresServer
from tests.serverkit import (
    API_TOKEN,
    clean_env,
    free_port,
    running_server,
    serve_cli,
    settings_for,
    short_script,
    wait_until,
    wait_until_async,
)

FAST = float("inf")


def spool_exists(store: CallStore) -> bool:
    return Path(store.spool_path).exists()


def pg_store(url: str, tmp_path: Path, instance: str = "test-a") -> CallStore:
    # Short timeouts: a hung database is given up on within a second.
    return CallStore(
        url, instance=instance, spool_path=str(tmp_path / "spool.jsonl"), timeout=1.0, connect_timeout=1.0
    )


async def records_in_database(url: str) -> dict[str, dict[str, Any]]:
    """Read the rows straight from the database (not through the server's memory)."""
    store = CallStore(url)
    try:
        page = await store.list_calls(limit=200)
    finally:
        await store.close()
    return {r["call_sid"]: r for r in page.items}


def assert_good_call(record: dict[str, Any]) -> None:
    """The call itself went as it should: the agent connected promptly, the goodbye was
    played to its last mark and the hang-up followed at once."""
    assert record["status"] == "ended" and record["end_reason"] == "agent_ended", record
    assert [e["text"] for e in record["transcript"]] == ["Hello!", "Goodbye!"]
    assert record["metrics"]["agent_connect_ms"] < 2000
    assert record["metrics"]["hangup_latency_ms"] < 500


async def test_database_stopped_during_calls_loses_nothing(
    twilio: TwilioEmulator, tmp_path: Path, pg_server: PostgresServer, pg_url: str
) -> None:
    store = pg_store(pg_url, tmp_path)
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "unused.db", database_url=pg_url)
        async with running_server(settings, store=store) as srv:
            before = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await srv.wait_records(1)
            await wait_until(lambda: store.pending == 0, 10, "first record written")

            pg_server.stop()
            during = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_="+15550001111")
            await srv.wait_records(2)
            await during.wait_ended(5)
            # The record is on disk at once, with its true end.
            await wait_until(lambda: not store.healthy, 10, "outage noticed")
            spooled = [op for op in iter_spool(store.spool_path) if op["call_sid"] == during.sid]
            assert spooled and spooled[-1]["record"]["end_reason"] == "agent_ended"
            # The API: lists answer 503 with a JSON error; the call itself is shown from memory.
            listing = await srv.api.get("/calls")
            assert listing.status_code == 503 and "unavailable" in listing.json()["error"]
            shown = await srv.call_record(during.sid)
            assert shown["end_reason"] == "agent_ended"

            pg_server.start()
            # Replayed as soon as the database is back, with no new call to trigger it.
            await wait_until(lambda: store.pending == 0, 15, "queued records written")
            assert not spool_exists(store)
            listing = await srv.api.get("/calls")
            assert listing.status_code == 200
    rows = await records_in_database(pg_url)
    assert set(rows) == {before.sid, during.sid}
    for record in rows.values():
        assert_good_call(record)
    assert rows[during.sid]["from"] == "+15550001111"
    assert before.status == during.status == "completed"


async def test_hung_database_never_delays_a_call_or_shutdown(
    twilio: TwilioEmulator, tmp_path: Path, pg_server: PostgresServer, pg_url: str
) -> None:
    store = pg_store(pg_url, tmp_path)
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(
            twilio, agent, tmp_path / "unused.db", database_url=pg_url, shutdown_grace_seconds=2.0
        )
        async with running_server(settings, store=store) as srv:
            pg_server.pause()  # accepts connections, answers nothing
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await srv.wait_records(1)
            await call.wait_ended(5)
            shown = await srv.call_record(call.sid)
            assert_good_call(shown)
            listing = await srv.api.get("/calls")  # answered within the store's 1 s timeout
            assert listing.status_code == 503
            pg_server.resume()
            await wait_until(lambda: store.pending == 0, 15, "queued record written")

            pg_server.pause()  # hung again when the process stops with a call's record queued
            second = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await srv.wait_records(2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
        stopped_in = loop.time() - t0
        assert srv.state.unwritten == 1
        assert [op["call_sid"] for op in iter_spool(store.spool_path)][-1] == second.sid
    pg_server.resume()
    assert stopped_in < settings.shutdown_grace_seconds + 2.0, stopped_in
    # The next start writes the spooled record back with its true end.
    again = pg_store(pg_url, tmp_path)
    await again.init()
    assert await again.wait_written(10)
    await again.close()
    rows = await records_in_database(pg_url)
    assert_good_call(rows[call.sid])
    assert_good_call(rows[second.sid])
    assert not spool_exists(store)


async def test_a_refused_value_costs_its_own_field_only(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callbridge")
    store = pg_store(pg_url, tmp_path)
    await store.init()
    now = datetime.now(UTC)
    sip = "sip:" + "caller." * 40 + "x@trunk.example.com"  # 267 characters: SIP URIs are long
    good = CallRecord(call_sid="CA" + "1" * 32, from_number=sip, started_at=now, status="ended")
    # PostgreSQL refuses a NUL character in text (SQLite takes it).
    bad = CallRecord(
        call_sid="CA" + "2" * 32,
        from_number="+15550002222",
        started_at=now,
        status="ended",
        end_reason="agent_error",
        end_detail="agent said: \x00 nothing",
        transcript=[{"role": "agent", "text": "Hi"}],
    )
    after = CallRecord(call_sid="CA" + "3" * 32, started_at=now, status="ended", end_reason="caller_hung_up")
    for record in (good, bad, after):
        await store.save(record)
    assert await store.wait_written(10)
    await store.close()
    rows = await records_in_database(pg_url)
    assert rows[good.call_sid]["from"] == sip and rows[good.call_sid]["refused_fields"] == []
    refused = rows[bad.call_sid]
    assert refused["refused_fields"] == ["end_detail"]
    assert refused["end_detail"] is None and refused["end_reason"] == "agent_error"
    assert refused["from"] == "+15550002222" and refused["transcript"] == [{"role": "agent", "text": "Hi"}]
    assert rows[after.call_sid]["end_reason"] == "caller_hung_up"
    assert store.quarantined == 0 and not spool_exists(store)
    refusals = [r for r in caplog.records if getattr(r, "cb_event", None) == "store.write_refused"]
    assert len(refusals) == 1, caplog.text
    line = json.loads(JsonFormatter().format(refusals[0]))
    assert line["level"] == "error" and line["call_sid"] == bad.call_sid
    assert line["refused_fields"] == "end_detail"


async def test_a_long_sip_caller_id_is_recorded(twilio: TwilioEmulator, tmp_path: Path, pg_url: str) -> None:
    sip = "sip:" + "a" * 180 + "@pbx.example.com"
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "unused.db", database_url=pg_url)
        store = pg_store(pg_url, tmp_path)
        async with running_server(settings, store=store) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_=sip)
            await srv.wait_records(1)
            await wait_until(lambda: store.pending == 0, 10, "record written")
    rows = await records_in_database(pg_url)
    assert rows[call.sid]["from"] == sip
    assert_good_call(rows[call.sid])


async def test_instances_starting_together_migrate_once(tmp_path: Path, pg_url: str) -> None:
    stores = [pg_store(pg_url, tmp_path / str(i), instance=f"i{i}") for i in range(8)]
    for i in range(8):
        (tmp_path / str(i)).mkdir()
    try:
        await asyncio.gather(*(s.init() for s in stores))
    finally:
        for s in stores:
            await s.close()
    engine = create_async_engine(pg_url)
    try:
        async with engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
    finally:
        await engine.dispose()
    assert versions == ["0004"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_database_made_by_an_earlier_release_is_upgraded_in_place(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("pg_url")
        if backend == "postgresql"
        else f"sqlite+aiosqlite:///{tmp_path}/c.db"
    )
    # The schema as releases before migrations created it (VARCHAR(64) caller IDs).
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE calls (call_sid VARCHAR(64) PRIMARY KEY, stream_sid VARCHAR(64), "
                    "conversation_id VARCHAR(128), direction VARCHAR(16) NOT NULL, from_number VARCHAR(64), "
                    "to_number VARCHAR(64), status VARCHAR(16) NOT NULL, end_reason VARCHAR(32), "
                    "end_detail TEXT, twilio_status VARCHAR(32), started_at TIMESTAMP WITH TIME ZONE, "
                    "answered_at TIMESTAMP WITH TIME ZONE, ended_at TIMESTAMP WITH TIME ZONE, "
                    "duration_s FLOAT, transcript JSON NOT NULL, timeline JSON NOT NULL, "
                    "twilio_events JSON NOT NULL, metrics JSON NOT NULL, instance VARCHAR(128), "
                    "updated_at TIMESTAMP WITH TIME ZONE NOT NULL)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO calls (call_sid, direction, status, end_reason, transcript, timeline, "
                    "twilio_events, metrics, updated_at) VALUES ('CA" + "9" * 32 + "', 'inbound', 'ended', "
                    "'agent_ended', '[{\"role\": \"agent\", \"text\": \"Bye\"}]', '[]', '[]', '{}', "
                    "CURRENT_TIMESTAMP)"
                )
            )
    finally:
        await engine.dispose()
    store = pg_store(url, tmp_path)
    await store.init()
    long_caller = "sip:" + "b" * 120 + "@example.com"
    await store.save(CallRecord(call_sid="CA" + "8" * 32, from_number=long_caller, status="ended"))
    assert await store.wait_written(10)
    old = await store.get("CA" + "9" * 32)
    new = await store.get("CA" + "8" * 32)
    await store.close()
    assert old is not None and old["end_reason"] == "agent_ended" and old["transcript"][0]["text"] == "Bye"
    assert new is not None and new["from"] == long_caller and new["refused_fields"] == []
    assert store.quarantined == 0


# -- a real `callbridge serve` process, signalled in the middle of an outage ---------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_process_stopped_during_an_outage_keeps_every_record(
    tmp_path: Path, pg_server: PostgresServer, pg_url: str, sig: signal.Signals
) -> None:
    port = free_port()
    async with TwilioEmulator() as twilio, AgentEmulator(short_script()) as agent:
        env = clean_env() | {
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_API_BASE_URL": twilio.base_url,
            "ELEVENLABS_AGENT_ID": "agent_outage",
            "ELEVENLABS_API_BASE_URL": agent.base_url,
            "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "CALLBRIDGE_DATABASE_URL": pg_url.replace("postgresql+asyncpg:", "postgresql:"),
            "CALLBRIDGE_API_TOKEN": API_TOKEN,
            "CALLBRIDGE_INSTANCE_ID": "bridge-a",
            "CALLBRIDGE_SHUTDOWN_GRACE_SECONDS": "1",
            "CALLBRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
        }
        (tmp_path / "spool").mkdir()
        spool = tmp_path / "spool" / "callbridge-unsaved-records.jsonl"
        proc = await serve_cli(env, port, cwd=tmp_path, log=tmp_path / "serve.log")
        try:
            pg_server.stop()
            ended = await twilio.place_inbound_call(f"http://127.0.0.1:{port}/twilio/inbound")
            await ended.wait_ended(10)

            def spooled_end() -> bool:
                return any(
                    op["call_sid"] == ended.sid and op.get("record", {}).get("status") == "ended"
                    for op in iter_spool(str(spool))
                )

            await wait_until(spooled_end, 10, "the ended call's record spooled")
            t0 = asyncio.get_running_loop().time()
            proc.send_signal(sig)
            code = await asyncio.wait_for(proc.wait(), 30)
            stopped_in = asyncio.get_running_loop().time() - t0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if sig is signal.SIGTERM:
            # Records were left unwritten: the exit status says so, and the log says where.
            assert code != 0, (tmp_path / "serve.log").read_text()[-2000:]
            assert str(spool) in (tmp_path / "serve.log").read_text()
            assert stopped_in < 10, stopped_in
        assert spooled_end()

        pg_server.start()
        proc = await serve_cli(env, port, cwd=tmp_path, log=tmp_path / "serve.log")
        try:
            await wait_until(lambda: not spool.exists(), 15, "spool written back at start")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    rows = await records_in_database(pg_url)
    assert_good_call(rows[ended.sid])  # its true end, not relabelled `shutdown` by recovery
    assert not [r for r in rows.values() if r["status"] == "active"]
    assert json.dumps(rows[ended.sid]).count("Goodbye!") == 1


async def test_a_spool_the_database_refuses_is_quarantined_and_never_blocks_start(
    tmp_path: Path, pg_url: str
) -> None:
    good = CallRecord(call_sid="CA" + "4" * 32, status="ended", end_reason="caller_hung_up")
    # A NUL in a core column: PostgreSQL refuses the row even without its optional fields.
    refused = CallRecord(call_sid="CA" + "5" * 32, status="ended", end_reason="agent\x00ended")
    spool = tmp_path / "spool.jsonl"
    lines = [
        json.dumps({"op": "record", "call_sid": r.call_sid, "record": r.to_dict(), "instance": "old"})
        for r in (refused, good)
    ]
    spool.write_text("this is not JSON\n" + "\n".join(lines) + "\n")
    store = pg_store(pg_url, tmp_path)
    await store.init()  # starts whatever the spool holds
    assert await store.wait_written(10)
    await store.close()
    rows = await records_in_database(pg_url)
    assert set(rows) == {good.call_sid} and rows[good.call_sid]["end_reason"] == "caller_hung_up"
    quarantine = (tmp_path / "callbridge-refused-records.jsonl").read_text().splitlines()
    assert quarantine[0] == "this is not JSON"
    assert json.loads(quarantine[1])["call_sid"] == refused.call_sid
    assert store.quarantined == 2 and not spool_exists(store)


async def test_a_write_from_another_instance_between_read_and_write_is_kept(
    tmp_path: Path, pg_url: str
) -> None:
    """Two instances write one call's row: the one holding the call its end, another the
    answering-machine verdict that reached it (a load balancer's choice). The holder writes
    its row back whole, so a verdict committed while it does must not be overwritten."""
    sid = "CA" + "7" * 32
    store = pg_store(pg_url, tmp_path)
    engine = create_async_engine(pg_url)
    await store.init()
    try:
        await store.set_answered_by(sid, "human")  # the row, as the first verdict left it
        assert await store.wait_written(5)
        async with engine.connect() as other, engine.connect() as watch:
            tx = await other.begin()  # the other instance's transaction, holding the row
            await other.execute(text("SELECT 1 FROM calls WHERE call_sid = :s FOR UPDATE"), {"s": sid})
            await store.close_record(sid, "voicemail", "answered by machine_end_beep")

            async def holder_waits_for_the_row() -> bool:
                found = await watch.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock'"
                    )
                )
                return bool(found.scalar())

            await wait_until_async(holder_waits_for_the_row, 10, "the holder's write waits for the row")
            await other.execute(
                text("UPDATE calls SET answered_by = 'machine_end_beep' WHERE call_sid = :s"), {"s": sid}
            )
            await tx.commit()
        assert await store.wait_written(5)
        record = await store.get(sid)
        assert record is not None
        assert (record["status"], record["end_reason"]) == ("ended", "voicemail")
        assert record["answered_by"] == "machine_end_beep"
    finally:
        await store.close()
        await engine.dispose()
