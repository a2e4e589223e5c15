"""The agent side of a call, as the `Call` sees it, whatever the vendor.

A backend (ElevenLabs first; OpenAI Realtime and others later) implements
`AgentSession`. Its `events()` stream ends with exactly one `AgentClosed`, however
the connection ended: closing is an event, never an exception that escapes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from callbridge.formats import AudioFormat

__all__ = [
    "AgentAudio",
    "AgentCallContext",
    "AgentClosed",
    "AgentEvent",
    "AgentInterrupted",
    "AgentReady",
    "AgentSession",
    "AgentToolUsed",
    "AgentTranscript",
    "AgentUnreachable",
    "AgentWarning",
    "ToolCallRequest",
]


class AgentUnreachable(Exception):
    """The agent could not be connected (refused, bad credentials, no metadata)."""


@dataclass(frozen=True, slots=True)
class AgentCallContext:
    """What the agent is told about the call when the session starts."""

    call_sid: str
    stream_sid: str
    from_number: str | None = None
    to_number: str | None = None
    direction: str = "inbound"
    dynamic_variables: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    agent_id: str | None = None  # a per-call choice of agent; None: the session's default


@dataclass(frozen=True, slots=True)
class AgentReady:
    conversation_id: str
    input_format: AudioFormat  # what the agent wants from the caller (parsed by the vendor's protocol)
    output_format: AudioFormat  # what the agent sends


@dataclass(frozen=True, slots=True)
class AgentAudio:
    """Agent speech in the session's output format; `b64` kept for passthrough."""

    payload: bytes
    b64: str


@dataclass(frozen=True, slots=True)
class AgentInterrupted:
    """The caller barged in: audio already sent to the caller must be cleared."""


@dataclass(frozen=True, slots=True)
class AgentTranscript:
    role: Literal["agent", "user"]
    text: str
    corrects: str | None = None  # for a correction: the text it replaces


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    call_id: str
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AgentToolUsed:
    """A tool the agent ran on its own side (system, webhook); `ends_call` for end_call."""

    name: str
    call_id: str
    tool_type: str
    is_error: bool
    ends_call: bool


@dataclass(frozen=True, slots=True)
class AgentWarning:
    """Input from the agent we could not use; logged, the call goes on."""

    reason: str


@dataclass(frozen=True, slots=True)
class AgentClosed:
    """The session is over. `by_agent`: the agent ended the conversation normally."""

    by_agent: bool
    code: int | None
    detail: str


AgentEvent = (
    AgentAudio
    | AgentInterrupted
    | AgentTranscript
    | ToolCallRequest
    | AgentToolUsed
    | AgentWarning
    | AgentClosed
)


class AgentSession(Protocol):
    """One conversation with a voice agent."""

    async def connect(self, context: AgentCallContext) -> AgentReady:
        """Open the session; raises `AgentUnreachable`. Cancellable: leaves nothing open."""
        ...

    def events(self) -> AsyncIterator[AgentEvent]:
        """The agent's events; the last one is always an `AgentClosed`."""
        ...

    async def send_audio(self, payload: bytes, b64: str | None = None) -> None:
        """Caller audio in the agent's input format; silently dropped once closed."""
        ...

    async def send_tool_result(self, call_id: str, result: str, is_error: bool) -> None: ...

    async def send_user_message(self, text: str) -> None:
        """Text from the caller's side that the agent answers as if spoken (keypad digits);
        silently dropped once closed."""
        ...

    async def send_contextual_update(self, text: str) -> None:
        """Background information for the agent that asks for no answer (e.g. what happened
        on the call); silently dropped once closed."""
        ...

    async def close(self, code: int = 1000) -> None:
        """Close (normally: 1000) if still open; idempotent, bounded in time."""
        ...

    @property
    def is_open(self) -> bool: ...

    @property
    def last_received(self) -> float:
        """Event-loop time of the last frame from the agent (pings included)."""
        ...

    def stats(self) -> Mapping[str, int]:
        """The session's own counters, kept in the call's metrics (e.g. stale audio dropped)."""
        ...
