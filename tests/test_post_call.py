"""Post-call analysis with the record (issue 14, part 4): fetched from the conversation details
API until processed, or brought by a signed post-call webhook; the first one wins, and a
failure never changes the call's end reason."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import replace
from typing import Any

import pytest

from callbridge.agents.elevenlabs.conversations import FetchPolicy
from callbridge.emulators.elevenlabs import AgentEmulator, sign_webhook
from callbridge.emulators.twilio import TwilioEmulator
from tests.serverkit import RunningServer, clean_env, running_server, settings_for, short_script, wait_until

API_KEY = "xi-test-key"
SECRET = "wsec_test_secret"
FAST = FetchPolicy(first_delay=0.05, base_delay=0.05, max_delay=0.2, deadline=20.0, request_timeout=2.0)
ANALYSIS = {
    "call_successful": "success",
    "call_summary_title": "Appointment booked",
    "transcript_summary": "The caller booked a cleaning for Tuesday.",
    "data_collection_results": {"slot": {"data_collection_id": "slot", "value": "Tuesday 10:00"}},
    "evaluation_criteria_results": {"polite": {"criteria_id": "polite", "result": "success"}},
}


def fast(srv: RunningServer, policy: FetchPolicy = FAST) -> None:
    assert srv.state.postcall is not None and srv.state.postcall.client is not None
    srv.state.postcall.client.policy = policy


async def one_call(twilio: TwilioEmulator, srv: RunningServer) -> str:
    call = await twilio.place_inbound_call(
        f"{srv.url}/twilio/inbound", from_="+15550200001", to="+15550200002"
    )
    await srv.wait_records(1)
    await call.wait_ended(5)
    return call.sid


async def record_with_analysis(srv: RunningServer, sid: str, timeout: float = 15) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        record = await srv.call_record(sid)
        if record["analysis"] or asyncio.get_running_loop().time() > deadline:
            return record
        await asyncio.sleep(0.05)


@pytest.mark.database
async def test_analysis_fetched_until_processed_and_shown(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script(), api_key=API_KEY) as agent:
        agent.details.processing_polls = 2
        agent.details.analysis = ANALYSIS
        agent.details.cost = 417
        settings = settings_for(twilio, agent, db_url, elevenlabs_api_key=API_KEY)
        async with running_server(settings) as srv:
            fast(srv)
            sid = await one_call(twilio, srv)
            record = await record_with_analysis(srv, sid)
        conv = agent.conversations[0]
    analysis = record["analysis"]
    assert analysis is not None, record
    # Asked with the key until ElevenLabs said done: processing, processing, done.
    assert [(cid, key, code) for cid, key, code in agent.details.requests] == [
        (conv.conversation_id, API_KEY, 200)
    ] * 3
    assert analysis["source"] == "api" and analysis["conversation_status"] == "done"
    assert analysis["call_successful"] == "success" and analysis["cost"] == 417
    assert analysis["transcript_summary"] == ANALYSIS["transcript_summary"]
    assert analysis["data_collection_results"]["slot"]["value"] == "Tuesday 10:00"
    assert analysis["evaluation_criteria_results"]["polite"]["result"] == "success"
    assert isinstance(analysis["call_duration_secs"], int)
    assert record["end_reason"] == "agent_ended"  # unchanged

    # `callbridge calls show` prints it from the database.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbridge.cli",
        "calls",
        "show",
        sid,
        "--database-url",
        db_url,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    shown = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "call successful  success" in shown and "Appointment booked" in shown
    assert "cost 417" in shown and "slot: Tuesday 10:00" in shown and "polite: success" in shown


@pytest.mark.database
@pytest.mark.parametrize("faults", [[500, 503], [429]])
async def test_passing_api_errors_are_retried(twilio: TwilioEmulator, db_url: str, faults: list[int]) -> None:
    async with AgentEmulator(short_script(), api_key=API_KEY) as agent:
        agent.details.processing_polls = 0
        agent.details.faults.extend(faults)
        settings = settings_for(twilio, agent, db_url, elevenlabs_api_key=API_KEY)
        async with running_server(settings) as srv:
            fast(srv)
            sid = await one_call(twilio, srv)
            record = await record_with_analysis(srv, sid)
    assert [code for _, _, code in agent.details.requests] == [*faults, 200]
    assert record["analysis"]["source"] == "api" and record["end_reason"] == "agent_ended"


@pytest.mark.database
@pytest.mark.parametrize(
    ("fault", "why"), [(404, "HTTP 404"), (500, "not processed within"), (401, "HTTP 401")]
)
async def test_api_failures_leave_the_record_and_its_end_reason(
    twilio: TwilioEmulator, db_url: str, caplog: pytest.LogCaptureFixture, fault: int, why: str
) -> None:
    caplog.set_level(logging.INFO, logger="callbridge")
    async with AgentEmulator(short_script(), api_key=API_KEY) as agent:
        agent.details.faults.extend([fault] * 1000)
        settings = settings_for(twilio, agent, db_url, elevenlabs_api_key=API_KEY)
        async with running_server(settings) as srv:
            # 3 s: long enough for a second request on a busy machine, short for the test.
            fast(srv, replace(FAST, deadline=3.0))
            sid = await one_call(twilio, srv)
            await wait_until(
                lambda: any("postcall.fetch_failed" in r.getMessage() for r in caplog.records),
                20,
                "the fetch gave up with a log line",
            )
            record = await srv.call_record(sid)
    failed = next(r.getMessage() for r in caplog.records if "postcall.fetch_failed" in r.getMessage())
    assert sid in failed and why in failed
    assert record["analysis"] is None and record["end_reason"] == "agent_ended"
    if fault == 404:
        assert len(agent.details.requests) == 1  # not found is final: not asked again
    if fault == 500:
        assert len(agent.details.requests) > 1  # asked again until the deadline


async def _signed_post(srv: RunningServer, body: bytes, header: str) -> Any:
    return await srv.api.post("/elevenlabs/post-call", content=body, headers={"ElevenLabs-Signature": header})


@pytest.mark.database
async def test_webhook_fills_the_record_once_and_refuses_bad_signatures(
    twilio: TwilioEmulator, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callbridge")
    async with AgentEmulator(short_script()) as agent:
        agent.details.analysis = ANALYSIS
        # No API key: the webhook is the only way in.
        settings = settings_for(twilio, agent, db_url, elevenlabs_webhook_secret=SECRET)
        async with running_server(settings) as srv:
            sid = await one_call(twilio, srv)
            conv = agent.conversations[0].conversation_id
            url = f"{srv.url}/elevenlabs/post-call"
            forged = await agent.send_post_call_webhook(conv, url, "wrong-secret")
            missing = await srv.api.post(url, content=b"{}")
            stale = await agent.send_post_call_webhook(conv, url, SECRET, timestamp=int(time.time()) - 3600)
            before = await srv.call_record(sid)
            first = await agent.send_post_call_webhook(conv, url, SECRET)
            after_first = await srv.call_record(sid)
            replayed = await agent.details.deliver(first)
            # The same conversation again, signed anew, with another analysis: still a no-op.
            agent.details.analysis = {**ANALYSIS, "call_successful": "failure"}
            again = await agent.send_post_call_webhook(conv, url, SECRET)
            audio = await agent.send_post_call_webhook(conv, url, SECRET, event_type="post_call_audio")
            # Altered after signing: refused.
            body = json.loads(first.body)
            body["data"]["analysis"]["call_successful"] = "failure"
            altered = await _signed_post(
                srv, json.dumps(body).encode(), first.headers["ElevenLabs-Signature"]
            )
            # Well signed, but no call of ours had this conversation.
            stamp = int(time.time())
            event = {
                "type": "post_call_transcription",
                "event_timestamp": stamp,
                "data": {"conversation_id": "x"},
            }
            stranger = json.dumps(event).encode().replace(b'"x"', b'"conv_nobody"')
            unknown = await _signed_post(srv, stranger, sign_webhook(SECRET, stamp, stranger))
            final = await srv.call_record(sid)
    assert forged.status_code == 401 and missing.status_code == 401 and stale.status_code == 401
    assert "too old" in stale.response
    assert altered.status_code == 401
    assert before["analysis"] is None
    assert first.status_code == 200 and json.loads(first.response)["status"] == "recorded"
    assert after_first["analysis"]["source"] == "webhook"
    assert after_first["analysis"]["call_successful"] == "success"
    for repeat in (replayed, again):
        assert repeat.status_code == 200 and json.loads(repeat.response)["status"] == "already recorded"
    assert audio.status_code == 200 and json.loads(audio.response)["status"] == "ignored"
    assert unknown.status_code == 200 and unknown.json()["status"] == "ignored"
    assert final["analysis"] == after_first["analysis"]  # the first one stands
    assert final["end_reason"] == "agent_ended"
    events = [r.getMessage() for r in caplog.records]
    assert any("postcall.bad_signature" in e for e in events)
    assert any("postcall.unknown_conversation" in e and "conv_nobody" in e for e in events)


@pytest.mark.database
async def test_first_arrival_wins_between_fetch_and_webhook(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script(), api_key=API_KEY) as agent:
        agent.details.processing_polls = 1000  # the API never finishes: the webhook comes first
        settings = settings_for(
            twilio, agent, db_url, elevenlabs_api_key=API_KEY, elevenlabs_webhook_secret=SECRET
        )
        async with running_server(settings) as srv:
            fast(srv)
            sid = await one_call(twilio, srv)
            postcall = srv.state.postcall
            assert postcall is not None
            await wait_until(lambda: len(agent.details.requests) >= 2, 10, "the fetch is asking")
            conv = agent.conversations[0].conversation_id
            sent = await agent.send_post_call_webhook(conv, f"{srv.url}/elevenlabs/post-call", SECRET)
            await wait_until(lambda: postcall.fetching == 0, 5, "the fetch stopped once the webhook came")
            asked = len(agent.details.requests)
            record = await srv.call_record(sid)
            await asyncio.sleep(0.3)  # several backoff periods: nobody asks any more
            asked_later = len(agent.details.requests)
    assert sent.status_code == 200 and record["analysis"]["source"] == "webhook"
    assert asked_later == asked


@pytest.mark.database
async def test_fetches_are_cancelled_at_shutdown_and_webhooks_off_without_a_secret(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with AgentEmulator(short_script(), api_key=API_KEY) as agent:
        agent.details.processing_polls = 1000
        settings = settings_for(twilio, agent, db_url, elevenlabs_api_key=API_KEY)
        async with running_server(settings) as srv:
            fast(srv)
            sid = await one_call(twilio, srv)
            postcall = srv.state.postcall
            assert postcall is not None
            await wait_until(lambda: len(agent.details.requests) >= 1, 10, "the fetch is asking")
            assert postcall.fetching == 1
            off = await srv.api.post("/elevenlabs/post-call", content=b"{}")
            record = await srv.call_record(sid)
        # The server stopped with the fetch still asking: it was cancelled (no task left over;
        # the autouse fixture checks that too).
        assert postcall.fetching == 0
    assert off.status_code == 503 and "CALLBRIDGE_ELEVENLABS_WEBHOOK_SECRET" in off.json()["error"]
    assert record["end_reason"] == "agent_ended" and record["analysis"] is None


def test_store_operations_keep_the_first_analysis_and_replay_idempotently() -> None:
    from callbridge.store import apply_op

    sid = "CA" + "1" * 32
    at = "2026-01-01T00:00:00+00:00"
    row = apply_op(
        None, {"op": "placeholder", "call_sid": sid, "direction": "outbound", "from": "+1", "to": "+2"}
    )
    first = {"op": "analysis", "call_sid": sid, "at": at, "analysis": {"source": "webhook", "cost": 1}}
    second = {"op": "analysis", "call_sid": sid, "at": at, "analysis": {"source": "api", "cost": 2}}
    verdict = {"op": "answered_by", "call_sid": sid, "at": at, "answered_by": "machine_end_beep"}
    once = apply_op(apply_op(row, verdict), first)
    assert once is not None and once["analysis"] == {"source": "webhook", "cost": 1}
    assert apply_op(once, first) == once  # a spool replayed twice changes nothing
    kept = apply_op(once, second)
    assert kept is not None and kept["analysis"] == once["analysis"]  # the first one wins
    assert apply_op(None, first) is None  # no record of the call: nothing to attach it to
    # The call's own final record (written after) keeps both.
    final = apply_op(once, {"op": "record", "call_sid": sid, "at": at, "record": {"status": "ended"}})
    assert final is not None and final["answered_by"] == "machine_end_beep" and final["analysis"]["cost"] == 1
    # A verdict may come before any record (it starts one, like a status callback).
    started = apply_op(None, verdict)
    assert started is not None and started["answered_by"] == "machine_end_beep"
