"""The server a Twilio number points at: uvicorn on loopback, emulated Twilio and agent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from callbridge.config import ConfigError, Settings
from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, EndCall, Say
from callbridge.emulators.speech import load_speech
from callbridge.emulators.twilio import TwilioEmulator, twilio_signature
from callbridge.store import CallStore
from tests.serverkit import running_server, settings_for, short_script, wait_until

FAST = float("inf")


def talkative_script(seconds: float = 30.0) -> AgentScript:
    return AgentScript(
        steps=[Say("Hello, I can talk for a long time.", seconds=seconds)], realtime_factor=1.0
    )


@pytest.mark.database
async def test_inbound_call_from_webhook_to_record(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound",
                from_="+15551230001",
                to="+15551230002",
                audio=load_speech("caller_hello"),
                status_callback=f"{srv.url}/twilio/status",
            )
            await srv.wait_records(1)
            await call.wait_ended(5)
            record = await srv.call_record(call.sid)
            conv = agent.conversations[0]
    # What Twilio was told: stream TwiML with the caller's numbers and a stream token.
    assert call.stream is not None
    start = call.stream.sent_events("start")[0]["start"]
    params = start["customParameters"]
    assert params["from"] == "+15551230001" and params["to"] == "+15551230002"
    assert params["direction"] == "inbound" and len(params["cb_token"]) == 40
    # What the agent was told.
    assert conv.client_data is not None
    dv = conv.client_data["dynamic_variables"]
    assert dv["caller_id"] == "+15551230001" and dv["call_sid"] == call.sid
    # What was recorded.
    assert record["status"] == "ended" and record["end_reason"] == "agent_ended"
    assert record["from"] == "+15551230001" and record["direction"] == "inbound"
    assert record["conversation_id"] == conv.conversation_id
    assert [e["text"] for e in record["transcript"]] == ["Hello!", "Goodbye!"]
    assert record["metrics"]["hangup_latency_ms"] is not None
    assert record["started_at"] and record["ended_at"] and record["duration_s"] > 0
    assert "cb_token" not in json.dumps(record)
    assert call.status == "completed"


@pytest.mark.database
async def test_outbound_call_from_api_to_record(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            resp = await srv.api.post(
                "/calls",
                json={
                    "to": "+15559870001",
                    "from": "+15559870002",
                    "dynamic_variables": {"customer_name": "Ada", "balance": 12.5},
                    "agent_id": "agent_sales",
                },
            )
            assert resp.status_code == 201, resp.text
            created = resp.json()
            sid = created["call_sid"]
            assert created["direction"] == "outbound" and created["status"] == "active"
            await srv.wait_records(1)
            call = twilio.calls[sid]
            await call.wait_ended(5)
            record = await srv.call_record(sid)
            # The status callbacks arrive after the call completes; give them a moment.
            for _ in range(50):
                record = await srv.call_record(sid)
                if record["twilio_status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            conv = agent.conversations[0]
    create_req = next(r for r in twilio.requests if r.method == "POST" and r.path.endswith("/Calls.json"))
    assert create_req.form["To"] == "+15559870001" and create_req.form["From"] == "+15559870002"
    assert "<Connect><Stream" in create_req.form["Twiml"]
    assert create_req.form["StatusCallback"] == f"{srv.url}/twilio/status"
    assert conv.agent_id == "agent_sales"
    assert conv.client_data is not None
    dv = conv.client_data["dynamic_variables"]
    assert dv["customer_name"] == "Ada" and dv["balance"] == "12.5" and dv["call_direction"] == "outbound"
    assert record["direction"] == "outbound" and record["end_reason"] == "agent_ended"
    assert record["twilio_status"] == "completed"
    assert [e["status"] for e in record["twilio_events"]][-1] == "completed"


@pytest.mark.database
async def test_api_hangup_ends_a_live_call(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(talkative_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=5)
            listed = (await srv.api.get("/calls", params={"status": "active"})).json()
            assert [c["call_sid"] for c in listed["calls"]] == [call.sid]
            resp = await srv.api.post(f"/calls/{call.sid}/hangup")
            assert resp.status_code == 200, resp.text
            assert resp.json()["end_reason"] == "hangup_requested"
            again = await srv.api.post(f"/calls/{call.sid}/hangup")
            assert again.status_code == 409
            missing = await srv.api.post("/calls/CA" + "f" * 32 + "/hangup")
            assert missing.status_code == 404
            await call.wait_ended(5)
            conv = agent.conversations[0]
            await asyncio.wait_for(conv.closed.wait(), 2)
    assert call.status == "completed" and call.end_cause == "rest_completed"
    assert conv.closed_by == "client"


@pytest.mark.database
async def test_status_callback_completed_ends_a_live_call(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(talkative_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=5)
            form = {"CallSid": call.sid, "AccountSid": twilio.account_sid, "CallStatus": "completed"}
            url = f"{srv.url}/twilio/status"
            sig = twilio_signature(twilio.auth_token, url, form)
            resp = await srv.api.post(url, data=form, headers={"X-Twilio-Signature": sig})
            assert resp.status_code == 204
            records = await srv.wait_records(1)
    assert records[0].end_reason == "caller_hung_up"
    assert "status callback" in (records[0].end_detail or "")
    # The carrier said the call was over: no REST hang-up was sent.
    assert not [r for r in twilio.requests if r.form.get("Status") == "completed"]


@pytest.mark.database
async def test_bad_signatures_are_rejected(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            form = {
                "CallSid": "CA" + "a" * 32,
                "From": "+1555",
                "To": "+1666",
                "AccountSid": twilio.account_sid,
            }
            url = f"{srv.url}/twilio/inbound"
            # Missing, wrong, and valid-but-for-another-URL signatures.
            for headers in (
                {},
                {"X-Twilio-Signature": "bm9wZQ=="},
                {"X-Twilio-Signature": twilio_signature(twilio.auth_token, f"{srv.url}/twilio/status", form)},
            ):
                resp = await srv.api.post(url, data=form, headers=headers)
                assert resp.status_code == 403, headers
            resp = await srv.api.post(f"{srv.url}/twilio/status", data=form | {"CallStatus": "completed"})
            assert resp.status_code == 403
            ok = await srv.api.post(
                url, data=form, headers={"X-Twilio-Signature": twilio_signature(twilio.auth_token, url, form)}
            )
            assert ok.status_code == 200 and "<Connect><Stream" in ok.text

            # WebSocket upgrade with a bad signature: closed with a policy code, nothing bridged.
            ws_url = srv.url.replace("http", "ws") + "/twilio/media-stream"
            async with connect(ws_url, additional_headers={"x-twilio-signature": "bad"}) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

            # Through the emulator: a webhook signed wrong never reaches a stream.
            call = await twilio.place_inbound_call(url, signature="wrong")
            await call.wait_ended(5)
            assert call.stream is None
            call2 = await twilio.place_inbound_call(url, stream_signature="wrong")
            await call2.wait_ended(5)
            assert agent.conversations == []
            metrics = (await srv.api.get("/metrics")).text
    assert 'callbridge_bad_signatures_total{route="/twilio/inbound"} 4.0' in metrics
    assert 'callbridge_bad_signatures_total{route="/twilio/status"} 1.0' in metrics
    assert 'callbridge_bad_signatures_total{route="/twilio/media-stream"} 2.0' in metrics


async def _raw_stream(ws_url: str, auth_token: str, call_sid: str, params: dict[str, str]) -> Any:
    """A hand-made Twilio media stream that claims `call_sid`; returns the open connection."""
    ws = await connect(
        ws_url, additional_headers={"x-twilio-signature": twilio_signature(auth_token, ws_url, {})}
    )
    stream_sid = "MZ" + call_sid[2:]
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    start = {
        "streamSid": stream_sid,
        "accountSid": "AC" + "0" * 32,
        "callSid": call_sid,
        "tracks": ["inbound"],
        "customParameters": params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    await ws.send(
        json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid})
    )
    return ws


async def _close_code(ws: Any) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return closed.value.rcvd.code if closed.value.rcvd else None


@pytest.mark.database
async def test_stream_token_cannot_be_reused_or_forged(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(talkative_script(2.0)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            ws_url = srv.url.replace("http", "ws") + "/twilio/media-stream"
            sid1, sid2, sid3 = ("CA" + c * 32 for c in "123")
            good = {"cb_ref": sid1, "cb_token": srv.state.stream_token(sid1), "from": "+1555"}
            # Call 1's token presented by call 2: refused.
            other = await _raw_stream(ws_url, twilio.auth_token, sid2, good)
            assert await _close_code(other) == 1008
            # A forged token for call 3: refused.
            forged = await _raw_stream(ws_url, twilio.auth_token, sid3, good | {"cb_ref": sid3})
            assert await _close_code(forged) == 1008
            # No token at all: refused.
            bare = await _raw_stream(ws_url, twilio.auth_token, sid3, {"from": "+1555"})
            assert await _close_code(bare) == 1008
            # The right call with its own token: bridged, once...
            first = await _raw_stream(ws_url, twilio.auth_token, sid1, good)
            await agent.wait_for_conversations(1, timeout=5)
            # ...and a replay of the same token is refused.
            replay = await _raw_stream(ws_url, twilio.auth_token, sid1, good)
            assert await _close_code(replay) == 1008
            await first.send(
                json.dumps({"event": "stop", "stop": {"callSid": sid1}, "streamSid": "MZ" + "1" * 32})
            )
            await _close_code(first)
            await srv.wait_records(1)
    assert len(agent.conversations) == 1
    assert [r.call_sid for r in srv.records] == [sid1]
    assert srv.state.bridge.stats.streams_refused == 4
    assert srv.records[0].end_reason == "caller_hung_up"


@pytest.mark.database
async def test_api_requires_the_bearer_token(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as anon:
            for method, path in (
                ("GET", "/calls"),
                ("POST", "/calls"),
                ("GET", "/calls/CA1"),
                ("POST", "/calls/CA1/hangup"),
            ):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                    resp = await anon.request(method, path, headers=headers, json={})
                    assert resp.status_code == 401, (method, path, headers)
                    assert "test-api-token" not in resp.text
            health = await anon.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.database
@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("not json", 400),
        ([], 422),
        ({"to": "+15550001111"}, 422),
        ({"to": "5550001111", "from": "+15550001111"}, 422),
        ({"to": "+15550001111", "from": "+15550002222", "extra": 1}, 422),
        ({"to": "+15550001111", "from": "+15550002222", "dynamic_variables": {"bad name": "x"}}, 422),
        ({"to": "+15550001111", "from": "+15550002222", "dynamic_variables": {"n": {"nested": 1}}}, 422),
        ({"to": "+15550001111", "from": "+15550002222", "dynamic_variables": {"n": "x" * 500}}, 422),
        ({"to": "+15550001111", "from": "+15550002222", "agent_id": "a/b"}, 422),
    ],
)
async def test_calls_api_validates_bodies(
    twilio: TwilioEmulator, db_url: str, body: Any, status: int
) -> None:
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            content = body if isinstance(body, str) else json.dumps(body)
            resp = await srv.api.post("/calls", content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert "error" in resp.json()
    assert not [r for r in twilio.requests if r.path.endswith("/Calls.json")]


@pytest.mark.database
async def test_records_survive_a_restart(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound", audio=load_speech("caller_hello")
            )
            await srv.wait_records(1)
            before = await srv.call_record(call.sid)
        async with running_server(settings) as srv2:
            after = await srv2.call_record(call.sid)
            listed = (await srv2.api.get("/calls", params={"end_reason": "agent_ended"})).json()
    assert after == before
    assert [c["call_sid"] for c in listed["calls"]] == [call.sid]


@pytest.mark.database
async def test_at_capacity_new_calls_get_polite_twiml(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(talkative_script()) as agent:
        settings = settings_for(twilio, agent, db_url, max_concurrent_calls=1)
        async with running_server(settings) as srv:
            first = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=5)
            second = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await second.wait_ended(5)
            metrics = (await srv.api.get("/metrics")).text
            await first.stream.hangup()  # type: ignore[union-attr]
            await srv.wait_records(1)
    assert second.stream is None
    assert "busy" in second.twiml_documents[-1]
    assert "callbridge_calls_rejected_total 1.0" in metrics
    assert "callbridge_active_calls 1.0" in metrics


@pytest.mark.database
async def test_sigterm_drain_lets_calls_finish_then_ends_the_rest(
    twilio: TwilioEmulator, db_url: str
) -> None:
    quick = AgentScript(
        steps=[Say("Short call", seconds=0.3), EndCall("Bye", seconds=0.3)], realtime_factor=1.0
    )

    def scripts(agent_id: str, n: int) -> AgentScript:
        return quick if n == 0 else talkative_script()

    async with AgentEmulator(script_factory=scripts) as agent:
        settings = settings_for(twilio, agent, db_url, shutdown_grace_seconds=4.0)
        async with running_server(settings) as srv:
            short = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=5)
            long = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(2, timeout=5)
            drain = asyncio.ensure_future(srv.server.drain("SIGTERM"))
            await asyncio.sleep(0.1)
            try:
                health = await srv.api.get("/healthz")
            except httpx.TransportError as exc:  # seen once under load: say what the drain had done
                ended = drain.done() and (drain.exception() or "finished")
                raise AssertionError(f"/healthz during the drain: {exc!r}; drain ended: {ended!r}") from exc
            late = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await late.wait_ended(5)
            await drain
            records = {r.call_sid: r for r in await srv.wait_records(2)}
    # Read from the database once the server is gone: the drain ends by stopping the server,
    # whose API may already be closing its connections.
    store = CallStore(db_url)
    try:
        db_long = await store.get(long.sid)
    finally:
        await store.close()
    assert db_long is not None
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert late.stream is None  # turned away with the busy TwiML
    assert records[short.sid].end_reason == "agent_ended"
    assert records[long.sid].end_reason == "shutdown"
    assert db_long["end_reason"] == "shutdown"
    assert long.status == "completed" and short.status == "completed"


def test_settings_report_every_problem_at_once() -> None:
    env = {
        "TWILIO_ACCOUNT_SID": "nope",
        "TWILIO_AUTH_TOKEN": "secret-token-value",
        "CALLBRIDGE_MAX_CALL_SECONDS": "-5",
        "CALLBRIDGE_PUBLIC_URL": "ftp://x",
        "CALLBRIDGE_FALLBACK_TWIML": "<Say>hi</Say>",
    }
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env, require=("twilio", "agent", "public_url"))
    problems = err.value.problems
    assert any("TWILIO_ACCOUNT_SID" in p for p in problems)
    assert any("ELEVENLABS_AGENT_ID is required" in p for p in problems)
    assert any("CALLBRIDGE_MAX_CALL_SECONDS" in p for p in problems)
    assert any("CALLBRIDGE_PUBLIC_URL" in p for p in problems)
    assert any("CALLBRIDGE_FALLBACK_TWIML" in p for p in problems)
    assert "secret-token-value" not in str(err.value)
    ok = Settings.from_env(
        {
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "TWILIO_AUTH_TOKEN": "secret-token-value",
            "ELEVENLABS_AGENT_ID": "a",
            "CALLBRIDGE_PUBLIC_URL": "https://bridge.example.com",
            "CALLBRIDGE_DATABASE_URL": "postgresql://u:p@db/calls",
        },
        require=("twilio", "agent", "public_url"),
    )
    assert ok.stream_url() == "wss://bridge.example.com/twilio/media-stream"
    assert ok.database_url == "postgresql+asyncpg://u:p@db/calls"
    assert "secret-token-value" not in repr(ok)


@pytest.mark.parametrize(
    ("ws_protocol", "socket_class"), [("", "LeanWebSocketProtocol"), ("uvicorn", "StarletteSocket")]
)
async def test_the_media_stream_runs_on_callbridge_s_connection_or_on_uvicorn_s(
    twilio: TwilioEmulator, db_url: str, monkeypatch: pytest.MonkeyPatch, ws_protocol: str, socket_class: str
) -> None:
    """By default the media stream is served on callbridge's own connection (server/wsroute.py);
    `CALLBRIDGE_WS_PROTOCOL=uvicorn` serves it through Starlette on uvicorn's. Either way the
    caller hears the goodbye, then is hung up, and the call is recorded."""
    monkeypatch.setenv("CALLBRIDGE_WS_PROTOCOL", ws_protocol)
    async with AgentEmulator(short_script()) as agent:
        async with running_server(settings_for(twilio, agent, db_url)) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound", audio=load_speech("caller_hello")
            )
            served_on: list[str] = []

            def live() -> bool:
                calls = list(srv.state.bridge.calls.values())
                served_on.extend(type(c.telephony._socket).__name__ for c in calls[:1])  # type: ignore[attr-defined]
                return bool(served_on)

            await wait_until(live, 10, "the call live on the bridge")
            await srv.wait_records(1)
            await call.wait_ended(5)
            record = await srv.call_record(call.sid)
    assert served_on[0] == socket_class
    assert record["end_reason"] == "agent_ended" and call.status == "completed"
    assert [e["text"] for e in record["transcript"]] == ["Hello!", "Goodbye!"]
    assert record["metrics"]["hangup_latency_ms"] is not None  # hung up after the goodbye's last mark
