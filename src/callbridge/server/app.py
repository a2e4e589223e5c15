"""The ASGI app a Twilio number points at (Starlette, served by uvicorn).

Routes: Twilio's voice webhook, the media-stream WebSocket, status callbacks, the
`/calls` API (bearer token), `/healthz` and `/metrics` (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse

from callbridge.agents.base import AgentCallContext, AgentSession
from callbridge.agents.elevenlabs.session import ElevenLabsConfig, session_factory
from callbridge.bridge import DYNAMIC_VARIABLE_PREFIX, Bridge
from callbridge.call import CallHooks, EndReason, Tool
from callbridge.config import Settings
from callbridge.logs import log_event
from callbridge.recovery import reconcile
from callbridge.server.streamwatch import ExpectedCall, StreamWatch
from callbridge.store import CallStore, StoreUnavailable
from callbridge.telephony.base import CallControl, CallControlError, StreamInfo
from callbridge.telephony.twilio.control import TwilioCallControl
from callbridge.transport import SocketClosed

__all__ = ["AppState", "StarletteSocket", "create_app"]

log = logging.getLogger("callbridge.server")

MAX_BODY_BYTES = 64 * 1024
END_STATUSES = frozenset({"completed", "failed", "busy", "no-answer", "canceled"})
BUSY_TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Sorry, all of our lines are busy right now. '
    "Please call again in a few minutes.</Say><Hangup/></Response>"
)
_PHONE_RE = re.compile(r"^(\+[1-9][0-9]{6,15}|(sip|client):[A-Za-z0-9@._:;=+-]{1,200})$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_SID_RE = re.compile(r"^CA[0-9a-fA-F]{32}$")


class StarletteSocket:
    """`MessageSocket` over a Starlette WebSocket (uvicorn)."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._closed = False

    async def receive(self) -> str | bytes:
        if self._closed:
            raise SocketClosed(1000, "closed")
        message = await self._ws.receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self._closed = True
        code = int(message.get("code", 1005))
        # uvicorn reports a connection lost without a close frame as 1006.
        raise SocketClosed(None if code == 1006 else code, str(message.get("reason") or ""))

    async def send(self, text: str) -> None:
        if self._closed:
            raise SocketClosed(1000, "closed")
        try:
            await self._ws.send({"type": "websocket.send", "text": text})
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            self._closed = True
            raise SocketClosed(None, repr(exc)) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._ws.close(code, reason)


@dataclass
class AppState:
    settings: Settings
    bridge: Bridge
    store: CallStore
    control: CallControl
    validator: RequestValidator
    token_key: bytes = field(repr=False)  # makes stream tokens: never shown
    reconciled: asyncio.Event = field(default_factory=asyncio.Event)
    used_refs: OrderedDict[str, float] = field(default_factory=OrderedDict)
    outbound_refs: dict[str, str] = field(default_factory=dict)
    pending_streams: OrderedDict[str, float] = field(default_factory=OrderedDict)
    rejected_signatures: dict[str, int] = field(default_factory=dict)
    unwritten: int = 0  # calls whose records were left in the spool at shutdown
    streamwatch: StreamWatch | None = None  # closes calls whose stream never connects

    # -- per-call stream token ------------------------------------------------

    def stream_token(self, ref: str) -> str:
        # surrogatepass: a ref from a stream's JSON may hold a lone surrogate.
        return hmac.new(self.token_key, ref.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:40]

    def check_stream(self, info: StreamInfo) -> str | None:
        """Refuse a stream whose token is missing, forged, for another call, or used before."""
        params = info.custom_parameters
        ref, token = params.get("cb_ref", ""), params.get("cb_token", "")
        if not ref or not token:
            return "no stream token"
        # As bytes: compare_digest raises TypeError on str with non-ASCII characters.
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.stream_token(ref).encode()):
            return "bad stream token"
        bound = info.call_sid if ref.startswith("CA") else self.outbound_refs.get(ref)
        if ref.startswith("CA") and ref != info.call_sid:
            return "stream token belongs to another call"
        if bound is not None and bound != info.call_sid:
            return "stream token belongs to another call"
        if ref in self.used_refs:
            return "stream token already used"
        self._remember(self.used_refs, ref)
        self.pending_streams.pop(info.call_sid, None)
        if self.streamwatch is not None:
            self.streamwatch.connected(info.call_sid)
        return None

    @staticmethod
    def _remember(table: OrderedDict[str, float], key: str, keep_s: float = 6 * 3600) -> None:
        now = time.monotonic()
        table[key] = now
        while table:
            oldest_key, t = next(iter(table.items()))
            if now - t < keep_s:
                break
            del table[oldest_key]

    def reserved_streams(self) -> int:
        """Calls answered with stream TwiML whose stream has not connected yet (30 s at most)."""
        now = time.monotonic()
        while self.pending_streams:
            oldest_key, t = next(iter(self.pending_streams.items()))
            if now - t < 30:
                break
            del self.pending_streams[oldest_key]
        return len(self.pending_streams)

    def has_capacity(self) -> bool:
        return self.bridge.live_calls + self.reserved_streams() < self.settings.max_concurrent_calls

    # -- Twilio signatures ---------------------------------------------------

    def bad_signature(self, route: str) -> None:
        self.rejected_signatures[route] = self.rejected_signatures.get(route, 0) + 1
        log_event(log, "twilio.bad_signature", logging.WARNING, route=route)

    def signed_url(self, request: Request | WebSocket, ws: bool = False) -> str:
        """The URL Twilio signed: the public URL plus the path and query it requested."""
        base = self.settings.stream_url().rsplit("/twilio/media-stream", 1)[0] if ws else None
        root = base if base is not None else (self.settings.public_url or "").rstrip("/")
        url = root + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        return url

    def signature_ok(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        if not signature:
            return False
        return bool(self.validator.validate(url, dict(params), signature))


def connect_twiml(stream_url: str, params: Mapping[str, str]) -> str:
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in params.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The body, or None if it is larger than `limit` (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request) -> dict[str, str] | Response:
    body = await read_body(request)
    if body is None:
        return JSONResponse({"error": "request body too large"}, status_code=413)
    from urllib.parse import parse_qsl

    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        return JSONResponse({"error": "form body is not UTF-8"}, status_code=400)
    return dict(pairs)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _BridgeCollector(Collector):
    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Any:
        s = self.state.bridge.stats
        yield GaugeMetricFamily(
            "callbridge_active_calls", "Calls live in this process", value=self.state.bridge.live_calls
        )
        started = CounterMetricFamily("callbridge_calls_started", "Media streams accepted")
        started.add_metric([], s.calls_started)
        yield started
        ended = CounterMetricFamily("callbridge_calls_ended", "Calls ended, by end reason", labels=["reason"])
        for reason in EndReason:
            ended.add_metric([reason.value], s.calls_ended.get(reason.value, 0))
        yield ended
        rejected = CounterMetricFamily("callbridge_calls_rejected", "Calls turned away at capacity")
        rejected.add_metric([], s.calls_rejected)
        yield rejected
        frames = CounterMetricFamily("callbridge_frames", "Audio frames forwarded", labels=["direction"])
        frames.add_metric(["caller_to_agent"], s.frames_to_agent)
        frames.add_metric(["agent_to_caller"], s.chunks_to_caller)
        yield frames
        errors = CounterMetricFamily("callbridge_errors", "Bad input and failures, all calls")
        errors.add_metric([], s.errors)
        yield errors
        refused = CounterMetricFamily(
            "callbridge_streams_refused", "Media streams refused (bad token, broken start)"
        )
        refused.add_metric([], s.streams_refused)
        yield refused
        signatures = CounterMetricFamily(
            "callbridge_bad_signatures", "Requests refused for a bad X-Twilio-Signature", labels=["route"]
        )
        for route in ("/twilio/inbound", "/twilio/status", "/twilio/media-stream"):
            signatures.add_metric([route], self.state.rejected_signatures.get(route, 0))
        yield signatures
        yield _histogram(
            "callbridge_hangup_latency_seconds",
            "From the last goodbye mark to the hang-up request",
            [v / 1000 for v in s.hangup_latency_ms],
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        yield _histogram(
            "callbridge_agent_connect_seconds",
            "From stream start to the agent's conversation metadata",
            [v / 1000 for v in s.agent_connect_ms],
            (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
        )


def _histogram(name: str, doc: str, values: list[float], bounds: tuple[float, ...]) -> HistogramMetricFamily:
    buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=sum(values))


def create_app(
    settings: Settings,
    *,
    agent_factory: Callable[[AgentCallContext], AgentSession] | None = None,
    control: CallControl | None = None,
    store: CallStore | None = None,
    hooks: CallHooks | None = None,
    tools: Mapping[str, Tool] | None = None,
) -> Starlette:
    control = control or TwilioCallControl(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )
    store = store or CallStore(
        settings.database_url, instance=settings.instance_id, spool_path=settings.spool_path()
    )
    agent_factory = agent_factory or session_factory(
        ElevenLabsConfig(
            agent_id=settings.elevenlabs_agent_id,
            api_key=settings.elevenlabs_api_key,
            api_base_url=settings.elevenlabs_api_base_url,
        )
    )
    bridge = Bridge(agent_factory, control, settings.call_options(), hooks, tools, sink=store)
    state = AppState(
        settings=settings,
        bridge=bridge,
        store=store,
        control=control,
        validator=RequestValidator(settings.twilio_auth_token),
        token_key=hmac.new(
            settings.twilio_auth_token.encode(), b"callbridge-stream-token", hashlib.sha256
        ).digest(),
    )
    bridge.stream_validator = state.check_stream

    async def settled(call_sid: str) -> bool:
        # A stream taken by another worker or instance has written its record (with its stream SID).
        record = await store.get(call_sid)
        return record is not None and (bool(record.get("stream_sid")) or record.get("status") == "ended")

    watch = state.streamwatch = StreamWatch(
        control, store, settings.stream_connect_timeout, settled, counts=bridge.stats.calls_ended
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_BridgeCollector(state))

    async def twilio_webhook(request: Request, direction: str) -> Response:
        form = await read_form(request)
        if isinstance(form, Response):
            return form
        url = state.signed_url(request)
        if not state.signature_ok(url, form, request.headers.get("x-twilio-signature")):
            state.bad_signature(request.url.path)
            return error(403, "invalid Twilio signature")
        call_sid = form.get("CallSid", "")
        if not _SID_RE.fullmatch(call_sid):
            return error(400, "CallSid missing or malformed")
        if not bridge.accepting or not state.has_capacity():
            bridge.stats.calls_rejected += 1
            log_event(log, "call.rejected", logging.WARNING, call_sid=call_sid, live_calls=bridge.live_calls)
            return Response(BUSY_TWIML, media_type="application/xml")
        params = {
            "from": form.get("From", ""),
            "to": form.get("To", ""),
            "direction": direction,
            "cb_ref": call_sid,
            "cb_token": state.stream_token(call_sid),
        }
        state._remember(state.pending_streams, call_sid, keep_s=30)
        watch.expect(call_sid, ExpectedCall(direction, form.get("From", ""), form.get("To", "")))
        log_event(log, "twilio.webhook", call_sid=call_sid, direction=direction)
        return Response(connect_twiml(settings.stream_url(), params), media_type="application/xml")

    async def inbound(request: Request) -> Response:
        return await twilio_webhook(request, "inbound")

    async def status_callback(request: Request) -> Response:
        form = await read_form(request)
        if isinstance(form, Response):
            return form
        if not state.signature_ok(state.signed_url(request), form, request.headers.get("x-twilio-signature")):
            state.bad_signature(request.url.path)
            return error(403, "invalid Twilio signature")
        call_sid, status = form.get("CallSid", ""), form.get("CallStatus", "")
        if not _SID_RE.fullmatch(call_sid) or not status:
            return error(400, "CallSid and CallStatus are required")
        details: dict[str, Any] = {
            k: form[k] for k in ("CallDuration", "Timestamp", "SequenceNumber") if k in form
        }
        log_event(log, "twilio.status", call_sid=call_sid, status=status)
        await store.set_twilio_status(call_sid, status, details, form)  # queued: never fails here
        if status in END_STATUSES:
            call = bridge.find(call_sid)
            if call is not None:
                call.carrier_ended(f"status callback: {status}")
            elif await watch.carrier_ended(call_sid, status):
                pass  # answered here but its stream never connected: closed `no_media_stream`
            elif status != "completed":
                # An outbound call that never connected its stream: close its placeholder.
                await store.close_record(call_sid, EndReason.TELEPHONY_ERROR.value, f"call {status}")
        return Response(status_code=204)

    async def media_stream(ws: WebSocket) -> None:
        url = state.signed_url(ws, ws=True)
        signature = ws.headers.get("x-twilio-signature")
        await ws.accept()
        if not state.signature_ok(url, {}, signature):
            state.bad_signature("/twilio/media-stream")
            with contextlib.suppress(Exception):
                await ws.close(1008, "invalid signature")
            return
        if not bridge.accepting:
            with contextlib.suppress(Exception):
                await ws.close(1013, "shutting down")
            return
        await bridge.handle_media_stream(StarletteSocket(ws))

    def authorized(request: Request) -> bool:
        expected = settings.api_token
        header = request.headers.get("authorization", "")
        if not expected or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].encode(), expected.encode())

    def require_token(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            if not settings.api_token:
                return error(503, "the /calls API is disabled: CALLBRIDGE_API_TOKEN is not set")
            if not authorized(request):
                return JSONResponse(
                    {"error": "missing or wrong bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            result: Response = await handler(request)
            return result

        return wrapped

    async def create_call(request: Request) -> Response:
        body = await read_body(request, 16 * 1024)
        if body is None:
            return error(413, "request body too large")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # incl. an integer literal over 4300 digits
            return error(400, "body must be JSON")
        problem = validate_call_request(data)
        if problem:
            return error(422, problem)
        if not bridge.accepting or not state.has_capacity():
            return error(503, "at capacity: try again later")
        ref = "out-" + secrets.token_hex(12)
        params: dict[str, str] = {
            "from": data["from"],
            "to": data["to"],
            "direction": "outbound",
            "cb_ref": ref,
            "cb_token": state.stream_token(ref),
        }
        if data.get("agent_id"):
            params["agent_id"] = data["agent_id"]
        for name, value in (data.get("dynamic_variables") or {}).items():
            params[DYNAMIC_VARIABLE_PREFIX + name] = (
                json.dumps(value) if not isinstance(value, str) else value
            )
        twiml = connect_twiml(settings.stream_url(), params)
        if not isinstance(control, TwilioCallControl):
            return error(501, "outbound calls need Twilio call control")
        try:
            out = await control.create_call(
                data["to"], data["from"], twiml, settings.public("/twilio/status")
            )
        except CallControlError as exc:
            log_event(log, "twilio.create_failed", logging.ERROR, to=data["to"], error=str(exc))
            return error(502, str(exc))
        state.outbound_refs[ref] = out.call_sid
        state._remember(state.pending_streams, out.call_sid, keep_s=60)
        watch.expect(out.call_sid, ExpectedCall("outbound", data["from"], data["to"]))
        # The call is placed: from here on, nothing may answer 5xx (a client that retries
        # would dial the person twice). The placeholder is queued; the API shows it at once.
        record = await store.create_placeholder(out.call_sid, "outbound", data["from"], data["to"])
        log_event(log, "call.outbound_created", call_sid=out.call_sid, to=data["to"])
        return JSONResponse(record, status_code=201)

    async def list_calls(request: Request) -> Response:
        q = request.query_params
        try:
            limit = min(max(int(q.get("limit", "50")), 1), 200)
            offset = max(int(q.get("offset", "0")), 0)
            since = datetime.fromisoformat(q["since"]) if q.get("since") else None
        except ValueError:
            return error(400, "limit/offset must be integers and since an ISO 8601 time")
        status = q.get("status")
        if status and status not in ("active", "ended"):
            return error(400, "status must be active or ended")
        reason = q.get("end_reason")
        if reason and reason not in {r.value for r in EndReason}:
            return error(400, f"unknown end_reason {reason!r}")
        page = await store.list_calls(
            status=status, end_reason=reason, since=since, limit=limit, offset=offset
        )
        return JSONResponse({"calls": page.items, "next_offset": page.next_offset})

    async def get_call(request: Request) -> Response:
        call_sid = request.path_params["call_sid"]
        if not _SID_RE.fullmatch(call_sid):
            return error(404, "no such call (a call SID is CA followed by 32 hex digits)")
        record = await store.get(call_sid)
        if record is None:
            return error(404, "no such call")
        return JSONResponse(record)

    async def hangup_call(request: Request) -> Response:
        call_sid = request.path_params["call_sid"]
        if not _SID_RE.fullmatch(call_sid):
            return error(404, "no such call (a call SID is CA followed by 32 hex digits)")
        live = await bridge.hangup(call_sid)
        if live is not None:
            return JSONResponse(await store.get(call_sid) or live.to_dict())
        record = await store.get(call_sid)
        if record is None:
            return error(404, "no such call")
        if record["status"] == "ended":
            return error(409, "call already ended")
        # Live on another instance (or its stream not connected yet): end it at Twilio;
        # the instance holding it sees the stream stop and records the end.
        try:
            await control.hangup(call_sid)
        except CallControlError as exc:
            return error(502, str(exc))
        return JSONResponse(record, status_code=202)

    async def healthz(request: Request) -> Response:
        body = {"status": "ok" if bridge.accepting else "draining", "live_calls": bridge.live_calls}
        return JSONResponse(body, status_code=200 if bridge.accepting else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def recover() -> None:
        try:
            # Writes spooled by an earlier run go first: a call that ended during an outage
            # keeps its true end reason instead of being reconciled as left open.
            if not await store.wait_written(settings.shutdown_grace_seconds + store.timeout):
                log.warning("crash recovery waits: spooled call records are not written yet")
                await store.wait_written(float("inf"))
            await reconcile(store, control, settings.instance_id)
        except Exception:
            log.exception("crash recovery failed")
        finally:
            state.reconciled.set()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.init()
        log_event(
            log, "server.started", public_url=settings.public_url, max_calls=settings.max_concurrent_calls
        )
        recovery = asyncio.ensure_future(recover())
        try:
            yield
        finally:
            recovery.cancel()
            await watch.close()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
            await bridge.shutdown(0)
            aclose = getattr(control, "aclose", None)
            if aclose is not None:
                await aclose()
            # Bounded: a hung database never holds the process past the grace period.
            state.unwritten = await store.close(min(store.timeout, max(settings.shutdown_grace_seconds, 1.0)))

    routes = [
        Route("/twilio/inbound", inbound, methods=["POST"]),
        Route("/twilio/status", status_callback, methods=["POST"]),
        WebSocketRoute("/twilio/media-stream", media_stream),
        Route("/calls", require_token(create_call), methods=["POST"]),
        Route("/calls", require_token(list_calls), methods=["GET"]),
        Route("/calls/{call_sid}", require_token(get_call), methods=["GET"]),
        Route("/calls/{call_sid}/hangup", require_token(hangup_call), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={StoreUnavailable: store_unavailable}
    )
    app.state.callbridge = state
    return app


async def store_unavailable(request: Request, exc: Exception) -> Response:
    log_event(log, "api.store_unavailable", logging.WARNING, path=request.url.path, error=str(exc))
    return JSONResponse(
        {"error": "the call records database is unavailable; try again shortly"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def validate_call_request(data: Any) -> str | None:
    """Why a `POST /calls` body is unacceptable, or None."""
    if not isinstance(data, dict):
        return "body must be a JSON object"
    unknown = set(data) - {"to", "from", "dynamic_variables", "agent_id"}
    if unknown:
        return f"unknown fields: {', '.join(sorted(map(str, unknown)))}"
    for key in ("to", "from"):
        value = data.get(key)
        if not isinstance(value, str) or not _PHONE_RE.fullmatch(value):
            return f"{key!r} must be an E.164 number (+15551234567) or a sip:/client: address"
    agent_id = data.get("agent_id")
    if agent_id is not None and (not isinstance(agent_id, str) or not _AGENT_ID_RE.fullmatch(agent_id)):
        return "'agent_id' must be letters, digits, '_' or '-'"
    variables = data.get("dynamic_variables")
    if variables is None:
        return None
    if not isinstance(variables, dict) or len(variables) > 32:
        return "'dynamic_variables' must be an object of at most 32 entries"
    for name, value in variables.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            return f"dynamic variable name {name!r} must be an identifier"
        if not isinstance(value, str | int | float | bool) or value is None:
            return f"dynamic variable {name!r} must be a string, number or boolean"
        if len(str(value)) + len(name) > 400:
            return (
                f"dynamic variable {name!r} is too long (Twilio limits a stream parameter to 500 characters)"
            )
    return None
