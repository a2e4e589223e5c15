"""`Bridge`: one process's calls. It builds a `Call` per media-stream connection,
keeps the live ones (for hang-up by SID, capacity, metrics) and ends them all on
shutdown. It is the composition root: vendors are chosen by what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from callbridge.agents.base import AgentCallContext, AgentSession
from callbridge.call import (
    Call,
    CallHooks,
    CallOptions,
    CallRecord,
    CallState,
    EndReason,
    RecordSink,
    Tool,
    context_from_stream,
)
from callbridge.logs import log_event
from callbridge.telephony.base import CallControl, StreamInfo, TelephonyLeg
from callbridge.telephony.twilio.stream import StreamValidator, TwilioMediaStream
from callbridge.transport import MessageSocket
from callbridge.wsserver import ServerSocket, serve

__all__ = ["Bridge", "BridgeStats"]

log = logging.getLogger("callbridge.bridge")

# A Twilio media message is ~300 bytes; nothing legitimate comes close to this.
MAX_MEDIA_STREAM_MESSAGE = 64 * 1024


@dataclass
class BridgeStats:
    """Process-wide counters (the source of /metrics)."""

    calls_started: int = 0
    calls_ended: dict[str, int] = field(default_factory=dict)
    calls_rejected: int = 0
    frames_from_caller: int = 0
    frames_to_agent: int = 0
    chunks_to_caller: int = 0
    hangup_latency_ms: list[float] = field(default_factory=list)
    agent_connect_ms: list[float] = field(default_factory=list)
    errors: int = 0
    streams_refused: int = 0


class Bridge:
    """Creates and tracks the calls of one process."""

    def __init__(
        self,
        agent_factory: Callable[[AgentCallContext], AgentSession],
        control: CallControl | None,
        options: CallOptions | None = None,
        hooks: CallHooks | None = None,
        tools: Mapping[str, Tool] | None = None,
        sink: RecordSink | None = None,
        context_factory: Callable[[StreamInfo], AgentCallContext] = context_from_stream,
        stream_validator: StreamValidator | None = None,
        leg_factory: Callable[[MessageSocket], TelephonyLeg] | None = None,
    ) -> None:
        self.agent_factory = agent_factory
        self.control = control
        self.options = options or CallOptions()
        self.hooks = hooks or CallHooks()
        self.tools = dict(tools or {})
        self.sink = sink
        self.context_factory = context_factory
        # Checks a stream's start (e.g. the per-call token); returns a reason to refuse.
        self.stream_validator = stream_validator
        # The phone leg of an accepted connection: Twilio Media Streams unless told otherwise.
        self.leg_factory = leg_factory or self._twilio_leg
        self.calls: dict[str, Call] = {}
        self.stats = BridgeStats()
        self.accepting = True
        self._ids = itertools.count(1)
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def live_calls(self) -> int:
        return len(self.calls)

    def _context(self, info: StreamInfo) -> AgentCallContext:
        return self.context_factory(info)

    def _twilio_leg(self, socket: MessageSocket) -> TelephonyLeg:
        timeout, validator = self.options.close_timeout, self.stream_validator
        return TwilioMediaStream(socket, close_timeout=timeout, validator=validator)

    async def handle_media_stream(self, socket: MessageSocket) -> CallRecord:
        """Run one call on an accepted media-stream connection until it has ended."""
        call = Call(
            telephony=self.leg_factory(socket),
            agent_factory=self.agent_factory,
            control=self.control,
            options=self.options,
            hooks=self.hooks,
            tools=self.tools,
            sink=self.sink,
            context_factory=self._context,
            on_identified=self._on_identified,
        )
        key = f"pending-{next(self._ids)}"
        self.calls[key] = call
        self.stats.calls_started += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            record = await call.run()
        finally:
            if task is not None:
                self._handlers.discard(task)
            for k in [k for k, v in self.calls.items() if v is call]:
                del self.calls[k]
        if record.call_sid is None:
            # Refused or broken before `start`: no call of ours, only a refused stream.
            self.stats.calls_started -= 1
            self.stats.streams_refused += 1
        else:
            self._account(call, record)
        return record

    def _on_identified(self, call: Call) -> None:
        # Re-key by call SID as soon as the stream says which call it is.
        sid = call.call_sid
        if sid is None or self.calls.get(sid) is call:
            return
        for k in [k for k, v in self.calls.items() if v is call]:
            del self.calls[k]
        if call.state is not CallState.ENDED:
            self.calls[sid] = call

    def _account(self, call: Call, record: CallRecord) -> None:
        s = self.stats
        reason = record.end_reason or "unknown"
        s.calls_ended[reason] = s.calls_ended.get(reason, 0) + 1
        m = record.metrics
        s.frames_from_caller += int(m.get("frames_from_caller") or 0)
        s.frames_to_agent += int(m.get("frames_to_agent") or 0)
        s.chunks_to_caller += int(m.get("chunks_to_caller") or 0)
        if m.get("hangup_latency_ms") is not None:
            s.hangup_latency_ms.append(float(m["hangup_latency_ms"]))
        if m.get("agent_connect_ms") is not None:
            s.agent_connect_ms.append(float(m["agent_connect_ms"]))
        s.errors += int(m.get("telephony_warnings") or 0) + int(m.get("agent_warnings") or 0)

    def find(self, call_sid: str) -> Call | None:
        return self.calls.get(call_sid)

    async def hangup(self, call_sid: str) -> CallRecord | None:
        """End a live call on request (`hangup_requested`); None if it is not live here."""
        call = self.find(call_sid)
        if call is None:
            return None
        return await call.end(EndReason.HANGUP_REQUESTED, "hang-up requested through the API")

    async def shutdown(self, grace: float) -> None:
        """Stop taking calls; let live ones finish for `grace` seconds; end the rest."""
        self.accepting = False
        live = list(self.calls.values())
        log_event(log, "bridge.shutdown", live_calls=len(live), grace_s=grace)
        if not live:
            return
        waiters = [asyncio.ensure_future(c.wait_done()) for c in live]
        _, pending = await asyncio.wait(waiters, timeout=grace)
        for w in pending:
            w.cancel()
        remaining = [c for c in live if c.state is not CallState.ENDED]
        await asyncio.gather(
            *(c.end(EndReason.SHUTDOWN, f"process shutting down after {grace:g}s grace") for c in remaining),
            return_exceptions=True,
        )

    @contextlib.asynccontextmanager
    async def serve_websockets(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """A bare WebSocket server for media streams (tests, benchmarks); yields its ws:// URL."""

        async def handler(sock: ServerSocket) -> None:
            await self.handle_media_stream(sock)

        async with serve(
            handler, host, port, max_size=MAX_MEDIA_STREAM_MESSAGE, close_timeout=self.options.close_timeout
        ) as server:
            sock = next(iter(server.sockets))
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            try:
                yield f"ws://{shown}:{bound_port}/twilio/media-stream"
            finally:
                await self.shutdown(0)
