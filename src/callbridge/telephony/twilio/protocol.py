"""Twilio Media Streams messages, parsed and built without any I/O.

Facts from Twilio's Media Streams message reference (shared/specs/twilio/):
`connected` comes first, then one `start`, then `media` / `dtmf` / `mark`
until `stop`. Numeric fields (`sequenceNumber`, `chunk`, `timestamp`) arrive as
JSON strings. Audio is base64 mu-law 8 kHz mono. A bidirectional stream accepts
`media`, `mark` and `clear` from us.

`TwilioStreamProtocol` holds the per-stream state (has `start` arrived, which
streamSid, which marks are outstanding) so that the transport adapter only moves
text frames. Nothing here raises on bad input: a frame that cannot be used
becomes a `TelephonyWarning` event carrying a readable reason.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from callbridge.telephony.base import (
    CallerAudio,
    CallerHungUp,
    Dtmf,
    MarkPlayed,
    StreamInfo,
    TelephonyWarning,
)
from callbridge.wire import decode_object, describe

__all__ = ["Connected", "TwilioEvent", "TwilioStreamProtocol"]

# Twilio SIDs are two letters and 32 hex digits; we accept any alnum so that a
# future format does not break calls, but nothing that could break our JSON templates.
# (fullmatch: `$` would let a trailing newline through, and into our JSON templates.)
_SID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The keys a DTMF event can name (`dtmf.digit`: "the number-key tone detected").
_KEYPAD = frozenset("0123456789*#ABCD")


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


TwilioEvent = Connected | StreamInfo | CallerAudio | MarkPlayed | Dtmf | CallerHungUp | TelephonyWarning


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


@dataclass
class TwilioStreamProtocol:
    """State of one Media Stream as seen by the bridge (the WebSocket server side)."""

    stream_sid: str | None = None
    call_sid: str | None = None
    account_sid: str | None = None
    stopped: bool = False
    _mark_seq: int = 0
    _pending_marks: dict[str, int] = field(default_factory=dict)
    _media_prefix: str = ""
    _mark_prefix: str = ""

    # -- receiving -----------------------------------------------------------

    def receive(self, frame: str | bytes) -> TwilioEvent | None:
        """Parse one frame from Twilio; returns None for a frame to skip silently."""
        msg = decode_object(frame, "Twilio")
        if isinstance(msg, str):
            return TelephonyWarning(msg)
        event = msg.get("event")
        if event == "media":
            return self._on_media(msg)
        if event == "mark":
            return self._on_mark(msg)
        if event == "start":
            return self._on_start(msg)
        if event == "connected":
            return Connected(str(msg.get("protocol", "")), str(msg.get("version", "")))
        if event == "stop":
            return self._on_stop(msg)
        if event == "dtmf":
            return self._on_dtmf(msg)
        return TelephonyWarning(f"unknown event {describe(event)}")

    def caller_audio(self, frame: str) -> CallerAudio | None:
        """The caller audio of `frame` if it is a valid `media` message, else None (for
        `receive` to read). No side effect: a frame refused here can be received after."""
        msg = decode_object(frame, "Twilio")
        if type(msg) is not dict or msg.get("event") != "media":
            return None
        event = self._on_media(msg)
        return event if type(event) is CallerAudio else None

    def _on_start(self, msg: dict[str, Any]) -> TwilioEvent:
        if self.stream_sid is not None:
            return TelephonyWarning("duplicate start ignored")
        start = msg.get("start")
        if not isinstance(start, dict):
            return TelephonyWarning("start without a start object", fatal=True)
        stream_sid = start.get("streamSid") or msg.get("streamSid")
        call_sid = start.get("callSid")
        account_sid = start.get("accountSid")
        for label, value in (("streamSid", stream_sid), ("callSid", call_sid), ("accountSid", account_sid)):
            if not isinstance(value, str) or not _SID_RE.fullmatch(value):
                return TelephonyWarning(f"start with missing or invalid {label}", fatal=True)
        assert isinstance(stream_sid, str) and isinstance(call_sid, str) and isinstance(account_sid, str)
        media_format = start.get("mediaFormat") if isinstance(start.get("mediaFormat"), dict) else {}
        assert isinstance(media_format, dict)
        encoding = str(media_format.get("encoding", "audio/x-mulaw"))
        sample_rate = _as_int(media_format.get("sampleRate")) or 8000
        channels = _as_int(media_format.get("channels")) or 1
        if encoding != "audio/x-mulaw" or sample_rate != 8000 or channels != 1:
            return TelephonyWarning(
                f"unsupported media format {encoding}/{sample_rate}/{channels}", fatal=True
            )
        raw_params = start.get("customParameters")
        params = {str(k): str(v) for k, v in raw_params.items()} if isinstance(raw_params, dict) else {}
        raw_tracks = start.get("tracks")
        tracks = tuple(str(t) for t in raw_tracks) if isinstance(raw_tracks, list) else ("inbound",)
        self.stream_sid, self.call_sid, self.account_sid = stream_sid, call_sid, account_sid
        # Outgoing frames are built from templates: the SID was validated above, and
        # base64 and our mark names contain no JSON-special characters.
        self._media_prefix = '{"event":"media","streamSid":"' + stream_sid + '","media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":"' + stream_sid + '","mark":{"name":"'
        return StreamInfo(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=account_sid,
            custom_parameters=params,
            tracks=tracks,
        )

    def _on_media(self, msg: dict[str, Any]) -> TwilioEvent:
        if self.stream_sid is None:
            return TelephonyWarning("media before start")
        media = msg.get("media")
        if not isinstance(media, dict):
            return TelephonyWarning("media without a media object")
        track = media.get("track")
        if track is not None and track != "inbound":
            return TelephonyWarning(f"media on unexpected track {describe(track)}")
        b64 = media.get("payload")
        if not isinstance(b64, str):
            return TelephonyWarning("media without a payload string")
        try:
            payload = binascii.a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError):
            return TelephonyWarning(f"media payload is not valid base64 ({len(b64)} chars)")
        return CallerAudio(payload, b64, _as_int(media.get("chunk")), _as_int(media.get("timestamp")))

    def _on_mark(self, msg: dict[str, Any]) -> TwilioEvent:
        mark = msg.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            return TelephonyWarning("mark without a name")
        known = self._pending_marks.pop(name, None) is not None
        return MarkPlayed(name, known)

    def _on_dtmf(self, msg: dict[str, Any]) -> TwilioEvent:
        dtmf = msg.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or not digit:
            return TelephonyWarning("dtmf without a digit")
        if len(digit) != 1 or digit.upper() not in _KEYPAD:
            return TelephonyWarning(f"dtmf digit is not a phone key: {describe(digit, 20)}")
        return Dtmf(digit)

    def _on_stop(self, msg: dict[str, Any]) -> TwilioEvent:
        self.stopped = True
        stop = msg.get("stop")
        call_sid = stop.get("callSid") if isinstance(stop, dict) else None
        valid = isinstance(call_sid, str) and _SID_RE.fullmatch(call_sid)
        return CallerHungUp(f"stop for {call_sid}" if valid else "stop")

    # -- sending -------------------------------------------------------------

    def media(self, b64_payload: str) -> str:
        """A `media` frame for Twilio; the payload must already be base64 mu-law 8 kHz."""
        if self.stream_sid is None:
            raise RuntimeError("cannot send media before start")
        return self._media_prefix + b64_payload + '"}}'

    def mark(self) -> tuple[str, str]:
        """A new `mark` frame and its name; the name is remembered until Twilio echoes it."""
        if self.stream_sid is None:
            raise RuntimeError("cannot send a mark before start")
        self._mark_seq += 1
        name = f"cb{self._mark_seq}"
        self._pending_marks[name] = self._mark_seq
        return self._mark_prefix + name + '"}}', name

    def clear(self) -> str:
        if self.stream_sid is None:
            raise RuntimeError("cannot send clear before start")
        return json.dumps({"event": "clear", "streamSid": self.stream_sid})

    @property
    def pending_marks(self) -> int:
        """Marks sent whose audio Twilio has not yet reported played (or cleared)."""
        return len(self._pending_marks)

    @property
    def last_mark_sent(self) -> str | None:
        return f"cb{self._mark_seq}" if self._mark_seq else None
