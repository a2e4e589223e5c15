"""Hostile input, part 2: signatures, tokens, limits and secrets, on the real server.

Every test runs callbridge's ASGI app on uvicorn (tests/serverkit.py) on 127.0.0.1,
with the Twilio and ElevenLabs emulators, and checks what a caller, an operator or an
attacker would see: status codes, close codes, call records, logs. What
tests/test_server.py already covers (the basic bad-signature matrix of the webhook, a
stream token replayed or presented by another inbound call, the 401s of /calls, one
busy TwiML at capacity) is not repeated here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from callbridge import cli
from callbridge.agents.elevenlabs.session import ElevenLabsConfig
from callbridge.config import Settings
from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    EndCall,
    RawSend,
    Say,
    Sleep,
    WaitForUser,
)
from callbridge.emulators.speech import load_speech
from callbridge.emulators.twilio import TwilioEmulator, twilio_signature
from callbridge.logs import JsonFormatter
from callbridge.telephony.twilio.control import RetryPolicy, TwilioCallControl
from tests.serverkit import ACCOUNT_SID, API_TOKEN, RunningServer, running_server, settings_for, short_script

FAST = float("inf")
CALL_SID = "CA" + "a" * 32


def talkative(seconds: float = 30.0) -> AgentScript:
    return AgentScript(steps=[Say("I can talk for a long time.", seconds=seconds)], realtime_factor=1.0)


def webhook_form(call_sid: str = CALL_SID, status: str = "ringing") -> dict[str, str]:
    """The parameters Twilio posts to the voice webhook."""
    return {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": status,
        "Called": "+15550002222",
        "Caller": "+15550001111",
        "Direction": "inbound",
        "From": "+15550001111",
        "To": "+15550002222",
    }


def ws_url(srv: RunningServer, query: str = "") -> str:
    return srv.url.replace("http://", "ws://") + "/twilio/media-stream" + query


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def close_of(ws: ClientConnection, timeout: float = 5) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    rcvd = closed.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, "")


async def raw_stream(
    url: str, signature: str | None, call_sid: str, params: dict[str, str]
) -> ClientConnection:
    """A hand-made Twilio media stream for `call_sid` (connected + start sent)."""
    headers = {"x-twilio-signature": signature} if signature is not None else {}
    ws = await connect(url, additional_headers=headers, max_size=None)
    stream_sid = "MZ" + call_sid[2:]
    start = {
        "streamSid": stream_sid,
        "accountSid": ACCOUNT_SID,
        "callSid": call_sid,
        "tracks": ["inbound"],
        "customParameters": params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    with contextlib.suppress(ConnectionClosed):  # a refused upgrade may be closed already
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(
            json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid})
        )
    return ws


async def stop(ws: ClientConnection, call_sid: str) -> None:
    stop_msg = {"event": "stop", "stop": {"callSid": call_sid}, "streamSid": "MZ" + call_sid[2:]}
    await ws.send(json.dumps(stop_msg))
    await close_of(ws)


# -- signatures ---------------------------------------------------------------------------------


@pytest.mark.database
async def test_webhook_signature_covers_the_exact_url_and_every_param(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with AgentEmulator(short_script(0.3)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            url = f"{srv.url}/twilio/inbound"
            form = webhook_form()
            token = twilio.auth_token

            async def post(target: str, data: dict[str, str], signed_url: str, signed: dict[str, str]) -> int:
                sig = twilio_signature(token, signed_url, signed)
                resp = await srv.api.post(target, data=data, headers={"X-Twilio-Signature": sig})
                return resp.status_code

            refused: list[tuple[str, int]] = []
            expect_refused = refused.append
            # The URL: another query string, a query added or removed, another scheme or host.
            expect_refused(("query added", await post(url + "?x=1", form, url, form)))
            expect_refused(("query changed", await post(url + "?x=2", form, url + "?x=1", form)))
            expect_refused(("query dropped", await post(url, form, url + "?x=1", form)))
            https = url.replace("http://", "https://")
            expect_refused(("https form", await post(url, form, https, form)))
            expect_refused(("other host", await post(url, form, url.replace("127.0.0.1", "localhost"), form)))
            # Every parameter: altered, removed; and one added.
            for key in form:
                altered = form | {key: form[key] + "0"}
                expect_refused((f"{key} altered", await post(url, altered, url, form)))
                removed = {k: v for k, v in form.items() if k != key}
                expect_refused((f"{key} removed", await post(url, removed, url, form)))
            expect_refused(("param added", await post(url, form | {"Digits": "1"}, url, form)))
            # A signature of the status callback's URL (same params) replayed at the webhook.
            expect_refused(("status url", await post(url, form, f"{srv.url}/twilio/status", form)))

            # Positive controls: the same requests, signed for what is really sent, pass.
            assert await post(url + "?x=1", form, url + "?x=1", form) == 200
            assert await post(url, form | {"Digits": "1"}, url, form | {"Digits": "1"}) == 200
            # A correctly signed CallSid with a trailing newline is still not a CallSid.
            bad_sid = webhook_form(CALL_SID + "\n")
            assert await post(url, bad_sid, url, bad_sid) == 400
            metrics = (await srv.api.get("/metrics")).text
    assert [label for label, status in refused if status != 403] == []
    assert metric(metrics, 'callbridge_bad_signatures_total{route="/twilio/inbound"}') == len(refused)


@pytest.mark.database
async def test_status_callback_refuses_forged_and_replayed_signatures_and_the_call_goes_on(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with AgentEmulator(talkative()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=5)
            status_url = f"{srv.url}/twilio/status"
            token = twilio.auth_token
            completed = webhook_form(call.sid, "completed") | {"CallDuration": "3"}
            attempts = {
                "missing": None,
                "wrong": "bm9wZQ==",
                # The same params, validly signed for the voice webhook's URL.
                "webhook url": twilio_signature(token, f"{srv.url}/twilio/inbound", completed),
                "query string": twilio_signature(token, status_url + "?cb=1", completed),
                # A genuine in-progress callback, replayed with its status changed to completed.
                "status altered": twilio_signature(
                    token, status_url, completed | {"CallStatus": "in-progress"}
                ),
                "other account's token": twilio_signature("another-auth-token", status_url, completed),
            }
            answers = {}
            for label, sig in attempts.items():
                headers = {"X-Twilio-Signature": sig} if sig is not None else {}
                resp = await srv.api.post(status_url, data=completed, headers=headers)
                answers[label] = resp.status_code
            await asyncio.sleep(0.2)
            still_live = srv.state.bridge.find(call.sid) is not None
            record_while_live = await srv.call_record(call.sid)
            # Positive control: the real callback ends the call.
            sig = twilio_signature(token, status_url, completed)
            ok = await srv.api.post(status_url, data=completed, headers={"X-Twilio-Signature": sig})
            records = await srv.wait_records(1)
            metrics = (await srv.api.get("/metrics")).text
    assert answers == dict.fromkeys(attempts, 403)
    assert still_live and record_while_live["status"] == "active"
    assert record_while_live["twilio_status"] is None  # nothing forged was stored
    assert ok.status_code == 204 and records[0].end_reason == "caller_hung_up"
    assert metric(metrics, 'callbridge_bad_signatures_total{route="/twilio/status"}') == len(attempts)


@pytest.mark.database
async def test_media_stream_upgrade_refuses_missing_wrong_and_replayed_signatures(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with AgentEmulator(short_script(0.3)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            token = twilio.auth_token
            plain = ws_url(srv)
            with_query = ws_url(srv, "?x=1")
            params = {"cb_ref": CALL_SID, "cb_token": srv.state.stream_token(CALL_SID)}
            attempts: dict[str, tuple[str, str | None]] = {
                "missing": (plain, None),
                "wrong": (plain, "bad"),
                "empty": (plain, ""),
                "http form of the url": (plain, twilio_signature(token, plain.replace("ws://", "http://"))),
                "webhook path": (plain, twilio_signature(token, f"{srv.url}/twilio/inbound")),
                "signed with params": (plain, twilio_signature(token, plain, {"CallSid": CALL_SID})),
                "query added": (with_query, twilio_signature(token, plain)),
                "query changed": (ws_url(srv, "?x=2"), twilio_signature(token, with_query)),
                "query dropped": (plain, twilio_signature(token, with_query)),
            }
            closes = {}
            for label, (url, sig) in attempts.items():
                # Even a stream carrying a valid per-call token is refused at the signature.
                ws = await raw_stream(url, sig, CALL_SID, params)
                closes[label] = await close_of(ws)
            # Positive control: signed for the URL it really uses, the same stream is bridged.
            ws = await raw_stream(with_query, twilio_signature(token, with_query), CALL_SID, params)
            await agent.wait_for_conversations(1, timeout=5)
            await stop(ws, CALL_SID)
            records = await srv.wait_records(1)
            metrics = (await srv.api.get("/metrics")).text
    assert closes == dict.fromkeys(attempts, (1008, "invalid signature"))
    assert [r.call_sid for r in records] == [CALL_SID] and records[0].end_reason == "caller_hung_up"
    assert len(agent.conversations) == 1
    assert metric(metrics, 'callbridge_bad_signatures_total{route="/twilio/media-stream"}') == len(attempts)


@pytest.mark.database
async def test_outbound_stream_token_is_bound_to_the_call_twilio_created(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbound call's token (a nonce ref, bound to the CallSid when Twilio answers the
    create) is refused for any other call, and cannot be used twice."""
    caplog.set_level(logging.INFO, logger="callbridge")
    # A callee that takes long to answer: the emulator will not open the stream itself.
    async with (
        TwilioEmulator(account_sid=ACCOUNT_SID, auth_token="test-auth-token", ring_delay=30) as tw,
        AgentEmulator(talkative()) as agent,
    ):
        settings = settings_for(tw, agent, db_url)
        async with running_server(settings) as srv:
            resp = await srv.api.post("/calls", json={"to": "+15559870001", "from": "+15559870002"})
            assert resp.status_code == 201, resp.text
            sid = resp.json()["call_sid"]
            create = next(r for r in tw.requests if r.path.endswith("/Calls.json") and r.method == "POST")
            params = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]*)"', create.form["Twiml"]))
            assert params["cb_ref"].startswith("out-") and params["cb_ref"] != sid
            sig = twilio_signature(tw.auth_token, ws_url(srv))
            other = await raw_stream(ws_url(srv), sig, CALL_SID, params)
            other_close = await close_of(other)
            genuine = await raw_stream(ws_url(srv), sig, sid, params)
            await agent.wait_for_conversations(1, timeout=5)
            replay = await raw_stream(ws_url(srv), sig, sid, params)
            replay_close = await close_of(replay)
            await stop(genuine, sid)
            records = await srv.wait_records(1)
    assert other_close[0] == 1008 and replay_close[0] == 1008
    assert [r.call_sid for r in records] == [sid] and len(agent.conversations) == 1
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("belongs to another call" in m for m in refusals), refusals
    assert any("already used" in m for m in refusals), refusals


@pytest.mark.database
async def test_a_malformed_stream_token_is_refused_cleanly(
    twilio: TwilioEmulator, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens that are not even the right shape (non-ASCII, truncated, upper-cased,
    padded, another call's ref) get the same 1008 as a wrong one, with no internal error."""
    caplog.set_level(logging.INFO, logger="callbridge")
    async with AgentEmulator(talkative()) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            good = srv.state.stream_token(CALL_SID)
            sig = twilio_signature(twilio.auth_token, ws_url(srv))
            tokens = {
                "non-ascii": "\u00e9" * 40,
                "emoji": "\U0001f4de" * 10,
                "lone surrogate": good[:-1] + "\ud800",
                "truncated": good[:-1],
                "upper-cased": good.upper(),
                "padded": good + " ",
                "nul": good[:-1] + "\x00",
                "ref of another call": srv.state.stream_token("CA" + "b" * 32),
            }
            closes = {}
            for label, token in tokens.items():
                ws = await raw_stream(ws_url(srv), sig, CALL_SID, {"cb_ref": CALL_SID, "cb_token": token})
                closes[label] = await close_of(ws)
            for label, ref in {"ref with a lone surrogate": "CA\ud800", "non-ascii ref": "CA\u00e9"}.items():
                tokens[label] = good
                ws = await raw_stream(ws_url(srv), sig, CALL_SID, {"cb_ref": ref, "cb_token": good})
                closes[label] = await close_of(ws)
            ws = await raw_stream(ws_url(srv), sig, CALL_SID, {"cb_ref": CALL_SID, "cb_token": good})
            await agent.wait_for_conversations(1, timeout=5)
            await stop(ws, CALL_SID)
            records = await srv.wait_records(1)
    assert closes == dict.fromkeys(tokens, (1008, "stream refused"))
    assert [r.call_sid for r in records] == [CALL_SID] and records[0].end_reason == "caller_hung_up"
    internal = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert internal == [], [r.getMessage() for r in internal]
    assert srv.state.bridge.stats.streams_refused == len(tokens)


@pytest.mark.database
async def test_api_bearer_token_is_compared_in_constant_time(
    twilio: TwilioEmulator, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_compare = hmac.compare_digest
    seen: list[tuple[Any, Any]] = []

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real_compare(a, b)

    # callbridge.server.app calls hmac.compare_digest through its module: patch it there.
    monkeypatch.setattr("callbridge.server.app.hmac.compare_digest", spy)
    async with AgentEmulator(short_script(0.3)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as anon:
            presented = {
                "wrong, same length": "x" * len(API_TOKEN),
                "wrong, short": "x",
                "prefix of the real one": API_TOKEN[:-1],
                "real one plus a suffix": API_TOKEN + "0",
                "real one upper-cased": API_TOKEN.upper(),
                "non-ascii": "\u00e9t\u00e9",
            }
            answers = {}
            for label, token in presented.items():
                seen.clear()
                resp = await anon.get("/calls", headers={b"Authorization": f"Bearer {token}".encode()})
                answers[label] = (resp.status_code, [a for a, _ in seen])
                assert API_TOKEN not in resp.text
            seen.clear()
            ok = await anon.get("/calls", headers={"Authorization": f"Bearer {API_TOKEN}"})
            ok_compared = [a for a, _ in seen]
    for label, token in presented.items():
        status, compared = answers[label]
        assert status == 401, label
        # The presented token went through compare_digest (no ==, no early length check);
        # the server reads header bytes as latin-1, so that is how a non-ASCII one arrives.
        arrived = token.encode().decode("latin-1")
        assert [c.decode() if isinstance(c, bytes) else c for c in compared] == [arrived], label
    assert ok.status_code == 200 and len(ok_compared) == 1


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.database
async def test_a_media_frame_over_64_kib_closes_1009_and_the_next_call_is_served(
    twilio: TwilioEmulator, db_url: str
) -> None:
    def scripts(agent_id: str, n: int) -> AgentScript:
        return talkative() if n < 2 else short_script(0.3)

    async with AgentEmulator(script_factory=scripts) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            # One frame of 64 KiB + 1, from a real (emulated) Twilio call.
            big = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await agent.wait_for_conversations(1, timeout=5)
            assert big.stream is not None
            await big.stream.send_raw("x" * (64 * 1024 + 1))
            await big.stream.wait_closed(5)
            first = (await srv.wait_records(1))[0]
            await big.wait_ended(5)
            # A message of 80 KiB in 20 KiB fragments: each frame is small, the message is not.
            sid = "CA" + "f" * 32
            sig = twilio_signature(twilio.auth_token, ws_url(srv))
            ws = await raw_stream(
                ws_url(srv), sig, sid, {"cb_ref": sid, "cb_token": srv.state.stream_token(sid)}
            )
            await agent.wait_for_conversations(2, timeout=5)
            await ws.send(["y" * 20_000 for _ in range(4)])
            fragmented_close = await close_of(ws)
            second = (await srv.wait_records(2))[1]
            # The server still serves: the next call is bridged to its end.
            after = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound", audio=load_speech("caller_hello")
            )
            third = (await srv.wait_records(3))[2]
            await after.wait_ended(5)
    # The server closes 1009 and drops the connection; the emulated Twilio, still sending a
    # frame every 20 ms, may get a TCP reset before it reads that close frame (seen under
    # load: 1006). What the bridge did is asserted from its record below.
    assert big.stream.close_code in (1009, 1006)
    assert first.call_sid == big.sid and first.end_reason == "telephony_error"
    assert "1009" in (first.end_detail or ""), first.end_detail
    # The phone call did not stay up: Twilio ran out of TwiML when the stream closed (and
    # the bridge's hang-up found it over, or ended it first).
    assert big.status == "completed" and big.end_cause in ("stream_closed", "rest_completed")
    assert fragmented_close[0] == 1009 and second.end_reason == "telephony_error"
    assert "1009" in (second.end_detail or "")
    assert third.call_sid == after.sid and third.end_reason == "agent_ended"
    assert after.status == "completed"


async def _http_exchange(
    url: str, head: str, body_parts: list[bytes], *, timeout: float = 3.0
) -> tuple[int, bytes, int]:
    """Send a request head then body parts (stopping early if the server has answered);
    returns the status, the answer's body and how many body bytes were sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    sent = 0

    async def read_response() -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *([0-9]+)", head)
        return head + (await reader.readexactly(int(length.group(1))) if length else b"")

    try:
        writer.write(head.encode("latin-1"))
        response = asyncio.ensure_future(read_response())
        for part in body_parts:
            if response.done():
                break
            writer.write(part)
            sent += len(part)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.001)  # paced, so an early answer is seen early
        async with asyncio.timeout(timeout):
            data = await response
    finally:
        response.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2], sent


@pytest.mark.database
@pytest.mark.parametrize("path", ["/twilio/inbound", "/twilio/status", "/calls"])
async def test_oversized_request_bodies_get_413_without_being_read(
    twilio: TwilioEmulator, db_url: str, path: str
) -> None:
    async with AgentEmulator(short_script(0.3)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            base = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_TOKEN}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
            )
            one_mb = 1_000_000
            started = time.monotonic()
            # A 1 MB body: answered from the header, before (almost) any of it is sent.
            honest = await _http_exchange(
                srv.url, base + f"Content-Length: {one_mb}\r\n\r\n", [b"a" * 1024] * 1000
            )
            # A Content-Length that lies high (the body never comes): no wait for it.
            lying = await _http_exchange(srv.url, base + f"Content-Length: {one_mb}\r\n\r\n", [b"a" * 100])
            # No Content-Length (chunked): cut off once over the limit, not at the end.
            chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
            chunked = await _http_exchange(
                srv.url, base + "Transfer-Encoding: chunked\r\n\r\n", [chunk] * 61, timeout=5
            )
            elapsed = time.monotonic() - started
            health = await srv.api.get("/healthz")
    for status, body, _ in (honest, lying, chunked):
        assert status == 413 and b"too large" in body
    assert honest[2] < one_mb // 2, f"the server waited for {honest[2]} bytes before answering"
    assert chunked[2] < 61 * 0x4000, "the chunked body was read to its end"
    assert elapsed < 5
    assert health.status_code == 200


@pytest.mark.database
async def test_a_content_length_lying_low_is_read_as_declared(twilio: TwilioEmulator, db_url: str) -> None:
    """A body longer than its Content-Length: only the declared bytes are the request."""
    async with AgentEmulator(short_script(0.3)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            body = json.dumps({"to": "+15559870001", "from": "+15559870002"}).encode() + b" " * 200_000
            head = (
                f"POST /calls HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
            )
            status, answer, _ = await _http_exchange(srv.url, head, [body[:65536], body[65536:]])
            health = await srv.api.get("/healthz")
    assert status == 400 and b"JSON" in answer  # the first 10 bytes are not a JSON document
    assert not [r for r in twilio.requests if r.path.endswith("/Calls.json")]
    assert health.status_code == 200


@pytest.mark.database
@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"to": ' + b"1" * 5000 + b"}", 400),  # valid JSON, but an integer Python will not convert
        (b'{"to": "+15550001111", "from": "\xff"}', 400),  # not UTF-8
        (b"[" * 100_000, 413),
        (b"[" * 7000 + b"]" * 7000, 400),  # nested deeper than the JSON decoder goes
    ],
)
async def test_calls_api_hostile_json_gets_a_client_error(
    twilio: TwilioEmulator, db_url: str, content: bytes, status: int
) -> None:
    async with AgentEmulator(short_script(0.3)) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            resp = await srv.api.post("/calls", content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert "error" in resp.json()


# A refused caller is answered at once, never held until a timeout
# (the agent connect timeout is 10 s). The bound is loose: the machines are shared and noisy.
NOT_HELD_S = 5.0


@pytest.mark.database
async def test_at_capacity_every_rejected_call_is_answered_without_waiting(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with AgentEmulator(talkative()) as agent:
        settings = settings_for(twilio, agent, db_url, max_concurrent_calls=2)
        async with running_server(settings) as srv:
            live = [await twilio.place_inbound_call(f"{srv.url}/twilio/inbound") for _ in range(2)]
            await agent.wait_for_conversations(2, timeout=5)
            url = f"{srv.url}/twilio/inbound"

            async def webhook(i: int) -> tuple[float, httpx.Response]:
                form = webhook_form(f"CA{i:032x}")
                sig = twilio_signature(twilio.auth_token, url, form)
                t = time.monotonic()
                resp = await srv.api.post(url, data=form, headers={"X-Twilio-Signature": sig})
                return time.monotonic() - t, resp

            async def api_call() -> tuple[float, httpx.Response]:
                t = time.monotonic()
                resp = await srv.api.post("/calls", json={"to": "+15559870001", "from": "+15559870002"})
                return time.monotonic() - t, resp

            async def emulated() -> tuple[float, Any]:
                t = time.monotonic()
                call = await twilio.place_inbound_call(url)
                await call.wait_ended(5)
                return time.monotonic() - t, call

            answers = await asyncio.gather(*(webhook(i) for i in range(20)))
            refused = await asyncio.gather(*(api_call() for _ in range(5)))
            turned_away = await asyncio.gather(*(emulated() for _ in range(3)))
            still_live = srv.state.bridge.live_calls
            metrics = (await srv.api.get("/metrics")).text
            for call in live:
                assert call.stream is not None
                await call.stream.hangup()
            await srv.wait_records(2)
    for took, resp in answers:
        assert resp.status_code == 200 and "lines are busy" in resp.text and "<Hangup/>" in resp.text
        assert "<Stream" not in resp.text
        assert took < NOT_HELD_S, took
    for took, resp in refused:
        assert resp.status_code == 503 and took < NOT_HELD_S
    for took, call in turned_away:
        assert call.stream is None and "busy" in call.twiml_documents[-1] and took < NOT_HELD_S
    assert still_live == 2
    assert metric(metrics, "callbridge_calls_rejected_total") == 20 + 3
    assert not [r for r in twilio.requests if r.method == "POST" and r.path.endswith("/Calls.json")]


@pytest.mark.database
async def test_an_agent_frame_over_1_mib_ends_the_call_as_agent_error(
    twilio: TwilioEmulator, db_url: str
) -> None:
    huge = {
        "type": "agent_response",
        "agent_response_event": {"agent_response": "z" * (1 << 20), "event_id": 9},
    }
    script = AgentScript(
        steps=[Say("Hello!", seconds=0.3), Sleep(0.2), RawSend(huge), Say("never heard", seconds=5)],
        realtime_factor=FAST,
    )
    async with AgentEmulator(script) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            record = (await srv.wait_records(1))[0]
            await call.wait_ended(5)
            conv = agent.conversations[0]
            await conv.wait_closed(5)
            stored = await srv.call_record(call.sid)
    assert record.end_reason == "agent_error"
    # e.g. "the bridge closed the agent connection: 1009 frame with 1048665 bytes exceeds limit ..."
    assert "the bridge closed the agent connection: 1009" in (record.end_detail or ""), record.end_detail
    assert stored["end_reason"] == "agent_error" and stored["end_detail"] == record.end_detail
    assert [t["text"] for t in record.transcript] == ["Hello!"]
    assert conv.close_code == 1009  # the bridge closed the agent with "message too big"
    assert call.status == "completed" and call.end_cause == "rest_completed"


@pytest.mark.database
async def test_hostile_frames_on_a_live_call_are_warnings_and_the_call_goes_on(
    twilio: TwilioEmulator, db_url: str
) -> None:
    """The parser properties, end to end: garbage from either side is counted and logged,
    and the call still ends the way it would have (the goodbye heard, then hang-up)."""
    big_int = '{"type": "ping", "ping_event": {"event_id": ' + "9" * 5000 + "}}"
    agent_garbage: list[Any] = [
        RawSend({"type": []}),
        RawSend(big_int),
        RawSend({"type": "user_transcript", "user_transcription_event": {"user_transcript": None}}),
        RawSend({"type": "error", "error_event": {"code": 1002, "message": "m" * 100_000}}),
        RawSend("[" * 5000),
    ]
    script = AgentScript(
        steps=[
            Say("Hello!", seconds=0.3),
            *agent_garbage,
            WaitForUser(0.6),
            EndCall("Goodbye!", seconds=0.3),
        ],
        realtime_factor=FAST,
    )
    twilio_garbage: list[str | bytes] = [
        '{"event": ' + "7" * 5000 + "}",
        '{"event": ["media"]}',
        '{"event": "media", "media": {"payload": "not base64!"}}',
        '{"event": "dtmf", "dtmf": {"digit": "' + "1" * 5000 + '"}}',
        b"\x00\x01binary",
        "[" * 5000,
    ]
    async with AgentEmulator(script) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound", audio=load_speech("caller_hello")
            )
            await agent.wait_for_conversations(1, timeout=5)
            assert call.stream is not None
            for frame in twilio_garbage:
                await call.stream.send_raw(frame)
            record = (await srv.wait_records(1))[0]
            await call.wait_ended(5)
    assert record.end_reason == "agent_ended", record.end_detail
    assert len(record.end_detail or "") < 400  # the agent's 100 KB error message is not copied in
    assert [t["text"] for t in record.transcript] == ["Hello!", "Goodbye!"]
    assert record.metrics["telephony_warnings"] >= len(twilio_garbage)
    assert record.metrics["agent_warnings"] >= len(agent_garbage)
    assert call.status == "completed" and call.end_cause == "rest_completed"
    assert not [e for e in record.timeline if e.get("event") == "caller.dtmf"]


# -- secrets ------------------------------------------------------------------------------------

AUTH_SECRET = "authTOKEN-4f1c9e0b7d2a58e3"
API_KEY_SECRET = "xiKEY-93b1d0c6e2f47a15"
BEARER_SECRET = "bearerTOKEN-6c2e81f0a9d34b77"


def secret_forms() -> dict[str, str]:
    """Each secret as it could leak: as is, and the Twilio token inside HTTP Basic auth."""
    basic = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_SECRET}".encode()).decode()
    return {
        "twilio auth token": AUTH_SECRET,
        "twilio basic auth": basic,
        "elevenlabs api key": API_KEY_SECRET,
        "api bearer token": BEARER_SECRET,
    }


def leaks(text: str) -> list[str]:
    return [name for name, value in secret_forms().items() if value in text]


class Capture(logging.Handler):
    """Every record of every logger, formatted both ways callbridge formats them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []
        self.plain = logging.Formatter("%(levelname)s %(name)s %(message)s")
        self.json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.plain.format(record) + "\n" + self.json.format(record)
        text += "\n" + repr(record.args) + repr(getattr(record, "cb_fields", ""))
        self.lines.append((record.name, text))


@contextlib.contextmanager
def every_logger_at_debug() -> Iterator[tuple[Capture, Any]]:
    """A root handler at DEBUG, and every logger opened to it (level unset, propagating,
    enabled); `reopen()` does it again for loggers configured meanwhile (uvicorn)."""
    capture = Capture()
    root = logging.getLogger()
    saved_root = root.level
    saved: dict[str, tuple[int, bool, bool]] = {}

    def reopen() -> None:
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                saved.setdefault(name, (logger.level, logger.propagate, logger.disabled))
                logger.setLevel(logging.NOTSET)
                logger.propagate = True
                logger.disabled = False

    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    reopen()
    try:
        yield capture, reopen
    finally:
        root.removeHandler(capture)
        root.setLevel(saved_root)
        for name, (level, propagate, disabled) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


# The emulators stand for Twilio and ElevenLabs, which hold these secrets; what they (and
# the websockets *server* the agent emulator runs on, which callbridge itself never runs:
# its server is uvicorn) log is the vendor's side, not callbridge's.
VENDOR_LOGGERS = ("callbridge.emulators", "websockets.server")


async def test_secrets_never_appear_in_logs_errors_or_reprs(tmp_path: Path) -> None:
    http_texts: list[str] = []

    def keep(resp: httpx.Response) -> httpx.Response:
        http_texts.append(f"{resp.status_code} {resp.headers} {resp.text}")
        return resp

    with every_logger_at_debug() as (capture, reopen):
        async with (
            TwilioEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_SECRET) as tw,
            AgentEmulator(short_script(0.3), api_key=API_KEY_SECRET) as agent,
        ):
            settings = settings_for(
                tw,
                agent,
                tmp_path / "calls.db",
                elevenlabs_api_key=API_KEY_SECRET,
                api_token=BEARER_SECRET,
            )
            control = TwilioCallControl(
                ACCOUNT_SID,
                AUTH_SECRET,
                tw.base_url,
                retry=RetryPolicy(attempts=3, base_delay=0.02, max_delay=0.1, deadline=3, request_timeout=2),
            )
            async with (
                running_server(settings, control=control) as srv,
                httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
            ):
                reopen()  # uvicorn configured its loggers when the server was built
                inbound, status = f"{srv.url}/twilio/inbound", f"{srv.url}/twilio/status"
                # 1. a good call (signed URL fetched with the key, agent ends it, hang-up).
                good = await tw.place_inbound_call(inbound, status_callback=status)
                await srv.wait_records(1)
                # 2. the hang-up refused (401), then failing (500, retried).
                tw.inject_fault("update", status=401, code=20003, message="Authenticate")
                await tw.place_inbound_call(inbound)
                await srv.wait_records(2)
                for _ in range(3):
                    tw.inject_fault("update", status=500)
                await tw.place_inbound_call(inbound)
                await srv.wait_records(3)
                # 3. the agent unreachable: its key was rotated, the signed-URL request fails.
                agent.api_key = "rotated-" + API_KEY_SECRET[::-1]
                await tw.place_inbound_call(inbound)
                await srv.wait_records(4)
                agent.api_key = API_KEY_SECRET
                # 4. forged requests: webhook, stream, status callback.
                await tw.place_inbound_call(inbound, signature="forged")
                forged_stream = await tw.place_inbound_call(inbound, stream_signature="forged")
                await forged_stream.wait_ended(5)
                keep(await client.post(status, data=webhook_form(good.sid, "completed")))
                # 5. the API: no token, a wrong one, bad bodies, Twilio refusing the create.
                keep(await client.get("/calls"))
                keep(await client.get("/calls", headers={"Authorization": "Bearer " + BEARER_SECRET[:-1]}))
                auth = {"Authorization": f"Bearer {BEARER_SECRET}"}
                keep(await client.post("/calls", json={"to": "nope"}, headers=auth))
                tw.inject_fault("create", status=401, code=20003, message="Authenticate")
                keep(
                    await client.post(
                        "/calls", json={"to": "+15559870001", "from": "+15559870002"}, headers=auth
                    )
                )
                for rec in srv.records:
                    keep(await client.get(f"/calls/{rec.call_sid}", headers=auth))
                keep(await client.get("/metrics"))
                records = list(srv.records)
            reprs = [repr(settings), str(settings), repr(control), str(control)]
            reprs += [repr(ElevenLabsConfig("agent", api_key=API_KEY_SECRET)), repr(srv.state.settings)]
    ours = [(name, text) for name, text in capture.lines if not name.startswith(VENDOR_LOGGERS)]
    # The faults really happened, and were logged...
    assert [r.end_reason for r in records] == [
        "agent_ended",
        "agent_ended",
        "agent_ended",
        "agent_unreachable",
    ]
    assert "HTTP 401" in (records[3].end_detail or "")
    logged = "\n".join(text for _, text in ours)
    assert "HTTP 401" in logged and "HTTP 500" in logged and "twilio.bad_signature" in logged
    assert "twilio.create_failed" in logged
    # ...and at DEBUG from every library on the path (so nothing was filtered out).
    names = {name.split(".")[0] for name, _ in ours}
    assert {"callbridge", "twilio", "httpx", "httpcore", "websockets", "uvicorn", "aiosqlite"} <= names, names
    # Not one secret, in any form, anywhere.
    assert [(name, leaks(text)) for name, text in ours if leaks(text)] == []
    assert [text[:200] for text in http_texts if leaks(text)] == []
    assert [text for text in reprs if leaks(text)] == []
    assert [r.call_sid for r in records if leaks(json.dumps(r.to_dict()))] == []


def test_cli_config_error_line_shows_no_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith(("TWILIO_", "ELEVENLABS_", "CALLBRIDGE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "not-a-sid")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_SECRET)
    monkeypatch.setenv("ELEVENLABS_API_KEY", API_KEY_SECRET)
    monkeypatch.setenv("CALLBRIDGE_API_TOKEN", BEARER_SECRET)
    monkeypatch.setenv("CALLBRIDGE_MAX_CALL_SECONDS", "soon")
    assert cli.main(["serve", "--public-url", "ftp://bridge.example.com"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("callbridge: configuration:"), err
    for expected in (
        "TWILIO_ACCOUNT_SID",
        "ELEVENLABS_AGENT_ID",
        "CALLBRIDGE_MAX_CALL_SECONDS",
        "PUBLIC_URL",
    ):
        assert expected in lines[0]
    assert leaks(out + err) == []
    # The same for the settings error itself, however it is shown.
    with pytest.raises(Exception) as caught:
        Settings.from_env(require=("twilio", "agent", "public_url", "api_token"))
    assert leaks(str(caught.value) + repr(caught.value) + repr(getattr(caught.value, "problems", ""))) == []


def test_serve_logging_keeps_libraries_that_log_credentials_quiet_at_debug() -> None:
    """At --log-level debug, the websockets client logs the agent's URL (whose query holds
    the signed URL's conversation_signature) and every frame, and the twilio SDK logs each
    REST request (numbers, TwiML): `callbridge serve` keeps those loggers at WARNING
    while its own loggers run at DEBUG."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    names = ("twilio", "websockets", "httpx", "aiosqlite", "callbridge")
    saved = {n: logging.getLogger(n).level for n in names}
    capture = Capture()
    try:
        cli.configure_logging("debug")
        root.addHandler(capture)
        logging.getLogger("websockets.client").debug(
            "> GET /v1/convai/conversation?conversation_signature=s3"
        )
        logging.getLogger("twilio.http_client").info("-- BEGIN Twilio API Request --")
        logging.getLogger("httpx").info("HTTP Request: GET https://api.elevenlabs.io/... 200")
        logging.getLogger("callbridge.call").debug("call.debug line")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
    assert [name for name, _ in capture.lines] == ["callbridge.call"]


def test_settings_repr_hides_the_password_of_every_url() -> None:
    """The database URL usually carries a password (postgresql://user:pass@host/db): a
    logged or printed Settings must not show it, nor one in any other URL setting."""
    settings = Settings(
        database_url="postgresql+asyncpg://calls:hunter2-db-pass@db.internal:5432/calls",
        public_url="https://ops:hunter3-proxy-pass@bridge.example.com",
        twilio_api_base_url="https://AC1:hunter4-edge-pass@api.twilio.com",
        twilio_auth_token=AUTH_SECRET,
    )
    shown = repr(settings) + str(settings)
    for password in ("hunter2-db-pass", "hunter3-proxy-pass", "hunter4-edge-pass", AUTH_SECRET):
        assert password not in shown
    # What is not secret stays readable.
    assert "postgresql+asyncpg://calls:***@db.internal:5432/calls" in shown
    assert "bridge.example.com" in shown and "sqlite" in repr(Settings())
