"""The Media Streams messages, from Twilio's side: what it sends, and its checks on what it gets.

Written from Twilio's documentation, not from the bridge's parser (see the package docstring).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BYTES_PER_SECOND",
    "FRAME_BYTES",
    "FRAME_SECONDS",
    "MULAW_SILENCE",
    "ServerMessage",
    "connected_message",
    "dtmf_message",
    "mark_message",
    "media_message",
    "read_server_message",
    "start_message",
    "stop_message",
]

FRAME_BYTES = 160  # 20 ms of mu-law at 8 kHz, the size of Twilio's inbound media frames
FRAME_SECONDS = 0.02
BYTES_PER_SECOND = 8000
MULAW_SILENCE = 0xFF


# --------------------------------------------------------------------------------------------- sent


def connected_message() -> dict[str, Any]:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start_message(
    account_sid: str, stream_sid: str, call_sid: str, custom_parameters: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "event": "start",
        "start": {
            "accountSid": account_sid,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": dict(custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": stream_sid,
    }


def media_message(stream_sid: str, index: int, frame: bytes) -> dict[str, Any]:
    """Inbound media frame ``index`` (from 0) of 20 ms."""
    return {
        "event": "media",
        "media": {
            "track": "inbound",
            "chunk": str(index + 1),
            "timestamp": str(index * 20),
            "payload": base64.b64encode(frame).decode("ascii"),
        },
        "streamSid": stream_sid,
    }


def mark_message(stream_sid: str, name: str) -> dict[str, Any]:
    return {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}


def dtmf_message(stream_sid: str, digit: str) -> dict[str, Any]:
    return {"event": "dtmf", "streamSid": stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}}


def stop_message(account_sid: str, call_sid: str, stream_sid: str) -> dict[str, Any]:
    return {
        "event": "stop",
        "stop": {"accountSid": account_sid, "callSid": call_sid},
        "streamSid": stream_sid,
    }


# --------------------------------------------------------------------------------------------- received


@dataclass
class ServerMessage:
    """One frame from the application, as Twilio reads it.

    ``parsed`` is the JSON object (None when the frame was not one), ``event`` its event,
    ``problem`` why Twilio ignores it (None when it acts on it); then ``audio`` (``media``) or
    ``mark`` (``mark``) say what to act on; ``clear`` has nothing more.
    """

    parsed: dict[str, Any] | None
    event: Any = None
    problem: str | None = None
    audio: bytes = b""
    mark: str = ""


def read_server_message(message: str | bytes, *, stream_sid: str, started: bool) -> ServerMessage:
    """Check one frame sent to Twilio on the stream ``stream_sid`` (``started``: ``start`` was sent)."""
    if isinstance(message, bytes):
        return ServerMessage(
            None, problem=f"binary frame of {len(message)} bytes (Twilio expects JSON text frames)"
        )
    try:
        parsed = json.loads(message)
    except ValueError:
        return ServerMessage(None, problem=f"bad JSON: {message[:80]!r}")
    if not isinstance(parsed, dict):
        return ServerMessage(None, problem=f"JSON is not an object: {message[:80]!r}")
    event = parsed.get("event")
    read = ServerMessage(parsed, event)
    if event not in ("media", "mark", "clear"):
        read.problem = f"unknown event {event!r}"
    elif not started:
        read.problem = f"{event} before start"
    elif parsed.get("streamSid") != stream_sid:
        read.problem = f"{event} with wrong streamSid {parsed.get('streamSid')!r}"
    elif event == "media":
        media = parsed.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            read.problem = "media without media.payload string"
        else:
            try:
                read.audio = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                read.problem = "media.payload is not valid base64"
    elif event == "mark":
        mark = parsed.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            read.problem = "mark without mark.name string"
        else:
            read.mark = name
    return read
