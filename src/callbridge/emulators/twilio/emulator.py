"""The Twilio emulator itself: the REST API served by an in-process uvicorn, and calls started by tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping

import httpx
import uvicorn

from callbridge.emulators._common import bind_loopback, netloc, require_loopback_url
from callbridge.emulators.twilio.calls import EmulatedCall
from callbridge.emulators.twilio.core import WHO
from callbridge.emulators.twilio.rest import RestApi

__all__ = ["TwilioEmulator"]

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: no signal handlers taken over, no 100 ms polling loop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()
        self.exit_requested = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        await self.on_tick(0)
        await self.exit_requested.wait()


class TwilioEmulator(RestApi):
    """The Twilio REST Calls API and the Twilio side of calls, on loopback.

    Timing knobs (seconds): ``ring_delay`` (outbound: queued -> ringing), ``answer_delay``
    (ringing -> answered), ``say_seconds`` (how long a ``<Say>``/``<Play>``/``<Pause>`` takes),
    ``dial_seconds`` (how long a ``<Dial>``'d conversation lasts before the far end hangs up;
    ``None`` keeps the call in progress until REST or :meth:`EmulatedCall.hangup` ends it).
    When a TwiML document runs out of verbs the call completes, as on Twilio.
    """

    # ---- lifecycle

    async def _open(self) -> None:
        await self.start()

    @property
    def base_url(self) -> str:
        """The REST API root, e.g. ``http://127.0.0.1:PORT`` (use as TWILIO_API_BASE_URL)."""
        if self._base_url is None:
            raise RuntimeError("TwilioEmulator is not started")
        return self._base_url

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("TwilioEmulator already started")
        sock = bind_loopback(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._base_url = f"http://{netloc(self.host, self.port)}"
        config = uvicorn.Config(
            self._build_app(),
            lifespan="off",
            log_level="warning",
            log_config=None,  # leave the process's logging configuration alone
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
            server_header=False,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._http = httpx.AsyncClient(trust_env=False, timeout=self.webhook_timeout)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="twilio-emulator-uvicorn")
        self._server_task = task
        task.add_done_callback(lambda _: server.ready.set())
        await server.ready.wait()
        if task.done():
            sock.close()
            await self._http.aclose()
            task.result()
            raise RuntimeError("the Twilio emulator's server stopped during startup")

    async def aclose(self) -> None:
        """End every call (streams get stop + close), stop the server; nothing is left running."""
        if self._server is None or self._closing.is_set():
            return
        self._closing.set()
        for call in list(self.calls.values()):
            self._finish_call(call, "completed" if call.answered_time else "canceled", "emulator_shutdown")
        streams = [stream for call in self.calls.values() for stream in call.streams]
        if streams:
            await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        # Give the last status callbacks a moment to arrive, as Twilio would still send them.
        pending = {task for task in self._callback_tasks if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        await self._tasks.cancel_all()
        await self._upgrade_faults.aclose()
        self._server.should_exit = True
        self._server.exit_requested.set()
        if self._server_task is not None:
            await asyncio.wait({self._server_task})
            if not self._server_task.cancelled() and self._server_task.exception() is not None:
                log.error(
                    "twilio emulator: server stopped with an error", exc_info=self._server_task.exception()
                )
        if self._http is not None:
            await self._http.aclose()

    # ---- calls started by the test

    async def place_inbound_call(
        self,
        webhook_url: str,
        *,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        audio: bytes = b"",
        method: str = "POST",
        signature: str | None = None,
        stream_signature: str | None = None,
        status_callback: str | None = None,
        status_callback_events: Iterable[str] | None = None,
        status_callback_method: str | None = None,
        timeout: float | None = None,
    ) -> EmulatedCall:
        """A phone call arrives: Twilio POSTs the voice webhook and runs the TwiML it gets back.

        Returns once the media stream is connected (``start`` sent), or the call has ended, or
        the TwiML has moved on.  ``signature``/``stream_signature`` override the X-Twilio-Signature
        of the webhook / of the WebSocket upgrade (negative tests).
        """
        require_loopback_url(webhook_url, WHO)
        call = self._new_call(from_=from_, to=to, direction="inbound", status="ringing")
        call.caller_audio = audio
        call._stream_signature = stream_signature
        call.status_callback = status_callback or self.status_callback_url
        call.status_callback_method = (status_callback_method or self.status_callback_method).upper()
        events = status_callback_events if status_callback_events is not None else self.status_callback_events
        call.status_callback_events = set(events)
        call._runner = self._spawn(
            self._run_document(
                call, twiml=None, url=webhook_url, method=method.upper(), webhook_signature=signature
            ),
            name=f"twilio-emu-inbound-{call.sid}",
        )
        await self._wait_settled(call, timeout)
        return call

    async def start_stream_call(
        self,
        ws_url: str,
        *,
        audio: bytes = b"",
        custom_parameters: Mapping[str, str] | None = None,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        direction: str = "inbound",
        signature: str | None = None,
        status_callback: str | None = None,
        status_callback_events: Iterable[str] | None = None,
        timeout: float | None = None,
    ) -> EmulatedCall:
        """An answered call whose TwiML is ``<Connect><Stream url=ws_url>`` with these parameters."""
        require_loopback_url(ws_url, WHO)
        call = self._new_call(from_=from_, to=to, direction=direction, status="ringing")
        call.caller_audio = audio
        call._stream_signature = signature
        call.status_callback = status_callback or self.status_callback_url
        events = status_callback_events if status_callback_events is not None else self.status_callback_events
        call.status_callback_events = set(events)
        response = ET.Element("Response")
        stream_el = ET.SubElement(ET.SubElement(response, "Connect"), "Stream", {"url": ws_url})
        for name, value in (custom_parameters or {}).items():
            ET.SubElement(stream_el, "Parameter", {"name": name, "value": value})
        twiml = ET.tostring(response, encoding="unicode")
        call._runner = self._spawn(
            self._run_document(call, twiml=twiml, url=None), name=f"twilio-emu-stream-{call.sid}"
        )
        await self._wait_settled(call, timeout)
        return call
