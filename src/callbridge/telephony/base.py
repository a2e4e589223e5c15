"""The phone side of a call, as the `Call` sees it, whatever the carrier.

`TelephonyLeg` is the media stream of one call (Twilio Media Streams first;
Telnyx, Plivo, Vonage later); its `events()` stream ends with one `TelephonyClosed`.
`CallControl` is the carrier's REST control of calls (hang up, hand the call to a
`Destination`, place a call, read its status). Nothing here names a carrier: each
adapter reads its own parameters into the neutral fields of `StreamInfo`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

__all__ = [
    "CallControl",
    "CallControlError",
    "CallerAudio",
    "CallerHungUp",
    "Destination",
    "Dtmf",
    "ExpectsRequests",
    "HangupOutcome",
    "MarkPlayed",
    "PlacedCall",
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
    """Who the media stream belongs to. The first fields are what the stream said; the
    rest is what the carrier's adapter read from its own parameters, in neutral terms."""

    stream_sid: str
    call_sid: str
    account_sid: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)  # as sent (the adapter's own)
    tracks: tuple[str, ...] = ("inbound",)
    from_number: str | None = None
    to_number: str | None = None
    direction: str = "inbound"  # "inbound" | "outbound"
    agent_id: str | None = None  # a per-call choice of agent, if the call carried one
    variables: Mapping[str, str] = field(default_factory=dict)  # for the agent (dynamic variables)
    recorded_parameters: Mapping[str, str] = field(default_factory=dict)  # may be kept in records


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a live call is handed: a person (an E.164 number or a SIP URI), or the
    carrier's own call instructions for it (Twilio: TwiML) for anything else."""

    to: str | None = None
    caller_id: str | None = None
    instructions: str | None = None

    def __post_init__(self) -> None:
        if not self.to and not self.instructions:
            raise ValueError("a Destination needs a number or SIP URI (to) or instructions")

    def describe(self) -> str:
        return self.to or "the fallback instructions"


@dataclass(frozen=True, slots=True)
class PlacedCall:
    call_sid: str
    status: str


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

    async def redirect(self, call_sid: str, destination: Destination) -> None:
        """Hand the live call to `destination` (transfer, fallback). Raises `CallControlError`."""
        ...

    async def place_call(
        self,
        to: str,
        from_: str,
        stream_url: str,
        parameters: Mapping[str, str],
        status_url: str | None = None,
        machine_detection_url: str | None = None,
    ) -> PlacedCall:
        """Place an outbound call whose media stream connects to `stream_url` with
        `parameters`. Never retried (a retry could ring a person twice). With
        `machine_detection_url`, the carrier detects answering machines in the background
        and reports who answered there."""
        ...

    async def fetch_status(self, call_sid: str) -> str | None:
        """The carrier's status of the call (None: no such call). Raises `CallControlError`."""
        ...


@runtime_checkable
class ExpectsRequests(Protocol):
    """A `CallControl` that can use a warning: the core announces a request it will make
    soon (the hang-up after a goodbye that is still playing), so that the control can open
    a connection for it meanwhile. Optional: a control without it is used as before."""

    def expect_request(self, call_sid: str) -> None:
        """A request about `call_sid` is due within seconds. Must not block or raise."""
        ...
