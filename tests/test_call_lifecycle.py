"""End-to-end lifecycle of a bridged call, on real loopback sockets, emulators on both sides.

Each test asserts what crossed each socket, what Twilio's REST API was told, and
the record the bridge produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from callbridge.audio import ulaw_to_pcm16
from callbridge.call import Call, CallHooks, CallOptions, CallRecord
from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    ClientToolCall,
    Close,
    Drop,
    EmulatedConversation,
    EndCall,
    Interrupt,
    Say,
    Sleep,
    Stall,
    WaitForUser,
)
from callbridge.emulators.speech import load_speech
from callbridge.emulators.twilio import EmulatedCall, TwilioEmulator
from callbridge.telephony.base import Destination
from tests.serverkit import make_bridge, wait_until

FAST = float("inf")


def hangup_requests(tw: TwilioEmulator, call_sid: str) -> list[Any]:
    return [
        r
        for r in tw.requests
        if r.method == "POST"
        and r.path.endswith(f"/Calls/{call_sid}.json")
        and r.form.get("Status") == "completed"
    ]


def redirect_requests(tw: TwilioEmulator, call_sid: str) -> list[Any]:
    return [
        r
        for r in tw.requests
        if r.method == "POST" and r.path.endswith(f"/Calls/{call_sid}.json") and "Twiml" in r.form
    ]


@dataclass
class Bridged:
    call: EmulatedCall
    record: CallRecord
    conversations: list[EmulatedConversation]

    @property
    def conv(self) -> EmulatedConversation:
        return self.conversations[0]


async def bridged(
    twilio: TwilioEmulator,
    script: AgentScript | None = None,
    *,
    script_factory: Any = None,
    agent_base_url: str | None = None,
    options: CallOptions | None = None,
    hooks: CallHooks | None = None,
    tools: dict[str, Any] | None = None,
    audio: bytes = b"",
    after_start: Callable[[EmulatedCall, AgentEmulator | None], Awaitable[None]] | None = None,
    timeout: float = 20.0,
) -> Bridged:
    """One call through a bridge wired to an agent emulator (or to `agent_base_url`): waits until
    the bridge has recorded the end, and checks the invariant that every agent socket is closed."""
    async with contextlib.AsyncExitStack() as stack:
        agent: AgentEmulator | None = None
        if agent_base_url is None:
            emulator = (
                AgentEmulator(script_factory=script_factory) if script_factory else AgentEmulator(script)
            )
            agent = await stack.enter_async_context(emulator)
            agent_base_url = agent.base_url
        h = make_bridge(twilio, agent_base_url, options=options, hooks=hooks, tools=tools)
        stack.push_async_callback(h.control.aclose)
        async with h.bridge.serve_websockets() as url:
            call = await twilio.start_stream_call(
                url,
                audio=audio,
                from_="+15550001111",
                to="+15550002222",
                custom_parameters={"from": "+15550001111", "to": "+15550002222"},
            )
            if after_start is not None:
                await after_start(call, agent)
            await h.wait_records(1, timeout)
            await call.wait_ended(5)
        conversations = list(agent.conversations) if agent else []
        for conv in conversations:
            await asyncio.wait_for(conv.closed.wait(), 2)
    return Bridged(call, h.records[-1], conversations)


def media_messages(call: EmulatedCall) -> list[dict[str, Any]]:
    assert call.stream is not None
    return [m for _, m in call.stream.received if isinstance(m, dict) and m.get("event") == "media"]


# -- the agent ends the call ----------------------------------------------------


async def test_agent_end_call_plays_goodbye_then_hangs_up(twilio: TwilioEmulator) -> None:
    goodbye = load_speech("agent_goodbye")
    script = AgentScript(
        steps=[
            Say("Hello!", seconds=0.5),
            WaitForUser(0.3),
            EndCall("Goodbye!", audio=goodbye, close_delay=0.05),
        ],
        realtime_factor=FAST,
    )
    ended_hooks: list[CallRecord] = []
    end_call_hooks: list[str | None] = []
    hooks = CallHooks(
        on_call_end=[ended_hooks.append], on_agent_end_call=[lambda c: end_call_hooks.append(c.call_sid)]
    )
    out = await bridged(twilio, script, hooks=hooks, audio=load_speech("caller_hello"))
    call, record, conv = out.call, out.record, out.conv

    stream = call.stream
    assert stream is not None
    assert record.end_reason == "agent_ended"
    assert len(ended_hooks) == 1 and ended_hooks[0] is record
    assert end_call_hooks == [call.sid]
    # All of the goodbye was played to the caller, and it was the last thing played.
    assert bytes(stream.played_audio).endswith(goodbye)
    # The REST hang-up came after the last mark was echoed, and promptly.
    hangups = hangup_requests(twilio, call.sid)
    assert len(hangups) == 1
    last_mark_t = max(t for t, _name, cleared in stream.marks_echoed if not cleared)
    assert hangups[0].time >= last_mark_t
    assert hangups[0].time - last_mark_t < 0.5
    assert record.metrics["hangup_latency_ms"] is not None and record.metrics["hangup_latency_ms"] < 500
    # Both sockets are closed; the phone call is over.
    assert conv.closed.is_set() and stream.closed.is_set()
    assert call.status == "completed"
    assert record.conversation_id == conv.conversation_id
    assert [e["role"] for e in record.transcript] == ["agent", "agent"]
    assert record.transcript[-1]["text"] == "Goodbye!"


async def test_agent_close_without_end_call_tool_still_waits_for_audio(twilio: TwilioEmulator) -> None:
    """max_duration_exceeded on the agent side is a 1000 close: the caller still hears the last words."""
    script = AgentScript(
        steps=[
            Say("This call has reached its time limit.", seconds=1.0),
            Close(1000, "max duration", error={"error_type": "max_duration_exceeded", "message": "limit"}),
        ],
        realtime_factor=FAST,
    )
    out = await bridged(twilio, script)
    call, record = out.call, out.record
    assert record.end_reason == "agent_ended"
    assert "max_duration_exceeded" in (record.end_detail or "")
    assert call.stream is not None and len(call.stream.played_audio) == 8000  # one second, all of it
    assert len(hangup_requests(twilio, call.sid)) == 1


# -- the caller hangs up --------------------------------------------------------


async def test_caller_hangup_closes_agent_without_rest(twilio: TwilioEmulator) -> None:
    script = AgentScript(steps=[Say("Hello, how can I help?", seconds=3.0)], realtime_factor=2.0)
    hung_up_at: list[float] = []

    async def hang_up_soon(call: EmulatedCall, agent: AgentEmulator | None) -> None:
        assert agent is not None and call.stream is not None
        await agent.wait_for_conversations(1, timeout=5)
        conv = agent.conversations[0]
        await wait_until(lambda: len(conv.user_audio) > 0, 5, "caller audio reached the agent")
        await call.stream.hangup()
        hung_up_at.append(asyncio.get_running_loop().time())

    out = await bridged(twilio, script, audio=load_speech("caller_hello"), after_start=hang_up_soon)
    call, record, conv = out.call, out.record, out.conv
    assert record.end_reason == "caller_hung_up"
    assert conv.closed_by == "client" and conv.close_code == 1000
    assert conv.ended_at is not None and conv.ended_at - hung_up_at[0] < 1.0
    assert hangup_requests(twilio, call.sid) == []
    assert call.end_cause == "caller_hangup"
    # Caller audio reached the agent while the call was up.
    assert len(conv.user_audio) > 0


# -- agent failures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "detail_part"),
    [
        (Close(1002, "", error={"error_type": "llm_error", "message": "LLM failed"}), "1002"),
        (Close(1008, "", error={"error_type": "invalid_message", "message": "bad"}), "1008"),
        (Close(1011, ""), "1011"),
        (Drop(), "without a close frame"),
    ],
    ids=["1002", "1008", "1011", "tcp-drop"],
)
async def test_agent_failure_hangs_up_the_phone(twilio: TwilioEmulator, step: Any, detail_part: str) -> None:
    script = AgentScript(steps=[Say("Hello", seconds=0.3), Sleep(0.2), step], realtime_factor=FAST)
    out = await bridged(twilio, script)
    call, record = out.call, out.record
    assert record.end_reason == "agent_error"
    assert detail_part in (record.end_detail or "")
    assert len(hangup_requests(twilio, call.sid)) == 1
    assert call.status == "completed"


async def test_agent_failure_redirects_to_fallback_when_configured(twilio: TwilioEmulator) -> None:
    fallback = "<Response><Say>Sorry, our assistant is unavailable.</Say><Dial>+15550009999</Dial></Response>"
    script = AgentScript(steps=[Say("Hello", seconds=0.2), Close(1011, "")], realtime_factor=FAST)
    out = await bridged(twilio, script, options=CallOptions(fallback=Destination(instructions=fallback)))
    call, record = out.call, out.record
    assert record.end_reason == "agent_error"
    assert "fallback" in (record.end_detail or "")
    redirects = redirect_requests(twilio, call.sid)
    assert len(redirects) == 1 and redirects[0].form["Twiml"] == fallback
    assert hangup_requests(twilio, call.sid) == []
    assert call.redirect_twiml == fallback


async def test_agent_refusing_connection_is_unreachable(twilio: TwilioEmulator) -> None:
    out = await bridged(twilio, AgentScript(steps=[], reject_with_status=503))
    call, record = out.call, out.record
    assert record.end_reason == "agent_unreachable"
    assert "503" in (record.end_detail or "")
    assert len(hangup_requests(twilio, call.sid)) == 1


async def test_agent_with_nothing_listening_is_unreachable(twilio: TwilioEmulator) -> None:
    # Start and stop an emulator to get a loopback port that is closed now.
    async with AgentEmulator(AgentScript(steps=[])) as agent:
        base = agent.base_url
    out = await bridged(twilio, agent_base_url=base)
    call, record = out.call, out.record
    assert record.end_reason == "agent_unreachable"
    assert len(hangup_requests(twilio, call.sid)) == 1


async def test_no_metadata_within_timeout_is_unreachable(twilio: TwilioEmulator) -> None:
    out = await bridged(
        twilio, AgentScript(steps=[], send_metadata=False), options=CallOptions(agent_connect_timeout=0.5)
    )
    call, record, conv = out.call, out.record, out.conv
    assert record.end_reason == "agent_unreachable"
    assert "0.5" in (record.end_detail or "")
    assert conv.closed_by == "client"  # the bridge gave up and closed the half-open session
    assert len(hangup_requests(twilio, call.sid)) == 1


# -- timers ---------------------------------------------------------------------


async def test_max_duration_ends_both_legs(twilio: TwilioEmulator) -> None:
    script = AgentScript(steps=[Say("Let me tell you a long story.", seconds=5.0)], realtime_factor=1.0)
    out = await bridged(twilio, script, options=CallOptions(max_call_seconds=1.0))
    call, record, conv = out.call, out.record, out.conv
    assert record.end_reason == "max_duration"
    assert 0.9 < (record.duration_s or 0) < 3.0
    assert conv.closed_by == "client"
    assert len(hangup_requests(twilio, call.sid)) == 1
    assert call.status == "completed"


async def test_silence_timeout(twilio: TwilioEmulator) -> None:
    # The caller line carries only silence frames; the agent says one short line and waits.
    script = AgentScript(steps=[Say("Hello?", seconds=0.3)], realtime_factor=FAST)
    out = await bridged(twilio, script, options=CallOptions(silence_timeout=1.0))
    call, record = out.call, out.record
    assert record.end_reason == "silence_timeout"
    # Silence counts from the end of the agent's line (0.3 s), so not before ~1.3 s.
    assert (record.duration_s or 0) > 1.2
    assert len(hangup_requests(twilio, call.sid)) == 1


# -- barge-in -------------------------------------------------------------------


async def test_interruption_clears_and_drops_stale_audio(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[
            Say("A long answer that the caller will interrupt.", seconds=3.0),
            Sleep(0.5),
            Interrupt(stale_chunks=3),
            Sleep(0.3),
            EndCall("Okay, bye.", seconds=0.4, close_delay=0.05),
        ],
        realtime_factor=FAST,
    )
    out = await bridged(twilio, script)
    call, record = out.call, out.record
    stream = call.stream
    assert stream is not None
    assert len(stream.clears) == 1
    assert record.metrics["interruptions"] == 1
    assert record.metrics["stale_audio_dropped"] == 3
    # Between the clear and the goodbye nothing stale was sent: 3 s of speech were
    # queued, only about 0.5 s of it played, then the 0.4 s goodbye in full.
    assert 0.4 * 8000 <= len(stream.played_audio) < 1.5 * 8000
    assert stream.cleared_audio_bytes > 1.0 * 8000
    assert record.end_reason == "agent_ended"


# -- agent protocol features ----------------------------------------------------


async def test_ping_pong_and_client_tools(twilio: TwilioEmulator) -> None:
    async def check_slot(params: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"day": params["day"], "free": ["10:00", "11:30"]}

    def failing_tool(params: dict[str, Any]) -> str:
        raise RuntimeError("calendar offline")

    script = AgentScript(
        steps=[
            Say("Let me check.", seconds=0.2),
            ClientToolCall("check_slot", {"day": "monday"}),
            ClientToolCall("book", {"slot": "10:00"}),
            ClientToolCall("not_registered", {}),
            Sleep(0.6),
            EndCall("Done.", seconds=0.2, close_delay=0.05),
        ],
        realtime_factor=FAST,
        ping_interval=0.2,
    )
    out = await bridged(twilio, script, tools={"check_slot": check_slot, "book": failing_tool})
    record, conv = out.record, out.conv
    assert conv.pings_sent and conv.pongs
    assert set(conv.pongs) <= set(conv.pings_sent)
    assert len(conv.pongs) >= len(conv.pings_sent) - 1  # the last ping may race the close
    results = {r["tool_call_id"]: r for r in conv.tool_results}
    assert len(results) == 3
    ordered = [r for r in conv.tool_results]
    assert ordered[0]["is_error"] is False
    assert json.loads(ordered[0]["result"]) == {"day": "monday", "free": ["10:00", "11:30"]}
    assert ordered[1]["is_error"] is True and "calendar offline" in ordered[1]["result"]
    assert ordered[2]["is_error"] is True and "unknown tool" in ordered[2]["result"]
    assert record.metrics["tool_calls"] == 3
    assert record.end_reason == "agent_ended"


def dominant_hz(ulaw: bytes, rate: int = 8000) -> float:
    pcm = np.frombuffer(ulaw_to_pcm16(ulaw), dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[int(np.argmax(spectrum))])


@pytest.mark.parametrize("fmt", ["ulaw_8000", "pcm_16000", "pcm_24000", "pcm_44100"])
async def test_agent_audio_formats_keep_the_tone(twilio: TwilioEmulator, fmt: str) -> None:
    script = AgentScript(
        steps=[
            WaitForUser(0.5),
            Say("tone", seconds=1.0, tone_hz=440),
            EndCall("", seconds=0.0, close_delay=0.05),
        ],
        output_format=fmt,
        input_format=fmt,
        realtime_factor=FAST,
    )
    out = await bridged(twilio, script, audio=load_speech("caller_hello"))
    call, record, conv = out.call, out.record, out.conv
    assert call.stream is not None
    played = bytes(call.stream.played_audio)
    # One second, all of it: the resampler's tail is flushed when the agent ends.
    assert abs(len(played) - 8000) <= 16
    assert abs(dominant_hz(played) - 440) < 3
    # Caller audio reached the agent in the agent's input format.
    rate = int(fmt.split("_")[1])
    bytes_per_s = rate if fmt.startswith("ulaw") else rate * 2
    assert len(conv.user_audio) > 0.3 * bytes_per_s
    if fmt == "ulaw_8000":
        # Passthrough: the caller's bytes arrive untouched (frames sent before the agent
        # was connected are not forwarded, so the agent hears a contiguous slice).
        line = load_speech("caller_hello") + b"\xff" * 80000
        heard = bytes(conv.user_audio[:4000])
        assert len(heard) == 4000 and heard in line
    assert record.end_reason == "agent_ended"


# -- robustness -----------------------------------------------------------------


async def test_two_calls_at_once_do_not_interfere(twilio: TwilioEmulator) -> None:
    def script_for(agent_id: str, n: int) -> AgentScript:
        if n == 0:
            return AgentScript(
                steps=[Say("First caller", seconds=0.6, tone_hz=440), EndCall("Bye one", seconds=0.3)],
                realtime_factor=FAST,
            )
        return AgentScript(
            steps=[Say("Second caller", seconds=1.5, tone_hz=880), Sleep(1.0), Close(1011, "")],
            realtime_factor=FAST,
        )

    async with AgentEmulator(script_factory=script_for) as agent:
        h = make_bridge(twilio, agent.base_url)
        try:
            async with h.bridge.serve_websockets() as url:
                first = await twilio.start_stream_call(
                    url, from_="+15550000001", to="+15550002222", custom_parameters={"from": "+15550000001"}
                )
                await agent.wait_for_conversations(1, timeout=5)
                second = await twilio.start_stream_call(
                    url, from_="+15550000002", to="+15550002222", custom_parameters={"from": "+15550000002"}
                )
                await h.wait_records(2, 15)
                await first.wait_ended(5)
                await second.wait_ended(5)
        finally:
            await h.control.aclose()
    by_sid = {r.call_sid: r for r in h.records}
    assert by_sid[first.sid].end_reason == "agent_ended"
    assert by_sid[second.sid].end_reason == "agent_error"
    assert by_sid[first.sid].from_number == "+15550000001"
    assert by_sid[second.sid].from_number == "+15550000002"
    assert first.stream is not None and second.stream is not None
    assert abs(dominant_hz(bytes(first.stream.played_audio)[:4000]) - 440) < 5
    assert abs(dominant_hz(bytes(second.stream.played_audio)[:4000]) - 880) < 5
    assert by_sid[first.sid].conversation_id != by_sid[second.sid].conversation_id
    assert len(hangup_requests(twilio, first.sid)) == 1 and len(hangup_requests(twilio, second.sid)) == 1


async def test_raising_hooks_do_not_break_teardown(
    twilio: TwilioEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_start(call: Call) -> None:
        raise RuntimeError("start hook bug")

    async def bad_end(record: CallRecord) -> None:
        raise ValueError("end hook bug")

    async def slow_end_call(call: Call) -> None:
        await asyncio.sleep(30)

    hooks = CallHooks(on_call_start=[bad_start], on_call_end=[bad_end], on_agent_end_call=[slow_end_call])
    script = AgentScript(
        steps=[Say("Hi", seconds=0.2), EndCall("Bye", seconds=0.2, close_delay=0.05)], realtime_factor=FAST
    )
    out = await bridged(twilio, script, hooks=hooks, options=CallOptions(hook_timeout=0.3))
    call, record = out.call, out.record
    assert record.end_reason == "agent_ended"
    # on_call_start and on_agent_end_call failed before the record was final; on_call_end
    # runs after it is saved, so its failure is only logged.
    assert record.metrics["hook_errors"] == 2
    assert "end hook bug" in caplog.text
    assert len(hangup_requests(twilio, call.sid)) == 1
    assert call.status == "completed"


async def test_rest_500_is_retried_and_404_is_taken_as_ended(twilio: TwilioEmulator) -> None:
    script = AgentScript(steps=[Say("Hi", seconds=0.2), Close(1011, "")], realtime_factor=FAST)
    twilio.inject_fault("update", status=500)
    twilio.inject_fault("update", status=503)
    out = await bridged(twilio, script)
    call, record = out.call, out.record
    assert len(hangup_requests(twilio, call.sid)) == 3  # 500, 503, then success
    assert call.status == "completed"
    assert any(e["event"] == "phone.hangup" and e["outcome"] == "completed" for e in record.timeline)

    twilio.inject_fault("update", status=404, code=20404)
    out2 = await bridged(twilio, script)
    call2, record2 = out2.call, out2.record
    assert len(hangup_requests(twilio, call2.sid)) == 1  # not retried
    assert any(e["event"] == "phone.hangup" and e["outcome"] == "already_ended" for e in record2.timeline)


async def test_stalled_agent_is_ended_by_max_duration_not_left_open(twilio: TwilioEmulator) -> None:
    script = AgentScript(steps=[Say("Hi", seconds=0.2), Stall()], realtime_factor=FAST)
    out = await bridged(twilio, script, options=CallOptions(max_call_seconds=1.0))
    call, record, conv = out.call, out.record, out.conv
    assert record.end_reason == "max_duration"
    assert call.status == "completed"
    assert conv.closed_by == "client"
