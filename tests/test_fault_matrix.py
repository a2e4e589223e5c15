"""The fault matrix: every fault, at three points of a call, on the real server.

Points: during the agent's greeting, mid-conversation while the caller speaks, and
during the goodbye. For every cell the same invariants are checked:

- exactly one end reason, and the right one (in the hook and in the database);
- the emulated Twilio call is not left in progress;
- every agent socket is closed;
- the record is in the database;
- nothing is left behind (tasks, sockets, threads: the conftest checks after each test);
- the server still serves the next call, which ends normally.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from callbridge.call import CallHooks
from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    ClientToolCall,
    Close,
    Drop,
    EmulatedConversation,
    EndCall,
    Garbage,
    RawSend,
    Say,
    Stall,
    UserTranscript,
    WaitForUser,
)
from callbridge.emulators.speech import load_speech
from callbridge.emulators.twilio import EmulatedCall, MediaStreamCaller, TwilioEmulator
from callbridge.telephony.twilio.control import RetryPolicy, TwilioCallControl
from tests.serverkit import RunningServer, running_server, settings_for

POINTS = ("greeting", "conversation", "goodbye")
TEN_MB = 10 * 1024 * 1024


def cells(faults: Mapping[str, object]) -> list[Any]:
    """Every fault at every point. The fast tier (`-m "not slow"`) keeps one point per fault,
    taken in turn, so that each fault and each point is still in it; the rest are marked slow."""
    return [
        pytest.param(
            fault,
            point,
            id=f"{fault}-{point}",
            marks=() if point == POINTS[i % len(POINTS)] else pytest.mark.slow,
        )
        for i, fault in enumerate(sorted(faults))
        for point in POINTS
    ]


def script_with(point: str, fault: list[Any]) -> AgentScript:
    """A short conversation with `fault` steps spliced in at `point`."""
    greet_a, greet_b = Say("Hello, thanks for", seconds=0.3), Say("calling us today.", seconds=0.3)
    listen = [WaitForUser(0.4), UserTranscript("I need some help please")]
    answer = Say("Sure, I can help.", seconds=0.4)
    bye_a = Say("Goodbye", seconds=0.3)
    bye_b = EndCall("and take care!", seconds=0.3, close_delay=0.05)
    plan = {
        "greeting": [greet_a, *fault, greet_b, *listen, answer, bye_a, bye_b],
        "conversation": [greet_a, greet_b, WaitForUser(0.2), *fault, *listen, answer, bye_a, bye_b],
        "goodbye": [greet_a, greet_b, *listen, answer, bye_a, *fault, bye_b],
    }[point]
    return AgentScript(steps=plan, realtime_factor=1.0, ping_interval=0.25, chunk_ms=100)


NEXT_CALL = AgentScript(
    steps=[Say("Next caller, hello.", seconds=0.3), EndCall("Bye.", seconds=0.3, close_delay=0.05)],
    realtime_factor=float("inf"),
    ping_interval=0.25,
)


@dataclass
class Cell:
    expected: str
    twilio_completed_by: set[str] = field(default_factory=lambda: {"rest_completed", "caller_hangup"})


def agent_message_sent(conv: EmulatedConversation, point: str) -> bool:
    """Has the agent reached `point` of the script (as seen on its socket)?"""
    for _, msg in conv.sent:
        if not isinstance(msg, dict):
            continue
        if point == "greeting" and msg.get("type") == "audio":
            return True
        if point == "conversation" and msg.get("type") == "user_transcript":
            return True
        if point == "goodbye" and msg.get("type") == "agent_response":
            if msg["agent_response_event"]["agent_response"] == "Goodbye":
                return True
    return False


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition of an emulator's records (test code: the emulators have no event for it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.02)


async def run_cell(
    twilio: TwilioEmulator,
    db_url: str,
    script: AgentScript,
    expected: str,
    *,
    twilio_fault: Callable[[MediaStreamCaller], Awaitable[None]] | None = None,
    point: str = "greeting",
    hooks: CallHooks | None = None,
    tools: dict[str, Any] | None = None,
    settings_overrides: dict[str, Any] | None = None,
    control: TwilioCallControl | None = None,
    caller_audio: bytes = b"",
) -> tuple[dict[str, Any], EmulatedCall, RunningServer]:
    """One faulty call then one normal call through a fresh server; checks the invariants."""

    def scripts(agent_id: str, n: int) -> AgentScript:
        return script if n == 0 else NEXT_CALL

    caller_audio = caller_audio or load_speech("caller_hello") * 3
    async with AgentEmulator(script_factory=scripts) as agent:
        overrides = {
            "agent_idle_timeout": 1.0,
            "final_audio_timeout": 2.0,
            "max_call_seconds": 30.0,
            "hook_timeout": 0.5,
            "tool_timeout": 0.5,
        } | (settings_overrides or {})
        settings = replace(settings_for(twilio, agent, db_url), **overrides)
        async with running_server(settings, hooks=hooks, tools=tools, control=control) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", audio=caller_audio)
            if twilio_fault is not None:
                await agent.wait_for_conversations(1, timeout=5)
                conv = agent.conversations[0]
                await eventually(lambda: agent_message_sent(conv, point), 10, f"agent reached {point}")
                assert call.stream is not None
                await twilio_fault(call.stream)
            records = await srv.wait_records(1, timeout=30)
            await call.wait_ended(10)

            # Invariants of the faulty call.
            assert len(records) == 1
            assert records[0].call_sid == call.sid
            assert records[0].end_reason == expected, (records[0].end_reason, records[0].end_detail)
            assert call.status != "in-progress", call.status
            for conv in agent.conversations:
                # Bounded by the close timeouts (2 s each side): a peer blocked writing an
                # oversized frame only notices the abort after its own timeout.
                await asyncio.wait_for(conv.closed.wait(), 6)
            saved = await srv.call_record(call.sid)
            assert saved["status"] == "ended" and saved["end_reason"] == expected

            # The server still serves the next call.
            nxt = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound")
            await srv.wait_records(2, timeout=15)
            await nxt.wait_ended(5)
            assert srv.records[1].end_reason == "agent_ended"
            assert nxt.status == "completed"
    return saved, call, srv


# -- agent-side faults ------------------------------------------------------------

AGENT_FAULTS: dict[str, tuple[list[Any], str]] = {
    "close_1000": ([Close(1000, "done")], "agent_ended"),
    "close_1000_max_duration": (
        [Close(1000, "", error={"error_type": "max_duration_exceeded", "message": "limit"})],
        "agent_ended",
    ),
    "close_1002": ([Close(1002, "")], "agent_error"),
    "close_1002_with_error": (
        [Close(1002, "", error={"error_type": "llm_error", "message": "x"})],
        "agent_error",
    ),
    "close_1008": ([Close(1008, "")], "agent_error"),
    "close_1008_with_error": (
        [Close(1008, "", error={"error_type": "invalid_message", "message": "x"})],
        "agent_error",
    ),
    "close_1011": ([Close(1011, "")], "agent_error"),
    "close_1011_with_error": (
        [Close(1011, "", error={"error_type": "unknown_websocket_crash", "message": "x"})],
        "agent_error",
    ),
    "tcp_drop": ([Drop()], "agent_error"),
    "stall": ([Stall()], "agent_error"),
    "garbage_frames": ([Garbage("{not json"), Garbage(b"\x00\xff binary"), Garbage("[1, 2]")], "agent_ended"),
    "audio_bad_base64": (
        [RawSend({"type": "audio", "audio_event": {"audio_base_64": "%%not base64%%", "event_id": 99}})],
        "agent_ended",
    ),
    # 10 MB of audio at once (1,300 s of speech), in 20 events each under the client's frame limit.
    "audio_burst_10mb": (
        [
            RawSend(
                {
                    "type": "audio",
                    "audio_event": {
                        "audio_base_64": base64.b64encode(b"\x55" * (TEN_MB // 20)).decode(),
                        "event_id": 50,
                    },
                }
            )
        ]
        * 20,
        "agent_ended",
    ),
    "oversized_frame": (
        [
            RawSend(
                json.dumps(
                    {"type": "audio", "audio_event": {"audio_base_64": "QUFB" * 400_000, "event_id": 98}}
                )
            )
        ],
        "agent_error",
    ),
}


@pytest.mark.database
@pytest.mark.parametrize(("fault", "point"), cells(AGENT_FAULTS))
async def test_agent_fault(twilio: TwilioEmulator, db_url: str, fault: str, point: str) -> None:
    steps, expected = AGENT_FAULTS[fault]
    saved, call, _ = await run_cell(twilio, db_url, script_with(point, steps), expected)
    metrics = saved["metrics"]
    if fault in ("garbage_frames", "audio_bad_base64"):
        assert metrics["agent_warnings"] >= 1
    if fault == "audio_burst_10mb":
        assert metrics["audio_to_caller_bytes"] >= TEN_MB
    if expected == "agent_error":
        assert call.end_cause == "rest_completed"  # the phone leg was hung up, not left in silence
    if fault == "stall":
        assert "stalled" in saved["end_detail"]
    if fault == "oversized_frame":
        assert "1009" in saved["end_detail"] and "exceeds limit" in saved["end_detail"]


# -- Twilio-side faults -----------------------------------------------------------


async def _stop_then_close(stream: MediaStreamCaller) -> None:
    await stream.hangup()


async def _close_without_stop(stream: MediaStreamCaller) -> None:
    await stream.close_without_stop()


async def _drop(stream: MediaStreamCaller) -> None:
    await stream.drop()


async def _duplicate_start(stream: MediaStreamCaller) -> None:
    start = stream.sent_events("start")[0]
    await stream.send_raw(json.dumps(start | {"sequenceNumber": "999"}))


async def _unknown_marks(stream: MediaStreamCaller) -> None:
    for name in ("never-sent", "cb999999", ""):
        mark = {
            "event": "mark",
            "sequenceNumber": "77",
            "streamSid": stream.stream_sid,
            "mark": {"name": name},
        }
        await stream.send_raw(json.dumps(mark))


async def _oversized_frame(stream: MediaStreamCaller) -> None:
    await stream.send_raw(json.dumps({"event": "media", "media": {"payload": "A" * 70_000}}))


TWILIO_FAULTS: dict[str, tuple[Callable[[MediaStreamCaller], Awaitable[None]], str]] = {
    "stop_then_close": (_stop_then_close, "caller_hung_up"),
    "close_without_stop": (_close_without_stop, "telephony_error"),
    "tcp_drop": (_drop, "telephony_error"),
    "duplicate_start": (_duplicate_start, "agent_ended"),
    "unknown_marks": (_unknown_marks, "agent_ended"),
    "oversized_frame": (_oversized_frame, "telephony_error"),
}


@pytest.mark.database
@pytest.mark.parametrize(("fault", "point"), cells(TWILIO_FAULTS))
async def test_twilio_stream_fault(twilio: TwilioEmulator, db_url: str, fault: str, point: str) -> None:
    inject, expected = TWILIO_FAULTS[fault]
    saved, _, _ = await run_cell(
        twilio, db_url, script_with(point, []), expected, twilio_fault=inject, point=point
    )
    if fault in ("duplicate_start", "unknown_marks"):
        assert saved["metrics"]["telephony_warnings"] >= 1
    if expected == "telephony_error":
        # The stream broke but the phone call may still be up: the bridge hung it up.
        assert any(e["event"] == "phone.hangup" for e in saved["timeline"])
    if expected == "caller_hung_up":
        assert not any(e["event"] == "phone.hangup" for e in saved["timeline"])


@pytest.mark.slow
@pytest.mark.database
async def test_media_before_start_is_logged_and_the_call_goes_on(twilio: TwilioEmulator, db_url: str) -> None:
    """Twilio never sends media before `start`; if it did, the frame is dropped with a log line."""
    from websockets.asyncio.client import connect

    from callbridge.emulators.twilio import twilio_signature

    async with AgentEmulator(NEXT_CALL) as agent:
        settings = settings_for(twilio, agent, db_url)
        async with running_server(settings) as srv:
            ws_url = srv.url.replace("http", "ws") + "/twilio/media-stream"
            sid = "CA" + "7" * 32
            params = {"cb_ref": sid, "cb_token": srv.state.stream_token(sid)}
            sig = twilio_signature(twilio.auth_token, ws_url, {})
            async with connect(ws_url, additional_headers={"x-twilio-signature": sig}) as ws:
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                await ws.send(json.dumps({"event": "media", "media": {"payload": "//8="}}))
                start = {
                    "streamSid": "MZ" + "7" * 32,
                    "callSid": sid,
                    "accountSid": twilio.account_sid,
                    "customParameters": params,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                }
                await ws.send(json.dumps({"event": "start", "start": start, "streamSid": "MZ" + "7" * 32}))
                records = await srv.wait_records(1)
    assert records[0].end_reason == "agent_ended"
    assert records[0].call_sid == sid


# -- Twilio REST faults at hang-up ------------------------------------------------


def _fast_control(twilio: TwilioEmulator, base_url: str | None = None) -> TwilioCallControl:
    policy = RetryPolicy(attempts=4, request_timeout=1.0, deadline=6.0, base_delay=0.1, max_delay=2.0)
    return TwilioCallControl(twilio.account_sid, twilio.auth_token, base_url or twilio.base_url, retry=policy)


REST_FAULTS: dict[str, list[dict[str, Any]]] = {
    "500_then_success": [{"status": 500}],
    "429_retry_after": [{"status": 429, "retry_after": 1}],
    "timeout": [{"delay": 2.0}],
    "404_20404": [{"status": 404, "code": 20404}],
    "400_21220": [{"status": 400, "code": 21220}],
    "connection_refused": [],
}


@pytest.mark.database
@pytest.mark.parametrize("fault", sorted(REST_FAULTS))
async def test_rest_fault_at_hangup(twilio: TwilioEmulator, db_url: str, fault: str) -> None:
    for spec in REST_FAULTS[fault]:
        twilio.inject_fault("update", **spec)
    base = None
    if fault == "connection_refused":
        async with TwilioEmulator() as closed:
            base = closed.base_url  # a loopback port with nothing listening any more
    control = _fast_control(twilio, base)
    saved, call, _ = await run_cell(
        twilio, db_url, script_with("goodbye", []), "agent_ended", control=control
    )
    updates = [r for r in twilio.requests if r.form.get("Status") == "completed" and call.sid in r.path]
    outcome = [e for e in saved["timeline"] if e["event"].startswith("phone.hangup")]
    if fault in ("500_then_success", "429_retry_after", "timeout"):
        assert len(updates) == 2, updates  # one failure, one retry
        assert outcome[-1]["event"] == "phone.hangup"
    if fault == "429_retry_after":
        assert updates[1].time - updates[0].time >= 0.95  # Retry-After: 1 was honoured
    if fault in ("404_20404", "400_21220"):
        assert len(updates) == 1 and outcome[-1]["outcome"] == "already_ended"
    if fault == "connection_refused":
        assert outcome[-1]["event"] == "phone.hangup_failed"
    # Whatever REST said, closing the media stream ended the phone call.
    assert call.status == "completed"


# -- faults inside: hooks, tools ----------------------------------------------------


def _raises(*_: Any) -> None:
    raise RuntimeError("user hook bug")


async def _hangs(*_: Any) -> None:
    await asyncio.sleep(3600)


@pytest.mark.database
@pytest.mark.parametrize("hook", ["on_call_start", "on_agent_end_call", "on_call_end", "on_transcript"])
@pytest.mark.parametrize("behaviour", ["raises", "hangs"])
async def test_user_hook_fault(twilio: TwilioEmulator, db_url: str, hook: str, behaviour: str) -> None:
    if hook == "on_transcript" and behaviour == "hangs":
        pytest.skip("on_transcript hooks are sync: they cannot await")
    fn: Callable[..., Any] = _raises if behaviour == "raises" else _hangs
    hooks = CallHooks(**{hook: [fn]})
    _, call, _ = await run_cell(twilio, db_url, script_with("goodbye", []), "agent_ended", hooks=hooks)
    assert call.end_cause == "rest_completed"


@pytest.mark.database
@pytest.mark.parametrize("behaviour", ["raises", "hangs"])
async def test_client_tool_fault(twilio: TwilioEmulator, db_url: str, behaviour: str) -> None:
    async def hanging_tool(params: dict[str, Any]) -> str:
        await asyncio.sleep(3600)
        return "never"

    def raising_tool(params: dict[str, Any]) -> str:
        raise ValueError("calendar offline")

    tool = raising_tool if behaviour == "raises" else hanging_tool
    script = script_with("conversation", [ClientToolCall("check_calendar", {"day": "monday"}, timeout=30)])
    saved, _, _ = await run_cell(twilio, db_url, script, "agent_ended", tools={"check_calendar": tool})
    assert saved["metrics"]["tool_calls"] == 1


def test_every_hook_kind_is_in_the_matrix() -> None:
    # A new kind of hook must be added to test_user_hook_fault.
    assert set(CallHooks.__dataclass_fields__) == {
        "on_call_start",
        "on_agent_end_call",
        "on_call_end",
        "on_transcript",
    }
