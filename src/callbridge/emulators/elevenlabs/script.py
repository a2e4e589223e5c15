"""What the emulated agent does: the script steps (fault injection included) and :class:`AgentScript`."""

from __future__ import annotations

import http
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from callbridge.emulators.elevenlabs.audio import AUDIO_FORMATS

__all__ = [
    "AgentScript",
    "ClientToolCall",
    "Close",
    "Drop",
    "EndCall",
    "Garbage",
    "Interrupt",
    "Ping",
    "RawSend",
    "Say",
    "Sleep",
    "Stall",
    "Step",
    "UserTranscript",
    "WaitForContextualUpdate",
    "WaitForUser",
    "WaitForUserMessage",
]


@dataclass(frozen=True)
class Say:
    """One agent response: ``agent_response`` then its audio as ``audio`` events.

    ``audio`` is mu-law 8 kHz mono and is converted to the script's output format; without it
    a ``tone_hz`` tone of ``seconds`` (default 0.06 s per character of ``text``) is sent.
    """

    text: str
    audio: bytes | None = None
    seconds: float | None = None
    tone_hz: float = 440.0


@dataclass(frozen=True)
class WaitForUser:
    """Wait until the client has sent ``seconds`` of user audio since this step began.

    On ``timeout`` the script carries on (noted in ``EmulatedConversation.step_log``).
    """

    seconds: float
    timeout: float = 30.0


@dataclass(frozen=True)
class WaitForContextualUpdate:
    """Wait until the client has sent a ``contextual_update`` (background information that
    asks for no answer), one whose text contains ``contains`` if given; one that came while
    earlier steps ran counts, one an earlier wait step already saw does not.

    On ``timeout`` the script carries on (noted in ``EmulatedConversation.step_log``).
    """

    contains: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class WaitForUserMessage:
    """Wait until the client sends a ``user_message`` (text the agent takes as the user's,
    e.g. keypad digits), one whose text contains ``contains`` if given.

    On ``timeout`` the script carries on (noted in ``EmulatedConversation.step_log``).
    """

    contains: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class UserTranscript:
    """Send a final ``user_transcript``."""

    text: str


@dataclass(frozen=True)
class ClientToolCall:
    """Ask the client to run a tool; with ``wait``, block until its ``client_tool_result``."""

    tool_name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    wait: bool = True
    timeout: float = 10.0


@dataclass(frozen=True)
class Interrupt:
    """Send ``interruption`` for the last agent response, then ``stale_chunks`` more audio
    events still carrying that response's ``event_id`` (a correct client drops them).

    With ``correction``, an ``agent_response_correction`` follows, as the real server sends
    when the spoken part of a response was cut short.
    """

    stale_chunks: int = 2
    correction: str | None = None


@dataclass(frozen=True)
class EndCall:
    """The agent's ``end_call`` system tool: a goodbye (like :class:`Say`), then
    ``agent_tool_response`` for ``end_call``, then after ``close_delay`` a 1000 close."""

    text: str = "Goodbye!"
    audio: bytes | None = None
    seconds: float | None = None
    close_delay: float = 0.2
    tone_hz: float = 440.0
    reason: str = "Agent ended the conversation"
    tool_request: bool = False  # also send agent_tool_request first (off by default client_events)


@dataclass(frozen=True)
class Close:
    """Close with ``code``; with ``error`` (a possibly empty dict of ``error_event`` fields),
    an ``error`` event goes first, its missing fields filled per the contract."""

    code: int
    reason: str = ""
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Drop:
    """Abort the TCP connection: no close frame."""


@dataclass(frozen=True)
class Stall:
    """Go silent for good: no more steps, no pings, no answers, until the client leaves.

    WebSocket control frames (protocol-level pings, the closing handshake) are still answered
    by the WebSocket library, as a hung application behind a healthy socket would.
    """


@dataclass(frozen=True)
class Garbage:
    """Send a malformed frame: text for ``str``, binary for ``bytes``."""

    data: str | bytes = "{not json"


@dataclass(frozen=True)
class RawSend:
    """Send exactly this (a dict is JSON-encoded)."""

    message: Mapping[str, Any] | str


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Ping:
    """Send one ``ping`` now, with a fresh ``event_id``."""


Step: TypeAlias = (
    Say
    | WaitForUser
    | WaitForUserMessage
    | WaitForContextualUpdate
    | UserTranscript
    | ClientToolCall
    | Interrupt
    | EndCall
    | Close
    | Drop
    | Stall
    | Garbage
    | RawSend
    | Sleep
    | Ping
)


@dataclass(frozen=True)
class AgentScript:
    """What the emulated agent does on one connection, and how its server behaves."""

    steps: Sequence[Step] = ()
    output_format: str = "ulaw_8000"
    input_format: str = "ulaw_8000"
    ping_interval: float | None = None
    chunk_ms: int = 250
    realtime_factor: float = 4.0
    metadata_delay: float = 0.0
    send_metadata: bool = True
    reject_with_status: int | None = None
    #: Invalid JSON (or a binary / non-object frame) from the client gets an ``error`` event
    #: with error_type ``invalid_message`` and a 1008 close, as the contract documents.
    strict: bool = True
    #: Longest wait for the client's first message before announcing the conversation.
    client_data_timeout: float = 2.0
    #: Only these server event types are sent (``error`` always is), like the agent's
    #: ``client_events`` setting; None sends every event the script produces.
    client_events: frozenset[str] | None = None
    #: Fixed conversation id instead of a random ``conv_...`` one.
    conversation_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("output_format", "input_format"):
            value = getattr(self, name)
            if value not in AUDIO_FORMATS:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(AUDIO_FORMATS)}")
        if self.chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        if not self.realtime_factor > 0:
            raise ValueError("realtime_factor must be positive (float('inf') for no pacing)")
        if self.ping_interval is not None and self.ping_interval <= 0:
            raise ValueError("ping_interval must be positive or None")
        if self.reject_with_status is not None:
            http.HTTPStatus(self.reject_with_status)  # ValueError for a made-up status
