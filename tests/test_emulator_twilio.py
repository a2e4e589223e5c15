"""The Twilio emulator, on real loopback sockets, checked against independent parties: the official
twilio SDK (REST client, RequestValidator), and media-stream / webhook servers written here from the
documented protocol (nothing from callbridge's own Twilio code)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from callbridge.emulators.twilio import EmulatedCall, MediaStreamCaller, TwilioEmulator, twilio_signature

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "test-token"
UNKNOWN_SID = "CA" + "f" * 32
T = TypeVar("T")


# ----------------------------------------------------------------------------------------- helpers


class StreamServer:
    """A minimal media-stream endpoint: records what Twilio sends, lets the test talk back."""

    def __init__(self, *, check_signature: bool = False) -> None:
        self.check_signature = check_signature
        self.refused = 0
        self.url = ""
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.request_headers: dict[str, str] = {}
        self.request_path = ""
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.ws: ServerConnection | None = None
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> StreamServer:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            compression=None,
            ping_interval=None,
            process_request=self._process_request,
        )
        port = self._server.sockets[0].getsockname()[1] if self._server.sockets else 0
        self.url = f"ws://127.0.0.1:{port}/media"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: WsRequest) -> WsResponse | None:
        signature = request.headers.get("x-twilio-signature", "")
        if self.check_signature and not RequestValidator(AUTH_TOKEN).validate(self.url, {}, signature):
            self.refused += 1
            return connection.respond(HTTPStatus.FORBIDDEN, "bad signature\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        self.ws = ws
        assert ws.request is not None
        self.request_headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        self.request_path = ws.request.path
        self.connected.set()
        loop = asyncio.get_running_loop()
        try:
            async for raw in ws:
                self.messages.append((loop.time(), json.loads(raw)))
                async with self._changed:
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("event") == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    @property
    def stream_sid(self) -> str:
        return str(self.events("start")[0]["streamSid"])

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(message))

    async def send_audio(self, audio: bytes, chunk: int = 160) -> None:
        for i in range(0, len(audio), chunk):
            payload = base64.b64encode(audio[i : i + chunk]).decode()
            await self.send({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    async def send_mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})


class _ReadyServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@asynccontextmanager
async def asgi_server(app: Starlette) -> AsyncIterator[str]:
    """Serve an ASGI app on a loopback port for the length of the block; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", log_level="warning", log_config=None, ws="none")
    server = _ReadyServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await server.ready.wait()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextmanager
def sync_sdk_client(base_url: str) -> Iterator[Client]:
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    # Domain.absolute_url() reads base_url at every request, so this is all it takes.
    client.api.base_url = base_url
    try:
        yield client
    finally:
        session = getattr(client.http_client, "session", None)
        if session is not None:
            session.close()


@asynccontextmanager
async def async_sdk_client(base_url: str) -> AsyncIterator[Client]:
    http_client = AsyncTwilioHttpClient()
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http_client)
    client.api.base_url = base_url
    try:
        yield client
    finally:
        await http_client.close()


def mulaw_ramp(n: int) -> bytes:
    """Recognisable, non-silent mu-law bytes (never 0xFF, our silence)."""
    return bytes(i % 200 for i in range(n))


def assert_twilio_error(exc: TwilioRestException, status: int, code: int) -> None:
    assert (exc.status, exc.code) == (status, code), (exc.status, exc.code, exc.msg)


# ----------------------------------------------------------------------------------------- REST via the SDK


async def test_sync_sdk_creates_updates_fetches_and_sees_errors() -> None:
    async with TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN, dial_seconds=None) as tw:
        executor = ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()

        async def in_thread(fn: Callable[[], T]) -> T:
            # The sync SDK blocks; the emulator lives on this loop, so it must run elsewhere.
            return await loop.run_in_executor(executor, fn)

        try:
            with sync_sdk_client(tw.base_url) as client:
                created = await in_thread(
                    lambda: client.calls.create(
                        to="+15550002222",
                        from_="+15550001111",
                        twiml="<Response><Dial>+15550009999</Dial></Response>",
                    )
                )
                assert created.sid in tw.calls
                assert created.status == "queued"
                assert created.direction == "outbound-api"
                assert created.account_sid == ACCOUNT_SID
                assert created.date_created is not None
                request = tw.requests[-1]
                assert request.method == "POST"
                assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
                assert request.form["To"] == "+15550002222"
                assert request.form["Twiml"].startswith("<Response><Dial>")
                assert request.headers["authorization"].startswith("Basic ")

                call = tw.calls[created.sid]
                await call.wait_status("in-progress", timeout=2)
                fetched = await in_thread(lambda: client.calls(created.sid).fetch())
                assert fetched.status == "in-progress"
                assert fetched.start_time is not None
                assert call.dialed == ["+15550009999"]

                listed = await in_thread(lambda: client.calls.list(limit=20))
                assert [c.sid for c in listed] == [created.sid]

                updated = await in_thread(lambda: client.calls(created.sid).update(status="completed"))
                assert updated.status == "completed"
                assert updated.end_time is not None
                assert updated.duration is not None and updated.duration.isdigit()
                assert call.end_cause == "rest_completed"
                assert call.ended.is_set()

                again = await in_thread(lambda: client.calls(created.sid).update(status="completed"))
                assert again.status == "completed"

                with pytest.raises(TwilioRestException) as info:
                    await in_thread(
                        lambda: client.calls(created.sid).update(twiml="<Response><Say>x</Say></Response>")
                    )
                assert_twilio_error(info.value, 400, 21220)
                assert "Cannot redirect" in info.value.msg

                with pytest.raises(TwilioRestException) as info:
                    await in_thread(lambda: client.calls(UNKNOWN_SID).update(status="completed"))
                assert_twilio_error(info.value, 404, 20404)

                tw.inject_fault("update", status=500)
                with pytest.raises(TwilioRestException) as info:
                    await in_thread(lambda: client.calls(created.sid).update(status="completed"))
                assert_twilio_error(info.value, 500, 20500)

                tw.inject_fault("fetch", status=404, code=20404)
                with pytest.raises(TwilioRestException) as info:
                    await in_thread(lambda: client.calls(created.sid).fetch())
                assert_twilio_error(info.value, 404, 20404)
        finally:
            executor.shutdown(wait=True)


async def test_async_sdk_creates_updates_fetches_and_sees_errors() -> None:
    async with TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN, dial_seconds=None) as tw:
        async with async_sdk_client(tw.base_url) as client:
            created = await client.calls.create_async(
                to="+15550002222",
                from_="+15550001111",
                twiml="<Response><Dial>+15550009999</Dial></Response>",
            )
            call = tw.calls[created.sid]
            await call.wait_status("in-progress", timeout=2)
            fetched = await client.calls(created.sid).fetch_async()
            assert fetched.status == "in-progress"

            tw.inject_fault("update", status=400, code=21220)
            with pytest.raises(TwilioRestException) as info:
                await client.calls(created.sid).update_async(status="completed")
            assert_twilio_error(info.value, 400, 21220)
            assert call.status == "in-progress"  # the fault answered; nothing happened

            updated = await client.calls(created.sid).update_async(status="completed")
            assert updated.status == "completed"
            assert call.end_cause == "rest_completed"

            with pytest.raises(TwilioRestException) as info:
                await client.calls(UNKNOWN_SID).update_async(status="completed")
            assert_twilio_error(info.value, 404, 20404)

            with pytest.raises(TwilioRestException) as info:
                await client.calls(created.sid).update_async(url="http://127.0.0.1:9/next")
            assert_twilio_error(info.value, 400, 21220)

            tw.inject_fault("update", status=500)
            with pytest.raises(TwilioRestException) as info:
                await client.calls(created.sid).update_async(status="completed")
            assert_twilio_error(info.value, 500, 20500)


async def test_ended_call_hangup_can_be_made_an_error() -> None:
    async with TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN, dial_seconds=None, hangup_ended_call_error=True) as tw:
        async with async_sdk_client(tw.base_url) as client:
            created = await client.calls.create_async(
                to="+15550002222",
                from_="+15550001111",
                twiml="<Response><Dial>+15550009999</Dial></Response>",
            )
            await tw.calls[created.sid].wait_status("in-progress", timeout=2)
            await client.calls(created.sid).update_async(status="completed")
            with pytest.raises(TwilioRestException) as info:
                await client.calls(created.sid).update_async(status="completed")
            assert_twilio_error(info.value, 400, 21220)


async def test_rest_auth_retry_after_and_late_answers() -> None:
    async with TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN, dial_seconds=None) as tw:
        calls_url = f"{tw.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
        async with httpx.AsyncClient(trust_env=False) as http:
            bad = await http.post(
                calls_url, data={"To": "+1", "From": "+2", "Twiml": "<Response/>"}, auth=("x", "y")
            )
            assert bad.status_code == 401
            assert bad.json()["code"] == 20003
            assert bad.json()["status"] == 401

            created = await http.post(
                calls_url,
                data={
                    "To": "+15550002222",
                    "From": "+15550001111",
                    "Twiml": "<Response><Dial>1</Dial></Response>",
                },
                auth=(ACCOUNT_SID, AUTH_TOKEN),
            )
            assert created.status_code == 201
            sid = created.json()["sid"]
            call = tw.calls[sid]
            await call.wait_status("in-progress", timeout=2)
            call_url = f"{tw.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json"

            tw.inject_fault("update", status=429, retry_after=1)
            limited = await http.post(call_url, data={"Status": "completed"}, auth=(ACCOUNT_SID, AUTH_TOKEN))
            assert limited.status_code == 429
            assert limited.headers["retry-after"] == "1"
            assert limited.json() == {
                "code": 20429,
                "message": "Too Many Requests",
                "more_info": "https://www.twilio.com/docs/errors/20429",
                "status": 429,
            }

            # A slow Twilio: the client gives up, the hang-up still happens.
            tw.inject_fault("update", delay=0.4)
            with pytest.raises(httpx.ReadTimeout):
                await http.post(
                    call_url, data={"Status": "completed"}, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=0.1
                )
            assert call.status == "in-progress"
            assert await call.wait_ended(timeout=2) == "rest_completed"


# ----------------------------------------------------------------------------------------- media streams


async def test_stream_messages_pacing_marks_and_clear() -> None:
    speech = mulaw_ramp(800)  # 100 ms of caller speech, then silence
    async with StreamServer() as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
        call = await tw.start_stream_call(server.url, audio=speech, custom_parameters={"FirstName": "Jane"})
        caller = call.stream
        assert caller is not None and caller.started.is_set()
        assert call.status == "in-progress"
        await server.wait_for(lambda: len(server.events("media")) >= 10)

        connected, start = server.messages[0][1], server.messages[1][1]
        assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        assert start["event"] == "start" and start["sequenceNumber"] == "1"
        assert start["streamSid"] == start["start"]["streamSid"] == caller.stream_sid
        assert start["streamSid"].startswith("MZ") and len(start["streamSid"]) == 34
        assert start["start"]["accountSid"] == ACCOUNT_SID
        assert start["start"]["callSid"] == call.sid
        assert start["start"]["tracks"] == ["inbound"]
        assert start["start"]["customParameters"] == {"FirstName": "Jane"}
        assert start["start"]["mediaFormat"] == {
            "encoding": "audio/x-mulaw",
            "sampleRate": 8000,
            "channels": 1,
        }

        media = server.events("media")
        for i, message in enumerate(media):
            assert message["sequenceNumber"] == str(i + 2)
            assert message["streamSid"] == caller.stream_sid
            assert message["media"]["track"] == "inbound"
            assert message["media"]["chunk"] == str(i + 1)
            assert message["media"]["timestamp"] == str(i * 20)
            assert len(base64.b64decode(message["media"]["payload"])) == 160
        caller_audio = b"".join(base64.b64decode(m["media"]["payload"]) for m in media)
        assert caller_audio[:800] == speech
        assert set(caller_audio[800:]) == {0xFF}

        # Twilio signs the upgrade over the ws URL with no parameters.
        signature = server.request_headers["x-twilio-signature"]
        expected = base64.b64encode(hmac.new(AUTH_TOKEN.encode(), server.url.encode(), hashlib.sha1).digest())
        assert signature == expected.decode()
        assert RequestValidator(AUTH_TOKEN).validate(server.url, {}, signature)

        loop = asyncio.get_running_loop()
        # One second of agent audio, then a mark: it comes back once that second has played,
        # while the caller's frames keep arriving at 50 per second.
        sent_at = loop.time()
        await server.send_audio(mulaw_ramp(8000))
        await server.send_mark("one")
        await server.wait_for(lambda: any(m["mark"]["name"] == "one" for m in server.events("mark")))
        mark_delay = loop.time() - sent_at
        assert 0.9 <= mark_delay <= 1.6, mark_delay  # not before it played; slack for a busy CI machine
        frames_in_second = sum(
            1 for t, m in server.messages if m["event"] == "media" and sent_at <= t < sent_at + 1.0
        )
        assert 45 <= frames_in_second <= 55, frames_in_second
        echo = server.events("mark")[0]
        assert echo["streamSid"] == caller.stream_sid and echo["sequenceNumber"].isdigit()
        assert caller.played_audio == mulaw_ramp(8000)
        assert caller.marks_echoed[0][1:] == ("one", False)

        # With nothing buffered a mark comes straight back.
        sent_at = loop.time()
        await server.send_mark("idle")
        await server.wait_for(lambda: any(m["mark"]["name"] == "idle" for m in server.events("mark")))
        assert loop.time() - sent_at < 0.5  # far less than any audio buffered: nothing to wait for

        # clear: the buffer empties at once, pending marks come back at once, playback stops.
        await server.send_audio(mulaw_ramp(16000))
        await server.send_mark("two")
        await asyncio.sleep(0.3)
        sent_at = loop.time()
        await server.send({"event": "clear", "streamSid": caller.stream_sid})
        await server.wait_for(lambda: any(m["mark"]["name"] == "two" for m in server.events("mark")))
        assert loop.time() - sent_at < 0.5  # about 1.7 s of the 2 s were still to play
        assert caller.marks_echoed[-1][1:] == ("two", True)
        assert len(caller.clears) == 1
        played = len(caller.played_audio)
        await asyncio.sleep(0.15)
        assert len(caller.played_audio) == played
        assert 8000 + 0.2 * 8000 <= played <= 8000 + 0.45 * 8000
        assert played + caller.cleared_audio_bytes == 8000 + 16000

        # Messages Twilio would not accept are recorded, not played.
        assert server.ws is not None
        await server.ws.send("not json")
        await server.send({"event": "media", "streamSid": "MZwrong", "media": {"payload": "AAAA"}})
        await server.send({"event": "media", "streamSid": caller.stream_sid, "media": {"payload": "***"}})
        await server.send({"event": "bogus", "streamSid": caller.stream_sid})
        await caller.wait_until(lambda: len(caller.invalid) >= 4, timeout=1)
        problems = " | ".join(problem for _, problem in caller.invalid)
        assert "bad JSON" in problems and "wrong streamSid" in problems
        assert "base64" in problems and "unknown event" in problems
        assert len(caller.played_audio) == played


async def test_rest_completed_sends_stop_then_closes() -> None:
    async with StreamServer() as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
        call = await tw.start_stream_call(server.url)
        await server.wait_for(lambda: len(server.events("media")) >= 3)
        async with async_sdk_client(tw.base_url) as client:
            updated = await client.calls(call.sid).update_async(status="completed")
        assert updated.status == "completed"
        await asyncio.wait_for(server.closed.wait(), 3)
        last = server.messages[-1][1]
        assert last["event"] == "stop"
        assert last["stop"] == {"accountSid": ACCOUNT_SID, "callSid": call.sid}
        assert last["streamSid"] == server.stream_sid
        assert int(last["sequenceNumber"]) == int(server.messages[-2][1]["sequenceNumber"]) + 1
        assert server.close_code == 1000
        assert call.stream is not None and call.stream.closed_by == "twilio"
        assert call.status == "completed" and call.end_cause == "rest_completed"
        assert call.end_time is not None and call.duration is not None


async def test_redirect_records_twiml_and_ends_stream() -> None:
    async with StreamServer() as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN, dial_seconds=0.1) as tw:
        call = await tw.start_stream_call(server.url)
        await server.wait_for(lambda: len(server.events("media")) >= 1)
        transfer = "<Response><Dial>+15550003333</Dial></Response>"
        async with async_sdk_client(tw.base_url) as client:
            updated = await client.calls(call.sid).update_async(twiml=transfer)
        assert updated.status == "in-progress"
        assert call.redirect_twiml == transfer
        await asyncio.wait_for(server.closed.wait(), 3)
        assert server.messages[-1][1]["event"] == "stop"
        assert await call.wait_ended(timeout=2) == "rest_redirect"
        assert call.end_detail == "dial_finished"
        assert call.dialed == ["+15550003333"]
        assert call.status == "completed"


async def test_caller_hangup_sends_stop_then_closes() -> None:
    async with StreamServer() as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
        call = await tw.start_stream_call(server.url)
        await server.wait_for(lambda: len(server.events("media")) >= 1)
        assert call.stream is not None
        await call.stream.send_dtmf("7")
        await call.stream.hangup()
        await asyncio.wait_for(server.closed.wait(), 3)
        events = [m["event"] for _, m in server.messages]
        assert events[-1] == "stop"
        assert events.index("dtmf") < len(events) - 1
        dtmf = server.events("dtmf")[0]
        assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "7"}
        assert call.status == "completed" and call.end_cause == "caller_hangup"
        assert call.stream.closed_by == "twilio"
        async with async_sdk_client(tw.base_url) as client:
            fetched = await client.calls(call.sid).fetch_async()
        assert fetched.status == "completed"


async def test_server_closing_the_stream_completes_the_call() -> None:
    async with StreamServer() as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
        call = await tw.start_stream_call(server.url)
        await server.wait_for(lambda: len(server.events("media")) >= 1)
        assert server.ws is not None
        await server.ws.close(1000)
        assert await call.wait_ended(timeout=2) == "stream_closed"
        assert call.stream is not None
        assert call.stream.closed_by == "server" and call.stream.close_code == 1000
        assert not call.stream.sent_events("stop")


async def test_dropped_stream_and_refused_upgrade() -> None:
    async with StreamServer() as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
        call = await tw.start_stream_call(server.url)
        await server.wait_for(lambda: len(server.events("media")) >= 1)
        assert call.stream is not None
        await call.stream.drop()
        await asyncio.wait_for(server.closed.wait(), 3)
        assert server.close_code == 1006
        assert call.stream.closed_by == "drop"
        assert await call.wait_ended(timeout=2) == "stream_dropped"

        closed = await tw.start_stream_call(server.url)
        assert closed.stream is not None
        await closed.stream.close_without_stop()
        await asyncio.wait_for(server.closed.wait(), 3)
        assert server.close_code == 1000
        assert not closed.stream.sent_events("stop")
        assert await closed.wait_ended(timeout=2) == "stream_closed_by_twilio"

        refused = await tw.start_stream_call("ws://127.0.0.1:9/nothing-here")
        assert refused.stream is not None and refused.stream.connect_error
        assert await refused.wait_ended(timeout=2) == "stream_connect_failed"


async def test_stream_upgrade_signature_checked_by_the_application() -> None:
    async with StreamServer(check_signature=True) as server, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
        good = await tw.start_stream_call(server.url)
        assert good.stream is not None and good.stream.started.is_set()
        forged = await tw.start_stream_call(server.url, signature="bad")
        assert forged.stream is not None and "403" in (forged.stream.connect_error or "")
        assert await forged.wait_ended(timeout=2) == "stream_connect_failed"
        assert server.refused == 1


async def test_standalone_caller_and_shutdown_closes_streams() -> None:
    async with StreamServer() as server:
        async with MediaStreamCaller(server.url, auth_token=AUTH_TOKEN, audio=mulaw_ramp(320)) as caller:
            await caller.speech_done.wait()
            await server.wait_for(lambda: len(server.events("media")) >= 2)
        assert caller.closed_by == "twilio"
        await asyncio.wait_for(server.closed.wait(), 3)
        assert server.events("stop")

    async with StreamServer() as server:
        async with TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
            call = await tw.start_stream_call(server.url)
        assert call.end_cause == "emulator_shutdown"
        assert call.stream is not None and call.stream.closed.is_set()
        await asyncio.wait_for(server.closed.wait(), 3)
        assert server.events("stop")


# ----------------------------------------------------------------------------------------- webhooks


class Application:
    """The application side of webhooks, checking every signature with the twilio SDK."""

    def __init__(self, stream_url: str) -> None:
        self.stream_url = stream_url
        self.base_url = ""
        self.validator = RequestValidator(AUTH_TOKEN)
        self.voice_requests: list[dict[str, str]] = []
        self.status_requests: list[dict[str, str]] = []
        self.rejected: list[str] = []
        self.status_changed = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/voice", self.voice, methods=["POST"]),
                Route("/busy", self.busy, methods=["POST"]),
                Route("/status", self.status, methods=["POST"]),
                Route("/reject", self.reject, methods=["POST"]),
            ]
        )

    async def _validated(self, request: Request) -> dict[str, str] | None:
        # Parsed by hand: starlette's request.form() needs python-multipart, not a dependency.
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        if not self.validator.validate(str(request.url), form, request.headers.get("x-twilio-signature", "")):
            self.rejected.append(request.url.path)
            return None
        return form

    async def voice(self, request: Request) -> Response:
        form = await self._validated(request)
        if form is None:
            return Response(status_code=403)
        self.voice_requests.append(form)
        twiml = (
            f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{self.stream_url}">'
            '<Parameter name="a" value="b"/></Stream></Connect></Response>'
        )
        return Response(twiml, media_type="text/xml")

    async def busy(self, request: Request) -> Response:
        if await self._validated(request) is None:
            return Response(status_code=403)
        return Response("<Response><Say>busy, try later</Say><Hangup/></Response>", media_type="text/xml")

    async def reject(self, request: Request) -> Response:
        if await self._validated(request) is None:
            return Response(status_code=403)
        return Response('<Response><Reject reason="busy"/></Response>', media_type="text/xml")

    async def status(self, request: Request) -> Response:
        form = await self._validated(request)
        if form is None:
            return Response(status_code=403)
        self.status_requests.append(form)
        self.status_changed.set()
        return Response(status_code=204)


async def test_inbound_webhook_flow_signed_and_streamed() -> None:
    async with StreamServer() as server:
        application = Application(server.url)
        async with asgi_server(application.app) as app_url, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
            call = await tw.place_inbound_call(
                f"{app_url}/voice",
                from_="+15550001111",
                to="+15550002222",
                audio=mulaw_ramp(160),
                status_callback=f"{app_url}/status",
            )
            assert application.rejected == []
            params = application.voice_requests[0]
            assert params == {
                "AccountSid": ACCOUNT_SID,
                "ApiVersion": "2010-04-01",
                "CallSid": call.sid,
                "CallStatus": "ringing",
                "Called": "+15550002222",
                "Caller": "+15550001111",
                "Direction": "inbound",
                "From": "+15550001111",
                "To": "+15550002222",
            }
            assert call.stream is not None and call.stream.started.is_set()
            await server.wait_for(lambda: len(server.events("start")) == 1)
            assert server.events("start")[0]["start"]["customParameters"] == {"a": "b"}
            assert call.status == "in-progress" and call.direction == "inbound"
            await call.stream.hangup()
            assert await call.wait_ended(timeout=2) == "caller_hangup"
            await asyncio.wait_for(application.status_changed.wait(), 2)
            completed = application.status_requests[-1]
            assert completed["CallStatus"] == "completed" and completed["CallSid"] == call.sid
            assert completed["CallbackSource"] == "call-progress-events"
            assert completed["CallDuration"].isdigit()

            # A wrong signature is refused by the application: Twilio gives up on the call.
            forged = await tw.place_inbound_call(f"{app_url}/voice", signature="bad")
            assert application.rejected == ["/voice"]
            assert forged.end_cause == "webhook_error" and forged.stream is None

            # At capacity, the application answers with TwiML that speaks and hangs up.
            busy = await tw.place_inbound_call(f"{app_url}/busy")
            assert busy.said == ["busy, try later"]
            assert busy.end_cause == "twiml_hangup" and busy.status == "completed"
            assert busy.stream is None


async def test_outbound_create_connects_stream_and_reports_status() -> None:
    async with StreamServer() as server:
        application = Application(server.url)
        async with asgi_server(application.app) as app_url, TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN) as tw:
            twiml = (
                f'<Response><Connect><Stream url="{server.url}"><Parameter name="lead" value="42"/>'
                "</Stream></Connect></Response>"
            )
            async with async_sdk_client(tw.base_url) as client:
                created = await client.calls.create_async(
                    to="+15550002222",
                    from_="+15550001111",
                    twiml=twiml,
                    status_callback=f"{app_url}/status",
                    status_callback_event=["initiated", "ringing", "answered", "completed"],
                )
                call = tw.calls[created.sid]
                caller = await call.wait_stream(timeout=3)
                await server.wait_for(lambda: len(server.events("start")) == 1)
                start = server.events("start")[0]["start"]
                assert start["customParameters"] == {"lead": "42"}
                assert start["callSid"] == created.sid
                await client.calls(created.sid).update_async(status="completed")
            await caller.wait_closed(timeout=3)
            await call.wait_ended(timeout=2)

            async def all_callbacks() -> None:
                while len(application.status_requests) < 4:
                    application.status_changed.clear()
                    await application.status_changed.wait()

            await asyncio.wait_for(all_callbacks(), 3)
            statuses = [r["CallStatus"] for r in application.status_requests]
            assert statuses == ["initiated", "ringing", "in-progress", "completed"]
            assert [r["SequenceNumber"] for r in application.status_requests] == ["0", "1", "2", "3"]
            assert all(r["Direction"] == "outbound-api" for r in application.status_requests)
            assert application.rejected == []
            assert len(call.status_callbacks_sent) == 4

            # Url instead of Twiml: Twilio fetches the TwiML with a signed webhook once answered.
            async with async_sdk_client(tw.base_url) as client:
                by_url = await client.calls.create_async(
                    to="+15550003333", from_="+15550001111", url=f"{app_url}/voice"
                )
            url_call: EmulatedCall = tw.calls[by_url.sid]
            await url_call.wait_stream(timeout=3)
            assert application.voice_requests[-1]["CallStatus"] == "in-progress"
            assert application.voice_requests[-1]["Direction"] == "outbound-api"
            assert application.rejected == []


async def test_reject_redirect_by_url_and_later_speech() -> None:
    async with StreamServer() as server:
        application = Application(server.url)
        async with asgi_server(application.app) as app_url:
            emulator = TwilioEmulator(ACCOUNT_SID, AUTH_TOKEN, status_callback_url=f"{app_url}/status")
            async with emulator as tw:
                rejected = await tw.place_inbound_call(f"{app_url}/reject")
                assert rejected.status == "busy" and rejected.end_cause == "rejected"
                assert rejected.reject_reason == "busy" and rejected.answered_time is None

                call = await tw.place_inbound_call(f"{app_url}/voice")
                caller = call.stream
                assert caller is not None
                caller.say(mulaw_ramp(320))
                await caller.speech_done.wait()
                await server.wait_for(lambda: len(server.events("media")) >= 4)
                audio = b"".join(base64.b64decode(m["media"]["payload"]) for m in server.events("media"))
                assert mulaw_ramp(320) in audio

                async with async_sdk_client(tw.base_url) as client:
                    await client.calls(call.sid).update_async(url=f"{app_url}/busy", method="POST")
                assert await call.wait_ended(timeout=3) == "rest_redirect"
                assert call.redirect_twiml == f"{app_url}/busy"
                assert call.said == ["busy, try later"] and call.end_detail == "twiml_hangup"
                assert caller.closed_by == "twilio" and caller.sent_events("stop")
            statuses = [(r["CallSid"], r["CallStatus"]) for r in application.status_requests]
            assert (rejected.sid, "busy") in statuses and (call.sid, "completed") in statuses
            assert application.rejected == []


def test_signature_helper_matches_the_sdk() -> None:
    params = {"CallSid": "CA1", "From": "+1 555", "Digits": "1234", "Caller": "x&y"}
    url = "https://example.com/voice?x=1"
    assert twilio_signature(AUTH_TOKEN, url, params) == RequestValidator(AUTH_TOKEN).compute_signature(
        url, params
    )
