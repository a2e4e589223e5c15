"""ElevenLabs Agents (ConvAI) WebSocket messages, parsed and built without I/O.

From shared/specs/elevenlabs/agent.asyncapi.yaml: the client opens with
`conversation_initiation_client_data`; the server answers
`conversation_initiation_metadata` (conversation id, both audio formats); user
audio goes up as `{"user_audio_chunk": b64}` with no type field; the server pings
with an `event_id` that the pong must echo; audio of one agent response shares
an `event_id`, and after an `interruption` audio at or below its `event_id` is
stale. An `error` event may precede a close; its `error_type` explains the code.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from callbridge.agents.base import (
    AgentAudio,
    AgentClosed,
    AgentEvent,
    AgentInterrupted,
    AgentReady,
    AgentToolUsed,
    AgentTranscript,
    AgentWarning,
    ToolCallRequest,
)
from callbridge.formats import AGENT_FORMATS as KNOWN_FORMATS
from callbridge.formats import parse_format
from callbridge.wire import decode_object, describe, shorten

__all__ = ["AGENT_FORMATS", "ElevenLabsProtocol", "close_outcome"]

# The audio formats an ElevenLabs agent may name (its names are our `formats` notation).
AGENT_FORMATS = frozenset(KNOWN_FORMATS)

# Server events the spec defines that a phone bridge has no use for.
_IGNORED_TYPES = frozenset(
    {
        "tentative_user_transcript",
        "agent_chat_response_part",
        "agent_reasoning_response_part",
        "vad_score",
        "internal_turn_probability",
        "internal_tentative_agent_response",
        "context_usage",
        "asr_initiation_metadata",
        "mcp_connection_status",
        "mcp_tool_call",
        "agent_tool_request",
        "agent_tool_response_full_payload",
        "rich_content",
        "guardrail_triggered",
        "agent_typing",
        "external_agent_connected",
        "external_agent_disconnected",
    }
)


def _event_id(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("event_id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


@dataclass(frozen=True, slots=True)
class ServerError:
    code: int | None
    error_type: str | None
    message: str


def close_outcome(code: int | None, reason: str, last_error: ServerError | None) -> AgentClosed:
    """What a close of the agent socket means for the call.

    1000 is the agent ending the conversation (also `max_duration_exceeded`);
    1002 / 1008 / 1011 are failures; `None` is a connection lost with no close frame.
    """
    parts = []
    if code is None:
        parts.append("connection lost without a close frame")
    else:
        parts.append(f"close {code}")
    if reason:
        parts.append(reason)
    if last_error is not None:
        if last_error.error_type:
            parts.append(last_error.error_type)
        if last_error.message:
            parts.append(last_error.message)
    detail = ": ".join(parts)
    return AgentClosed(by_agent=code == 1000, code=code, detail=detail)


@dataclass
class ElevenLabsProtocol:
    """State of one conversation as seen by the client (the bridge)."""

    ready: AgentReady | None = None
    last_interrupt_id: int = -1
    last_error: ServerError | None = None
    stale_audio_dropped: int = 0
    end_call_seen: bool = False
    outbox: list[str] = field(default_factory=list)  # frames to send back (pongs)

    # -- sending -------------------------------------------------------------

    @staticmethod
    def initiation(
        dynamic_variables: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        source: str = "callbridge",
        version: str = "",
    ) -> str:
        msg: dict[str, Any] = {"type": "conversation_initiation_client_data"}
        if overrides:
            msg["conversation_config_override"] = dict(overrides)
        if dynamic_variables:
            msg["dynamic_variables"] = dict(dynamic_variables)
        if user_id:
            msg["user_id"] = user_id
        msg["source_info"] = {"source": source, "version": version}
        return json.dumps(msg)

    @staticmethod
    def user_audio(b64: str) -> str:
        # Base64 has no JSON-special characters, so a template is safe and saves a dumps.
        return '{"user_audio_chunk":"' + b64 + '"}'

    @staticmethod
    def tool_result(call_id: str, result: str, is_error: bool) -> str:
        return json.dumps(
            {
                "type": "client_tool_result",
                "tool_call_id": call_id,
                "result": result,
                "is_error": is_error,
            }
        )

    @staticmethod
    def user_message(text: str) -> str:
        return json.dumps({"type": "user_message", "text": text})

    @staticmethod
    def contextual_update(text: str) -> str:
        return json.dumps({"type": "contextual_update", "text": text})

    @staticmethod
    def pong(event_id: int) -> str:
        return '{"type":"pong","event_id":' + str(int(event_id)) + "}"

    # -- receiving -----------------------------------------------------------

    def receive(self, frame: str | bytes) -> AgentEvent | AgentReady | None:
        """Parse one server frame. Returns None for frames with nothing for the call."""
        msg = decode_object(frame, "the agent")
        if isinstance(msg, str):
            return AgentWarning(msg)
        kind = msg.get("type")
        try:
            handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is not None:
                event: AgentEvent | AgentReady | None = handler(self, msg)
                return event
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return AgentWarning(shorten(f"malformed {kind} event: {exc!r}", 200))
        if isinstance(kind, str) and kind in _IGNORED_TYPES:
            return None
        return AgentWarning(f"unknown agent event type {describe(kind)}")

    def _body(self, msg: dict[str, Any], key: str) -> dict[str, Any]:
        body = msg.get(key)
        if not isinstance(body, dict):
            raise ValueError(f"missing {key}")
        return body

    def _on_metadata(self, msg: dict[str, Any]) -> AgentReady | AgentWarning:
        body = self._body(msg, "conversation_initiation_metadata_event")
        conv_id = body.get("conversation_id")
        out_fmt = body.get("agent_output_audio_format")
        in_fmt = body.get("user_input_audio_format")
        if not isinstance(conv_id, str) or not conv_id:
            raise ValueError("no conversation_id")
        if out_fmt not in AGENT_FORMATS or in_fmt not in AGENT_FORMATS:
            raise ValueError(f"unsupported audio formats {describe(out_fmt)}/{describe(in_fmt)}")
        if self.ready is not None:
            return AgentWarning("second conversation_initiation_metadata ignored")
        self.ready = AgentReady(conv_id, parse_format(in_fmt), parse_format(out_fmt))
        return self.ready

    def _on_audio(self, msg: dict[str, Any]) -> AgentEvent | None:
        body = self._body(msg, "audio_event")
        b64 = body.get("audio_base_64")
        if not isinstance(b64, str):
            raise ValueError("audio_event without audio_base_64")
        event_id = _event_id(body)
        if event_id is not None and event_id <= self.last_interrupt_id:
            self.stale_audio_dropped += 1
            return None
        try:
            payload = binascii.a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError):
            return AgentWarning(f"agent audio is not valid base64 ({len(b64)} chars)")
        if not payload:
            return None
        return AgentAudio(payload, b64)

    def _on_interruption(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "interruption_event")
        event_id = _event_id(body)
        if event_id is None:
            raise ValueError("interruption without event_id")
        self.last_interrupt_id = max(self.last_interrupt_id, event_id)
        return AgentInterrupted()

    def _on_ping(self, msg: dict[str, Any]) -> None:
        body = self._body(msg, "ping_event")
        event_id = _event_id(body)
        if event_id is None:
            raise ValueError("ping without event_id")
        self.outbox.append(self.pong(event_id))
        return None

    @staticmethod
    def _text(body: dict[str, Any], key: str) -> str:
        # A transcript line goes into the call record: a null or a number is not speech.
        value = body.get(key)
        if not isinstance(value, str):
            raise ValueError(f"{key} is not a string")
        return value

    def _on_agent_response(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "agent_response_event")
        return AgentTranscript("agent", self._text(body, "agent_response"))

    def _on_correction(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "agent_response_correction_event")
        return AgentTranscript(
            "agent",
            self._text(body, "corrected_agent_response"),
            corrects=self._text(body, "original_agent_response"),
        )

    def _on_user_transcript(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "user_transcription_event")
        return AgentTranscript("user", self._text(body, "user_transcript"))

    def _on_client_tool_call(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "client_tool_call")
        call_id, name = body.get("tool_call_id"), body.get("tool_name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise ValueError("client_tool_call without tool_call_id/tool_name")
        params = body.get("parameters")
        return ToolCallRequest(call_id, name, params if isinstance(params, dict) else {})

    def _on_agent_tool_response(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "agent_tool_response")
        name = _label(body.get("tool_name", ""))
        is_error = bool(body.get("is_error", False))
        ends_call = name == "end_call" and not is_error
        if ends_call:
            self.end_call_seen = True
        return AgentToolUsed(
            name=name,
            call_id=_label(body.get("tool_call_id", "")),
            tool_type=_label(body.get("tool_type", "")),
            is_error=is_error,
            ends_call=ends_call,
        )

    def _on_error(self, msg: dict[str, Any]) -> AgentEvent:
        body = self._body(msg, "error_event")
        code = body.get("code")
        error_type = body.get("error_type")
        texts = [v for v in (body.get("reason"), body.get("message")) if isinstance(v, str) and v]
        message = texts[0] if texts else ""
        # Both end up in the call record's end detail: bounded, and only if they are text.
        self.last_error = ServerError(
            code=code if isinstance(code, int) and not isinstance(code, bool) else None,
            error_type=shorten(error_type, 60) if isinstance(error_type, str) and error_type else None,
            message=shorten(message, 200),
        )
        return AgentWarning(
            f"agent error event: code={self.last_error.code} "
            f"type={self.last_error.error_type} {self.last_error.message}".rstrip()
        )


def _label(value: Any) -> str:
    """A name or id from the agent as text: scalars as they are, containers by type only
    (`str()` of a deeply nested list from a peer raises RecursionError)."""
    return value if isinstance(value, str) else describe(value)


_HANDLERS: dict[str, Any] = {
    "audio": ElevenLabsProtocol._on_audio,
    "ping": ElevenLabsProtocol._on_ping,
    "interruption": ElevenLabsProtocol._on_interruption,
    "agent_response": ElevenLabsProtocol._on_agent_response,
    "agent_response_correction": ElevenLabsProtocol._on_correction,
    "user_transcript": ElevenLabsProtocol._on_user_transcript,
    "client_tool_call": ElevenLabsProtocol._on_client_tool_call,
    "agent_tool_response": ElevenLabsProtocol._on_agent_tool_response,
    "conversation_initiation_metadata": ElevenLabsProtocol._on_metadata,
    "error": ElevenLabsProtocol._on_error,
}
