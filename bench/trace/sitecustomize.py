"""Timing probes for `callbridge serve` under load (`bench/run.py --trace`).

Python imports `sitecustomize` at start-up from its path: run.py puts this folder on the
path of the system under test (callbridge only) and names the output file in
`BENCH_TRACE_OUT`. Nothing here changes what the server does; it records, with
`time.monotonic()` (the clock the load generators stamp with):

- each call's hang-up: when it was announced to the call control (`expect_request`, if the
  version measured has it), when the server read the goodbye's last mark (`Call._on_mark`),
  when the REST hang-up started and ended, and, through aiohttp's trace hooks, whether
  the request opened a new connection and when the request was sent;
- the event loop's lateness: a timer due every 2 ms, with how late each run of it came;
- every garbage collection of the oldest generation, with its duration.

The file is written when the process exits (uvicorn exits normally on SIGTERM).
"""

from __future__ import annotations

import atexit
import contextvars
import gc
import json
import os
import time
from typing import Any

OUT = os.environ.get("BENCH_TRACE_OUT")
TICK_S = 0.002

calls: dict[str, dict[str, Any]] = {}
lag: list[tuple[float, float]] = []  # (when, how late in ms), only runs over 5 ms late
ticks = 0
full_gcs: list[tuple[float, float]] = []  # (when, ms)
_gc_start = 0.0
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("bench_trace_call", default=None)


def _call(sid: str) -> dict[str, Any]:
    return calls.setdefault(sid, {})


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_start
    if info.get("generation") != 2:
        return
    if phase == "start":
        _gc_start = time.monotonic()
    else:
        full_gcs.append((_gc_start, (time.monotonic() - _gc_start) * 1000))


def _start_ticks(loop: Any) -> None:
    due = time.monotonic() + TICK_S

    def tick() -> None:
        nonlocal due
        global ticks
        now = time.monotonic()
        late = (now - due) * 1000
        ticks += 1
        if late > 5:
            lag.append((now, round(late, 2)))
        due = now + TICK_S
        loop.call_later(TICK_S, tick)

    loop.call_later(TICK_S, tick)


def _patch() -> None:
    import aiohttp

    import callbridge.eventloop as eventloop
    from callbridge.call import Call
    from callbridge.telephony.twilio import control

    make_loop = eventloop.new_event_loop

    def new_event_loop() -> Any:
        loop = make_loop()
        loop.call_soon(_start_ticks, loop)
        return loop

    eventloop.new_event_loop = new_event_loop  # type: ignore[assignment]

    on_mark = Call._on_mark

    def traced_on_mark(self: Call, event: Any) -> None:
        on_mark(self, event)
        if self.call_sid and self.telephony.pending_marks == 0:
            _call(self.call_sid)["last_mark_read"] = time.monotonic()

    Call._on_mark = traced_on_mark  # type: ignore[method-assign]

    hangup = control.TwilioCallControl.hangup

    async def traced_hangup(self: Any, call_sid: str) -> Any:
        c = _call(call_sid)
        c["hangup_start"] = time.monotonic()
        token = _current.set(call_sid)
        try:
            return await hangup(self, call_sid)
        finally:
            _current.reset(token)
            c["hangup_end"] = time.monotonic()

    control.TwilioCallControl.hangup = traced_hangup  # type: ignore[method-assign]

    def hook(name: str) -> Any:
        async def record(session: Any, ctx: Any, params: Any) -> None:
            sid = _current.get()
            if sid is not None:
                _call(sid).setdefault(name, time.monotonic())

        return record

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(hook("conn_start"))
    trace.on_connection_create_end.append(hook("conn_end"))
    trace.on_connection_reuseconn.append(hook("conn_reused"))
    trace.on_request_headers_sent.append(hook("headers_sent"))
    trace.on_request_end.append(hook("response"))

    expect = getattr(control.TwilioCallControl, "expect_request", None)
    if expect is not None:

        def traced_expect(self: Any, call_sid: str) -> None:
            _call(call_sid)["expected"] = time.monotonic()
            expect(self, call_sid)

        control.TwilioCallControl.expect_request = traced_expect  # type: ignore[method-assign]

    init = control._HttpClient.__init__

    def traced_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, trace_configs=[trace], **kwargs)

    control._HttpClient.__init__ = traced_init  # type: ignore[method-assign]


def _write() -> None:
    assert OUT is not None
    with open(OUT, "w") as f:
        json.dump({"calls": calls, "lag": lag, "ticks": ticks, "full_gcs": full_gcs, "tick_s": TICK_S}, f)


if OUT:
    _patch()
    gc.callbacks.append(_on_gc)
    atexit.register(_write)
