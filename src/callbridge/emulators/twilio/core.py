"""The state every part of the Twilio emulator shares: settings, calls, their status changes.

:class:`EmulatorCore` holds the emulator's settings and records, its background tasks, and what
happens when a call changes status (waiters woken, status callbacks sent, signed and in order).
The TwiML interpreter (:mod:`.twiml`), the REST API (:mod:`.rest`) and the server
(:mod:`.emulator`) build on it, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import httpx

from callbridge.emulators._common import (
    AsyncService,
    TaskSet,
    Waiters,
    is_loopback_host,
    require_loopback_url,
)
from callbridge.emulators.twilio.calls import (
    API_VERSION,
    DEFAULT_ACCOUNT_SID,
    EVENT_OF_STATUS,
    TERMINAL_STATUSES,
    EmulatedCall,
    RecordedRequest,
    WebhookRecord,
    new_sid,
    rfc2822,
    utcnow,
)
from callbridge.emulators.twilio.signing import webhook_request
from callbridge.emulators.twilio.upgrade_fault import UpgradeFaultProxies
from callbridge.emulators.twilio.wire import FRAME_SECONDS

if TYPE_CHECKING:
    from callbridge.emulators.twilio.emulator import _EmbeddedServer
    from callbridge.emulators.twilio.rest import Fault

__all__ = ["WHO", "EmulatorCore"]

log = logging.getLogger(__name__)

WHO = "the Twilio emulator"


class EmulatorCore(AsyncService):
    """Settings, records and call status changes; see :class:`TwilioEmulator` for the knobs."""

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = "test-token",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sign_requests: bool = True,
        ring_delay: float = 0.02,
        answer_delay: float = 0.05,
        say_seconds: float = 0.0,
        dial_seconds: float | None = 0.2,
        hangup_ended_call_error: bool = False,
        outbound_outcome: str = "answer",
        outbound_audio: bytes = b"",
        status_callback_url: str | None = None,
        status_callback_events: Iterable[str] = ("completed",),
        status_callback_method: str = "POST",
        webhook_timeout: float = 15.0,
        stream_open_timeout: float = 5.0,
        stream_close_timeout: float = 2.0,
        record_media: bool = True,
        media_frame_interval: float = FRAME_SECONDS,
        stream_upgrade_fault: str | None = None,
    ) -> None:
        if not is_loopback_host(host):
            raise ValueError(f"the Twilio emulator only listens on loopback addresses, not {host!r}")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self.port = port
        self.sign_requests = sign_requests
        self.ring_delay = ring_delay
        self.answer_delay = answer_delay
        self.say_seconds = say_seconds
        self.dial_seconds = dial_seconds
        # Caller IDs verified on the account: a <Dial><Number> may show these besides the
        # call's own From and To (Twilio's warning 13214 otherwise).
        self.verified_caller_ids: set[str] = set()
        # Real Twilio's answer to Status=completed on a call that already ended is not documented;
        # see _update_call. False: 200 with the call unchanged; True: 400 / 21220.
        self.hangup_ended_call_error = hangup_ended_call_error
        # What the callee of an outbound call does: "answer" | "busy" | "no-answer" | "failed".
        self.outbound_outcome = outbound_outcome
        self.outbound_audio = outbound_audio
        self.status_callback_url = status_callback_url
        self.status_callback_events = set(status_callback_events)
        self.status_callback_method = status_callback_method.upper()
        self.webhook_timeout = webhook_timeout
        self.stream_open_timeout = stream_open_timeout
        self.stream_close_timeout = stream_close_timeout
        self.record_media = record_media
        self.media_frame_interval = media_frame_interval
        # None, or how the streams of calls run from now on fail to connect: "drop" | "hang".
        self.stream_upgrade_fault = stream_upgrade_fault

        self.calls: dict[str, EmulatedCall] = {}
        self.requests: list[RecordedRequest] = []
        self.webhooks: list[WebhookRecord] = []  # every voice webhook and status callback we sent

        self._faults: dict[str, deque[Fault]] = {}
        self._new_calls = Waiters()
        self._tasks = TaskSet(log, "twilio emulator")
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self._server: _EmbeddedServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._base_url: str | None = None
        self._upgrade_faults = UpgradeFaultProxies(host)

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name=name)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when the emulator shuts down."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    # ---- call lifecycle

    def _new_call(self, *, from_: str, to: str, direction: str, status: str) -> EmulatedCall:
        call = EmulatedCall(self, sid=new_sid("CA"), from_=from_, to=to, direction=direction, status=status)
        self.calls[call.sid] = call
        self._new_calls.wake()
        return call

    def _set_status(self, call: EmulatedCall, status: str) -> None:
        if call.status == status or call.is_ended:
            return
        now = utcnow()
        call.status = status
        call.date_updated = now
        call.history.append((asyncio.get_running_loop().time(), status))
        call._status_changed.wake()
        if status == "in-progress":
            call.answered_time = now
        if status in TERMINAL_STATUSES:
            # end_time and duration are documented as empty unless the call completed.
            if status == "completed":
                call.end_time = now
            call.ended_at = asyncio.get_running_loop().time()
        self._emit_status_callback(call, EVENT_OF_STATUS[status])
        if status in TERMINAL_STATUSES:
            call.ended.set()
            call._settled.set()

    def _answer(self, call: EmulatedCall) -> None:
        if call.status in ("queued", "ringing"):
            self._set_status(call, "in-progress")

    def _finish_call(self, call: EmulatedCall, status: str, cause: str, detail: str | None = None) -> None:
        """End the call once; its stream (if any) gets Twilio's stop + close."""
        if call.is_ended:
            return
        call.end_cause = cause
        call.end_detail = detail or cause
        self._set_status(call, status)
        runner = call._runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
        stream = call.stream
        if stream is not None and stream.is_open:
            self._spawn(stream.end_stream(send_stop=True), name=f"twilio-emu-stop-{stream.stream_sid}")

    async def _wait_settled(self, call: EmulatedCall, timeout: float | None) -> None:
        if timeout is None:
            timeout = self.webhook_timeout + self.stream_open_timeout + 1.0
        async with asyncio.timeout(timeout):
            await call._settled.wait()

    async def wait_for_call(
        self, timeout: float | None = None, *, direction: str | None = None
    ) -> EmulatedCall:
        """The most recent call (optionally of a direction), waiting for one to exist."""
        async with asyncio.timeout(timeout):
            while True:
                for call in reversed(list(self.calls.values())):
                    if direction is None or call.direction == direction:
                        return call
                await self._new_calls.changed()

    # ---- HTTP requests to the application

    def _webhook_params(self, call: EmulatedCall, call_status: str) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": call_status,
            "Called": call.to,
            "Caller": call.from_,
            "Direction": call.direction,
            "From": call.from_,
            "To": call.to,
        }

    async def _signed_request(
        self,
        kind: str,
        call: EmulatedCall,
        url: str,
        method: str,
        params: dict[str, str],
        signature: str | None = None,
    ) -> WebhookRecord:
        assert self._http is not None
        method = method.upper()
        target, headers, signature = webhook_request(
            self.auth_token, url, method, params, sign=self.sign_requests, signature=signature
        )
        record = WebhookRecord(
            time=asyncio.get_running_loop().time(),
            kind=kind,
            call_sid=call.sid,
            method=method,
            url=url,
            params=params,
            signature=signature,
            status_code=None,
        )
        self.webhooks.append(record)
        try:
            require_loopback_url(url, WHO)
            if method == "GET":
                response = await self._http.get(target, headers=headers)
            else:
                response = await self._http.post(target, data=params, headers=headers)
            record.status_code = response.status_code
            record.body = response.text
        except (httpx.HTTPError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    async def _fetch_twiml(
        self, call: EmulatedCall, url: str, method: str, *, signature: str | None = None
    ) -> str | None:
        call_status = "ringing" if call.status in ("queued", "ringing") else call.status
        record = await self._signed_request(
            "voice", call, url, method, self._webhook_params(call, call_status), signature
        )
        if record.status_code is None or not 200 <= record.status_code < 300:
            call.twiml_errors.append(f"webhook {url} answered {record.status_code or record.error}")
            return None
        return record.body

    def _emit_status_callback(self, call: EmulatedCall, event: str) -> None:
        url = call.status_callback
        if not url or event not in call.status_callback_events:
            return
        params = self._webhook_params(call, "initiated" if event == "initiated" else call.status)
        params.update(
            {
                "CallbackSource": "call-progress-events",
                "SequenceNumber": str(call._callback_seq),
                "Timestamp": rfc2822(utcnow()) or "",
            }
        )
        if event == "completed":
            params["CallDuration"] = str(call.duration or 0)
        call._callback_seq += 1
        previous = call._callback_chain
        task = self._spawn(
            self._deliver_status_callback(call, url, params, previous), name=f"twilio-emu-callback-{call.sid}"
        )
        self._callback_tasks.add(task)
        task.add_done_callback(self._callback_tasks.discard)
        call._callback_chain = task

    async def _deliver_status_callback(
        self, call: EmulatedCall, url: str, params: dict[str, str], previous: asyncio.Task[None] | None
    ) -> None:
        # One call's callbacks go out in order, each after the previous one was answered.
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        await self._signed_request("status", call, url, call.status_callback_method, params)
        call.status_callbacks_sent.append(params)
