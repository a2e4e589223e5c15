"""One accepted connection: sending and recording frames, pings, and reading what the client sends.

Every client frame is recorded and checked against the contract (:mod:`.schema`); with a strict
script, a frame that is not a JSON object gets an ``invalid_message`` error and a 1008 close.
The script that runs on the connection is :class:`~.session.Session`'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from callbridge.emulators._common import TaskSet
from callbridge.emulators.elevenlabs.conversation import ClosedBy, EmulatedConversation, Sent
from callbridge.emulators.elevenlabs.schema import CLIENT_SCHEMAS, schema_problems, short

__all__ = ["Connection"]

logger = logging.getLogger(__name__)


class Connection:
    """The traffic of one accepted connection, recorded in its :class:`EmulatedConversation`."""

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
        self._tasks = TaskSet(logger, "elevenlabs emulator")

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
        task = self._tasks.spawn(self._guard(coro), name=f"el-emu-{name}-{self.conv.index}")
        # Cancelled before it ever ran (the connection closed at once), the guard never awaits
        # `coro`: close it, or Python warns "coroutine ... was never awaited" on stderr.
        task.add_done_callback(lambda _: coro.close())

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

    def _log(self, text: str) -> None:
        self.conv.step_log.append((time.monotonic(), text))

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
            self._problem(f"invalid JSON ({exc}): {short(frame)}")
            return self._reject_invalid()
        if not isinstance(message, dict):
            self._problem(f"JSON {type(message).__name__} instead of an object: {short(frame)}")
            return self._reject_invalid()
        if "type" not in message and "user_audio_chunk" in message:
            self._on_user_audio(now, message)
            return True
        self.conv.received.append((now, message))
        type_ = message.get("type")
        schema = CLIENT_SCHEMAS.get(type_) if isinstance(type_, str) else None
        if schema is None:
            self._problem(f"unknown message type {short(type_)}")
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
            self._problem(f"client_tool_result for unknown tool_call_id {short(message.get('tool_call_id'))}")
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
