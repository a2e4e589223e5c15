"""The phone side of a call, as the `Call` sees it, whatever the carrier.

`TelephonyLeg` is the media stream of one call (Twilio Media Streams first;
Telnyx, Plivo, Vonage later). `CallControl` is the carrier's REST control of
calls (hang up, redirect). Its `events()` stream ends with one `TelephonyClosed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

__all__ = [
    "CallControl",
    "CallControlError",
    "CallerAudio",
    "CallerHungUp",
    "Dtmf",
    "HangupOutcome",
    "MarkPlayed",
    "StreamInfo",
    "TelephonyClosed",
    "TelephonyError",
    "TelephonyEvent",
    "TelephonyLeg",
    "TelephonyWarning",
]


class TelephonyError(Exception):
    """The media stream cannot be bridged (no start, bad start, closed early)."""


class CallControlError(Exception):
    """A call-control request failed for good (after its retries)."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str] = field(default_factory=dict)
    tracks: tuple[str, ...] = ("inbound",)


@dataclass(frozen=True, slots=True)
class CallerAudio:
    """One frame of caller audio, mu-law 8 kHz; `b64` kept so passthrough never re-encodes."""

    payload: bytes
    b64: str
    chunk: int | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """The audio sent before this mark has played (or was cleared)."""

    name: str
    known: bool  # False: a mark we never sent (logged, otherwise ignored)


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class CallerHungUp:
    """The carrier says the stream is over (Twilio `stop`): the call has ended."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class TelephonyWarning:
    reason: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class TelephonyClosed:
    code: int | None  # None: connection lost with no close frame
    by_bridge: bool
    reason: str = ""


TelephonyEvent = CallerAudio | MarkPlayed | Dtmf | CallerHungUp | TelephonyWarning | TelephonyClosed


class TelephonyLeg(Protocol):
    """The media stream of one phone call."""

    async def start(self) -> StreamInfo:
        """Read until the stream's metadata; raises `TelephonyError`."""
        ...

    def events(self) -> AsyncIterator[TelephonyEvent]:
        """Events after start; the last one is always a `TelephonyClosed`."""
        ...

    async def send_audio(self, ulaw: bytes, b64: str | None = None) -> None:
        """Play mu-law 8 kHz audio to the caller, followed by a mark."""
        ...

    async def clear(self) -> None:
        """Drop audio queued for the caller (barge-in)."""
        ...

    async def close(self) -> None:
        """Close the stream if still open; idempotent, bounded in time."""
        ...

    @property
    def pending_marks(self) -> int:
        """Marks sent whose audio has not yet been reported played."""
        ...

    @property
    def is_open(self) -> bool: ...


class HangupOutcome(StrEnum):
    COMPLETED = "completed"  # our request ended the call
    ALREADY_ENDED = "already_ended"  # the carrier says it was over already


class CallControl(Protocol):
    """The carrier's REST control of live calls."""

    async def hangup(self, call_sid: str) -> HangupOutcome:
        """End the call; idempotent. Raises `CallControlError` after bounded retries."""
        ...

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace the call's TwiML (transfer, fallback). Raises `CallControlError`."""
        ...

    async def fetch_status(self, call_sid: str) -> str | None:
        """The carrier's status of the call (None: no such call). Raises `CallControlError`."""
        ...
