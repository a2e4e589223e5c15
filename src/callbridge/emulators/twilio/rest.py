"""The REST Calls API: ``Calls.json`` and ``Calls/{CallSid}.json``, and scripted faults.

HTTP Basic auth, form-encoded requests, JSON Call resources that the official SDK parses, and
Twilio's error bodies; faults answer with status codes, Twilio error codes, Retry-After, or late.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callbridge.emulators.twilio.amd import MachineDetection
from callbridge.emulators.twilio.calls import API_VERSION, EmulatedCall, RecordedRequest
from callbridge.emulators.twilio.numbers import PhoneNumbers
from callbridge.emulators.twilio.twiml import TwimlRunner

__all__ = ["Fault", "RestApi"]


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


_DEFAULT_ERROR_CODES = {400: 20001, 401: 20003, 403: 20403, 404: 20404, 405: 20004, 429: 20429}
_DEFAULT_ERROR_MESSAGES = {
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    20503: "Service unavailable",
    21220: "Call is not in-progress. Cannot redirect.",
}


@dataclass
class Fault:
    status: int | None
    code: int | None
    message: str | None
    retry_after: float | None
    delay: float


class RestApi(TwimlRunner):
    """The REST side of the emulator: a Starlette app over the calls, with scripted faults."""

    # ---- faults

    def inject_fault(
        self,
        operation: str,
        *,
        status: int | None = None,
        code: int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
    ) -> None:
        """Script the answer to the next REST ``operation`` ("create" | "update" | "fetch" | "list").

        Faults are consumed in order, one per request.  ``delay`` makes the answer late; with no
        ``status`` the request is then processed normally (a slow Twilio: the change still
        happens even if the client has given up waiting).
        """
        if operation not in ("create", "update", "fetch", "list"):
            raise ValueError(f"unknown operation {operation!r}")
        self._faults.setdefault(operation, deque()).append(Fault(status, code, message, retry_after, delay))

    async def _apply_fault(self, operation: str) -> Response | None:
        queue = self._faults.get(operation)
        if not queue:
            return None
        fault = queue.popleft()
        if fault.delay:
            await self._sleep(fault.delay)
        if fault.status is None:
            return None
        code = fault.code or _DEFAULT_ERROR_CODES.get(fault.status, 20000 + fault.status)
        message = fault.message or _DEFAULT_ERROR_MESSAGES.get(code, f"Injected fault {fault.status}")
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        return JSONResponse(
            error_body(fault.status, code, message), status_code=fault.status, headers=headers
        )

    # ---- REST API

    @functools.cached_property
    def machine_detection(self) -> MachineDetection:
        """Answering-machine detection of outbound calls: what answers them (tests set it)."""
        return MachineDetection()

    @functools.cached_property
    def phone_numbers(self) -> PhoneNumbers:
        """The account's IncomingPhoneNumbers (tests add numbers pointed anywhere)."""
        return PhoneNumbers(self.account_sid)

    def _build_app(self) -> Starlette:
        calls_path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls.json"
        call_path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls/{{call_sid}}.json"
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        return Starlette(
            routes=[
                Route(calls_path, self._calls_endpoint, methods=methods),
                Route(call_path, self._call_endpoint, methods=methods),
                # The account and its phone numbers (numbers.py).
                *self.phone_numbers.routes(self._authenticate, self._record),
                Route("/{path:path}", self._not_found_endpoint, methods=methods),
            ]
        )

    async def _record(self, request: Request) -> list[tuple[str, str]]:
        if request.method == "GET":
            items = list(request.query_params.multi_items())
        else:
            body = (await request.body()).decode("utf-8", "replace")
            items = parse_qsl(body, keep_blank_values=True)
        self.requests.append(
            RecordedRequest(
                time=asyncio.get_running_loop().time(),
                method=request.method,
                path=request.url.path,
                form=dict(items),
                headers=dict(request.headers),
                items=items,
            )
        )
        return items

    def _authenticate(self, request: Request) -> Response | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            user = password = ""
        ok = (
            scheme.lower() == "basic"
            and hmac.compare_digest(user, self.account_sid)
            and hmac.compare_digest(password, self.auth_token)
        )
        if not ok:
            return JSONResponse(
                error_body(401, 20003, "Authenticate"),
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
        if request.path_params.get("account_sid") != self.account_sid:
            return self._not_found(request)
        return None

    @staticmethod
    def _not_found(request: Request) -> Response:
        return JSONResponse(
            error_body(404, 20404, f"The requested resource {request.url.path} was not found"),
            status_code=404,
        )

    async def _not_found_endpoint(self, request: Request) -> Response:
        await self._record(request)
        return self._not_found(request)

    @staticmethod
    def _method_not_allowed() -> Response:
        return JSONResponse(error_body(405, 20004, "Method not allowed"), status_code=405)

    async def _calls_endpoint(self, request: Request) -> Response:
        items = await self._record(request)
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        if request.method not in ("GET", "POST"):
            return self._method_not_allowed()
        fault = await self._apply_fault("create" if request.method == "POST" else "list")
        if fault is not None:
            return fault
        if request.method == "POST":
            return await self._create_call(items)
        return self._list_calls(request, dict(items))

    async def _call_endpoint(self, request: Request) -> Response:
        items = await self._record(request)
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        if request.method == "GET":
            fault = await self._apply_fault("fetch")
        elif request.method == "POST":
            fault = await self._apply_fault("update")
        else:
            return self._method_not_allowed()
        if fault is not None:
            return fault
        call = self.calls.get(request.path_params["call_sid"])
        if call is None:
            return self._not_found(request)
        if request.method == "GET":
            return JSONResponse(call.to_resource())
        return await self._update_call(call, dict(items))

    def _list_calls(self, request: Request, query: dict[str, str]) -> Response:
        calls = sorted(self.calls.values(), key=lambda c: c.date_created, reverse=True)
        for key, attr in (("Status", "status"), ("To", "to"), ("From", "from_")):
            if key in query:
                calls = [c for c in calls if getattr(c, attr) == query[key]]
        try:
            page_size = max(1, min(1000, int(query.get("PageSize", "50"))))
        except ValueError:
            page_size = 50
        calls = calls[:page_size]
        uri = request.url.path
        return JSONResponse(
            {
                "calls": [c.to_resource() for c in calls],
                "end": max(len(calls) - 1, 0),
                "first_page_uri": f"{uri}?PageSize={page_size}&Page=0",
                "next_page_uri": None,
                "page": 0,
                "page_size": page_size,
                "previous_page_uri": None,
                "start": 0,
                "uri": f"{uri}?PageSize={page_size}&Page=0",
            }
        )

    async def _create_call(self, items: list[tuple[str, str]]) -> Response:
        form = dict(items)
        to, from_ = form.get("To", ""), form.get("From", "")
        twiml, url = form.get("Twiml"), form.get("Url")
        if not to:
            return JSONResponse(error_body(400, 21201, "No 'To' number is specified"), status_code=400)
        if not from_:
            return JSONResponse(error_body(400, 21603, "A 'From' phone number is required."), status_code=400)
        if not twiml and not url and not form.get("ApplicationSid"):
            return JSONResponse(
                error_body(400, 21205, "Either Url, Twiml or ApplicationSid parameter is required."),
                status_code=400,
            )
        refused = self.machine_detection.check(form)
        if refused is not None:
            return JSONResponse(error_body(400, 20001, refused), status_code=400)
        call = self._new_call(from_=from_, to=to, direction="outbound-api", status="queued")
        call.caller_audio = self.outbound_audio
        call._pending_twiml, call._pending_url = twiml, url
        call._pending_method = form.get("Method", "POST").upper() or "POST"
        if form.get("StatusCallback"):
            call.status_callback = form["StatusCallback"]
            call.status_callback_method = form.get("StatusCallbackMethod", "POST").upper() or "POST"
            # The SDK repeats StatusCallbackEvent; some clients send one space-separated value.
            events = {e for key, value in items if key == "StatusCallbackEvent" for e in value.split()}
            call.status_callback_events = events or {"completed"}
        self._emit_status_callback(call, "initiated")
        call._runner = self._spawn(self._run_outbound(call), name=f"twilio-emu-outbound-{call.sid}")
        self.machine_detection.start(self, call, form)
        return JSONResponse(call.to_resource(), status_code=201)

    async def _update_call(self, call: EmulatedCall, form: dict[str, str]) -> Response:
        status, twiml, url = form.get("Status"), form.get("Twiml"), form.get("Url")
        if form.get("StatusCallback"):
            call.status_callback = form["StatusCallback"]
            call.status_callback_method = form.get("StatusCallbackMethod", "POST").upper() or "POST"
        if status:
            if status not in ("completed", "canceled"):
                return JSONResponse(
                    error_body(400, 20001, f"Invalid Status {status!r}: must be canceled or completed"),
                    status_code=400,
                )
            if call.is_ended:
                # Twilio documents 21220 for redirecting a finished call, but not what hanging up a
                # finished call answers.  Hanging up is idempotent in effect, and clients (pipecat,
                # our own design) must accept both a 200 and an error here, so the default is the
                # unchanged call; hangup_ended_call_error=True switches to 400 / 21220.
                if status == "completed" and self.hangup_ended_call_error:
                    return JSONResponse(
                        error_body(400, 21220, "Call is not in-progress. Cannot hang up."), status_code=400
                    )
                return JSONResponse(call.to_resource())
            if call.status in ("queued", "ringing"):
                # A call not yet answered cannot be "completed"; both values cancel it.
                self._finish_call(
                    call, "canceled", "rest_canceled" if status == "canceled" else "rest_completed"
                )
            elif status == "completed":
                self._finish_call(call, "completed", "rest_completed")
                await self._stop_sent(call)
            # Status=canceled "will not affect calls already in progress" (Twilio docs): unchanged.
            return JSONResponse(call.to_resource())
        if twiml or url:
            if call.is_ended:
                return JSONResponse(
                    error_body(400, 21220, "Call is not in-progress. Cannot redirect."), status_code=400
                )
            method = form.get("Method", "POST").upper() or "POST"
            if call.status in ("queued", "ringing"):
                # Not answered yet: the new instructions are what runs when it is.
                call._pending_twiml, call._pending_url, call._pending_method = twiml, url, method
                return JSONResponse(call.to_resource())
            self._redirect(call, twiml=twiml, url=url, method=method)
            await self._stop_sent(call)
        return JSONResponse(call.to_resource())

    async def _stop_sent(self, call: EmulatedCall) -> None:
        # The REST answer comes after Twilio has sent `stop`, but never waits for the close
        # handshake: the application may well be busy waiting for this very answer.
        stream = call.stream
        if stream is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stream.finished_sending.wait()
