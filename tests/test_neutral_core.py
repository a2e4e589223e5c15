"""The core is carrier- and agent-neutral: a second phone leg and a second agent backend,
written here in a few dozen lines each with no vendor, run the lifecycle through the
same `Bridge` without any change to it. Also: the end policy is data that agrees with
ARCHITECTURE.md, and the states move only along their transitions."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callbridge.agents.base import (
    AgentAudio,
    AgentCallContext,
    AgentClosed,
    AgentEvent,
    AgentReady,
    AgentTranscript,
)
from callbridge.bridge import Bridge
from callbridge.call import Call, CallHooks, CallOptions, CallRecord
from callbridge.formats import ULAW_8000
from callbridge.lifecycle import END_POLICY, EndReason, IllegalTransition, PhoneLeg, render_policy_table
from callbridge.telephony.base import (
    CallerAudio,
    CallerHungUp,
    Destination,
    HangupOutcome,
    MarkPlayed,
    PlacedCall,
    StreamInfo,
    TelephonyClosed,
    TelephonyEvent,
)

SILENCE = b"\xff" * 160  # 20 ms of mu-law silence


class QueueLeg:
    """A phone leg on in-memory queues: it 'plays' each chunk in `play_s` seconds."""

    def __init__(self, call_sid: str, play_s: float = 0.05) -> None:
        self.call_sid, self.play_s = call_sid, play_s
        self.inbox: asyncio.Queue[TelephonyEvent] = asyncio.Queue()
        self.log: list[str] = []  # what crossed the leg, in order
        self._marks = 0
        self._open = True
        self._loop = asyncio.get_running_loop()

    async def start(self) -> StreamInfo:
        return StreamInfo("ST1", self.call_sid, from_number="+15550001000", direction="inbound")

    async def events(self) -> AsyncIterator[TelephonyEvent]:
        while True:
            event = await self.inbox.get()
            yield event
            if isinstance(event, TelephonyClosed):
                return

    async def send_audio(self, ulaw: bytes, b64: str | None = None) -> None:
        self._marks += 1
        self.log.append(f"audio {len(ulaw)}")
        self._loop.call_later(self.play_s, self._played)

    def _played(self) -> None:
        self._marks -= 1
        self.log.append("played")
        self.inbox.put_nowait(MarkPlayed("m", known=True))

    async def clear(self) -> None:
        self.log.append("clear")

    async def close(self) -> None:
        if self._open:
            self._open = False
            self.log.append("closed")
            self.inbox.put_nowait(TelephonyClosed(1000, by_bridge=True))

    @property
    def pending_marks(self) -> int:
        return self._marks

    @property
    def is_open(self) -> bool:
        return self._open


class ScriptedAgent:
    """An agent backend that says its lines (one chunk each) and then closes or fails."""

    def __init__(self, lines: list[str], then: str = "close", wait_s: float = 0.0) -> None:
        self.lines, self.then, self.wait_s = lines, then, wait_s
        self.context: AgentCallContext | None = None
        self.heard = 0
        self.closed = False
        self._closing = asyncio.Event()
        self.last_received = 0.0

    async def connect(self, context: AgentCallContext) -> AgentReady:
        self.context = context
        return AgentReady("conv-1", ULAW_8000, ULAW_8000)

    async def events(self) -> AsyncIterator[AgentEvent]:
        for line in self.lines:
            yield AgentTranscript("agent", line)
            yield AgentAudio(SILENCE, base64.b64encode(SILENCE).decode())
        await asyncio.sleep(self.wait_s)
        if self.then == "stay":  # until the bridge closes the session
            await self._closing.wait()
            yield AgentClosed(by_agent=False, code=1000, detail="closed by the bridge")
            return
        ok = self.then == "close"
        yield AgentClosed(by_agent=ok, code=1000 if ok else 1011, detail="")

    async def send_audio(self, payload: bytes, b64: str | None = None) -> None:
        self.heard += 1

    async def send_tool_result(self, call_id: str, result: str, is_error: bool) -> None:
        pass

    async def send_user_message(self, text: str) -> None:
        pass

    async def send_contextual_update(self, text: str) -> None:
        pass

    async def close(self, code: int = 1000) -> None:
        self.closed = True
        self._closing.set()

    @property
    def is_open(self) -> bool:
        return not self.closed

    def stats(self) -> dict[str, int]:
        return {"lines_said": len(self.lines)}


class RecordingControl:
    def __init__(self, leg: QueueLeg) -> None:
        self.leg, self.requests = leg, []

    async def hangup(self, call_sid: str) -> HangupOutcome:
        self.requests.append(("hangup", call_sid))
        self.leg.log.append("hangup")
        return HangupOutcome.COMPLETED

    async def redirect(self, call_sid: str, destination: Destination) -> None:
        self.requests.append(("redirect", destination.to))
        self.leg.log.append("redirect")

    async def fetch_status(self, call_sid: str) -> str | None:
        return "in-progress"

    async def place_call(self, *args: Any, **kwargs: Any) -> PlacedCall:
        raise AssertionError("not used")


class AnnouncedControl(RecordingControl):
    """A control that takes the core's warning of a request to come (`ExpectsRequests`)."""

    def expect_request(self, call_sid: str) -> None:
        self.requests.append(("expect", call_sid))
        self.leg.log.append("expect")


async def run_call(
    agent: ScriptedAgent,
    options: CallOptions | None = None,
    hooks: CallHooks | None = None,
    control_class: type[RecordingControl] = RecordingControl,
) -> tuple[CallRecord, QueueLeg, RecordingControl]:
    leg = QueueLeg("CALL-1")
    control = control_class(leg)
    bridge = Bridge(lambda ctx: agent, control, options or CallOptions(), hooks, leg_factory=lambda sock: leg)
    record = await asyncio.wait_for(bridge.handle_media_stream(leg), 10)  # type: ignore[arg-type]
    return record, leg, control


async def test_agent_goodbye_is_heard_then_the_other_carrier_hangs_up() -> None:
    agent = ScriptedAgent(["Hello.", "Goodbye."])
    record, leg, control = await run_call(agent)
    assert record.end_reason == "agent_ended"
    assert [t["text"] for t in record.transcript] == ["Hello.", "Goodbye."]
    # Both chunks were played before the hang-up, which came before the stream closed.
    assert leg.log.index("hangup") > max(i for i, e in enumerate(leg.log) if e == "played")
    assert leg.log[-1] == "closed" and control.requests == [("hangup", "CALL-1")]
    assert agent.closed and agent.context is not None and agent.context.from_number == "+15550001000"
    assert record.metrics["lines_said"] == 2  # the backend's own stats, through the interface


async def test_a_control_that_can_prepare_is_told_of_the_hang_up_while_the_goodbye_plays() -> None:
    agent = ScriptedAgent(["Hello.", "Goodbye."])
    record, leg, control = await run_call(agent, control_class=AnnouncedControl)
    assert record.end_reason == "agent_ended"
    assert control.requests == [("expect", "CALL-1"), ("hangup", "CALL-1")]
    # Told before the goodbye's last chunk had played; the hang-up after it.
    last_played = max(i for i, e in enumerate(leg.log) if e == "played")
    assert leg.log.index("expect") < last_played < leg.log.index("hangup")


async def test_a_call_the_caller_ends_announces_no_request() -> None:
    agent = ScriptedAgent(["Hello."], then="stay")

    async def hang_up_soon(call: Call) -> None:
        assert isinstance(call.telephony, QueueLeg)
        call.telephony.inbox.put_nowait(CallerHungUp("stop"))

    record, _leg, control = await run_call(
        agent, hooks=CallHooks(on_call_start=[hang_up_soon]), control_class=AnnouncedControl
    )
    assert record.end_reason == "caller_hung_up"
    assert control.requests == []


async def test_caller_hangs_up_on_the_other_carrier() -> None:
    agent = ScriptedAgent(["Hello."], then="stay")

    async def hang_up_soon(call: Call) -> None:
        assert isinstance(call.telephony, QueueLeg)
        call.telephony.inbox.put_nowait(CallerAudio(SILENCE, base64.b64encode(SILENCE).decode()))
        call.telephony.inbox.put_nowait(CallerHungUp("stop"))

    record, _leg, control = await run_call(agent, hooks=CallHooks(on_call_start=[hang_up_soon]))
    assert record.end_reason == "caller_hung_up"
    assert control.requests == [] and agent.closed


async def test_agent_failure_hands_the_caller_to_the_fallback_person() -> None:
    agent = ScriptedAgent(["Hello."], then="fail")
    options = CallOptions(fallback=Destination(to="+15550009999"))
    record, _leg, control = await run_call(agent, options=options)
    assert record.end_reason == "agent_error" and "redirected to fallback" in (record.end_detail or "")
    assert control.requests == [("redirect", "+15550009999")]


async def test_transfer_to_a_person_leaves_the_phone_leg_alone() -> None:
    agent = ScriptedAgent(["Let me put you through."], then="stay")

    async def transfer(call: Call) -> None:
        await call.transfer("sip:desk@pbx.example.com")
        assert call.phone is PhoneLeg.TRANSFERRED

    record, _leg, control = await run_call(agent, hooks=CallHooks(on_call_start=[transfer]))
    assert record.end_reason == "transferred" and "sip:desk@pbx.example.com" in (record.end_detail or "")
    assert control.requests == [("redirect", "sip:desk@pbx.example.com")]


async def test_an_illegal_transition_raises() -> None:
    leg = QueueLeg("CALL-2")
    call = Call(leg, lambda ctx: ScriptedAgent([]), None)
    with pytest.raises(IllegalTransition):
        call._set_state(call.state.ENDED)


def test_every_end_reason_has_a_policy_and_architecture_shows_it() -> None:
    assert set(END_POLICY) == set(EndReason)
    text = (Path(__file__).parent.parent / "ARCHITECTURE.md").read_text()
    # To regenerate: python -c 'from callbridge.lifecycle import *; print(render_policy_table())'
    assert render_policy_table() in text
