"""The script played on one connection: metadata, then each step in turn.

Every agent turn (``Say``, ``EndCall``, ``UserTranscript``, ``ClientToolCall``) takes the next
value of one per-connection ``event_id`` counter; all audio of one response shares its
``event_id``.  ``{{name}}`` placeholders in spoken text are filled from the client's
``dynamic_variables`` (plus ``system__agent_id`` / ``system__conversation_id``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

from websockets.protocol import State

from callbridge.emulators.elevenlabs.audio import audio_chunks, bytes_per_second, convert_mulaw8k, synth_tone
from callbridge.emulators.elevenlabs.connection import Connection
from callbridge.emulators.elevenlabs.schema import short
from callbridge.emulators.elevenlabs.script import (
    ClientToolCall,
    Close,
    Drop,
    EndCall,
    Garbage,
    Interrupt,
    Ping,
    RawSend,
    Say,
    Sleep,
    Stall,
    Step,
    UserTranscript,
    WaitForContextualUpdate,
    WaitForUser,
    WaitForUserMessage,
)

__all__ = ["DEFAULT_ERROR_TYPES", "Session"]

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

_SECONDS_PER_CHAR: Final = 0.06


class Session(Connection):
    """Runs one script on one accepted connection and records the traffic."""

    _contextual_seen = 0  # contextual updates already seen by a WaitForContextualUpdate

    async def run(self) -> None:
        self._tasks.spawn(self._read_loop(), name=f"el-emu-read-{self.conv.index}")
        self._spawn(self._run_script(), "script")
        try:
            await self.ws.wait_closed()
        finally:
            # The socket is gone: every task of this connection ends with it.
            await self._tasks.cancel_all()
            for waiter in self._tool_waiters.values():
                waiter.cancel()
            self._record_close()

    async def _run_script(self) -> None:
        script = self.script
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(script.client_data_timeout):
                await self._activity.wait()
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

    async def _run_step(self, step: Step) -> None:
        match step:
            case Say():
                await self._say(step.text, step.audio, step.seconds, step.tone_hz)
            case WaitForUser():
                await self._wait_for_user(step)
            case WaitForUserMessage():
                await self._wait_for_user_message(step)
            case WaitForContextualUpdate():
                await self._wait_for_contextual_update(step)
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
        for i, chunk in enumerate(audio_chunks(audio, script.output_format, script.chunk_ms)):
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

    async def _wait_for_contextual_update(self, step: WaitForContextualUpdate) -> None:
        # Updates that came while earlier steps ran count too (the agent keeps them in its
        # context); each wait consumes what it has seen.
        def texts() -> list[str]:
            return [str(m.get("text")) for m in self.conv.received_messages("contextual_update")]

        seen = self._contextual_seen

        def arrived() -> bool:
            return any(step.contains is None or step.contains in text for text in texts()[seen:])

        if await self._wait_until(arrived, step.timeout):
            self._log(f"contextual_update received: {short(texts()[-1])}")
        else:
            self._log(f"timeout: no contextual_update in {step.timeout} s")
        self._contextual_seen = len(texts())

    async def _wait_for_user_message(self, step: WaitForUserMessage) -> None:
        seen = len(self.conv.user_messages())

        def arrived() -> bool:
            new = self.conv.user_messages()[seen:]
            return any(step.contains is None or step.contains in text for text in new)

        if await self._wait_until(arrived, step.timeout):
            self._log(f"user_message received: {short(self.conv.user_messages()[-1])}")
        else:
            self._log(f"timeout: no user_message in {step.timeout} s")

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
            async with asyncio.timeout(step.timeout):
                result = await asyncio.shield(waiter)
        except TimeoutError:
            self._log(
                f"timeout: no client_tool_result for {step.tool_name} ({tool_call_id}) in {step.timeout} s"
            )
        else:
            self._log(f"tool {step.tool_name} ({tool_call_id}) returned {short(result.get('result'))}")

    async def _interrupt(self, step: Interrupt) -> None:
        event_id = self._last_response_id or self._event_id
        await self._send({"type": "interruption", "interruption_event": {"event_id": event_id}})
        self._log(f"interrupt #{event_id}, then {step.stale_chunks} stale chunks")
        stale = synth_tone(step.stale_chunks * self.script.chunk_ms / 1000, self.script.output_format)
        for chunk in audio_chunks(stale, self.script.output_format, self.script.chunk_ms):
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
