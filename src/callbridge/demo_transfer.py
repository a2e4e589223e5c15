"""`callbridge demo --transfer`: keypad input and a handover to a person, offline.

The emulated caller dials the clinic; the emulated agent asks for a patient number;
the caller keys it in (`4 2 7 #`), and the bridge sends it to the agent as one
`user_message`; the agent says it is putting the caller through and calls its
`transfer_call` client tool. The bridge checks the destination against the
allow-list, lets the handoff sentence play to its last mark, then redirects the
call through the (emulated) Twilio REST API to `<Dial>` the billing desk, closes the
agent session and records the call `transferred`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from callbridge.demo import DemoFailed, _Printer, demo_server
from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    ClientToolCall,
    Say,
    Sleep,
    WaitForUserMessage,
)
from callbridge.transfer import parse_allow_list

__all__ = ["run_transfer_demo"]

DESK = "+15550100009"
DIGITS = "427#"
GREETING = "Hello, this is Bright Smile Dental. Please key in your patient number, then the pound key."
HANDOFF = "Thank you. I am putting you through to our billing desk now, please hold."
GREETING_S, HANDOFF_S = 3.0, 3.0


def transfer_script() -> AgentScript:
    return AgentScript(
        steps=[
            Say(GREETING, seconds=GREETING_S, tone_hz=523.0),
            WaitForUserMessage(contains="pressed", timeout=30),
            Say(HANDOFF, seconds=HANDOFF_S, tone_hz=392.0),
            ClientToolCall("transfer_call", {"to": DESK, "reason": "billing question"}, timeout=30),
            # Whatever the agent would say next is never played: the caller is on the move.
            Say("Is there anything else?", seconds=1.0, tone_hz=440.0),
            Sleep(30),
        ],
        output_format="ulaw_8000",
        input_format="ulaw_8000",
        # Like a real voice service, the agent streams speech faster than it is played:
        # part of the handoff sentence is still queued at Twilio when the tool call comes.
        realtime_factor=2.0,
        ping_interval=2.0,
    )


async def run_transfer_demo(verbose: bool = False) -> int:
    out = _Printer()
    print("callbridge demo --transfer: keypad input and a handover to a person, on the emulators\n")
    options = {"dial_seconds": 2.0}
    allow = parse_allow_list("+1555010*")
    try:
        async with demo_server(
            out, transfer_script(), twilio_options=options, transfer_allow=allow, dtmf_gap_seconds=3.0
        ) as run:
            twilio, agent = run.twilio, run.agent
            print(f"  callbridge server          {run.public}  (transfers allowed to +1555010*)\n")
            call, stream = await run.place_call()
            greeting_bytes = int(GREETING_S * 8000)

            def greeting_played() -> bool:
                return len(stream.played_audio) >= greeting_bytes and stream.buffered_audio_bytes == 0

            await stream.wait_until(greeting_played, timeout=30)
            out.line(f"caller keys in {' '.join(DIGITS)}")
            for i, key in enumerate(DIGITS):
                if i:
                    await asyncio.sleep(0.3)  # a person's pace on the keypad
                await stream.send_dtmf(key)
            conv = await _first_conversation(agent)
            await _wait(lambda: bool(conv.user_messages()), 10)
            out.line(f"agent received user_message: {conv.user_messages()[0]!r}")
            await _wait(lambda: bool(conv.tool_calls), 20)
            out.line(f"agent calls transfer_call {conv.tool_calls[0]['parameters']}")
            async with asyncio.timeout(60):
                await run.ended.wait()
            redirect_at = _redirect_time(twilio, call.sid)
            if redirect_at is not None:
                dial = call.dials[0] if call.dials else None
                shown = f"{dial.target} (callerId {dial.caller_id})" if dial else "nothing"
                out.line(f"Twilio REST redirect: <Dial> {shown}")
            await call.wait_ended(15)
            out.line(f"Twilio call status: {call.status} ({call.end_cause}, then {call.end_detail})")
    except DemoFailed as exc:
        print(f"callbridge demo: {exc}", file=sys.stderr)
        return 1
    saved = run.saved
    if saved is None:
        print("\ncallbridge demo: FAILED: no call record was saved", file=sys.stderr)
        return 1
    return _report(saved, stream, call, conv, redirect_at)


async def _first_conversation(agent: AgentEmulator) -> Any:
    await _wait(lambda: bool(agent.conversations), 10)
    return agent.conversations[0]


async def _wait(predicate: Any, timeout: float) -> None:
    # The emulators' records have no event to wait on: poll them, as the tests do.
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _redirect_time(twilio: Any, call_sid: str) -> float | None:
    for r in twilio.requests:
        if r.path.endswith(f"/Calls/{call_sid}.json") and "Twiml" in r.form:
            return float(r.time)
    return None


def _report(saved: dict[str, Any], stream: Any, call: Any, conv: Any, redirect_at: float | None) -> int:
    played = len(stream.played_audio)
    full = int((GREETING_S + HANDOFF_S) * 8000)
    last_mark = stream.last_mark_played_at
    cleared = any(c for _, _, c in stream.marks_echoed)
    heard_in_full = played >= full and not cleared and last_mark is not None
    before_redirect = heard_in_full and redirect_at is not None and redirect_at >= last_mark
    keys = [e["digits"] for e in saved["timeline"] if e["event"] == "dtmf.to_agent"]
    dial = call.dials[0] if call.dials else None
    m = saved["metrics"]
    print("\nCall record (as saved in the database):")
    print(f"  call            {saved['call_sid']}  {saved['from']} -> {saved['to']} ({saved['direction']})")
    print(f"  keypad          {keys} sent to the agent as {conv.user_messages()}")
    print(f"  end reason      {saved['end_reason']}  ({saved['end_detail']})")
    print(
        f"  handoff         {'heard in full' if heard_in_full else 'CUT OFF'} "
        f"({played / 8000:.1f} s of agent audio played, no mark cleared: {not cleared})"
    )
    print(
        f"  redirect        {'after' if before_redirect else 'BEFORE'} the last mark; "
        f"the bridge waited {m.get('transfer_wait_ms')} ms for it"
    )
    noun = "Sip" if dial is not None and dial.kind == "sip" else "Number"
    target, caller_id = (dial.target, dial.caller_id) if dial is not None else (None, None)
    print(f"  dialled         {target} via <{noun}>, callerId {caller_id}")
    steps = [e["event"] for e in saved["timeline"] if e["event"].startswith("transfer.")]
    print(f"  timeline        {', '.join(steps)}")
    ok = (
        saved["end_reason"] == "transferred"
        and DESK in (saved["end_detail"] or "")
        and keys == [DIGITS]
        and conv.user_messages() == [f"The caller pressed {' '.join(DIGITS)}"]
        and before_redirect
        and dial is not None
        and dial.target == DESK
        and dial.status == "completed"
    )
    print("\ndemo " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1
