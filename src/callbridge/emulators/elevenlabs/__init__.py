"""A local stand-in for the ElevenLabs Agents ("ConvAI") WebSocket server.

Built from the AsyncAPI contract (``agent.asyncapi.yaml``), the public AsyncAPI docs and the
``get-signed-url`` OpenAPI operation, *not* from our bridge's code: nothing here imports from
``callbridge`` outside ``callbridge.emulators``, so a misunderstanding of the protocol in the
bridge cannot be mirrored (and thereby hidden) by the emulator.

A test describes what the agent does as an :class:`AgentScript` (a list of steps such as
:class:`Say`, :class:`WaitForUser`, :class:`ClientToolCall`, :class:`Interrupt`,
:class:`EndCall`, or failure modes like :class:`Drop` and :class:`Stall`), serves it with
:class:`AgentEmulator` on a loopback port, and afterwards asserts on the
:class:`EmulatedConversation` records of what crossed each socket.

Deliberate choices where the contract is silent:

* Every agent turn (``Say``, ``EndCall``, ``UserTranscript``, ``ClientToolCall``) takes the
  next value of one per-connection ``event_id`` counter; all audio of one response shares
  its ``event_id``. Server pings count on a separate counter.
* The server waits (up to ``AgentScript.client_data_timeout``) for the client's first message
  before announcing ``conversation_initiation_metadata``, because the real server applies the
  ``conversation_initiation_client_data`` overrides to the session it announces.
* ``{{name}}`` placeholders in spoken text are filled from the client's
  ``dynamic_variables`` (plus ``system__agent_id`` / ``system__conversation_id``), as the
  real agent does with its prompt and first message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import numpy as np
import numpy.typing as npt
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

__all__ = [
    "AUDIO_FORMATS",
    "AgentEmulator",
    "AgentScript",
    "ClientToolCall",
    "Close",
    "Drop",
    "EmulatedConversation",
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
    "WaitForUser",
    "mulaw_decode",
    "mulaw_encode",
    "resample_linear",
]

logger = logging.getLogger(__name__)

CONVERSATION_PATH: Final = "/v1/convai/conversation"
SIGNED_URL_PATH: Final = "/v1/convai/conversation/get-signed-url"

#: ``AudioFormat`` / ``UserInputAudioFormat`` of the contract.
AUDIO_FORMATS: Final = (
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_44100",
    "pcm_48000",
    "ulaw_8000",
)

#: ``error_type`` the contract documents for each close code (see ``ErrorType``).
DEFAULT_ERROR_TYPES: Final[Mapping[int, str]] = {
    1000: "max_duration_exceeded",
    1002: "llm_error",
    1008: "invalid_message",
    1011: "unknown_websocket_crash",
}
_DEFAULT_ERROR_MESSAGES: Final[Mapping[int, str]] = {
    1000: "Conversation exceeded the maximum duration",
    1002: "The language model failed to respond",
    1008: "Invalid message received",
    1011: "Unexpected error in websocket endpoint",
}

_TONE_AMPLITUDE: Final = 0.3 * 32767  # about -10 dBFS: plainly audible, far from clipping
_FADE_S: Final = 0.005  # ramps so tone edges do not click
_SECONDS_PER_CHAR: Final = 0.06


# --------------------------------------------------------------------------------------------
# Script steps
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# What crossed the socket
# --------------------------------------------------------------------------------------------

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
        await asyncio.wait_for(self.closed.wait(), timeout)


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def sample_rate(fmt: str) -> int:
    return int(fmt.split("_", 1)[1])


def bytes_per_second(fmt: str) -> int:
    return sample_rate(fmt) * (1 if fmt.startswith("ulaw") else 2)


def _mulaw_table() -> npt.NDArray[np.int16]:
    # G.711: the code is stored inverted; 4 mantissa bits, 3 exponent bits, a 0x84 bias.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


_MULAW_TO_PCM: Final = _mulaw_table()


def mulaw_decode(data: bytes) -> npt.NDArray[np.int16]:
    """G.711 mu-law bytes to 16-bit linear samples."""
    return _MULAW_TO_PCM[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(samples: npt.NDArray[Any]) -> bytes:
    """16-bit linear samples to G.711 mu-law bytes."""
    x = np.asarray(samples, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    biased = np.minimum(np.abs(x), 32635) + 0x84
    # Position of the highest set bit above bit 7 gives the segment (exponent).
    exponent = np.clip(np.floor(np.log2(biased)).astype(np.int32) - 7, 0, 7)
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return bytes((~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes())


def resample_linear(samples: npt.NDArray[Any], src_rate: int, dst_rate: int) -> npt.NDArray[np.float64]:
    """Resample by linear interpolation; good enough for test speech, and keeps durations exact."""
    x = np.asarray(samples, dtype=np.float64)
    if src_rate == dst_rate or x.size == 0:
        return x
    n_out = round(x.size * dst_rate / src_rate)
    positions = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    return np.interp(positions, np.arange(x.size, dtype=np.float64), x)


def _pcm16_bytes(samples: npt.NDArray[Any]) -> bytes:
    clipped = np.clip(np.rint(samples), -32768, 32767)
    return bytes(clipped.astype("<i2").tobytes())


def convert_mulaw8k(audio: bytes, fmt: str) -> bytes:
    """Mu-law 8 kHz audio in the output format ``fmt``."""
    if fmt == "ulaw_8000":
        return audio
    return _pcm16_bytes(resample_linear(mulaw_decode(audio), 8000, sample_rate(fmt)))


def synth_tone(seconds: float, fmt: str, tone_hz: float = 440.0) -> bytes:
    """A sine tone of ``seconds`` in format ``fmt``, with short fades at both ends."""
    rate = sample_rate(fmt)
    n = max(0, round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    wave = _TONE_AMPLITUDE * np.sin(2 * np.pi * tone_hz * t)
    fade = min(n // 2, round(_FADE_S * rate))
    if fade:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
        wave[:fade] *= ramp
        wave[n - fade :] *= ramp[::-1]
    if fmt == "ulaw_8000":
        return mulaw_encode(np.rint(wave))
    return _pcm16_bytes(wave)


def _chunks(audio: bytes, fmt: str, chunk_ms: int) -> Iterator[bytes]:
    width = 1 if fmt.startswith("ulaw") else 2
    size = max(1, sample_rate(fmt) * chunk_ms // 1000) * width
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


# --------------------------------------------------------------------------------------------
# Client message validation (schemas transcribed from agent.asyncapi.yaml)
# --------------------------------------------------------------------------------------------

Schema: TypeAlias = dict[str, Any]

_LANGUAGES: Final = (
    "en ja zh de hi fr ko pt pt-br it es id nl tr pl sv bg ro ar cs el fi ms da ta uk ru hu hr sk "
    "no vi tl af hy as az be bn bs ca et gl ka gu ha he is ga jv kn kk ky lv lt lb mk ml mr ne ps "
    "fa pa sr sd sl so sw te th ur cy"
).split()

#: ``ClientEvent``: event types a client may ask the server for.
SERVER_EVENT_TYPES: Final = frozenset(
    (
        "audio agent_response agent_response_correction agent_chat_response_part "
        "agent_reasoning_response_part interruption user_transcript tentative_user_transcript "
        "conversation_initiation_metadata client_tool_call rich_content agent_tool_request "
        "agent_tool_response agent_tool_response_full_payload mcp_tool_call mcp_connection_status "
        "vad_score ping context_usage asr_initiation_metadata guardrail_triggered "
        "internal_turn_probability internal_tentative_agent_response agent_typing "
        "external_agent_connected external_agent_disconnected"
    ).split()
)

_STR: Final[Schema] = {"type": "string"}
_NULLABLE_STR: Final[Schema] = {"type": "string", "nullable": True}
_OBJECT: Final[Schema] = {"type": "object"}


def _typed(type_: str, required: Sequence[str] = (), **properties: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["type", *required],
        "properties": {"type": {"const": type_}, **properties},
    }


_USER_MESSAGE: Final = _typed("user_message", text=_NULLABLE_STR, rich_content_id=_STR)

_CONFIG_OVERRIDE: Final[Schema] = {
    "type": "object",
    "properties": {
        "agent": {
            "type": "object",
            "properties": {
                "first_message": _NULLABLE_STR,
                "language": {"type": "string", "enum": _LANGUAGES, "nullable": True},
                "prompt": {
                    "type": "object",
                    "nullable": True,
                    "properties": {"prompt": _NULLABLE_STR, "llm": _NULLABLE_STR},
                },
                "native_mcp_server_ids": {
                    "type": "array",
                    "nullable": True,
                    "maxItems": 10,
                    "items": _STR,
                },
            },
        },
        "asr": {
            "type": "object",
            "properties": {"keywords": {"type": "array", "nullable": True, "items": _STR}},
        },
        "tts": {
            "type": "object",
            "properties": {
                "voice_id": _NULLABLE_STR,
                "stability": {"type": "number", "nullable": True, "minimum": 0, "maximum": 1},
                "speed": {"type": "number", "nullable": True, "minimum": 0.7, "maximum": 5},
                "similarity_boost": {"type": "number", "nullable": True, "minimum": 0, "maximum": 1},
            },
        },
        "conversation": {
            "type": "object",
            "properties": {
                "text_only": {"type": "boolean", "nullable": True},
                "client_events": {
                    "type": "array",
                    "nullable": True,
                    "minItems": 1,
                    "items": {"type": "string", "enum": sorted(SERVER_EVENT_TYPES)},
                },
            },
        },
    },
}

CLIENT_SCHEMAS: Final[Mapping[str, Schema]] = {
    "pong": _typed("pong", ["event_id"], event_id={"type": "integer"}),
    "user_message": _USER_MESSAGE,
    "user_activity": _typed("user_activity"),
    "feedback": _typed(
        "feedback",
        ["event_id", "score"],
        event_id={"type": "integer"},
        score={"type": "string", "enum": ["like", "dislike"], "nullable": True},
    ),
    "client_tool_result": _typed(
        "client_tool_result",
        ["tool_call_id", "result", "is_error"],
        tool_call_id=_STR,
        result=_STR,
        is_error={"type": "boolean"},
    ),
    "mcp_tool_approval_result": _typed(
        "mcp_tool_approval_result",
        ["tool_call_id", "is_approved"],
        tool_call_id=_STR,
        is_approved={"type": "boolean"},
    ),
    "contextual_update": _typed("contextual_update", ["text"], text=_STR, context_id=_STR),
    "conversation_initiation_client_data": _typed(
        "conversation_initiation_client_data",
        conversation_config_override=_CONFIG_OVERRIDE,
        custom_llm_extra_body=_OBJECT,
        # The public docs narrow the values: strings, numbers or booleans.
        dynamic_variables={
            "type": "object",
            "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
        },
        user_id=_NULLABLE_STR,
        source_info={"type": "object", "properties": {"source": _NULLABLE_STR, "version": _NULLABLE_STR}},
        tool_mock_config={
            "type": "object",
            "properties": {
                "mocking_strategy": {"type": "string", "enum": ["none", "all", "selected"]},
                "mocked_tool_names": {"type": "array", "items": _STR},
                "fallback_strategy": {"type": "string", "enum": ["raise_error", "call_real_tool"]},
            },
        },
    ),
    "multimodal_message": _typed(
        "multimodal_message",
        text={**_USER_MESSAGE, "nullable": True},
        file={
            "type": "object",
            "nullable": True,
            "required": ["type", "file_id"],
            "properties": {"type": {"const": "file_input"}, "file_id": _STR},
        },
    ),
}

_JSON_TYPES: Final[Mapping[str, Callable[[Any], bool]]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_problems(value: Any, schema: Schema, path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON-Schema subset the contract uses)."""
    if value is None and schema.get("nullable"):
        return []
    if "anyOf" in schema:
        if any(not schema_problems(value, s, path) for s in schema["anyOf"]):
            return []
        return [f"{path}: {_short(value)} matches none of the allowed shapes"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: expected {schema['const']!r}, got {_short(value)}"]
    type_ = schema.get("type")
    if type_ is not None and not _JSON_TYPES[type_](value):
        return [f"{path}: expected {type_}, got {_short(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {_short(value)} is not an allowed value"]
    problems: list[str] = []
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                problems.append(f"{path}: missing required field {name!r}")
        extra: Schema | None = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                problems += schema_problems(item, properties[name], f"{path}.{name}")
            elif extra is not None:
                problems += schema_problems(item, extra, f"{path}.{name}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += schema_problems(item, schema["items"], f"{path}[{i}]")
    return problems


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------------------------


class _Session:
    """Runs one script on one accepted connection and records the traffic."""

    def __init__(self, ws: ServerConnection, conv: EmulatedConversation) -> None:
        self.ws = ws
        self.conv = conv
        self.script = conv.script
        self._frames = 0
        self._event_id = 0
        self._ping_id = 0
        self._last_response_id = 0
        self._last_response_text = ""
        self._pending_pings: dict[int, float] = {}
        self._last_rtt_ms: int | None = None
        self._tool_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._activity = asyncio.Event()
        self._stalled = False
        self._closing_by: ClosedBy | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"el-emu-read-{self.conv.index}"),
            asyncio.create_task(self._guard(self._run_script()), name=f"el-emu-script-{self.conv.index}"),
        ]
        try:
            await self.ws.wait_closed()
        finally:
            # The socket is gone: every task of this connection ends with it.
            while self._tasks:
                tasks, self._tasks = self._tasks, []
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for waiter in self._tool_waiters.values():
                waiter.cancel()
            self._record_close()

    def _record_close(self) -> None:
        conv = self.conv
        protocol = self.ws.protocol
        conv.ended_at = time.monotonic()
        sent, rcvd = protocol.close_sent, protocol.close_rcvd
        if self._closing_by == "drop":
            conv.closed_by, conv.close_code, conv.close_reason = "drop", 1006, ""
        elif sent is not None and (rcvd is None or protocol.close_rcvd_then_sent is False):
            # Server-initiated: our own close steps, or the emulator shutting down (1001).
            conv.closed_by, conv.close_code, conv.close_reason = "server", sent.code, sent.reason
        elif rcvd is not None:
            conv.closed_by, conv.close_code, conv.close_reason = "client", rcvd.code, rcvd.reason
        else:
            # No close frame from the peer: it vanished (aborted TCP, crashed process).
            conv.closed_by, conv.close_code, conv.close_reason = "client", 1006, ""
        conv.closed.set()

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug in the emulator must show up in tests, not vanish
            logger.exception("ElevenLabs emulator failed on conversation %s", self.conv.conversation_id)
            self.conv.errors.append(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(ConnectionClosed):
                await self._close(1011, "Emulator error")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(self._guard(coro), name=f"el-emu-{name}-{self.conv.index}"))

    # ---- sending -------------------------------------------------------------------------

    async def _send(self, message: Sent) -> bool:
        """Send and record one frame; False when stalled, closing or filtered out."""
        if self._stalled or self.ws.state is not State.OPEN:
            return False
        if isinstance(message, dict):
            type_ = message.get("type")
            allowed = self.script.client_events
            if allowed is not None and type_ != "error" and type_ not in allowed:
                return False
            payload: str | bytes = json.dumps(message)
        else:
            payload = message
        now = time.monotonic()
        await self.ws.send(payload)
        self.conv.sent.append((now, message))
        return True

    async def _close(self, code: int, reason: str) -> None:
        if self._closing_by is None:
            self._closing_by = "server"
        await self.ws.close(code, _truncate_reason(reason))

    def _next_event_id(self) -> int:
        self._event_id += 1
        return self._event_id

    async def _send_ping(self) -> None:
        self._ping_id += 1
        event_id = self._ping_id
        sent_at = time.monotonic()
        # Registered before sending: a fast client may answer before send() returns.
        self._pending_pings[event_id] = sent_at
        ping = {"type": "ping", "ping_event": {"event_id": event_id, "ping_ms": self._last_rtt_ms}}
        if await self._send(ping):
            self.conv.pings_sent.append(event_id)
        else:
            del self._pending_pings[event_id]

    async def _ping_loop(self, interval: float) -> None:
        while not self._stalled:
            await asyncio.sleep(interval)
            if self._stalled:
                return
            await self._send_ping()

    # ---- the script ----------------------------------------------------------------------

    async def _run_script(self) -> None:
        script = self.script
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._activity.wait(), script.client_data_timeout)
        if script.metadata_delay > 0:
            await asyncio.sleep(script.metadata_delay)
        if not script.send_metadata:
            self._log("metadata withheld (send_metadata=False)")
            self._stalled = True
            return
        await self._send(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": self.conv.conversation_id,
                    "agent_output_audio_format": script.output_format,
                    "user_input_audio_format": script.input_format,
                },
            }
        )
        if script.ping_interval is not None:
            self._spawn(self._ping_loop(script.ping_interval), "ping")
        for step in script.steps:
            if self._stalled or self._closing_by is not None:
                break
            await self._run_step(step)
        self._log("script finished")
        self.conv.script_done.set()

    def _log(self, text: str) -> None:
        self.conv.step_log.append((time.monotonic(), text))

    async def _run_step(self, step: Step) -> None:
        match step:
            case Say():
                await self._say(step.text, step.audio, step.seconds, step.tone_hz)
            case WaitForUser():
                await self._wait_for_user(step)
            case UserTranscript():
                await self._send(
                    {
                        "type": "user_transcript",
                        "user_transcription_event": {
                            "user_transcript": step.text,
                            "event_id": self._next_event_id(),
                        },
                    }
                )
            case ClientToolCall():
                await self._client_tool_call(step)
            case Interrupt():
                await self._interrupt(step)
            case EndCall():
                await self._end_call(step)
            case Close():
                await self._close_step(step)
            case Drop():
                self._log("drop")
                self._closing_by = "drop"
                self.ws.transport.abort()
            case Stall():
                self._log("stall")
                self._stalled = True
                await asyncio.Event().wait()  # until the connection goes and cancels us
            case Garbage():
                await self._send(step.data)
            case RawSend():
                message = step.message
                await self._send(dict(message) if isinstance(message, Mapping) else message)
            case Sleep():
                await asyncio.sleep(step.seconds)
            case Ping():
                await self._send_ping()

    def _render_text(self, text: str) -> str:
        variables: dict[str, Any] = {
            "system__agent_id": self.conv.agent_id,
            "system__conversation_id": self.conv.conversation_id,
        }
        if self.conv.client_data is not None and isinstance(
            self.conv.client_data.get("dynamic_variables"), dict
        ):
            variables.update(self.conv.client_data["dynamic_variables"])

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            return str(variables[name]) if name in variables else match.group(0)

        return re.sub(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}", fill, text)

    async def _say(self, text: str, audio: bytes | None, seconds: float | None, tone_hz: float) -> int:
        fmt = self.script.output_format
        text = self._render_text(text)
        event_id = self._next_event_id()
        self._last_response_id, self._last_response_text = event_id, text
        if audio is not None:
            pcm = convert_mulaw8k(audio, fmt)
        else:
            pcm = synth_tone(len(text) * _SECONDS_PER_CHAR if seconds is None else seconds, fmt, tone_hz)
        if text or pcm:
            await self._send(
                {
                    "type": "agent_response",
                    "agent_response_event": {"agent_response": text, "event_id": event_id},
                }
            )
        self._log(f"say #{event_id}: {text!r} ({len(pcm) / bytes_per_second(fmt):.3f} s of audio)")
        await self._stream_audio(pcm, event_id)
        return event_id

    async def _stream_audio(self, audio: bytes, event_id: int) -> None:
        script = self.script
        chunk_s = script.chunk_ms / 1000
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, chunk in enumerate(_chunks(audio, script.output_format, script.chunk_ms)):
            if math.isinf(script.realtime_factor):
                await asyncio.sleep(0)  # stay fair to the reader and pinger
            else:
                await asyncio.sleep(max(0.0, start + i * chunk_s / script.realtime_factor - loop.time()))
            await self._send_audio(chunk, event_id)

    async def _send_audio(self, chunk: bytes, event_id: int) -> None:
        await self._send(
            {
                "type": "audio",
                "audio_event": {
                    "audio_base_64": base64.b64encode(chunk).decode("ascii"),
                    "event_id": event_id,
                },
            }
        )

    async def _wait_for_user(self, step: WaitForUser) -> None:
        needed = math.ceil(step.seconds * bytes_per_second(self.script.input_format))
        start = len(self.conv.user_audio)
        if await self._wait_until(lambda: len(self.conv.user_audio) - start >= needed, step.timeout):
            self._log(f"heard {step.seconds} s of user audio")
        else:
            heard = (len(self.conv.user_audio) - start) / bytes_per_second(self.script.input_format)
            self._log(
                f"timeout: waited {step.timeout} s for {step.seconds} s of user audio, heard {heard:.3f} s"
            )

    async def _wait_until(self, condition: Callable[[], bool], limit: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0 or self.ws.state is State.CLOSED:
                return False  # a client that is gone will never satisfy the condition
            # Clearing right after the check cannot lose a wake-up: nothing runs in between.
            self._activity.clear()
            # asyncio.timeout, not wait_for: on 3.11, wait_for swallows a cancellation that
            # arrives together with the event (the close sets it), and the step would then
            # wait out its whole timeout on a closed connection.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._activity.wait()
        return True

    async def _client_tool_call(self, step: ClientToolCall) -> None:
        tool_call_id = f"toolu_{secrets.token_hex(12)}"
        call = {
            "tool_name": step.tool_name,
            "tool_call_id": tool_call_id,
            "parameters": dict(step.parameters),
            "event_id": self._next_event_id(),
        }
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._tool_waiters[tool_call_id] = waiter
        self.conv.tool_calls.append(call)
        await self._send({"type": "client_tool_call", "client_tool_call": call})
        if not step.wait:
            self._log(f"tool call {step.tool_name} ({tool_call_id}) sent, not waiting")
            return
        try:
            result = await asyncio.wait_for(asyncio.shield(waiter), step.timeout)
        except TimeoutError:
            self._log(
                f"timeout: no client_tool_result for {step.tool_name} ({tool_call_id}) in {step.timeout} s"
            )
        else:
            self._log(f"tool {step.tool_name} ({tool_call_id}) returned {_short(result.get('result'))}")

    async def _interrupt(self, step: Interrupt) -> None:
        event_id = self._last_response_id or self._event_id
        await self._send({"type": "interruption", "interruption_event": {"event_id": event_id}})
        self._log(f"interrupt #{event_id}, then {step.stale_chunks} stale chunks")
        stale = synth_tone(step.stale_chunks * self.script.chunk_ms / 1000, self.script.output_format)
        for chunk in _chunks(stale, self.script.output_format, self.script.chunk_ms):
            await self._send_audio(chunk, event_id)
        if step.correction is not None:
            await self._send(
                {
                    "type": "agent_response_correction",
                    "agent_response_correction_event": {
                        "original_agent_response": self._last_response_text,
                        "corrected_agent_response": step.correction,
                        "event_id": event_id,
                    },
                }
            )

    async def _end_call(self, step: EndCall) -> None:
        event_id = await self._say(step.text, step.audio, step.seconds, step.tone_hz)
        tool_call_id = f"toolu_{secrets.token_hex(12)}"
        if step.tool_request:
            await self._send(
                {
                    "type": "agent_tool_request",
                    "agent_tool_request": {
                        "tool_name": "end_call",
                        "tool_call_id": tool_call_id,
                        "tool_type": "system",
                        "event_id": event_id,
                    },
                }
            )
        await self._send(
            {
                "type": "agent_tool_response",
                "agent_tool_response": {
                    "tool_name": "end_call",
                    "tool_call_id": tool_call_id,
                    "tool_type": "system",
                    "is_error": False,
                    "is_called": True,
                    "event_id": event_id,
                },
            }
        )
        await asyncio.sleep(step.close_delay)
        self._log(f"end_call: closing 1000 {step.reason!r}")
        await self._close(1000, step.reason)

    async def _close_step(self, step: Close) -> None:
        reason = step.reason
        if step.error is not None:
            event: dict[str, Any] = {
                "code": step.code,
                "message": reason or _DEFAULT_ERROR_MESSAGES.get(step.code, "Conversation closed"),
                "error_type": DEFAULT_ERROR_TYPES.get(step.code, "unknown"),
                "reason": reason or None,
            }
            event.update(step.error)
            reason = reason or str(event.get("message") or "")
            await self._send({"type": "error", "error_event": event})
        self._log(f"close {step.code} {reason!r}")
        await self._close(step.code, reason)

    # ---- receiving -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            async for frame in self.ws:
                if not self._on_frame(frame):
                    break
        except ConnectionClosed:
            pass
        self._activity.set()

    def _problem(self, text: str) -> None:
        self.conv.invalid.append(f"frame {self._frames}: {text}")

    def _on_frame(self, frame: str | bytes) -> bool:
        """Record one client frame; False when it ends the conversation."""
        now = time.monotonic()
        self._frames += 1
        self._activity.set()
        message: Any
        if isinstance(frame, bytes):
            self._problem(f"binary frame of {len(frame)} bytes; the protocol is JSON text")
            return self._reject_invalid()
        try:
            message = json.loads(frame)
        except ValueError as exc:
            self._problem(f"invalid JSON ({exc}): {_short(frame)}")
            return self._reject_invalid()
        if not isinstance(message, dict):
            self._problem(f"JSON {type(message).__name__} instead of an object: {_short(frame)}")
            return self._reject_invalid()
        if "type" not in message and "user_audio_chunk" in message:
            self._on_user_audio(now, message)
            return True
        self.conv.received.append((now, message))
        type_ = message.get("type")
        schema = CLIENT_SCHEMAS.get(type_) if isinstance(type_, str) else None
        if schema is None:
            self._problem(f"unknown message type {_short(type_)}")
            return True
        for problem in schema_problems(message, schema, str(type_)):
            self._problem(problem)
        if type_ == "conversation_initiation_client_data":
            if self.conv.client_data is not None:
                self._problem("conversation_initiation_client_data sent again")
            else:
                if len(self.conv.received) > 1:
                    self._problem("conversation_initiation_client_data is not the first message")
                self.conv.client_data = message
        elif type_ == "pong":
            self._on_pong(now, message.get("event_id"))
        elif type_ == "client_tool_result":
            self._on_tool_result(message)
        return True

    def _on_user_audio(self, now: float, message: dict[str, Any]) -> None:
        chunk = message["user_audio_chunk"]
        extra = sorted(set(message) - {"user_audio_chunk"})
        try:
            if not isinstance(chunk, str):
                raise TypeError(f"user_audio_chunk is {type(chunk).__name__}, not a base64 string")
            audio = base64.b64decode(chunk, validate=True)
        except (binascii.Error, TypeError) as exc:
            self.conv.received.append((now, message))
            self._problem(f"user_audio_chunk is not valid base64: {exc}")
            return
        self.conv.received.append((now, {"user_audio_chunk": len(audio), **{k: message[k] for k in extra}}))
        if len(audio) % (1 if self.script.input_format.startswith("ulaw") else 2):
            self._problem(f"user_audio_chunk of {len(audio)} bytes splits a 16-bit sample")
        self.conv.user_audio += audio

    def _on_pong(self, now: float, event_id: Any) -> None:
        if not isinstance(event_id, int) or isinstance(event_id, bool):
            return  # already reported by the schema check
        self.conv.pongs.append(event_id)
        sent_at = self._pending_pings.pop(event_id, None)
        if sent_at is None:
            self._problem(f"pong for event_id {event_id}, which no outstanding ping had")
        else:
            self._last_rtt_ms = round((now - sent_at) * 1000)

    def _on_tool_result(self, message: dict[str, Any]) -> None:
        self.conv.tool_results.append(message)
        waiter = self._tool_waiters.pop(str(message.get("tool_call_id")), None)
        if waiter is None:
            self._problem(
                f"client_tool_result for unknown tool_call_id {_short(message.get('tool_call_id'))}"
            )
        elif not waiter.done():
            waiter.set_result(message)

    def _reject_invalid(self) -> bool:
        if not self.script.strict or self._stalled:
            return True
        self._spawn(self._invalid_message_close(), "reject")
        return False

    async def _invalid_message_close(self) -> None:
        message = "Invalid message received"
        await self._send(
            {
                "type": "error",
                "error_event": {
                    "code": 1008,
                    "message": message,
                    "error_type": "invalid_message",
                    "reason": message,
                },
            }
        )
        await self._close(1008, message)


def _truncate_reason(reason: str) -> str:
    # A close frame's reason may hold at most 123 bytes of UTF-8.
    data = reason.encode()
    return reason if len(data) <= 123 else data[:123].decode(errors="ignore")


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

ScriptFactory: TypeAlias = Callable[[str, int], AgentScript]


@dataclass
class _Admission:
    script: AgentScript
    agent_id: str
    query: dict[str, str]
    headers: dict[str, str]


class AgentEmulator:
    """An ElevenLabs Agents server on a loopback port.

    ``script_factory(agent_id, n)`` picks a script per WebSocket connection attempt, ``n``
    counting attempts from 0 (rejected ones included, so "refuse the first, accept the retry"
    is expressible). With ``api_key``, conversations need a fresh ``conversation_signature``
    from the signed-URL endpoint or an ``xi-api-key`` header, as with a private agent.
    """

    def __init__(
        self,
        script: AgentScript | None = None,
        *,
        script_factory: ScriptFactory | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        close_timeout: float = 2.0,
    ) -> None:
        if script is not None and script_factory is not None:
            raise ValueError("pass either script or script_factory, not both")
        self._script_factory: ScriptFactory = script_factory or (lambda _agent, _n: script or AgentScript())
        self.host = _loopback_host(host)
        self._requested_port = port
        self.api_key = api_key
        self.close_timeout = close_timeout
        self.conversations: list[EmulatedConversation] = []
        #: ``(status, request path)`` of every refused WebSocket handshake or HTTP request.
        self.rejections: list[tuple[int, str]] = []
        #: Signatures issued by the signed-URL endpoint and not yet used.
        self.signatures: set[str] = set()
        self._attempts = 0
        self._admissions: dict[int, _Admission] = {}
        self._server: Server | None = None
        self._new_conversation = asyncio.Condition()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            ping_interval=None,  # the agent protocol pings at application level
            close_timeout=self.close_timeout,
            max_size=16 * 1024 * 1024,
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), self.close_timeout + 1.0)
        except TimeoutError:
            # A peer that ignores the closing handshake must not hold the emulator open.
            for connection in list(server.connections):
                connection.transport.abort()
            await server.wait_closed()
        if server.close_task is not None:
            await server.close_task

    async def __aenter__(self) -> AgentEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self._netloc}"

    def ws_url(self, agent_id: str, **params: str) -> str:
        query = urlencode({"agent_id": agent_id, **params}, quote_via=quote)
        return f"ws://{self._netloc}{CONVERSATION_PATH}?{query}"

    async def wait_for_conversations(
        self,
        n: int,
        timeout: float = 5.0,
    ) -> list[EmulatedConversation]:
        """Wait until ``n`` connections have been accepted; returns the first ``n``."""
        async with self._new_conversation:
            await asyncio.wait_for(
                self._new_conversation.wait_for(lambda: len(self.conversations) >= n), timeout
            )
        return self.conversations[:n]

    # ---- HTTP side -----------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path = url.path.rstrip("/") or "/"
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        if path == SIGNED_URL_PATH:
            return self._signed_url(connection, request, query)
        if path != CONVERSATION_PATH:
            return self._reject(connection, request, http.HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
        if not self._authorised(request, query):
            return self._reject(
                connection,
                request,
                http.HTTPStatus.FORBIDDEN,
                {"detail": "Missing or invalid conversation authorization"},
            )
        agent_id = query.get("agent_id")
        if agent_id is None:
            # The real server validates the query before accepting, which surfaces as a 403.
            return self._reject(
                connection, request, http.HTTPStatus.FORBIDDEN, {"detail": "agent_id is required"}
            )
        n, self._attempts = self._attempts, self._attempts + 1
        script = self._script_factory(agent_id, n)
        if script.reject_with_status is not None:
            status = http.HTTPStatus(script.reject_with_status)
            return self._reject(connection, request, status, {"detail": status.phrase})
        headers: dict[str, str] = {}
        for name, value in request.headers.raw_items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self._admissions[id(connection)] = _Admission(script, agent_id, query, headers)
        return None

    def _authorised(self, request: Request, query: Mapping[str, str]) -> bool:
        if self.api_key is None:
            return True
        if request.headers.get("xi-api-key") == self.api_key:
            return True
        signature = query.get("conversation_signature")
        if signature is not None and signature in self.signatures:
            self.signatures.discard(signature)  # single use
            return True
        return False

    def _signed_url(
        self, connection: ServerConnection, request: Request, query: Mapping[str, str]
    ) -> Response:
        if self.api_key is not None:
            given = request.headers.get("xi-api-key")
            if given != self.api_key:
                status = "needs_authorization" if given is None else "invalid_api_key"
                message = "Missing xi-api-key header" if given is None else "Invalid API key"
                return self._reject(
                    connection,
                    request,
                    http.HTTPStatus.UNAUTHORIZED,
                    {"detail": {"status": status, "message": message}},
                )
        agent_id = query.get("agent_id")
        if agent_id is None:
            detail = [{"loc": ["query", "agent_id"], "msg": "Field required", "type": "missing"}]
            return self._reject(connection, request, http.HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": detail})
        signature = secrets.token_urlsafe(24)
        self.signatures.add(signature)
        # ConversationSignedUrlResponseModel
        return _json_response(
            connection,
            http.HTTPStatus.OK,
            {"signed_url": self.ws_url(agent_id, conversation_signature=signature)},
        )

    def _reject(
        self, connection: ServerConnection, request: Request, status: http.HTTPStatus, body: Any
    ) -> Response:
        self.rejections.append((status.value, request.path))
        return _json_response(connection, status, body)

    # ---- WebSocket side ------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        admission = self._admissions.pop(id(ws))
        script = admission.script
        conv = EmulatedConversation(
            index=len(self.conversations),
            agent_id=admission.agent_id,
            conversation_id=script.conversation_id or f"conv_{secrets.token_hex(13)}",
            query=admission.query,
            request_headers=admission.headers,
            script=script,
        )
        async with self._new_conversation:
            self.conversations.append(conv)
            self._new_conversation.notify_all()
        session = _Session(ws, conv)
        try:
            await session.run()
        except Exception as exc:
            logger.exception("ElevenLabs emulator connection handler failed")
            conv.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conv.closed.set()


def _json_response(connection: ServerConnection, status: http.HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"  # an IP literal also spares the loop a resolver thread
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the emulator only binds loopback addresses, not {host!r}")
    return host
