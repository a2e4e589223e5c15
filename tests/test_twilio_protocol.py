"""Twilio Media Streams protocol, checked with the message examples of Twilio's reference."""

from __future__ import annotations

import base64
import json

from callbridge.telephony.base import (
    CallerAudio,
    CallerHungUp,
    Dtmf,
    MarkPlayed,
    StreamInfo,
    TelephonyWarning,
)
from callbridge.telephony.twilio.protocol import Connected, TwilioStreamProtocol

SID = "MZ" + "X" * 32
CONNECTED = '{"event": "connected", "protocol": "Call", "version": "1.0.0"}'
START = json.dumps(
    {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "X" * 32,
            "streamSid": SID,
            "callSid": "CA" + "X" * 32,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
        },
        "streamSid": SID,
    }
)
PAYLOAD = bytes(range(160))
MEDIA = json.dumps(
    {
        "event": "media",
        "sequenceNumber": "4",
        "media": {
            "track": "inbound",
            "chunk": "2",
            "timestamp": "5",
            "payload": base64.b64encode(PAYLOAD).decode(),
        },
        "streamSid": SID,
    }
)
STOP = json.dumps(
    {
        "event": "stop",
        "sequenceNumber": "5",
        "stop": {"accountSid": "AC" + "X" * 32, "callSid": "CA" + "X" * 32},
        "streamSid": SID,
    }
)
DTMF = json.dumps(
    {
        "event": "dtmf",
        "streamSid": SID,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
)


def started() -> TwilioStreamProtocol:
    p = TwilioStreamProtocol()
    assert isinstance(p.receive(CONNECTED), Connected)
    assert isinstance(p.receive(START), StreamInfo)
    return p


def test_start_carries_ids_and_custom_parameters() -> None:
    p = TwilioStreamProtocol()
    info = p.receive(START)
    assert isinstance(info, StreamInfo)
    assert info.stream_sid == SID and info.call_sid == "CA" + "X" * 32
    assert info.custom_parameters == {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"}
    assert info.tracks == ("inbound",)


def test_media_numbers_arrive_as_strings() -> None:
    ev = started().receive(MEDIA)
    assert isinstance(ev, CallerAudio)
    assert ev.payload == PAYLOAD and ev.chunk == 2 and ev.timestamp_ms == 5
    assert ev.b64 == base64.b64encode(PAYLOAD).decode()


def test_stop_dtmf() -> None:
    p = started()
    assert p.receive(DTMF) == Dtmf("1")
    assert isinstance(p.receive(STOP), CallerHungUp)
    assert p.stopped


def test_outgoing_frames_are_valid_json_matching_the_reference() -> None:
    p = started()
    media = json.loads(p.media("AAEC"))
    assert media == {"event": "media", "streamSid": SID, "media": {"payload": "AAEC"}}
    frame, name = p.mark()
    assert json.loads(frame) == {"event": "mark", "streamSid": SID, "mark": {"name": name}}
    assert json.loads(p.clear()) == {"event": "clear", "streamSid": SID}


def test_marks_are_tracked_until_echoed() -> None:
    p = started()
    _, a = p.mark()
    _, b = p.mark()
    assert p.pending_marks == 2
    echo = {"event": "mark", "sequenceNumber": "9", "streamSid": SID, "mark": {"name": a}}
    assert p.receive(json.dumps(echo)) == MarkPlayed(a, True)
    assert p.pending_marks == 1
    assert p.receive(json.dumps(echo)) == MarkPlayed(a, False)  # echoed twice: unknown now
    echo["mark"] = {"name": b}
    assert p.receive(json.dumps(echo)) == MarkPlayed(b, True)
    assert p.pending_marks == 0


def test_bad_input_becomes_warnings_not_exceptions() -> None:
    p = TwilioStreamProtocol()
    assert isinstance(p.receive(MEDIA), TelephonyWarning)  # media before start
    p = started()
    cases = [
        "{not json",
        "[]",
        b"\x00\x01",
        '{"event": "media"}',
        '{"event": "media", "media": {"payload": "%%%"}}',
        '{"event": "media", "media": {"payload": 5}}',
        '{"event": "warp"}',
        '{"event": "mark", "mark": {}}',
        '{"event": "dtmf", "dtmf": {}}',
        START,  # duplicate start
    ]
    for frame in cases:
        ev = p.receive(frame)
        assert isinstance(ev, TelephonyWarning), frame
        assert not ev.fatal, frame
    assert p.stream_sid == SID  # the duplicate start did not take over the stream


def test_broken_start_is_fatal() -> None:
    for start in (
        {"event": "start"},
        {"event": "start", "start": {"streamSid": SID}},
        {"event": "start", "start": {"streamSid": 'MZ"x', "callSid": "CA1", "accountSid": "AC1"}},
        {
            "event": "start",
            "start": {
                "streamSid": SID,
                "callSid": "CA1",
                "accountSid": "AC1",
                "mediaFormat": {"encoding": "audio/L16", "sampleRate": 16000, "channels": 1},
            },
        },
    ):
        ev = TwilioStreamProtocol().receive(json.dumps(start))
        assert isinstance(ev, TelephonyWarning) and ev.fatal, start


def test_caller_audio_is_read_without_consuming_anything_else() -> None:
    """What the call may forward as it arrives: media only; every other frame is left, unread
    and unchanged, for `receive`."""
    p = TwilioStreamProtocol()
    assert p.caller_audio(MEDIA) is None  # before start: receive() warns about it
    assert isinstance(p.receive(START), StreamInfo)
    assert p.caller_audio(MEDIA) == p.receive(MEDIA)
    _, name = p.mark()
    echo = json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": name}})
    bad = json.dumps({"event": "media", "media": {"payload": "not base64!"}})
    for frame in (echo, STOP, DTMF, bad, "{", "[1]"):
        assert p.caller_audio(frame) is None
    assert p.pending_marks == 1 and not p.stopped
    assert p.receive(echo) == MarkPlayed(name, True)
    assert isinstance(p.receive(bad), TelephonyWarning)
