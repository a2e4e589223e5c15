"""Keypad input to the agent, and transfers to a person (issue 14, parts 1 and 2), end to end on
the emulators: what the agent received, what Twilio was told and when, what was recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from callbridge.call import CallOptions, CallRecord
from callbridge.config import ConfigError, Settings
from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    ClientToolCall,
    Close,
    EmulatedConversation,
    EndCall,
    Say,
    Sleep,
    WaitForUserMessage,
)
from callbridge.emulators.twilio import EmulatedCall, TwilioEmulator
from callbridge.transfer import TransferRefused, check_destination, parse_allow_list
from tests.serverkit import make_bridge, running_server, settings_for, wait_until

FAST = float("inf")
CALLER, OURS = "+15550001111", "+15550002222"
DESK = "+15550003333"


@dataclass
class Outcome:
    call: EmulatedCall
    record: CallRecord
    conv: EmulatedConversation


async def one_call(
    twilio: TwilioEmulator,
    script: AgentScript,
    options: CallOptions,
    during: Callable[[EmulatedCall, AgentEmulator], Awaitable[None]] | None = None,
    timeout: float = 20.0,
) -> Outcome:
    async with contextlib.AsyncExitStack() as stack:
        agent = await stack.enter_async_context(AgentEmulator(script))
        h = make_bridge(twilio, agent.base_url, options=options)
        stack.push_async_callback(h.control.aclose)
        async with h.bridge.serve_websockets() as url:
            call = await twilio.start_stream_call(
                url, from_=CALLER, to=OURS, custom_parameters={"from": CALLER, "to": OURS}
            )
            if during is not None:
                await during(call, agent)
            await h.wait_records(1, timeout)
            await call.wait_ended(5)
        conv = agent.conversations[0]
        await asyncio.wait_for(conv.closed.wait(), 2)
    return Outcome(call, h.records[-1], conv)


async def agent_speaking(call: EmulatedCall) -> None:
    """Until the bridge is active: the agent's first audio has reached the caller."""
    stream = await call.wait_stream(5)
    await wait_until(lambda: stream.media_messages_received > 0, 5, "the agent's greeting reached Twilio")


def events(record: CallRecord, name: str) -> list[dict[str, Any]]:
    return [e for e in record.timeline if e["event"] == name]


def redirects(twilio: TwilioEmulator, call_sid: str) -> list[Any]:
    return [r for r in twilio.requests if r.path.endswith(f"/Calls/{call_sid}.json") and "Twiml" in r.form]


# -- keypad input -----------------------------------------------------------------------------


async def press(call: EmulatedCall, keys: str) -> None:
    assert call.stream is not None
    for key in keys:
        await call.stream.send_dtmf(key)


async def test_digits_ended_by_hash_reach_the_agent_as_one_user_message(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[
            Say("Please enter your account number, then the pound key.", seconds=0.3),
            WaitForUserMessage(timeout=10),
            EndCall("Thank you, goodbye.", seconds=0.2, close_delay=0.05),
        ],
        realtime_factor=FAST,
    )

    async def keys(call: EmulatedCall, agent: AgentEmulator) -> None:
        await agent_speaking(call)
        await press(call, "1234#")

    out = await one_call(twilio, script, CallOptions(dtmf_gap=5.0), keys)
    # One message, at once on `#` (the 5 s gap never ran out), the digits in order.
    assert out.conv.user_messages() == ["The caller pressed 1 2 3 4 #"]
    assert out.record.end_reason == "agent_ended"
    sent = events(out.record, "dtmf.to_agent")
    assert sent == [
        {"t": sent[0]["t"], "event": "dtmf.to_agent", "digits": "1234#", "ended_by": "#", "sent": True}
    ]
    assert [e["digit"] for e in events(out.record, "caller.dtmf")] == list("1234#")
    assert out.record.metrics["dtmf_messages"] == 1 and out.record.metrics["dtmf_dropped"] == 0
    assert not out.conv.invalid  # every frame the bridge sent follows the agent's schema


async def test_digits_without_hash_go_after_the_gap_in_separate_entries(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[
            Say("Menu.", seconds=0.2),
            WaitForUserMessage(contains="2", timeout=10),
            WaitForUserMessage(contains="7", timeout=10),
            EndCall("Bye.", seconds=0.1, close_delay=0.05),
        ],
        realtime_factor=FAST,
    )

    async def keys(call: EmulatedCall, agent: AgentEmulator) -> None:
        await agent_speaking(call)
        await press(call, "2")
        conv = agent.conversations[0]
        await wait_until(lambda: len(conv.user_messages()) == 1, 5, "the first entry after its gap")
        await press(call, "7*")

    out = await one_call(twilio, script, CallOptions(dtmf_gap=0.3, dtmf_message="Keys: {digits}."), keys)
    assert out.conv.user_messages() == ["Keys: 2.", "Keys: 7 *."]
    assert [e["ended_by"] for e in events(out.record, "dtmf.to_agent")] == ["gap", "gap"]


async def test_digits_keyed_in_while_the_agent_connects_reach_it_once_ready(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[WaitForUserMessage(timeout=10), EndCall("Thanks, bye.", seconds=0.1, close_delay=0.05)],
        realtime_factor=FAST,
        metadata_delay=1.0,  # the agent takes a second to answer the connection
    )

    async def keys(call: EmulatedCall, agent: AgentEmulator) -> None:
        await call.wait_stream(5)
        await press(call, "55#")

    out = await one_call(twilio, script, CallOptions(), keys)
    assert out.conv.user_messages() == ["The caller pressed 5 5 #"]
    [entry] = events(out.record, "dtmf.to_agent")
    connected = events(out.record, "agent.connected")[0]
    assert entry["sent"] is True and entry["t"] >= connected["t"]
    assert events(out.record, "caller.dtmf")[0]["t"] < connected["t"]  # pressed before it was ready
    assert out.record.end_reason == "agent_ended"


async def test_keypad_to_agent_off_keeps_the_digits_in_the_record_only(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[Say("Hi.", seconds=0.2), Sleep(1.0), EndCall("Bye.", seconds=0.1, close_delay=0.05)],
        realtime_factor=FAST,
    )

    async def keys(call: EmulatedCall, agent: AgentEmulator) -> None:
        await agent_speaking(call)
        await press(call, "9#")

    out = await one_call(twilio, script, CallOptions(dtmf_to_agent=False, dtmf_gap=0.2), keys)
    assert out.conv.user_messages() == []
    assert [e["digit"] for e in events(out.record, "caller.dtmf")] == ["9", "#"]
    assert events(out.record, "dtmf.to_agent") == []


async def test_a_digit_flood_is_bounded_and_the_call_goes_on(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[Say("Hi.", seconds=0.2), Sleep(1.5), EndCall("Bye.", seconds=0.2, close_delay=0.05)],
        realtime_factor=FAST,
    )
    flood = "12#" * 700  # 2100 presses as fast as the socket takes them

    async def keys(call: EmulatedCall, agent: AgentEmulator) -> None:
        await agent_speaking(call)
        await press(call, flood)

    out = await one_call(twilio, script, CallOptions(dtmf_gap=0.2), keys)
    m = out.record.metrics
    # The token bucket lets a burst of 32 through (plus the refill at 10 a second while
    # the flood lasts); the rest is counted, not queued, not sent, not recorded per key.
    assert m["dtmf_digits"] + m["dtmf_dropped"] == len(flood)
    assert 32 <= m["dtmf_digits"] < 100 and m["dtmf_dropped"] > 2000
    messages = out.conv.user_messages()
    assert 10 <= len(messages) == m["dtmf_messages"] < 40
    # The burst went through whole; later entries hold whichever keys the bucket let through.
    assert messages[:10] == ["The caller pressed 1 2 #"] * 10
    sent = "".join(m.removeprefix("The caller pressed ").replace(" ", "") for m in messages)
    assert set(sent) <= set("12#") and len(sent) <= m["dtmf_digits"]
    assert len(events(out.record, "caller.dtmf")) == m["dtmf_digits"]
    assert out.record.end_reason == "agent_ended"  # the call itself went on to its normal end


# -- transfers decided by the agent -------------------------------------------------------------

HANDOFF_SECONDS = 1.0


def transfer_script(to: str, after: list[Any] | None = None) -> AgentScript:
    return AgentScript(
        steps=[
            Say("Let me put you through to a colleague.", seconds=HANDOFF_SECONDS),
            ClientToolCall("transfer_call", {"to": to, "reason": "billing question"}, timeout=10),
            *(after or [Say("This should never be heard.", seconds=0.5), Sleep(5)]),
        ],
        realtime_factor=FAST,  # all of the handoff audio is sent at once: Twilio plays it out
    )


async def test_agent_transfer_plays_the_handoff_then_redirects_to_dial(twilio: TwilioEmulator) -> None:
    options = CallOptions(transfer_allow=parse_allow_list(f"{DESK}, +1444*"))
    out = await one_call(twilio, transfer_script(DESK), options)
    call, record, conv = out.call, out.record, out.conv
    stream = call.streams[0]

    assert conv.tool_results and conv.tool_results[0]["is_error"] is False
    assert json.loads(conv.tool_results[0]["result"]) == {"transferring_to": DESK}
    # The handoff sentence was heard in full: every mark echoed as played (none cleared), all
    # of its audio played, and only then the REST redirect.
    [redirect] = redirects(twilio, call.sid)
    handoff_bytes = int(HANDOFF_SECONDS * 8000)
    assert len(stream.played_audio) >= handoff_bytes
    assert stream.marks_echoed and not any(cleared for _, _, cleared in stream.marks_echoed)
    assert stream.last_mark_played_at is not None and redirect.time >= stream.last_mark_played_at
    assert redirect.time - stream.connected_at >= HANDOFF_SECONDS * 0.9  # type: ignore[operator]
    # Twilio dialled the person, showing the caller's own number.
    assert f'<Dial callerId="{CALLER}"><Number>{DESK}</Number></Dial>' in redirect.form["Twiml"]
    assert [(d.kind, d.target, d.caller_id, d.status) for d in call.dials] == [
        ("number", DESK, CALLER, "completed")
    ]
    assert call.end_cause == "rest_redirect"
    # The agent session was closed by the bridge; the record says where the call went.
    assert conv.closed_by == "client" and conv.close_code == 1000
    assert record.end_reason == "transferred"
    assert record.end_detail == f"transferred to {DESK} (billing question)"
    steps = [e["event"] for e in record.timeline if e["event"].startswith("transfer.")]
    assert steps == ["transfer.started", "transfer.redirecting", "transfer.redirected"]
    assert events(record, "transfer.started")[0]["by"] == "agent"
    assert record.metrics["transfer_wait_ms"] >= HANDOFF_SECONDS * 1000 * 0.5
    # What the agent said after its tool call was never played (the caller was on the move).
    assert len(stream.played_audio) < handoff_bytes + 0.5 * 8000 * 0.5


async def test_transfer_to_a_sip_domain_dials_sip(twilio: TwilioEmulator) -> None:
    options = CallOptions(transfer_allow=parse_allow_list("pbx.example.com"), transfer_caller_id="support")
    out = await one_call(twilio, transfer_script("sip:desk@PBX.example.com"), options)
    assert out.record.end_reason == "transferred"
    [redirect] = redirects(twilio, out.call.sid)
    assert '<Dial callerId="support"><Sip>sip:desk@PBX.example.com</Sip></Dial>' in redirect.form["Twiml"]
    assert [(d.kind, d.status) for d in out.call.dials] == [("sip", "completed")]


@pytest.mark.parametrize(
    ("allow", "to", "why"),
    [
        (DESK, "+19005550000", "+19005550000 is not an allowed transfer destination"),
        ("", DESK, "transfers are off"),
        ("pbx.example.com", "sip:desk@evil.example.com", "is not an allowed transfer destination"),
        (DESK, "<Dial>+19005550000</Dial>", "is not an E.164 number"),
    ],
)
async def test_a_destination_not_allowed_is_refused_and_the_call_goes_on(
    twilio: TwilioEmulator, allow: str, to: str, why: str
) -> None:
    after = [Say("Sorry, I cannot transfer you.", seconds=0.2), EndCall("Goodbye.", seconds=0.2)]
    out = await one_call(
        twilio, transfer_script(to, after), CallOptions(transfer_allow=parse_allow_list(allow))
    )
    [result] = out.conv.tool_results
    assert result["is_error"] is True and why in result["result"]
    assert redirects(twilio, out.call.sid) == []
    assert out.record.end_reason == "agent_ended"  # the agent went on and ended the call itself
    assert why in events(out.record, "transfer.refused")[0]["why"]


async def test_a_second_transfer_while_one_is_under_way_is_refused(twilio: TwilioEmulator) -> None:
    script = transfer_script(DESK, after=[ClientToolCall("transfer_call", {"to": "+15550004444"}), Sleep(5)])
    options = CallOptions(transfer_allow=parse_allow_list("+1555000*"))
    out = await one_call(twilio, script, options)
    first, second = out.conv.tool_results
    assert first["is_error"] is False
    assert second["is_error"] is True and f"a transfer to {DESK} is already under way" in second["result"]
    assert out.record.end_reason == "transferred" and [d.target for d in out.call.dials] == [DESK]


async def test_a_failing_redirect_is_retried_then_the_call_ends_saying_why(twilio: TwilioEmulator) -> None:
    for _ in range(4):
        twilio.inject_fault("update", status=503, code=20503)
    options = CallOptions(transfer_allow=parse_allow_list(DESK))
    out = await one_call(twilio, transfer_script(DESK), options)
    assert len(redirects(twilio, out.call.sid)) == 4  # the retry policy's attempts, all refused
    assert out.record.end_reason == "telephony_error"
    assert out.record.end_detail is not None
    assert f"transfer to {DESK} failed" in out.record.end_detail and "HTTP 503" in out.record.end_detail
    assert events(out.record, "transfer.failed")
    # The caller is not left in silence: the call was hung up (Twilio answered that one).
    assert out.call.end_cause == "rest_completed"


async def test_caller_hanging_up_during_the_handoff_cancels_the_transfer(twilio: TwilioEmulator) -> None:
    script = AgentScript(
        steps=[
            Say("Let me put you through to a colleague, one moment please.", seconds=3.0),
            ClientToolCall("transfer_call", {"to": DESK}, timeout=10),
            Sleep(5),
        ],
        realtime_factor=FAST,
    )

    async def hang_up(call: EmulatedCall, agent: AgentEmulator) -> None:
        await wait_until(lambda: bool(agent.conversations and agent.conversations[0].tool_results), 5, "tool")
        await asyncio.sleep(0.3)
        await call.hangup()

    out = await one_call(twilio, script, CallOptions(transfer_allow=parse_allow_list(DESK)), hang_up)
    assert out.record.end_reason == "caller_hung_up"
    assert (out.record.end_detail or "").endswith(f"during the transfer to {DESK}")
    assert redirects(twilio, out.call.sid) == []
    assert out.call.dials == []
    assert events(out.record, "transfer.abandoned")[0]["why"] == "caller_hung_up"


async def test_caller_gone_while_the_redirect_is_sent_ends_caller_hung_up(twilio: TwilioEmulator) -> None:
    # The redirect reaches Twilio after the caller hung up: Twilio answers 21220 (not in
    # progress), which says the stop was the caller's, not the transfer's.
    twilio.inject_fault("update", delay=0.5)

    async def hang_up(call: EmulatedCall, agent: AgentEmulator) -> None:
        await wait_until(lambda: bool(redirects(twilio, call.sid)), 10, "the redirect request")
        await call.hangup()

    options = CallOptions(transfer_allow=parse_allow_list(DESK))
    out = await one_call(twilio, transfer_script(DESK), options, hang_up)
    assert out.record.end_reason == "caller_hung_up"
    assert out.record.end_detail == f"caller hung up during the transfer to {DESK}"
    assert out.call.dials == []


async def test_an_end_while_the_redirect_is_in_flight_never_hangs_up_a_transferred_call(
    twilio: TwilioEmulator,
) -> None:
    # Twilio takes 3 s to answer the redirect (and then does it); the call's maximum
    # duration runs out meanwhile. Teardown waits for the redirect's answer: the caller is
    # with the person, so nothing is hung up.
    twilio.inject_fault("update", delay=3.0)
    options = CallOptions(transfer_allow=parse_allow_list(DESK), max_call_seconds=2.5)
    out = await one_call(twilio, transfer_script(DESK), options)
    assert out.record.end_reason == "max_duration"
    assert events(out.record, "transfer.redirected")
    hangups = [r for r in twilio.requests if r.form.get("Status") == "completed"]
    assert hangups == []
    assert [d.target for d in out.call.dials] == [DESK]


async def test_agent_failure_hands_the_caller_to_the_fallback_number(twilio: TwilioEmulator) -> None:
    script = AgentScript(steps=[Say("Hello.", seconds=0.2), Close(1011, "boom")], realtime_factor=FAST)
    settings = Settings(
        twilio_account_sid=twilio.account_sid,
        twilio_auth_token=twilio.auth_token,
        elevenlabs_agent_id="agent_test",
        transfer_allow=parse_allow_list("+1555000*"),
        fallback_transfer_to=DESK,
    )
    out = await one_call(twilio, script, settings.call_options())
    assert out.record.end_reason == "agent_error"
    assert "redirected to fallback" in (out.record.end_detail or "")
    [redirect] = redirects(twilio, out.call.sid)
    assert f'<Dial callerId="{CALLER}"><Number>{DESK}</Number></Dial>' in redirect.form["Twiml"]


# -- POST /calls/{sid}/transfer -----------------------------------------------------------------


@pytest.mark.database
async def test_transfer_through_the_api(twilio: TwilioEmulator, db_url: str) -> None:
    script = AgentScript(steps=[Say("Hello, how can I help?", seconds=1.0), Sleep(20)], realtime_factor=FAST)
    async with AgentEmulator(script) as agent:
        settings = settings_for(twilio, agent, db_url, transfer_allow=parse_allow_list("+1555000*"))
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_=CALLER, to=OURS)
            await agent_speaking(call)
            path = f"/calls/{call.sid}/transfer"
            refusals = [
                (await srv.api.post(path, json={"to": "+19005550000"}), 403, "not an allowed"),
                (await srv.api.post(path, json={"to": "0800 CALL ME"}), 422, "not an E.164"),
                (await srv.api.post(path, json={"to": DESK, "extra": 1}), 422, "body must be"),
                (await srv.api.post(path, content=b"{"), 400, "JSON"),
                (await srv.api.post(f"/calls/CA{'0' * 32}/transfer", json={"to": DESK}), 404, "no such"),
            ]
            for resp, status, says in refusals:
                assert resp.status_code == status and says in resp.json()["error"], resp.text
            unauthenticated = await srv.api.post(path, json={"to": DESK}, headers={"Authorization": "x"})
            assert unauthenticated.status_code == 401
            assert redirects(twilio, call.sid) == []  # nothing refused reached Twilio

            done = await srv.api.post(path, json={"to": DESK, "reason": "asked for a person"})
            assert done.status_code == 200, done.text
            await call.wait_ended(5)
            again = await srv.api.post(path, json={"to": DESK})
    record = done.json()
    assert record["end_reason"] == "transferred"
    assert record["end_detail"] == f"transferred to {DESK} (asked for a person)"
    assert [e["by"] for e in record["timeline"] if e["event"] == "transfer.started"] == ["api"]
    [redirect] = redirects(twilio, call.sid)
    assert f"<Number>{DESK}</Number>" in redirect.form["Twiml"]
    # The greeting already sent was heard to its end before the redirect.
    stream = call.streams[0]
    assert stream.last_mark_played_at is not None and redirect.time >= stream.last_mark_played_at
    assert again.status_code == 409


@pytest.mark.database
async def test_api_transfer_whose_redirect_fails_answers_502(twilio: TwilioEmulator, db_url: str) -> None:
    script = AgentScript(steps=[Say("Hello.", seconds=0.3), Sleep(20)], realtime_factor=FAST)
    async with AgentEmulator(script) as agent:
        settings = settings_for(twilio, agent, db_url, transfer_allow=parse_allow_list(DESK))
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_=CALLER, to=OURS)
            await agent_speaking(call)
            for _ in range(4):
                twilio.inject_fault("update", status=500)
            resp = await srv.api.post(f"/calls/{call.sid}/transfer", json={"to": DESK})
            await srv.wait_records(1)
            record = await srv.call_record(call.sid)
    assert resp.status_code == 502 and "HTTP 500" in resp.json()["error"]
    assert record["end_reason"] == "telephony_error"
    assert f"transfer to {DESK} failed" in record["end_detail"]


# -- settings and the allow-list ----------------------------------------------------------------

BASE_ENV = {
    "TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
    "TWILIO_AUTH_TOKEN": "t",
    "ELEVENLABS_AGENT_ID": "agent_x",
}


def test_settings_read_the_keypad_and_transfer_variables() -> None:
    s = Settings.from_env(
        BASE_ENV
        | {
            "CALLBRIDGE_DTMF_TO_AGENT": "0",
            "CALLBRIDGE_DTMF_GAP_SECONDS": "1.5",
            "CALLBRIDGE_DTMF_MESSAGE": "Pressed: {digits}",
            "CALLBRIDGE_TRANSFER_ALLOW": "+15550001111, +1444*, sip:pbx.example.com",
            "CALLBRIDGE_FALLBACK_TRANSFER_TO": "+14445556666",
        }
    )
    options = s.call_options()
    assert options.dtmf_to_agent is False and options.dtmf_gap == 1.5
    assert options.dtmf_message == "Pressed: {digits}"
    assert options.transfer_allow.allows("+14440000000") and options.transfer_allow.allows(
        "sip:a@pbx.example.com"
    )
    assert options.fallback is not None and options.fallback.to == "+14445556666"
    defaults = Settings.from_env(BASE_ENV).call_options()
    assert defaults.dtmf_to_agent is True and defaults.dtmf_gap == 2.0 and defaults.transfer_allow.empty


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CALLBRIDGE_DTMF_TO_AGENT": "maybe"}, "CALLBRIDGE_DTMF_TO_AGENT must be 1 or 0"),
        ({"CALLBRIDGE_DTMF_MESSAGE": "Pressed"}, "must contain {digits}"),
        ({"CALLBRIDGE_TRANSFER_ALLOW": "+1555, bad domain"}, "CALLBRIDGE_TRANSFER_ALLOW: '+1555' is not"),
        ({"CALLBRIDGE_FALLBACK_TRANSFER_TO": "+15550001111"}, "transfers are off"),
        (
            {"CALLBRIDGE_FALLBACK_TRANSFER_TO": "+15550001111", "CALLBRIDGE_TRANSFER_ALLOW": "+1444*"},
            "+15550001111 is not an allowed transfer destination (add it to CALLBRIDGE_TRANSFER_ALLOW)",
        ),
        (
            {
                "CALLBRIDGE_FALLBACK_TRANSFER_TO": "+15550001111",
                "CALLBRIDGE_TRANSFER_ALLOW": "+1555*",
                "CALLBRIDGE_FALLBACK_TWIML": "<Response><Hangup/></Response>",
            },
            "not both",
        ),
    ],
)
def test_bad_keypad_and_transfer_settings_are_one_line_each(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(BASE_ENV | env)
    assert any(says in p for p in err.value.problems), err.value.problems


def test_allow_list_matching() -> None:
    allow = parse_allow_list(" +15550001111 ,+1444*, @PBX.Example.com ")
    assert check_destination("+15550001111", allow) == "+15550001111"
    assert check_destination(" +14449990000 ", allow) == "+14449990000"
    assert check_destination("sip:ann@pbx.example.com;transport=tcp", allow)
    for refused in (
        "+15550001112",  # not that number
        "+1555000111",  # a prefix of an allowed number is not allowed
        "sip:ann@pbx.example.com.evil.net",
        "sip:ann@evil.net;x=pbx.example.com",
        "client:ann",
        "tel:+15550001111",
        "+15550001111\n<Hangup/>",
        "",
        None,
        42,
    ):
        with pytest.raises(TransferRefused):
            check_destination(refused, allow)


# -- the emulators model what these features rely on ------------------------------------------


async def test_agent_emulator_keeps_user_messages_and_contextual_updates() -> None:
    from websockets.asyncio.client import connect as ws_connect

    script = AgentScript(
        steps=[WaitForUserMessage(contains="4 2", timeout=5), Say("Thanks.", seconds=0.1)],
        realtime_factor=FAST,
    )
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("agent_test"), ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "conversation_initiation_client_data"}))
            await ws.recv()  # conversation_initiation_metadata
            await ws.send(json.dumps({"type": "contextual_update", "text": "The call reached voicemail."}))
            await ws.send(json.dumps({"type": "user_message", "text": "The caller pressed 1"}))
            await ws.send(json.dumps({"type": "user_message", "text": "The caller pressed 4 2 #"}))
            reply = json.loads(await ws.recv())
        conv = agent.conversations[0]
        await conv.wait_closed()
    # The step waited for the message that matched, then the agent answered it.
    assert reply["type"] == "agent_response" and reply["agent_response_event"]["agent_response"] == "Thanks."
    assert conv.user_messages() == ["The caller pressed 1", "The caller pressed 4 2 #"]
    assert conv.contextual_updates() == ["The call reached voicemail."]
    assert any("user_message received" in line for _, line in conv.step_log)
    assert conv.invalid == []


@pytest.mark.parametrize(
    ("dial", "status", "problem"),
    [
        (f'<Dial callerId="{CALLER}"><Number>{DESK}</Number></Dial>', "completed", None),
        (f'<Dial callerId="{OURS}">{DESK}</Dial>', "completed", None),  # the called number
        (f'<Dial callerId="+15559990000"><Number>{DESK}</Number></Dial>', "failed", "13214"),
        ('<Dial callerId="+15558880000"><Number>+15550003333</Number></Dial>', "completed", None),
        ('<Dial callerId="support"><Sip>sip:desk@pbx.example.com</Sip></Dial>', "completed", None),
        ('<Dial callerId="front desk"><Sip>sip:desk@pbx.example.com</Sip></Dial>', "failed", "13214"),
        (
            "<Dial><Sip>sip:a@pbx.example.com</Sip><Sip>sip:b@pbx.example.com</Sip></Dial>",
            "failed",
            "one <Sip>",
        ),
        ("<Dial><Sip>desk@pbx.example.com</Sip></Dial>", "failed", "sip: URI"),
    ],
)
async def test_twilio_emulator_dials_as_the_docs_say(
    twilio: TwilioEmulator, dial: str, status: str, problem: str | None
) -> None:
    import httpx

    twilio.verified_caller_ids.add("+15558880000")
    async with httpx.AsyncClient(auth=(twilio.account_sid, twilio.auth_token)) as http:
        resp = await http.post(
            f"{twilio.base_url}/2010-04-01/Accounts/{twilio.account_sid}/Calls.json",
            data={"To": CALLER, "From": OURS, "Twiml": f"<Response>{dial}<Say>After.</Say></Response>"},
        )
    assert resp.status_code == 201
    call = twilio.calls[resp.json()["sid"]]
    await call.wait_ended(5)
    assert {d.status for d in call.dials} == {status}
    if problem is None:
        assert call.twiml_errors == []
    else:
        assert any(problem in e for e in call.twiml_errors), call.twiml_errors
    assert call.said == ["After."]  # without an action URL, Twilio goes on with the document


# -- the demo ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_transfer_demo_passes(capsys: pytest.CaptureFixture[str]) -> None:
    from callbridge.demo_transfer import run_transfer_demo

    assert await run_transfer_demo() == 0
    shown = capsys.readouterr().out
    assert "handoff         heard in full" in shown and "redirect        after the last mark" in shown
    assert "demo OK" in shown


async def test_keypad_gatherer_bounds_a_whole_call() -> None:
    from callbridge.keypad import KeypadEntry, KeypadGatherer

    entries: list[KeypadEntry] = []
    keypad = KeypadGatherer(entries.append, gap=60, max_digits=4, rate=1e9, burst=10**6, max_total=10)
    accepted = [keypad.press(key) for key in "123456789012345x"]
    assert accepted == [True] * 10 + [False] * 6
    # Entries of at most 4 digits; the unfinished one is returned when the call ends.
    assert [(e.digits, e.ended_by) for e in entries] == [("1234", "full"), ("5678", "full")]
    assert keypad.close() == "90" and keypad.dropped == 6
