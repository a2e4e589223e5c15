"""`Call`: the one owner of a phone call's lifecycle.

A call has two legs, a phone media stream (`TelephonyLeg`) and an agent session
(`AgentSession`), and it ends exactly once, through `request_end` (or `end`, which
also waits). The first end request wins and names the `EndReason`; later ones are
logged and ignored. Teardown always runs the same steps in the same order, each
bounded in time and isolated from the others' failures:

1. stop forwarding caller audio;
2. if the agent ended the conversation, let its goodbye play: wait for the mark
   of the last agent chunk (bounded by the final-audio timeout);
3. the phone leg: hang it up, leave it, or hand it to the fallback destination;
4. close the agent session; 5. close the media stream; 6. cancel what is left;
7. finish the record; 8. persist it; 9. run the `on_call_end` hooks; 10. log
   `call.ended`.

What steps 2 and 3 do for each end reason is data: `lifecycle.END_POLICY`. The
states move only along `lifecycle.TRANSITIONS`; what is known of the phone call is
one `PhoneLeg` status. This module knows no HTTP framework, no CLI and no vendor:
only the interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from callbridge.agents.base import (
    AgentAudio,
    AgentCallContext,
    AgentClosed,
    AgentInterrupted,
    AgentReady,
    AgentSession,
    AgentToolUsed,
    AgentTranscript,
    AgentUnreachable,
    AgentWarning,
    ToolCallRequest,
)
from callbridge.audio import (
    AudioConverter,
    agent_to_telephony,
    telephony_to_agent,
    ulaw_peak,
)
from callbridge.hooks import CallHooks, Hook, Tool
from callbridge.keypad import KeypadEntry, KeypadGatherer, render_digits
from callbridge.lifecycle import (
    END_POLICY,
    TRANSITIONS,
    CallState,
    EndReason,
    IllegalTransition,
    PhoneAction,
    PhoneLeg,
)
from callbridge.logs import bind_call, log_event
from callbridge.record import CallRecord, RecordSink
from callbridge.telephony.base import (
    CallControl,
    CallControlError,
    CallerAudio,
    CallerHungUp,
    Destination,
    Dtmf,
    ExpectsRequests,
    HangupOutcome,
    MarkPlayed,
    StreamInfo,
    TelephonyClosed,
    TelephonyError,
    TelephonyLeg,
    TelephonyWarning,
)
from callbridge.transfer import TRANSFER_TOOL, AllowList, TransferRefused, check_destination, is_number

__all__ = [
    "Call",
    "CallHooks",
    "CallOptions",
    "CallRecord",
    "CallState",
    "EndReason",
    "PhoneLeg",
    "RecordSink",
    "Tool",
    "context_from_stream",
]

log = logging.getLogger("callbridge.call")


@dataclass(frozen=True)
class CallOptions:
    """Timers and limits of one call (the `CALLBRIDGE_*` settings feed these)."""

    agent_connect_timeout: float = 10.0
    max_call_seconds: float = 3600.0
    silence_timeout: float | None = None
    final_audio_timeout: float = 15.0
    start_timeout: float = 10.0  # from socket open to the stream's start (who the call is)
    agent_close_grace: float = 5.0  # after end_call, how long the agent may take to close
    hook_timeout: float = 10.0
    tool_timeout: float = 20.0
    close_timeout: float = 3.0  # closing each socket
    persist_timeout: float = 10.0
    # After an agent failure: hand the caller here (a person, a queue) instead of hanging up.
    fallback: Destination | None = None
    silence_threshold: int = 600  # peak linear amplitude that counts as the caller speaking
    # An agent that sends nothing at all (not even its pings) for this long is stuck:
    # the caller would hear silence until max duration. Agent services ping every few seconds.
    agent_idle_timeout: float | None = 60.0
    # Keypad presses go to the agent as one user message per entry (ended by `#` or by
    # `dtmf_gap` seconds without a key); `{digits}` is replaced by the digits, space-separated.
    dtmf_to_agent: bool = True
    dtmf_gap: float = 2.0
    dtmf_message: str = "The caller pressed {digits}"
    dtmf_max_digits: int = 32
    # Where the agent's `transfer_call` tool may send the caller (empty: nowhere), and the
    # caller ID the person sees (None: the call's own number).
    transfer_allow: AllowList = field(default_factory=AllowList)
    transfer_caller_id: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def context_from_stream(info: StreamInfo) -> AgentCallContext:
    """What the agent is told about the call: the carrier-neutral fields of the stream."""
    return AgentCallContext(
        call_sid=info.call_sid,
        stream_sid=info.stream_sid,
        from_number=info.from_number,
        to_number=info.to_number,
        direction=info.direction,
        dynamic_variables=dict(info.variables),
        agent_id=info.agent_id,
    )


class Call:
    """One phone call bridged to one agent session."""

    def __init__(
        self,
        telephony: TelephonyLeg,
        agent_factory: Callable[[AgentCallContext], AgentSession],
        control: CallControl | None,
        options: CallOptions | None = None,
        hooks: CallHooks | None = None,
        tools: Mapping[str, Tool] | None = None,
        sink: RecordSink | None = None,
        context_factory: Callable[[StreamInfo], AgentCallContext] | None = None,
        on_state: Callable[[Call], None] | None = None,
        on_identified: Callable[[Call], None] | None = None,
    ) -> None:
        self.telephony = telephony
        self.agent: AgentSession | None = None
        self._agent_factory = agent_factory
        self.control = control
        self.options = options or CallOptions()
        self.hooks = hooks or CallHooks()
        self.tools: Mapping[str, Tool] = tools or {}
        self.sink = sink
        self._context_factory = context_factory
        self._on_state = on_state  # every state change
        self._on_identified = on_identified  # the stream said which call it is

        self.state = CallState.CONNECTING
        self.phone = PhoneLeg.UP
        self.record = CallRecord()
        self.info: StreamInfo | None = None
        self.ready: AgentReady | None = None
        self.end_reason: EndReason | None = None
        self.end_detail: str = ""

        loop = asyncio.get_running_loop()
        self._loop = loop
        self._t0 = loop.time()
        self._t_end = self._t0  # when teardown began
        self._end_requested = asyncio.Event()
        self._done = asyncio.Event()
        self._marks_drained = asyncio.Event()  # only `_sync_drained` sets or clears it
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._silence_timer: asyncio.TimerHandle | None = None
        self._forward_caller = False
        self._forward_agent = True
        self._stream_open = True
        self._end_call_hooks_ran = False
        self._last_mark_at: float | None = None
        self._last_activity = loop.time()
        self._to_agent: AudioConverter | None = None
        self._to_caller: AudioConverter | None = None
        self._connect_task: asyncio.Task[Any] | None = None
        self._keypad = KeypadGatherer(
            self._on_keypad_entry, gap=self.options.dtmf_gap, max_digits=self.options.dtmf_max_digits
        )
        # A transfer under way: None, "accepted" (the agent was told yes), "playing" (its
        # last words still playing), "redirecting" (the carrier asked to dial the person).
        self._transfer: str | None = None
        self._transfer_to: str | None = None
        self._stop_during_redirect = False
        self._redirect_done = asyncio.Event()
        self._keypad_backlog: list[KeypadEntry] = []  # entries finished before the agent was ready
        self.metrics: dict[str, Any] = {
            "agent_connect_ms": None,
            "hangup_latency_ms": None,
            "final_audio_wait_ms": None,
            "interruptions": 0,
            "frames_from_caller": 0,
            "frames_to_agent": 0,
            "chunks_from_agent": 0,
            "chunks_to_caller": 0,
            "audio_to_caller_bytes": 0,
            "stale_audio_dropped": 0,
            "telephony_warnings": 0,
            "agent_warnings": 0,
            "tool_calls": 0,
            "hook_errors": 0,
            "dtmf_digits": 0,
            "dtmf_dropped": 0,
            "dtmf_messages": 0,
        }

    # -- public --------------------------------------------------------------

    @property
    def call_sid(self) -> str | None:
        return self.info.call_sid if self.info else None

    @property
    def conversation_id(self) -> str | None:
        return self.ready.conversation_id if self.ready else None

    @property
    def transferring(self) -> str | None:
        """The destination of a transfer under way (or failed), else None."""
        return self._transfer_to if self._transfer is not None else None

    @property
    def elapsed(self) -> float:
        return self._loop.time() - self._t0

    def request_end(self, reason: EndReason, detail: str = "") -> bool:
        """Ask the call to end. The first request wins and returns True."""
        if self.end_reason is not None:
            log_event(
                log,
                "call.end_ignored",
                logging.DEBUG,
                call_sid=self.call_sid,
                reason=reason.value,
                kept=self.end_reason.value,
            )
            return False
        self.end_reason = reason
        self.end_detail = detail
        self._forward_caller = False
        self._end_requested.set()
        return True

    def carrier_ended(self, detail: str, after: float = 0.0) -> None:
        """The carrier reports the call over (e.g. a status callback): nothing to hang up.
        `after`: let the media stream report its own end first for this long (a callback
        may overtake the stream's `stop` or its dropped connection, which say more)."""
        if after > 0:
            self._after(after, self.carrier_ended, detail)
            return
        if self.end_reason is not None:
            return
        self._phone_is(PhoneLeg.GONE)
        self.request_end(EndReason.CALLER_HUNG_UP, detail)

    async def end(self, reason: EndReason, detail: str = "") -> CallRecord:
        """End the call (first request wins) and wait until teardown has finished."""
        self.request_end(reason, detail)
        await self._done.wait()
        return self.record

    async def wait_done(self) -> CallRecord:
        await self._done.wait()
        return self.record

    async def transfer(
        self, to: str | Destination, detail: str = "", reason: str = "", by: str = "code"
    ) -> None:
        """Hand the phone leg to a person (an E.164 number or a SIP URI) or another
        `Destination`. The agent's audio already sent plays to its last mark (bounded by
        `final_audio_timeout`), then the carrier is asked to connect the caller there, and
        the call ends `transferred`. Raises `CallControlError` when that did not happen:
        no call control, the call already ending, another transfer under way, the caller
        gone meanwhile, or the redirect failed after its retries (the call then ends
        `telephony_error`, hung up, or `caller_hung_up`). The allow-list is not checked
        here: your code decides (the agent's tool and the HTTP API are checked)."""
        self._reserve_transfer(to.describe() if isinstance(to, Destination) else to)
        await self._hand_over(to, detail=detail, reason=reason, by=by)

    async def send_user_message(self, text: str) -> bool:
        """Text the agent takes as said by the caller, and answers. False: no open agent session."""
        sent = await self._to_agent_text("user_message", text)
        if sent:
            self._mark("agent.user_message", text=text[:200])
        return sent

    async def send_contextual_update(self, text: str) -> bool:
        """Background information for the agent (it does not answer it). False: no open session."""
        sent = await self._to_agent_text("contextual_update", text)
        if sent:
            self._mark("agent.contextual_update", text=text[:200])
        return sent

    async def _to_agent_text(self, kind: str, text: str) -> bool:
        agent = self.agent
        if agent is None or not agent.is_open or self.end_reason is not None:
            return False
        if kind == "user_message":
            await agent.send_user_message(text)
        else:
            await agent.send_contextual_update(text)
        return True

    # -- lifecycle -----------------------------------------------------------

    def _mark(self, event: str, **data: Any) -> None:
        self.record.timeline.append({"t": round(self.elapsed, 3), "event": event, **data})

    def _set_state(self, state: CallState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"call {self.call_sid}: {self.state.value} -> {state.value}")
        self.state = state
        self._notify(self._on_state)

    def _notify(self, observer: Callable[[Call], None] | None) -> None:
        if observer is not None:
            try:
                observer(self)
            except Exception:
                log.exception("call observer failed")

    def _phone_is(self, status: PhoneLeg) -> None:
        """What is known of the phone call; once it is not up, it stays so."""
        if self.phone is PhoneLeg.UP:
            self.phone = status
        self._sync_drained()

    def _sync_drained(self) -> None:
        """The goodbye wait is over when every mark sent was played, or nobody can hear
        any more (the caller is gone, the stream closed). The one place it changes."""
        heard = self.telephony.pending_marks == 0
        if heard or self.phone is not PhoneLeg.UP or not self._stream_open:
            self._marks_drained.set()
        else:
            self._marks_drained.clear()

    def _after(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        """A timer (a loop handle, not a task); every one is cancelled at teardown."""
        self._timers.append(self._loop.call_later(delay, callback, *args))

    def _end_after(self, delay: float, reason: EndReason, detail: str) -> None:
        self._after(delay, self.request_end, reason, detail)

    def _spawn(self, coro: Awaitable[Any], name: str, leg: EndReason) -> asyncio.Task[Any]:
        """A task of the call; if it crashes, the call ends with `leg` (the side it served)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, leg))
        return task

    def _task_done(self, task: asyncio.Task[Any], leg: EndReason) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s of call %s failed: %r", task.get_name(), self.call_sid, exc, exc_info=exc)
            self.request_end(leg, f"internal error in {task.get_name()}: {exc!r}")

    async def run(self) -> CallRecord:
        """Bridge the call until it ends; returns the final record. Never raises,
        except `CancelledError` after a completed teardown."""
        cancelled = False
        try:
            await self._run_until_end_requested()
        except asyncio.CancelledError:
            cancelled = True
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.request_end(EndReason.SHUTDOWN, "bridge task cancelled")
        except Exception as exc:
            log.exception("call %s failed", self.call_sid)
            self.request_end(EndReason.TELEPHONY_ERROR, f"internal error: {exc!r}")
        await self._teardown()
        if cancelled:
            raise asyncio.CancelledError
        return self.record

    async def _run_until_end_requested(self) -> None:
        self.record.started_at = _now()
        try:
            async with asyncio.timeout(self.options.start_timeout):
                info = await self.telephony.start()
        except TimeoutError:
            self.request_end(EndReason.TELEPHONY_ERROR, "no start message from the media stream")
            return
        except TelephonyError as exc:
            self.request_end(EndReason.TELEPHONY_ERROR, str(exc))
            return
        self.info = info
        bind_call(info.call_sid)  # every line logged for this call from here carries its SID
        self._notify(self._on_identified)
        rec = self.record
        rec.call_sid, rec.stream_sid = info.call_sid, info.stream_sid
        rec.custom_parameters = dict(info.recorded_parameters)  # the carrier says what may be kept
        ctx = self._context_factory(info) if self._context_factory else context_from_stream(info)
        rec.direction = ctx.direction
        rec.from_number, rec.to_number = ctx.from_number, ctx.to_number
        self._mark("call.started")
        log_event(
            log,
            "call.started",
            call_sid=info.call_sid,
            stream_sid=info.stream_sid,
            direction=ctx.direction,
        )
        await self._persist("start")
        for hook in self.hooks.on_call_start:
            await self._run_hook("on_call_start", hook, self)

        # Timers start with the call: the caller may hang up, or the call overrun,
        # while the agent is still connecting.
        self._end_after(
            self.options.max_call_seconds,
            EndReason.MAX_DURATION,
            f"call exceeded {self.options.max_call_seconds:g}s",
        )
        self._spawn(self._read_telephony(), "telephony-reader", EndReason.TELEPHONY_ERROR)
        if self._end_requested.is_set():
            return

        connect = self._connect_task = self._spawn(
            self._connect_agent(ctx), "agent-connect", EndReason.AGENT_UNREACHABLE
        )
        ended = asyncio.ensure_future(self._end_requested.wait())
        try:
            await asyncio.wait({connect, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if self._end_requested.is_set():
            return
        await self._end_requested.wait()

    async def _connect_agent(self, ctx: AgentCallContext) -> None:
        t = self._loop.time()
        try:
            self.agent = self._agent_factory(ctx)
            async with asyncio.timeout(self.options.agent_connect_timeout):
                ready = await self.agent.connect(ctx)
            self._to_agent = telephony_to_agent(ready.input_format)
            self._to_caller = agent_to_telephony(ready.output_format)
        except TimeoutError:
            self.request_end(
                EndReason.AGENT_UNREACHABLE,
                f"no conversation metadata within {self.options.agent_connect_timeout:g}s",
            )
            return
        except AgentUnreachable as exc:
            self.request_end(EndReason.AGENT_UNREACHABLE, str(exc))
            return
        except ValueError as exc:  # an audio format we cannot convert
            self.request_end(EndReason.AGENT_ERROR, str(exc))
            return
        self.ready = ready
        self.metrics["agent_connect_ms"] = round((self._loop.time() - t) * 1000, 1)
        self.record.conversation_id = ready.conversation_id
        self.record.answered_at = _now()
        self._mark("agent.connected", conversation_id=ready.conversation_id)
        log_event(
            log,
            "agent.connected",
            call_sid=self.call_sid,
            conversation_id=ready.conversation_id,
            input_format=ready.input_format.name,
            output_format=ready.output_format.name,
            connect_ms=self.metrics["agent_connect_ms"],
        )
        if self.end_reason is not None or self._transfer is not None:
            return
        self._set_state(CallState.ACTIVE)
        self._forward_caller = True
        self._offer_caller_audio_directly()
        self._last_activity = self._loop.time()
        if self.options.silence_timeout:
            self._arm_silence_timer(self.options.silence_timeout)
        if self.options.agent_idle_timeout:
            self._after(self.options.agent_idle_timeout, self._agent_idle_check)
        self._spawn(self._read_agent(), "agent-reader", EndReason.AGENT_ERROR)
        backlog, self._keypad_backlog = self._keypad_backlog, []
        for entry in backlog:
            self._on_keypad_entry(entry)

    # -- caller side ---------------------------------------------------------

    def _offer_caller_audio_directly(self) -> None:
        """Plain caller audio goes to the agent as the phone leg reads it, with no turn of
        the reader task, where both legs can (`set_audio_fast_path`, `try_send_audio`): about
        an eighth of the CPU of a call (BENCHMARKS.md, issue 17). Only passthrough audio with
        no silence check, whose forwarding `_read_telephony` does no more than this; the
        reader still gets all else, in order, and any frame this declines."""
        offer = getattr(self.telephony, "set_audio_fast_path", None)
        agent = self.agent
        send_now = getattr(agent, "try_send_audio", None)
        conv = self._to_agent
        if offer is None or send_now is None or conv is None or not conv.passthrough:
            return
        if self.options.silence_timeout is not None:
            return
        m = self.metrics

        def take(event: CallerAudio) -> bool:
            if not self._forward_caller or self.agent is not agent or not send_now(event.payload, event.b64):
                return False  # the reader decides (and counts) as before
            m["frames_from_caller"] += 1
            m["frames_to_agent"] += 1
            return True

        offer(take)

    async def _read_telephony(self) -> None:
        m = self.metrics
        silence_check = self.options.silence_timeout is not None
        threshold = self.options.silence_threshold
        async for event in self.telephony.events():
            if type(event) is CallerAudio:
                m["frames_from_caller"] += 1
                if silence_check and ulaw_peak(event.payload) >= threshold:
                    self._last_activity = self._loop.time()
                if not self._forward_caller:
                    continue
                agent, conv = self.agent, self._to_agent
                if agent is None or conv is None:
                    continue
                if conv.passthrough:
                    await agent.send_audio(event.payload, event.b64)
                else:
                    out = conv.convert(event.payload)
                    if out:
                        await agent.send_audio(out)
                m["frames_to_agent"] += 1
            elif type(event) is MarkPlayed:
                self._on_mark(event)
            elif type(event) is CallerHungUp:
                self._mark("caller.stop")
                if self._transfer == "redirecting":
                    # The carrier stops the stream when the redirect takes the call: the redirect's
                    # answer says whether this was the transfer or the caller hanging up.
                    self._stop_during_redirect = True
                    continue
                self._phone_is(PhoneLeg.GONE)
                detail = event.detail or "stop received"
                if self._transfer is not None:
                    detail = f"{detail} during the transfer to {self._transfer_to}"
                self.request_end(EndReason.CALLER_HUNG_UP, detail)
            elif type(event) is TelephonyClosed:
                self._stream_open = False
                self._sync_drained()
                if not event.by_bridge:
                    self._mark("telephony.closed", code=event.code)
                    if self.phone is PhoneLeg.UP and self._transfer != "redirecting":
                        detail = (
                            f"media stream closed without stop (code {event.code}"
                            f"{': ' + event.reason if event.reason else ''})"
                            if event.code is not None
                            else "media stream connection lost"
                        )
                        self.request_end(EndReason.TELEPHONY_ERROR, detail)
                return
            elif type(event) is Dtmf:
                self._on_dtmf(event.digit)
            elif type(event) is TelephonyWarning:
                m["telephony_warnings"] += 1
                log_event(
                    log, "phone.bad_input", logging.WARNING, call_sid=self.call_sid, problem=event.reason
                )

    def _on_mark(self, event: MarkPlayed) -> None:
        if not event.known:
            self.metrics["telephony_warnings"] += 1
            log_event(log, "phone.unknown_mark", logging.WARNING, call_sid=self.call_sid, mark=event.name)
            return
        now = self._loop.time()
        self._last_activity = now
        if self.telephony.pending_marks == 0:
            self._last_mark_at = now
        self._sync_drained()

    def _arm_silence_timer(self, delay: float) -> None:
        self._silence_timer = self._loop.call_later(delay, self._silence_check)

    def _silence_check(self) -> None:
        timeout = self.options.silence_timeout
        if timeout is None or self.end_reason is not None:
            return
        # Agent speech still playing counts as activity: silence is nobody talking.
        if self.telephony.pending_marks:
            self._last_activity = self._loop.time()
        idle = self._loop.time() - self._last_activity
        if idle >= timeout:
            self.request_end(EndReason.SILENCE_TIMEOUT, f"no caller speech for {idle:.0f}s")
        else:
            self._arm_silence_timer(timeout - idle)

    # -- agent side ----------------------------------------------------------

    def _agent_idle_check(self) -> None:
        timeout, agent = self.options.agent_idle_timeout, self.agent
        if timeout is None or agent is None or self.end_reason is not None or self._transfer:
            return
        idle = self._loop.time() - agent.last_received
        if idle >= timeout:
            self.request_end(EndReason.AGENT_ERROR, f"the agent sent nothing for {idle:.1f}s (stalled)")
        else:
            self._after(timeout - idle, self._agent_idle_check)

    async def _read_agent(self) -> None:
        agent = self.agent
        assert agent is not None
        m = self.metrics
        async for event in agent.events():
            if type(event) is AgentAudio:
                m["chunks_from_agent"] += 1
                conv = self._to_caller
                if not self._forward_agent or conv is None:
                    continue
                if conv.passthrough:
                    await self.telephony.send_audio(event.payload, event.b64)
                    m["audio_to_caller_bytes"] += len(event.payload)
                else:
                    out = conv.convert(event.payload)
                    if not out:
                        continue
                    await self.telephony.send_audio(out)
                    m["audio_to_caller_bytes"] += len(out)
                m["chunks_to_caller"] += 1
                self._sync_drained()
            elif type(event) is AgentInterrupted:
                m["interruptions"] += 1
                self._mark("agent.interrupted")
                if not self._forward_agent:
                    continue  # its last words are playing out (goodbye, handover): keep them
                if self._to_caller is not None:
                    self._to_caller.reset()  # the resampler's tail belongs to the cleared speech
                await self.telephony.clear()
            elif type(event) is AgentTranscript:
                self._on_transcript(event)
            elif type(event) is ToolCallRequest:
                m["tool_calls"] += 1
                self._spawn(self._run_tool(agent, event), f"tool-{event.name}", EndReason.AGENT_ERROR)
            elif type(event) is AgentToolUsed:
                self._mark("agent.tool", name=event.name, is_error=event.is_error)
                if event.ends_call:
                    await self._on_end_call()
            elif type(event) is AgentWarning:
                m["agent_warnings"] += 1
                log_event(
                    log,
                    "agent.bad_input",
                    logging.WARNING,
                    call_sid=self.call_sid,
                    conversation_id=self.conversation_id,
                    problem=event.reason,
                )
            elif type(event) is AgentClosed:
                if event.by_agent:
                    await self._flush_agent_audio()
                self._on_agent_closed(event)
                return

    async def _flush_agent_audio(self) -> None:
        """Send what the resampler still holds: the last milliseconds of the goodbye."""
        conv = self._to_caller
        if conv is None or conv.passthrough or not self._forward_agent:
            return
        tail = conv.flush()
        if tail:
            await self.telephony.send_audio(tail)
            self.metrics["audio_to_caller_bytes"] += len(tail)
            self._sync_drained()

    def _on_transcript(self, event: AgentTranscript) -> None:
        entry: dict[str, Any] = {"role": event.role, "text": event.text, "t": round(self.elapsed, 3)}
        if event.role == "agent" and self._transfer is not None:
            entry["unheard"] = True  # said after the handover began: never played to the caller
        transcript = self.record.transcript
        if event.corrects is not None:
            # An interrupted agent line: keep what the caller actually heard.
            for old in reversed(transcript):
                if old["role"] == "agent" and old["text"] == event.corrects:
                    old["text"] = event.text
                    old["interrupted"] = True
                    break
            else:
                transcript.append(entry | {"interrupted": True})
        else:
            transcript.append(entry)
        for hook in self.hooks.on_transcript:
            try:
                hook(self, entry)
            except Exception as exc:
                self.metrics["hook_errors"] += 1
                log.error("hook on_transcript of call %s raised %r", self.call_sid, exc)
        log_event(
            log, "call.transcript", logging.DEBUG, call_sid=self.call_sid, role=event.role, text=event.text
        )

    async def _on_end_call(self) -> None:
        self._mark("agent.end_call")
        if self._transfer is not None:
            return  # the caller is being handed to a person: the transfer ends the call
        log_event(log, "agent.end_call", call_sid=self.call_sid, conversation_id=self.conversation_id)
        if not self._end_call_hooks_ran:
            self._end_call_hooks_ran = True
            for hook in self.hooks.on_agent_end_call:
                await self._run_hook("on_agent_end_call", hook, self)
        # The agent closes its socket right after end_call; if it does not, end anyway.
        self._end_after(
            self.options.agent_close_grace,
            EndReason.AGENT_ENDED,
            "end_call (the agent did not close its socket)",
        )

    def _on_agent_closed(self, event: AgentClosed) -> None:
        self._mark("agent.closed", code=event.code, detail=event.detail)
        if self._transfer is not None:
            return  # the agent's part is over; the transfer ends the call
        if event.by_agent:
            self.request_end(EndReason.AGENT_ENDED, event.detail)
        else:
            self.request_end(EndReason.AGENT_ERROR, event.detail)

    async def _run_tool(self, agent: AgentSession, req: ToolCallRequest) -> None:
        tool = self.tools.get(req.name)
        self._mark("tool.call", name=req.name)
        handover: tuple[str, str] | None = None
        if tool is None and req.name == TRANSFER_TOOL:
            # Built in (a tool of your own by this name replaces it).
            result, is_error, handover = self._transfer_tool(req.parameters)
        elif tool is None:
            result, is_error = f"unknown tool {req.name!r}", True
        else:
            try:
                async with asyncio.timeout(self.options.tool_timeout):
                    value = tool(req.parameters)
                    if inspect.isawaitable(value):
                        value = await value
                result = value if isinstance(value, str) else json.dumps(value, default=str)
                is_error = False
            except TimeoutError:
                result, is_error = f"tool {req.name!r} timed out", True
            except Exception as exc:
                result, is_error = f"tool {req.name!r} failed: {exc}", True
        if is_error:
            log_event(log, "tool.error", logging.WARNING, call_sid=self.call_sid, tool=req.name, error=result)
        await agent.send_tool_result(req.call_id, result, is_error)
        if handover is not None:
            to, reason = handover
            try:
                await self._hand_over(to, reason=reason, by="agent")
            except CallControlError:
                pass  # recorded, logged, and the call's end requested by _hand_over

    # -- transfer ------------------------------------------------------------

    def _transfer_tool(self, params: dict[str, Any]) -> tuple[str, bool, tuple[str, str] | None]:
        """The agent's `transfer_call`: (result, is_error, what to hand over to)."""
        to, reason = params.get("to"), params.get("reason")
        reason = reason[:200] if isinstance(reason, str) else ""
        try:
            destination = check_destination(to, self.options.transfer_allow)
            self._reserve_transfer(destination)
        except (TransferRefused, CallControlError) as exc:
            shown = to[:100] if isinstance(to, str) else repr(to)[:100]
            self._mark("transfer.refused", to=shown, why=str(exc))
            log_event(
                log, "transfer.refused", logging.WARNING, call_sid=self.call_sid, to=shown, why=str(exc)
            )
            return f"transfer refused: {exc}", True, None
        return json.dumps({"transferring_to": destination}), False, (destination, reason)

    def _reserve_transfer(self, where: str) -> None:
        if self.call_sid is None or self.control is None:
            raise CallControlError("the call cannot be transferred: no call control")
        if self.end_reason is not None:
            raise CallControlError(f"the call is already ending ({self.end_reason.value})")
        if self._transfer is not None:
            raise CallControlError(f"a transfer to {self._transfer_to} is already under way")
        self._transfer, self._transfer_to = "accepted", where

    def _caller_id(self) -> str | None:
        """What the person sees: the setting, else the call's own number (its From: the
        caller on an inbound call, our number on an outbound one), else the number called."""
        if self.options.transfer_caller_id:
            return self.options.transfer_caller_id
        for number in (self.record.from_number, self.record.to_number):
            if is_number(number):
                return number
        return None

    def _destination(self, to: str | Destination) -> Destination:
        if isinstance(to, Destination):
            if to.to and to.caller_id is None and not to.instructions:
                return replace(to, caller_id=self._caller_id())
            return to
        return Destination(to=to, caller_id=self._caller_id())

    async def _hand_over(
        self, to: str | Destination, detail: str = "", reason: str = "", by: str = "code"
    ) -> None:
        """The transfer itself, once reserved: let the audio sent play, redirect, end."""
        call_sid, control = self.call_sid, self.control
        assert call_sid is not None and control is not None
        destination = self._destination(to)
        where = destination.describe()
        self._transfer_to = where
        self._transfer = "playing"
        # The agent's part is over: the caller is not heard by it any more, and what it
        # says from now on would be cut off by the redirect, so it is not played.
        self._forward_caller = False
        self._forward_agent = False
        self._mark("transfer.started", to=where, by=by, reason=reason or None)
        log_event(log, "transfer.started", call_sid=call_sid, to=where, by=by, reason=reason or None)
        waited = await self._wait_heard()
        self.metrics["transfer_wait_ms"] = waited
        if self.end_reason is not None or self.phone is not PhoneLeg.UP:
            why = self.end_reason.value if self.end_reason else self.phone.value
            self._mark("transfer.abandoned", to=where, why=why)
            log_event(log, "transfer.abandoned", logging.WARNING, call_sid=call_sid, to=where, why=why)
            raise CallControlError(f"transfer to {where} abandoned: the call ended first ({why})")
        self._mark("transfer.redirecting", to=where, waited_ms=waited)
        self._transfer = "redirecting"
        try:
            await control.redirect(call_sid, destination)
        except CallControlError as exc:
            self._transfer = "failed"
            self._mark("transfer.failed", to=where, error=str(exc))
            log_event(log, "transfer.failed", logging.ERROR, call_sid=call_sid, to=where, error=str(exc))
            if self._stop_during_redirect:
                self._phone_is(PhoneLeg.GONE)
                self.request_end(EndReason.CALLER_HUNG_UP, f"caller hung up during the transfer to {where}")
            else:
                self.request_end(
                    EndReason.TELEPHONY_ERROR, f"transfer to {where} failed ({exc}); the call was hung up"
                )
            raise
        finally:
            self._redirect_done.set()
        self._phone_is(PhoneLeg.TRANSFERRED)
        self._mark("transfer.redirected", to=where)
        log_event(log, "transfer.redirected", call_sid=call_sid, to=where, by=by)
        why = f" ({reason})" if reason else ""
        self.request_end(EndReason.TRANSFERRED, detail or f"transferred to {where}{why}")

    async def _wait_heard(self) -> float:
        """Until the caller heard every mark sent (or cannot hear any more, or the call is
        ending), at most `final_audio_timeout`; returns the milliseconds waited."""
        t = self._loop.time()
        self._sync_drained()
        if not self._marks_drained.is_set() and self.end_reason is None:
            drained = asyncio.ensure_future(self._marks_drained.wait())
            ending = asyncio.ensure_future(self._end_requested.wait())
            try:
                done, _ = await asyncio.wait(
                    {drained, ending},
                    timeout=self.options.final_audio_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                drained.cancel()
                ending.cancel()
            if not done:
                log_event(
                    log,
                    "call.final_audio_timeout",
                    logging.WARNING,
                    call_sid=self.call_sid,
                    pending_marks=self.telephony.pending_marks,
                )
        return round((self._loop.time() - t) * 1000, 1)

    # -- keypad --------------------------------------------------------------

    def _on_dtmf(self, digit: str) -> None:
        m = self.metrics
        if not self._keypad.press(digit):
            m["dtmf_dropped"] += 1
            dropped = m["dtmf_dropped"]
            if dropped & (dropped - 1) == 0:  # 1, 2, 4, 8...: a flood is a few lines, not one per key
                log_event(
                    log, "caller.dtmf_dropped", logging.WARNING, call_sid=self.call_sid, dropped=dropped
                )
            return
        m["dtmf_digits"] += 1
        self._mark("caller.dtmf", digit=digit)
        log_event(log, "caller.dtmf", logging.DEBUG, call_sid=self.call_sid, digit=digit)

    def _on_keypad_entry(self, entry: KeypadEntry) -> None:
        if not self.options.dtmf_to_agent:
            return
        if self.state is CallState.CONNECTING and self.end_reason is None and self._transfer is None:
            # Keyed in while the agent connects: sent once it is ready.
            self._keypad_backlog.append(entry)
            return
        agent = self.agent
        sent = agent is not None and agent.is_open and self._forward_caller and self.end_reason is None
        self._mark("dtmf.to_agent", digits=entry.digits, ended_by=entry.ended_by, sent=sent)
        log_event(
            log,
            "dtmf.to_agent",
            call_sid=self.call_sid,
            digits=entry.digits,
            ended_by=entry.ended_by,
            sent=sent,
        )
        if sent and agent is not None:
            self.metrics["dtmf_messages"] += 1
            text = render_digits(self.options.dtmf_message, entry.digits)
            self._spawn(agent.send_user_message(text), "keypad-to-agent", EndReason.AGENT_ERROR)

    # -- hooks ---------------------------------------------------------------

    async def _run_hook(self, label: str, hook: Hook, *args: Any) -> None:
        try:
            async with asyncio.timeout(self.options.hook_timeout):
                value = hook(*args)
                if inspect.isawaitable(value):
                    await value
        except TimeoutError:
            self.metrics["hook_errors"] += 1
            log_event(
                log,
                "hook.timeout",
                logging.ERROR,
                call_sid=self.call_sid,
                hook=label,
                timeout_s=self.options.hook_timeout,
            )
        except Exception as exc:
            self.metrics["hook_errors"] += 1
            log.error("hook %s of call %s raised %r", label, self.call_sid, exc, exc_info=exc)

    # -- teardown ------------------------------------------------------------

    async def _teardown(self) -> None:
        reason = self.end_reason or EndReason.TELEPHONY_ERROR
        self.end_reason = reason
        self._set_state(CallState.ENDING)
        self._forward_caller = False
        self._t_end = self._loop.time()
        self._mark("call.ending", reason=reason.value)
        log_event(
            log,
            "call.ending",
            call_sid=self.call_sid,
            conversation_id=self.conversation_id,
            reason=reason.value,
            detail=self.end_detail,
        )
        for timer in self._timers:
            timer.cancel()
        left = "".join(e.digits for e in self._keypad_backlog) + self._keypad.close()
        if left:
            self._mark("dtmf.unsent", digits=left)
        if self._silence_timer is not None:
            self._silence_timer.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            # A connect still under way must not open a session after we closed it.
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)

        policy = END_POLICY[reason]
        steps: tuple[Callable[[EndReason], Awaitable[None]], ...] = (
            self._step_final_audio,  # 2
            self._step_phone_leg,  # 3
            self._step_close_agent,  # 4
            self._step_close_stream,  # 5
            self._step_cancel_tasks,  # 6
            self._step_finish_record,  # 7
            self._step_persist,  # 8
            self._step_end_hooks,  # 9
            self._step_log_end,  # 10
        )
        if not policy.play_goodbye:
            steps = steps[1:]
        for step in steps:
            try:
                await step(reason)
            except Exception:
                log.exception("teardown step %s of call %s failed", step.__name__, self.call_sid)
        self._done.set()

    async def _step_final_audio(self, reason: EndReason) -> None:
        if self.phone is not PhoneLeg.UP or not self.telephony.is_open:
            return
        # Audio the agent sends from now on would not be heard in full: stop taking it,
        # so that the last mark sent is the last one we wait for.
        self._forward_agent = False
        if self.telephony.pending_marks == 0:
            return
        if (
            isinstance(self.control, ExpectsRequests)
            and self.call_sid is not None
            and END_POLICY[reason].phone is not PhoneAction.LEAVE
        ):
            # The hang-up (or the fallback's redirect) follows the goodbye's last mark: a
            # connection for it can be opened while the goodbye plays.
            self.control.expect_request(self.call_sid)
        t = self._loop.time()
        try:
            # Not wait_for: on Python 3.11 it waits in a task of its own, and the hang-up
            # that follows the last mark would start two turns of the loop later.
            async with asyncio.timeout(self.options.final_audio_timeout):
                await self._marks_drained.wait()
        except TimeoutError:
            log_event(
                log,
                "call.final_audio_timeout",
                logging.WARNING,
                call_sid=self.call_sid,
                pending_marks=self.telephony.pending_marks,
            )
        self.metrics["final_audio_wait_ms"] = round((self._loop.time() - t) * 1000, 1)

    async def _step_phone_leg(self, reason: EndReason) -> None:
        call_sid = self.call_sid
        action = END_POLICY[reason].phone
        if self._transfer == "redirecting":
            # Ended (max duration, a hang-up request...) while the carrier is being asked to dial
            # the person: its answer says whether the phone leg is still ours to end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.final_audio_timeout):
                    await self._redirect_done.wait()
        if call_sid is None or self.control is None or self.phone is not PhoneLeg.UP:
            return  # no verified call, nothing to control it with, or not ours to end
        if action is PhoneAction.LEAVE:
            return
        fallback = self.options.fallback
        if action is PhoneAction.FALLBACK and fallback is not None:
            fallback = self._destination(fallback)
            try:
                await self.control.redirect(call_sid, fallback)
                self._phone_is(PhoneLeg.TRANSFERRED)
                self._mark("phone.redirect", to="fallback")
                log_event(log, "phone.redirect", call_sid=call_sid, to="fallback")
                self.end_detail = f"{self.end_detail} (redirected to fallback)".strip()
                return
            except CallControlError as exc:
                log_event(log, "phone.redirect_failed", logging.ERROR, call_sid=call_sid, error=str(exc))
                # fall through: a caller in silence is worse than a dropped call
        t = self._loop.time()
        if self._last_mark_at is not None and END_POLICY[reason].play_goodbye:
            self.metrics["hangup_latency_ms"] = round((t - self._last_mark_at) * 1000, 1)
            # On the timeline too: when the caller had heard the goodbye's last mark.
            heard_at = round(self._last_mark_at - self._t0, 3)
            self.record.timeline.append({"t": heard_at, "event": "phone.last_mark"})
        self._mark("phone.request_hangup")
        try:
            outcome = await self.control.hangup(call_sid)
        except CallControlError as exc:
            self._mark("phone.hangup_failed", error=str(exc))
            log_event(log, "phone.hangup_failed", logging.ERROR, call_sid=call_sid, error=str(exc))
            return
        self._mark("phone.hangup", outcome=outcome.value)
        log_event(
            log,
            "phone.hangup",
            call_sid=call_sid,
            outcome=outcome.value,
            request_ms=round((self._loop.time() - t) * 1000, 1),
            after_last_mark_ms=self.metrics["hangup_latency_ms"],
        )
        self._phone_is(PhoneLeg.GONE if outcome is HangupOutcome.ALREADY_ENDED else PhoneLeg.HUNG_UP)

    async def _step_close_agent(self, reason: EndReason) -> None:
        if self.agent is not None:
            code = END_POLICY[reason].agent_close_code
            async with asyncio.timeout(self.options.close_timeout):
                await self.agent.close(code)

    async def _step_close_stream(self, reason: EndReason) -> None:
        async with asyncio.timeout(self.options.close_timeout):
            await self.telephony.close()

    async def _step_cancel_tasks(self, reason: EndReason) -> None:
        await self._cancel_tasks()

    async def _step_finish_record(self, reason: EndReason) -> None:
        rec = self.record
        rec.status = "ended"
        rec.end_reason = reason.value
        rec.end_detail = self.end_detail or None
        rec.ended_at = _now()
        if rec.started_at is not None:
            rec.duration_s = round((rec.ended_at - rec.started_at).total_seconds(), 3)
        if self.agent is not None:
            self.metrics.update(self.agent.stats())
        self.metrics["teardown_ms"] = round((self._loop.time() - self._t_end) * 1000, 1)
        rec.metrics = dict(self.metrics)
        self._mark("call.ended", reason=reason.value)
        self._set_state(CallState.ENDED)

    async def _step_persist(self, reason: EndReason) -> None:
        await self._persist("end")

    async def _step_end_hooks(self, reason: EndReason) -> None:
        if self.info is None:
            return  # no verified call behind this stream: no call hooks
        for hook in self.hooks.on_call_end:
            await self._run_hook("on_call_end", hook, self.record)

    async def _step_log_end(self, reason: EndReason) -> None:
        if self.info is None:
            log_event(log, "stream.refused", logging.WARNING, detail=self.end_detail or None)
            return
        log_event(
            log,
            "call.ended",
            call_sid=self.call_sid,
            conversation_id=self.conversation_id,
            reason=reason.value,
            detail=self.end_detail or None,
            duration_s=self.record.duration_s,
            agent_connect_ms=self.metrics["agent_connect_ms"],
            hangup_latency_ms=self.metrics["hangup_latency_ms"],
        )

    async def _cancel_tasks(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _persist(self, when: str) -> None:
        # A stream refused or broken before `start` names no call of ours: nothing to keep.
        if self.sink is None or self.info is None:
            return
        if when == "start":
            self.record.status = "active"
        try:
            async with asyncio.timeout(self.options.persist_timeout):
                await self.sink.save(self.record)
        except Exception as exc:
            log_event(
                log, "record.save_failed", logging.ERROR, call_sid=self.call_sid, when=when, error=repr(exc)
            )
