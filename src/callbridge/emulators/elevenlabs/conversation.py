"""What crossed one accepted connection: :class:`EmulatedConversation`, for assertions."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from callbridge.emulators.elevenlabs.audio import bytes_per_second
from callbridge.emulators.elevenlabs.script import AgentScript

__all__ = ["ClosedBy", "EmulatedConversation", "Sent"]

ClosedBy: TypeAlias = Literal["client", "server", "drop"]
Sent: TypeAlias = dict[str, Any] | str | bytes


@dataclass
class EmulatedConversation:
    """Everything one accepted connection saw. Times are :func:`time.monotonic` values."""

    index: int
    agent_id: str
    conversation_id: str
    query: dict[str, str]
    request_headers: dict[str, str]
    script: AgentScript
    started_at: float = field(default_factory=time.monotonic)
    client_data: dict[str, Any] | None = None
    #: Every parsed client message in order; user audio is stored compactly as
    #: ``{"user_audio_chunk": <decoded byte count>}``.
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    user_audio: bytearray = field(default_factory=bytearray)
    pongs: list[int] = field(default_factory=list)
    pings_sent: list[int] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    sent: list[tuple[float, Sent]] = field(default_factory=list)
    #: Client-side protocol problems (bad JSON, unknown types, schema violations, ...).
    invalid: list[str] = field(default_factory=list)
    #: What the script did, including steps that timed out.
    step_log: list[tuple[float, str]] = field(default_factory=list)
    #: Failures of the emulator itself (should stay empty).
    errors: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    script_done: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    close_reason: str | None = None
    closed_by: ClosedBy | None = None
    ended_at: float | None = None

    def sent_messages(self, type_: str | None = None) -> list[dict[str, Any]]:
        """JSON messages the server sent, optionally only those of one ``type``."""
        return [m for _, m in self.sent if isinstance(m, dict) and (type_ is None or m.get("type") == type_)]

    def received_messages(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Parsed client messages, optionally only those of one ``type``."""
        return [m for _, m in self.received if type_ is None or m.get("type") == type_]

    def user_messages(self) -> list[str]:
        """The texts of the ``user_message`` frames the client sent, in order."""
        return [str(m.get("text")) for m in self.received_messages("user_message")]

    def contextual_updates(self) -> list[str]:
        """The texts of the ``contextual_update`` frames the client sent, in order."""
        return [str(m.get("text")) for m in self.received_messages("contextual_update")]

    def agent_audio(self, min_event_id: int = 0) -> bytes:
        """The agent audio sent, concatenated, from events with ``event_id >= min_event_id``."""
        out = bytearray()
        for m in self.sent_messages("audio"):
            event = m["audio_event"]
            if event["event_id"] >= min_event_id:
                out += base64.b64decode(event["audio_base_64"])
        return bytes(out)

    @property
    def user_audio_seconds(self) -> float:
        return len(self.user_audio) / bytes_per_second(self.script.input_format)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
