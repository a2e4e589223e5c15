"""Hostile input, part 1: property-based tests of every parser the outside world can reach.

Parsers under test: `TwilioStreamProtocol.receive` (media-stream frames),
`ElevenLabsProtocol.receive` (agent frames, every server event type of the AsyncAPI
contract), `read_body` / `read_form` (Twilio webhooks and status callbacks) and
`validate_call_request` (`POST /calls` bodies).

The properties: nothing raises out of a parser; bad input becomes a warning event
(or an HTTP error / error string) whose reason is readable and bounded, so a hostile
peer cannot flood the logs; and valid input built by Hypothesis parses to the right
event with the very values that were sent (round trips).

Every test is derandomized (fixed examples, same in CI as on a laptop) and bounded
by `max_examples`; the whole file runs in about 15 seconds.
"""

from __future__ import annotations

import base64
import binascii
import json
import string
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import Response

from callbridge.agents.base import (
    AgentAudio,
    AgentInterrupted,
    AgentReady,
    AgentToolUsed,
    AgentTranscript,
    AgentWarning,
    ToolCallRequest,
)
from callbridge.agents.elevenlabs.protocol import AGENT_FORMATS, ElevenLabsProtocol
from callbridge.emulators.elevenlabs import SERVER_EVENT_TYPES
from callbridge.formats import parse_format
from callbridge.server.app import MAX_BODY_BYTES, read_body, read_form, validate_call_request
from callbridge.telephony.base import (
    CallerAudio,
    CallerHungUp,
    Dtmf,
    MarkPlayed,
    StreamInfo,
    TelephonyWarning,
)
from callbridge.telephony.twilio.protocol import Connected, TwilioStreamProtocol

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FEW = settings(FUZZ, max_examples=60)

# A warning (or a stop detail, an agent error message) longer than this is a log-flooding bug:
# a frame of 64 KiB (Twilio) or 1 MiB (agent) must not become a log line of that size.
MAX_REASON = 300

# JSON text can carry an integer literal Python refuses to convert (over 4300 digits).
# Strategies put this placeholder where such a literal goes; `encode` swaps it in.
_BIG = "\x00big-number\x00"
BIG_LITERAL = "7" * 5000


def encode(value: Any) -> str:
    return json.dumps(value).replace(json.dumps(_BIG), BIG_LITERAL)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- strategies shared by both protocols ---------------------------------------------------------

numeric_strings = st.one_of(
    st.integers().map(str),
    st.sampled_from(["1e3", "-0", "0x10", " 12 ", "١٢", "²", "--5", "+7", "12.5", "NaN", "9" * 4400]),
)
huge_strings = st.sampled_from(["x" * 70_000, "\u00e9" * 20_000, "\U0001f4de" * 10_000])
unicode_text = st.text(
    alphabet=st.characters(codec=None, categories=["L", "M", "N", "P", "S", "Z", "C"]), max_size=40
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    unicode_text,
    numeric_strings,
    huge_strings,
    st.just(_BIG),
)
garbage = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
raw_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    garbage.map(encode),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nested JSON value (dict keys and list indexes), outermost first."""
    out: list[tuple[Any, ...]] = []
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, child in items:
        out.append((*prefix, key))
        out += paths(child, (*prefix, key))
    return out


@st.composite
def mutated(draw: st.DrawFn, message: dict[str, Any], keep_type_key: str | None = None) -> dict[str, Any]:
    """A near-valid message: 1-3 fields deleted or replaced by garbage (wrong type, huge,
    unicode, numeric string, nested), or a field added; `keep_type_key` is left alone."""
    msg: dict[str, Any] = json.loads(json.dumps(message))
    for _ in range(draw(st.integers(1, 3))):
        candidates = [p for p in paths(msg) if p != (keep_type_key,)] or [()]
        path = draw(st.sampled_from(candidates))
        if not path:
            break
        parent: Any = msg
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(garbage)
        else:
            parent[path[-1]] = draw(garbage)
    return msg


# -- Twilio Media Streams -----------------------------------------------------------------------

SID_CHARS = string.ascii_letters + string.digits + "_-"
sids = st.text(alphabet=SID_CHARS, min_size=1, max_size=64)
STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "0" * 32
KEYPAD = "0123456789*#ABCD"


def twilio_start(
    stream_sid: str = STREAM_SID, call_sid: str = CALL_SID, params: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "0" * 32,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": params or {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": stream_sid,
    }


TWILIO_VALID: dict[str, dict[str, Any]] = {
    "connected": {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    "start": twilio_start(params={"cb_ref": CALL_SID, "cb_token": "t" * 40}),
    "media": {
        "event": "media",
        "sequenceNumber": "4",
        "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": b64(bytes(range(160)))},
        "streamSid": STREAM_SID,
    },
    "mark": {"event": "mark", "sequenceNumber": "9", "streamSid": STREAM_SID, "mark": {"name": "cb1"}},
    "stop": {
        "event": "stop",
        "sequenceNumber": "5",
        "stop": {"accountSid": "AC" + "0" * 32, "callSid": CALL_SID},
        "streamSid": STREAM_SID,
    },
    "dtmf": {
        "event": "dtmf",
        "streamSid": STREAM_SID,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    },
}
TWILIO_EXPECTED: dict[str, type] = {
    "connected": Connected,
    "start": StreamInfo,
    "media": CallerAudio,
    "mark": MarkPlayed,
    "stop": CallerHungUp,
    "dtmf": Dtmf,
}


def started_twilio() -> TwilioStreamProtocol:
    p = TwilioStreamProtocol()
    assert isinstance(p.receive(json.dumps(twilio_start())), StreamInfo)
    return p


def assert_outgoing_frames_are_json(p: TwilioStreamProtocol, stream_sid: str) -> None:
    """What the bridge sends back on this stream is valid JSON naming this stream."""
    media = json.loads(p.media("AAEC"))
    frame, name = p.mark()
    mark = json.loads(frame)
    clear = json.loads(p.clear())
    assert media == {"event": "media", "streamSid": stream_sid, "media": {"payload": "AAEC"}}
    assert mark == {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}
    assert clear == {"event": "clear", "streamSid": stream_sid}


def check_twilio(event: Any, p: TwilioStreamProtocol, sent: Any) -> None:
    """What any Twilio event must satisfy, whatever frame produced it."""
    if isinstance(event, TelephonyWarning):
        assert isinstance(event.reason, str) and event.reason
        assert len(event.reason) <= MAX_REASON, event.reason[:200]
        if event.fatal:
            assert isinstance(sent, dict) and sent.get("event") == "start"
    elif isinstance(event, StreamInfo):
        for sid in (event.stream_sid, event.call_sid, event.account_sid):
            assert isinstance(sid, str) and 1 <= len(sid) <= 64 and set(sid) <= set(SID_CHARS), repr(sid)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in event.custom_parameters.items())
        assert_outgoing_frames_are_json(p, event.stream_sid)
    elif isinstance(event, CallerAudio):
        assert isinstance(sent, dict)
        assert event.b64 == sent["media"]["payload"]
        assert event.payload == base64.b64decode(event.b64, validate=True)
    elif isinstance(event, MarkPlayed):
        assert isinstance(sent, dict) and event.name == sent["mark"]["name"]
    elif isinstance(event, Dtmf):
        assert isinstance(sent, dict) and event.digit == sent["dtmf"]["digit"]
        assert len(event.digit) == 1 and event.digit.upper() in KEYPAD, repr(event.digit)
    elif isinstance(event, CallerHungUp):
        assert len(event.detail) <= MAX_REASON
    else:
        assert isinstance(event, Connected), event


@FUZZ
@given(frame=raw_frames, before_start=st.booleans())
@example(frame='{"event": "media", "n": ' + BIG_LITERAL + "}", before_start=False)
@example(frame='{"event": ' + BIG_LITERAL + "}", before_start=True)
@example(frame='{"event": "' + "x" * 60_000 + '"}', before_start=False)
def test_twilio_any_frame_is_parsed_without_raising(frame: str | bytes, before_start: bool) -> None:
    p = TwilioStreamProtocol() if before_start else started_twilio()
    check_twilio(p.receive(frame), p, None)


@FUZZ
@given(value=garbage, before_start=st.booleans())
def test_twilio_any_json_value_is_parsed_without_raising(value: Any, before_start: bool) -> None:
    p = TwilioStreamProtocol() if before_start else started_twilio()
    sent = {"event": "warp", "payload": value} if not isinstance(value, dict) else value
    for frame in (encode(value), encode(sent)):
        check_twilio(p.receive(frame), p, None)


@pytest.mark.parametrize("kind", sorted(TWILIO_VALID))
@FUZZ
@given(data=st.data())
def test_twilio_near_valid_messages_are_warnings_or_consistent_events(kind: str, data: st.DataObject) -> None:
    message = data.draw(mutated(TWILIO_VALID[kind]))
    p = TwilioStreamProtocol() if kind in ("connected", "start") else started_twilio()
    if kind == "mark":
        assert p.mark()[1] == "cb1"  # the valid mark message echoes a mark the bridge sent
    event = p.receive(encode(message))
    check_twilio(event, p, message)
    assert isinstance(event, TWILIO_EXPECTED[kind] | TelephonyWarning), (kind, event)


@FUZZ
@given(
    stream_sid=sids,
    call_sid=sids,
    params=st.dictionaries(st.text(max_size=20), st.text(max_size=60), max_size=8),
)
def test_twilio_valid_start_round_trips(stream_sid: str, call_sid: str, params: dict[str, str]) -> None:
    p = TwilioStreamProtocol()
    event = p.receive(json.dumps(twilio_start(stream_sid, call_sid, params)))
    assert event == StreamInfo(stream_sid, call_sid, "AC" + "0" * 32, params, ("inbound",))
    assert (p.stream_sid, p.call_sid) == (stream_sid, call_sid)
    assert_outgoing_frames_are_json(p, stream_sid)


@FUZZ
@given(suffix=st.text(min_size=1, max_size=3), field=st.sampled_from(["streamSid", "callSid", "accountSid"]))
@example(suffix="\n", field="streamSid")
def test_twilio_start_with_a_sid_that_would_break_our_frames_is_fatal(suffix: str, field: str) -> None:
    """A SID is pasted into outgoing JSON templates: one with a quote, a backslash, a
    control character (a trailing newline included) must be refused, never echoed."""
    message = twilio_start()
    message["start"][field] = message["start"][field] + suffix
    p = TwilioStreamProtocol()
    event = p.receive(json.dumps(message))
    if set(suffix) <= set(SID_CHARS) and len(message["start"][field]) <= 64:
        assert isinstance(event, StreamInfo)
        assert_outgoing_frames_are_json(p, p.stream_sid or "")
    else:
        assert isinstance(event, TelephonyWarning) and event.fatal, repr(suffix)
        assert p.stream_sid is None


@FUZZ
@given(
    payload=st.binary(max_size=4000),
    chunk=st.integers(0, 2**40),
    timestamp=st.integers(0, 2**40),
    as_strings=st.booleans(),
)
def test_twilio_media_payload_round_trips(
    payload: bytes, chunk: int, timestamp: int, as_strings: bool
) -> None:
    """Any bytes base64-encoded in a media message come back identical, with the
    numeric fields whether Twilio sends them as JSON strings (it does) or numbers."""
    p = started_twilio()
    media: dict[str, Any] = {"track": "inbound", "payload": b64(payload)}
    media["chunk"], media["timestamp"] = (str(chunk), str(timestamp)) if as_strings else (chunk, timestamp)
    event = p.receive(json.dumps({"event": "media", "streamSid": STREAM_SID, "media": media}))
    assert event == CallerAudio(payload, b64(payload), chunk, timestamp)


@FUZZ
@given(text=st.text(max_size=64))
@example(text="AAAA\n")
@example(text="AAA")
@example(text="A===")
def test_twilio_media_payload_that_is_not_strict_base64_is_a_warning(text: str) -> None:
    """The payload is forwarded to the agent as-is inside a JSON template: only strict
    base64 may pass, anything else is a warning naming its length, not its content."""
    try:
        strict = binascii.a2b_base64(text.encode(), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        strict = None
    p = started_twilio()
    event = p.receive(json.dumps({"event": "media", "media": {"payload": text}}))
    if strict is None:
        assert isinstance(event, TelephonyWarning) and "base64" in event.reason
    else:
        assert event == CallerAudio(strict, text)


@FUZZ
@given(ops=st.lists(st.one_of(st.just("send"), st.integers(0, 12), st.text(max_size=6)), max_size=40))
def test_twilio_marks_are_each_acknowledged_once(ops: list[Any]) -> None:
    """Model check: pending marks are the marks sent and not yet echoed; an echo of an
    unknown or already-echoed name is reported `known=False` and changes nothing."""
    p = started_twilio()
    pending: set[str] = set()
    sent = 0
    for op in ops:
        if op == "send":
            _, name = p.mark()
            sent += 1
            pending.add(name)
            continue
        name = f"cb{op}" if isinstance(op, int) else op
        event = p.receive(json.dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": name}}))
        assert event == MarkPlayed(name, name in pending)
        pending.discard(name)
        assert p.pending_marks == len(pending)
    assert p.last_mark_sent == (f"cb{sent}" if sent else None)


@FUZZ
@given(digit=st.one_of(st.sampled_from(list(KEYPAD)), st.text(max_size=5), st.just("1" * 70_000)))
def test_twilio_dtmf_is_one_keypad_digit(digit: str) -> None:
    p = started_twilio()
    event = p.receive(json.dumps({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}}))
    if len(digit) == 1 and digit.upper() in KEYPAD:
        assert event == Dtmf(digit)
    else:
        assert isinstance(event, TelephonyWarning) and len(event.reason) <= MAX_REASON


@FUZZ
@given(call_sid=st.one_of(sids, garbage))
def test_twilio_stop_always_ends_the_call_with_a_bounded_detail(call_sid: Any) -> None:
    p = started_twilio()
    frame = encode({"event": "stop", "stop": {"callSid": call_sid}})
    event = p.receive(frame)
    if BIG_LITERAL in frame:  # not JSON Python can read: no stop at all
        assert isinstance(event, TelephonyWarning) and not p.stopped
        return
    assert isinstance(event, CallerHungUp) and p.stopped
    assert len(event.detail) <= MAX_REASON


# -- ElevenLabs Agents --------------------------------------------------------------------------

event_ids = st.integers(min_value=0, max_value=2**53)
texts = st.text(max_size=80)

# Every server event type of shared/specs/elevenlabs/agent.asyncapi.yaml: its payload key and,
# for the types a phone bridge uses, valid payloads and the event they must become.
EL_PAYLOAD_KEY: dict[str, str] = {
    "audio": "audio_event",
    "user_transcript": "user_transcription_event",
    "tentative_user_transcript": "tentative_user_transcription_event",
    "agent_response": "agent_response_event",
    "agent_response_correction": "agent_response_correction_event",
    "agent_chat_response_part": "text_response_part",
    "agent_reasoning_response_part": "reasoning_response_part",
    "interruption": "interruption_event",
    "conversation_initiation_metadata": "conversation_initiation_metadata_event",
    "client_tool_call": "client_tool_call",
    "rich_content": "rich_content",
    "agent_tool_request": "agent_tool_request",
    "agent_tool_response": "agent_tool_response",
    "agent_tool_response_full_payload": "agent_tool_response_full_payload",
    "mcp_tool_call": "mcp_tool_call",
    "mcp_connection_status": "mcp_connection_status",
    "vad_score": "vad_score_event",
    "ping": "ping_event",
    "context_usage": "context_usage_event",
    "asr_initiation_metadata": "asr_initiation_metadata_event",
    "guardrail_triggered": "guardrail_triggered_event",
    "internal_turn_probability": "turn_probability_internal_event",
    "internal_tentative_agent_response": "tentative_agent_response_internal_event",
    "agent_typing": "agent_typing_event",
    "external_agent_connected": "external_agent_connected_event",
    "external_agent_disconnected": "external_agent_disconnected_event",
    "error": "error_event",
}
EL_VALID_BODY: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "audio": st.fixed_dictionaries(
        {"audio_base_64": st.binary(min_size=1, max_size=600).map(b64), "event_id": event_ids}
    ),
    "user_transcript": st.fixed_dictionaries({"user_transcript": texts, "event_id": event_ids}),
    "agent_response": st.fixed_dictionaries({"agent_response": texts, "event_id": event_ids}),
    "agent_response_correction": st.fixed_dictionaries(
        {"original_agent_response": texts, "corrected_agent_response": texts, "event_id": event_ids}
    ),
    "interruption": st.fixed_dictionaries({"event_id": event_ids}),
    "conversation_initiation_metadata": st.fixed_dictionaries(
        {
            "conversation_id": st.text(min_size=1, max_size=40),
            "agent_output_audio_format": st.sampled_from(sorted(AGENT_FORMATS)),
            "user_input_audio_format": st.sampled_from(sorted(AGENT_FORMATS)),
        }
    ),
    "client_tool_call": st.fixed_dictionaries(
        {
            "tool_name": st.text(max_size=30),
            "tool_call_id": st.text(max_size=30),
            "parameters": st.dictionaries(st.text(max_size=10), json_values, max_size=4),
            "event_id": event_ids,
        }
    ),
    "agent_tool_response": st.fixed_dictionaries(
        {
            "tool_name": st.one_of(st.sampled_from(["end_call", "transfer_to_number"]), texts),
            "tool_call_id": texts,
            "tool_type": st.sampled_from(["system", "client", "webhook", "mcp"]),
            "is_error": st.booleans(),
            "is_called": st.booleans(),
            "event_id": event_ids,
        }
    ),
    "ping": st.fixed_dictionaries(
        {"event_id": event_ids, "ping_ms": st.one_of(st.none(), st.integers(0, 9999))}
    ),
    "error": st.fixed_dictionaries(
        {
            "code": st.sampled_from([1000, 1002, 1008, 1011]),
            "message": texts,
            "error_type": st.one_of(st.none(), st.sampled_from(["llm_timeout", "invalid_message"])),
            "reason": st.one_of(st.none(), texts),
        }
    ),
}
EL_EXPECTED: dict[str, tuple[type, ...]] = {
    "audio": (AgentAudio,),
    "user_transcript": (AgentTranscript,),
    "agent_response": (AgentTranscript,),
    "agent_response_correction": (AgentTranscript,),
    "interruption": (AgentInterrupted,),
    "conversation_initiation_metadata": (AgentReady,),
    "client_tool_call": (ToolCallRequest,),
    "agent_tool_response": (AgentToolUsed,),
    "ping": (type(None),),
    "error": (AgentWarning,),
}
EL_IGNORED = sorted(set(EL_PAYLOAD_KEY) - set(EL_VALID_BODY))
TRANSCRIPT_FIELD = {
    "user_transcript": "user_transcript",
    "agent_response": "agent_response",
    "agent_response_correction": "corrected_agent_response",
}


def test_the_table_covers_every_server_event_type_of_the_contract() -> None:
    assert set(EL_PAYLOAD_KEY) == set(SERVER_EVENT_TYPES) | {"error"}
    assert set(EL_VALID_BODY) == set(EL_EXPECTED)


def el_message(kind: str, body: Any) -> dict[str, Any]:
    return {"type": kind, EL_PAYLOAD_KEY[kind]: body}


def as_event_id(value: Any) -> int | None:
    """How the spec's integer event_id may arrive: an int, or its decimal string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        try:
            return int(value)
        except ValueError:
            return None
    return None


def decoded(frame: str | bytes) -> Any:
    """The frame as the bridge reads it (wire.py: orjson, then the standard library)."""
    try:
        return orjson.loads(frame)
    except ValueError:
        pass
    try:
        return json.loads(frame)
    except (ValueError, RecursionError):
        return None


def check_agent(event: Any, p: ElevenLabsProtocol, sent: Any, outbox_before: int) -> None:
    """What any agent event must satisfy, whatever frame produced it."""
    kind = sent.get("type") if isinstance(sent, dict) else None
    body = (
        sent.get(EL_PAYLOAD_KEY.get(kind, "")) if isinstance(kind, str) and isinstance(sent, dict) else None
    )
    new_frames = p.outbox[outbox_before:]
    for frame in new_frames:  # only pongs are ever queued, each one valid JSON
        pong = json.loads(frame)
        assert set(pong) == {"type", "event_id"} and pong["type"] == "pong"
        assert isinstance(body, dict) and pong["event_id"] == as_event_id(body.get("event_id"))
    if isinstance(event, AgentWarning):
        assert isinstance(event.reason, str) and event.reason
        assert len(event.reason) <= MAX_REASON, event.reason[:200]
        assert not new_frames
    elif isinstance(event, AgentAudio):
        assert isinstance(body, dict) and event.b64 == body["audio_base_64"]
        assert event.payload and event.payload == base64.b64decode(event.b64, validate=True)
        eid = as_event_id(body.get("event_id"))
        assert eid is None or eid > p.last_interrupt_id
    elif isinstance(event, AgentTranscript):
        assert isinstance(body, dict) and isinstance(kind, str)
        assert event.text == body[TRANSCRIPT_FIELD[kind]], (kind, body)
        if event.corrects is not None:
            assert event.corrects == body["original_agent_response"]
    elif isinstance(event, AgentReady):
        assert isinstance(body, dict)
        assert event == AgentReady(
            body["conversation_id"],
            parse_format(body["user_input_audio_format"]),
            parse_format(body["agent_output_audio_format"]),
        )
    elif isinstance(event, ToolCallRequest):
        assert isinstance(body, dict)
        assert (event.call_id, event.name) == (body["tool_call_id"], body["tool_name"])
        assert isinstance(event.parameters, dict)
    elif isinstance(event, AgentToolUsed):
        assert event.ends_call == (event.name == "end_call" and not event.is_error)
        assert p.end_call_seen or not event.ends_call
    elif event is None:
        assert kind is not None
    else:
        assert isinstance(event, AgentInterrupted), event
    if p.last_error is not None:
        assert len(p.last_error.message) <= MAX_REASON


@FUZZ
@given(frame=raw_frames)
@example(frame='{"type": []}')
@example(frame='{"type": {"a": 1}}')
@example(frame='{"type": "ping", "ping_event": {"event_id": ' + BIG_LITERAL + "}}")
@example(frame='{"type": "' + "x" * 60_000 + '"}')
def test_agent_any_frame_is_parsed_without_raising(frame: str | bytes) -> None:
    p = ElevenLabsProtocol()
    check_agent(p.receive(frame), p, decoded(frame), 0)


@FUZZ
@given(value=garbage)
def test_agent_any_json_value_is_parsed_without_raising(value: Any) -> None:
    p = ElevenLabsProtocol()
    for sent in (value, {"type": value}, {"type": "audio", "audio_event": value}):
        before = len(p.outbox)
        event = p.receive(encode(sent))
        check_agent(event, p, decoded(encode(sent)), before)


@pytest.mark.parametrize("kind", sorted(EL_VALID_BODY))
@FEW
@given(data=st.data())
def test_agent_valid_events_parse_to_the_right_event(kind: str, data: st.DataObject) -> None:
    body = data.draw(EL_VALID_BODY[kind])
    p = ElevenLabsProtocol()
    event = p.receive(json.dumps(el_message(kind, body)))
    check_agent(event, p, el_message(kind, body), 0)
    assert isinstance(event, EL_EXPECTED[kind]), (kind, event)
    if kind == "ping":
        assert [json.loads(f) for f in p.outbox] == [{"type": "pong", "event_id": body["event_id"]}]
    if kind == "error":
        assert p.last_error is not None and p.last_error.code == body["code"]
        assert p.last_error.error_type == body["error_type"]
        expected = body["reason"] or body["message"]
        assert p.last_error.message == expected or (
            len(expected) > MAX_REASON and expected.startswith(p.last_error.message.rstrip("."))
        )


@pytest.mark.parametrize("kind", sorted(EL_VALID_BODY))
@FUZZ
@given(data=st.data())
def test_agent_near_valid_events_are_warnings_or_consistent_events(kind: str, data: st.DataObject) -> None:
    valid = el_message(kind, data.draw(EL_VALID_BODY[kind]))
    message = data.draw(mutated(valid, keep_type_key="type"))
    p = ElevenLabsProtocol()
    event = p.receive(encode(message))
    check_agent(event, p, message, 0)
    allowed = (*EL_EXPECTED[kind], AgentWarning, type(None))
    assert isinstance(event, allowed), (kind, event)


@pytest.mark.parametrize("kind", EL_IGNORED)
@FEW
@given(body=garbage)
def test_agent_events_a_phone_bridge_ignores_are_ignored_whatever_they_carry(kind: str, body: Any) -> None:
    p = ElevenLabsProtocol()
    frame = encode(el_message(kind, body))
    event = p.receive(frame)
    if BIG_LITERAL in frame:  # not JSON Python can read
        assert isinstance(event, AgentWarning) and event.reason.startswith("malformed JSON")
    else:
        assert event is None
    assert p.receive(encode({"type": kind})) is None
    assert p.outbox == [] and p.ready is None


@FUZZ
@given(
    kind=st.one_of(st.text(max_size=40), garbage).filter(
        lambda k: not isinstance(k, str) or k not in EL_PAYLOAD_KEY
    )
)
def test_agent_unknown_event_types_are_bounded_warnings(kind: Any) -> None:
    event = ElevenLabsProtocol().receive(encode({"type": kind, "x": 1}))
    assert isinstance(event, AgentWarning) and 0 < len(event.reason) <= MAX_REASON


# The integers orjson reads as integers (wider ones it reads as floats).
JSON_INT = st.integers(-(2**63), 2**64 - 1)


@FUZZ
@given(
    event_id=st.integers(),
    as_string=st.booleans(),
    ping_ms=st.one_of(st.none(), st.integers()),
    data=st.data(),
)
def test_any_ping_gets_a_pong_with_its_event_id(
    event_id: int, as_string: bool, ping_ms: int | None, data: st.DataObject
) -> None:
    # As a JSON number, an event_id is in orjson's integer range (wire.py reads JSON with
    # orjson, which reads wider integers as floats: refused below); as a string, any size.
    if not as_string:
        event_id = data.draw(JSON_INT)
    p = ElevenLabsProtocol()
    sent: Any = str(event_id) if as_string else event_id
    assert p.receive(json.dumps(el_message("ping", {"event_id": sent, "ping_ms": ping_ms}))) is None
    assert [json.loads(f) for f in p.outbox] == [{"type": "pong", "event_id": event_id}]


@pytest.mark.parametrize("event_id", [2**64, -(2**63) - 1, 10**30])
def test_a_ping_whose_event_id_number_is_past_64_bits_gets_a_warning_and_no_pong(event_id: int) -> None:
    p = ElevenLabsProtocol()
    event = p.receive(json.dumps(el_message("ping", {"event_id": event_id})))
    assert isinstance(event, AgentWarning) and "event_id" in event.reason
    assert p.outbox == []


@FUZZ
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["audio", "interruption"]), st.integers(-3, 30)), min_size=1, max_size=40
    )
)
def test_audio_at_or_below_the_last_interruption_is_dropped(ops: list[tuple[str, int]]) -> None:
    """Model check of the interruption filter against any order of audio and interruptions."""
    p = ElevenLabsProtocol()
    last, dropped = -1, 0
    for kind, eid in ops:
        if kind == "interruption":
            assert p.receive(json.dumps(el_message(kind, {"event_id": eid}))) == AgentInterrupted()
            last = max(last, eid)
            continue
        event = p.receive(json.dumps(el_message(kind, {"audio_base_64": "AAEC", "event_id": eid})))
        if eid <= last:
            dropped += 1
            assert event is None
        else:
            assert event == AgentAudio(b"\x00\x01\x02", "AAEC")
    assert (p.last_interrupt_id, p.stale_audio_dropped) == (last, dropped)


@pytest.mark.parametrize("depth", [50, 900, 990, 1020, 1500, 100_000])
def test_deeply_nested_json_in_every_field_is_harmless(depth: int) -> None:
    nested = "[" * depth + "]" * depth
    agent = ElevenLabsProtocol()
    for kind, key in EL_PAYLOAD_KEY.items():
        for frame in (
            f'{{"type": "{kind}", "{key}": {nested}}}',
            f'{{"type": "{kind}", "{key}": {{"event_id": 1, "agent_response": {nested}, '
            f'"user_transcript": {nested}, "conversation_id": {nested}, "tool_name": {nested}}}}}',
        ):
            check_agent(agent.receive(frame), agent, decoded(frame), len(agent.outbox))
    twilio = started_twilio()
    for kind in TWILIO_VALID:
        frame = f'{{"event": "{kind}", "{kind}": {nested}, "media": {{"payload": {nested}}}}}'
        check_twilio(twilio.receive(frame), twilio, None)


# -- webhook forms (read_body / read_form) ------------------------------------------------------


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never really waits (our receive() answers at once), loop-free."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine waited for something")


def form_request(
    body: bytes, *, declared: str | None = "auto", chunk: int = 4096
) -> tuple[Request, Callable[[], int]]:
    """A Starlette request whose body arrives in chunks; also returns how many bytes were read."""
    headers = [(b"content-type", b"application/x-www-form-urlencoded")]
    if declared == "auto":
        declared = str(len(body))
    if declared is not None:
        headers.append((b"content-length", declared.encode("latin-1")))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/twilio/inbound",
        "raw_path": b"/twilio/inbound",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
    }
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not chunks:
            return {"type": "http.disconnect"}
        part = chunks.pop(0)
        read += len(part)
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    return Request(scope, receive), lambda: read


@FUZZ
@given(body=st.one_of(st.binary(max_size=3000), st.text(max_size=1000).map(str.encode)))
@example(body=b"a=%ff%fe&b=\xff")
@example(body=b"&&&=&==&a=1&a=2")
@example(body=b"\xed\xa0\x80=1")  # an encoded lone surrogate: not UTF-8
def test_read_form_never_raises(body: bytes) -> None:
    request, _ = form_request(body)
    form = run_now(read_form(request))
    if isinstance(form, Response):
        assert form.status_code == 400 and b"UTF-8" in form.body
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())


@FUZZ
@given(params=st.dictionaries(st.text(max_size=30), st.text(max_size=200), max_size=20))
@example(params={"Digits": "", "SpeechResult": "caf\u00e9 & cr\u00e8me=1%", "": "x"})
def test_read_form_round_trips_what_twilio_posts(params: dict[str, str]) -> None:
    request, _ = form_request(urlencode(params).encode())
    assert run_now(read_form(request)) == params


@FUZZ
@given(
    size=st.integers(MAX_BODY_BYTES + 1, 1_000_000),
    declared=st.sampled_from(["true", "none", "small", "huge", "garbage"]),
    chunk=st.sampled_from([1024, 16384, 65536]),
)
def test_bodies_over_the_limit_get_413_without_being_read_whole(size: int, declared: str, chunk: int) -> None:
    """Whatever Content-Length says (true, absent, lying small or large, not a number), a
    body over 64 KiB is answered 413 having read at most the limit plus one chunk."""
    header = {
        "true": str(size),
        "none": None,
        "small": "10",
        "huge": "9" * 30,
        "garbage": "-1",
    }[declared]
    request, read = form_request(b"a" * size, declared=header, chunk=chunk)
    answer = run_now(read_form(request))
    assert isinstance(answer, Response) and answer.status_code == 413
    assert read() <= MAX_BODY_BYTES + chunk
    request, read = form_request(b"a" * size, declared=header, chunk=chunk)
    assert run_now(read_body(request)) is None


@FUZZ
@given(size=st.integers(0, MAX_BODY_BYTES), declared_delta=st.integers(-5, 0))
def test_bodies_within_the_limit_are_read_whole(size: int, declared_delta: int) -> None:
    body = bytes(i % 251 for i in range(size))
    request, _ = form_request(body, declared=str(max(size + declared_delta, 0)))
    assert run_now(read_body(request)) == body


# -- POST /calls bodies (validate_call_request) -------------------------------------------------

e164 = st.builds(
    lambda first, rest: f"+{first}{rest}", st.integers(1, 9), st.text("0123456789", min_size=6, max_size=14)
)
sip = st.builds(
    lambda scheme, user: f"{scheme}:{user}",
    st.sampled_from(["sip", "client"]),
    st.text(string.ascii_letters + string.digits + "@._:;=+-", min_size=1, max_size=60),
)
numbers = st.one_of(e164, sip)
var_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
var_values = st.one_of(
    st.text(max_size=100), st.integers(-(10**12), 10**12), st.floats(allow_nan=False), st.booleans()
)
valid_call_bodies = st.fixed_dictionaries(
    {"to": numbers, "from": numbers},
    optional={
        "dynamic_variables": st.dictionaries(var_names, var_values, max_size=32),
        "agent_id": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    },
)


@FUZZ
@given(data=st.one_of(garbage, json_values, valid_call_bodies))
def test_validate_call_request_never_raises(data: Any) -> None:
    problem = validate_call_request(data)
    assert problem is None or (isinstance(problem, str) and problem)


@FUZZ
@given(body=valid_call_bodies)
def test_valid_call_requests_are_accepted(body: dict[str, Any]) -> None:
    assert validate_call_request(body) is None
    assert validate_call_request(json.loads(json.dumps(body))) is None


@FUZZ
@given(
    body=valid_call_bodies,
    field=st.sampled_from(["to", "from", "agent_id", "var_name"]),
    suffix=st.text(min_size=1, max_size=3).filter(lambda s: not s.isalnum()),
)
@example(body={"to": "+15551230001", "from": "+15551230002"}, field="to", suffix="\n")
@example(body={"to": "+15551230001", "from": "+15551230002"}, field="agent_id", suffix="\n")
@example(body={"to": "+15551230001", "from": "+15551230002"}, field="var_name", suffix="\n")
def test_a_field_with_trailing_junk_is_refused_by_name(body: dict[str, Any], field: str, suffix: str) -> None:
    """Numbers, agent ids and variable names end up in TwiML, URLs and records: a valid one
    with a newline, a space or punctuation appended is refused, and the error names it."""
    body = dict(body)
    if field == "var_name":
        body["dynamic_variables"] = {"name" + suffix: "x"}
        name = "dynamic variable name"
    elif field == "agent_id":
        body["agent_id"] = "agent_1" + suffix
        name = "agent_id"
    else:
        body[field] = body[field] + suffix
        name = f"'{field}'"
    word = string.ascii_letters + string.digits
    if field in ("to", "from") and body[field].startswith(("sip:", "client:")):
        if set(suffix) <= set(word + "@._:;=+-"):
            return  # still a valid address
    if field == "agent_id" and set(suffix) <= set(word + "_-"):
        return
    if field == "var_name" and set(suffix) <= set(word + "_"):
        return
    problem = validate_call_request(body)
    assert problem is not None and name in problem, (body, problem)


@FUZZ
@given(
    body=valid_call_bodies,
    breakage=st.sampled_from(["unknown", "nested", "too_long", "too_many", "bad_type", "null_number"]),
)
def test_broken_call_requests_say_what_is_wrong(body: dict[str, Any], breakage: str) -> None:
    body = dict(body)
    if breakage == "unknown":
        body["callback_url"] = "http://evil.example"
        expected = "unknown fields: callback_url"
    elif breakage == "nested":
        body["dynamic_variables"] = {"n": {"nested": [1]}}
        expected = "'n' must be a string, number or boolean"
    elif breakage == "too_long":
        body["dynamic_variables"] = {"n": "x" * 450}
        expected = "too long"
    elif breakage == "too_many":
        body["dynamic_variables"] = {f"v{i}": i for i in range(33)}
        expected = "at most 32"
    elif breakage == "bad_type":
        body["agent_id"] = 42
        expected = "'agent_id'"
    else:
        body["to"] = None
        expected = "'to' must be an E.164 number"
    problem = validate_call_request(body)
    assert problem is not None and expected in problem, problem
