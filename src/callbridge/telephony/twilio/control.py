"""Twilio REST call control through the official `twilio` SDK and its async HTTP client.

Hang-up is `status=completed` on the Call resource. It is idempotent here: 20404
(no such call, i.e. long gone) and 21220 (call not in progress) both mean the call
is already over. 429 and 5xx (and timeouts, refused connections) are retried with
exponential backoff, honouring `Retry-After`, a bounded number of times and within
a total deadline, so teardown is never held forever by a slow API.

A hang-up announced ahead (`expect_request`, while the goodbye plays) finds a connection
to the API already open: a new one costs TCP and TLS set-up first (two round trips to
Twilio), and under load the turns of the event loop each step takes (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client
from yarl import URL

# The SDK imports its REST resources on first use (`client.calls`): ~80 ms of imports that
# would block the event loop at the first hang-up after start (measured in bench/: the first
# hang-ups of a run took 190-280 ms instead of ~2 ms, and every live call stalled meanwhile).
# Imported here, at start-up, instead.
import twilio.rest.api.v2010.account.call  # noqa: F401  isort: skip

from callbridge.logs import log_event
from callbridge.telephony.base import CallControlError, Destination, HangupOutcome, PlacedCall
from callbridge.telephony.twilio.twiml import connect_twiml, dial_twiml

__all__ = ["ALREADY_ENDED_CODES", "RetryPolicy", "TwilioCallControl"]

log = logging.getLogger("callbridge.twilio")

ALREADY_ENDED_CODES = frozenset({20404, 21220})
T = TypeVar("T")

# Retry-After of the latest response of *this* operation. The HTTP client is shared by
# every call, so a plain attribute would race between calls: the retry loop puts a holder
# in its context, and the request of each attempt fills it in.
_retry_after: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "retry_after", default=None
)


def _basic_auth(login: str, password: str) -> str:
    """The `Authorization` value aiohttp's (deprecated) `BasicAuth` sent: the same bytes."""
    if ":" in login:
        raise ValueError('A ":" is not allowed in login (RFC 1945#section-11.1)')
    return "Basic " + base64.b64encode(f"{login}:{password}".encode("latin1")).decode("ascii")


class _HttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        # The SDK would turn `auth` into aiohttp's BasicAuth and pass it as `auth=`, both
        # deprecated in aiohttp: the header is set here instead, and the SDK gets no auth.
        if auth is not None:
            headers = {**(headers or {}), "Authorization": _basic_auth(auth[0], auth[1])}
        response: Response = await super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=None,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )
        holder = _retry_after.get()
        value = response.headers.get("Retry-After") if response.headers else None
        if holder is not None and value is not None:
            try:
                holder["seconds"] = float(value)
            except ValueError:
                pass  # an HTTP-date form: fall back to our own backoff
        return response


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    request_timeout: float = 5.0  # one HTTP request
    deadline: float = 12.0  # all attempts together
    base_delay: float = 0.25
    max_delay: float = 4.0


# At most this many connections are kept idle ahead of expected requests. When 200 calls
# ended within 2 s (bench/), their hang-ups opened 3 to 27 new connections without this; with
# a cap of 8 still 3-7 (the expected outnumbered it), with 32 0-8. Idle connections cost
# the API nothing, and aiohttp closes one unused for 15 s.
WARM_CONNECTIONS = 32
# An announced request that never came (the call ended some other way) stops counting after
# this long.
EXPECTED_FOR_S = 30.0


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, TwilioRestException):
        status = int(exc.status)
        return status == 429 or status >= 500
    return isinstance(exc, TimeoutError | aiohttp.ClientError | OSError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TwilioRestException):
        return f"HTTP {exc.status} code {exc.code}"
    return type(exc).__name__


class TwilioCallControl:
    """`CallControl` for Twilio. One instance serves every call of a process."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base_url: str = "https://api.twilio.com",
        retry: RetryPolicy | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._api_base_url = api_base_url.rstrip("/")
        self._client: Client | None = None
        self._http: _HttpClient | None = None
        self._expected: dict[str, float] = {}  # call sid -> when its request was announced
        self._topping_up: asyncio.Task[None] | None = None
        self._demand = asyncio.Event()  # an announcement, or a connection opened ahead
        self.connections_opened_ahead = 0

    def __repr__(self) -> str:
        return f"TwilioCallControl(account_sid={self._account_sid!r}, api_base_url={self._api_base_url!r})"

    @property
    def client(self) -> Client:
        # Created lazily inside the running loop: aiohttp sessions bind to their loop.
        if self._client is None:
            self._http = _HttpClient(timeout=None)
            client = Client(self._account_sid, self._auth_token, http_client=self._http)
            # The SDK joins each request path to its domain's base_url; pointing it
            # elsewhere (a regional edge, the local emulator) is this one attribute.
            client.api.base_url = self._api_base_url
            self._client = client
        return self._client

    async def aclose(self) -> None:
        if self._topping_up is not None:
            self._topping_up.cancel()
            await asyncio.gather(self._topping_up, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._http = None
        self._client = None

    # -- connections opened ahead ---------------------------------------------------------

    def expect_request(self, call_sid: str) -> None:
        """A request about `call_sid` (its hang-up) is due soon: if fewer connections to the
        API sit idle or are being opened than requests are expected (up to
        `WARM_CONNECTIONS`), open more now."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._expected[call_sid] = now
        for sid, at in list(self._expected.items()):
            if now - at > EXPECTED_FOR_S:
                del self._expected[sid]
        self._demand.set()
        if self._topping_up is None or self._topping_up.done():
            self._topping_up = loop.create_task(self._top_up(), name="twilio-connect-ahead")

    def _wanted(self) -> int:
        return min(len(self._expected), WARM_CONNECTIONS)

    def _session(self) -> aiohttp.ClientSession | None:
        _ = self.client  # the SDK's HTTP client and its aiohttp session, made on first use
        session = getattr(self._http, "session", None)
        return session if isinstance(session, aiohttp.ClientSession) else None

    def _bare_request(self) -> aiohttp.ClientRequest:
        # Filed in the pool under the same key as the SDK's requests: the same scheme, host
        # and port, default TLS settings, no proxy.
        return aiohttp.ClientRequest("POST", URL(self._api_base_url), loop=asyncio.get_running_loop())

    def _idle_connections(self, session: aiohttp.ClientSession) -> int:
        # aiohttp has no public count of a pool's idle connections; `_conns` is where it keeps
        # them (3.9 to 3.14). With another layout this counts none, and connections are opened
        # up to the cap: more than needed, never fewer.
        pool = getattr(session.connector, "_conns", None)
        try:
            return len(pool.get(self._bare_request().connection_key, ())) if pool is not None else 0
        except (AttributeError, TypeError, ValueError):
            return 0

    async def _connect(self, session: aiohttp.ClientSession) -> Any:
        """A connection from the pool (an idle one, else a new one), or what went wrong. Each
        is bounded on its own, so that one a connect got is given back even when another
        times out."""
        assert session.connector is not None
        try:
            async with asyncio.timeout(self.retry.request_timeout):
                return await session.connector.connect(self._bare_request(), [], session.timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return exc

    async def _top_up(self) -> None:
        """Keeps idle + opening connections up to the expected requests, re-counting at each
        announcement and each connection opened. A connect takes an idle connection if there
        is one, so the idle ones are held while new connects start (these then find the pool
        empty and open new ones) and given back at once, before those finish: a request
        meanwhile finds them. A failure ends it until the next announcement."""
        opening: set[asyncio.Future[Any]] = set()
        try:
            session = self._session()  # makes the SDK's client on first use: inside the guard
            if session is None or session.connector is None:
                return
            while True:
                self._demand.clear()
                idle = self._idle_connections(session)
                missing = self._wanted() - idle - len(opening)
                if missing > 0:
                    held = [await self._connect(session) for _ in range(idle)]  # the pool's, no wait
                    for _ in range(missing):
                        task: asyncio.Future[Any] = asyncio.ensure_future(self._connect(session))
                        task.add_done_callback(lambda _: self._demand.set())
                        opening.add(task)
                    await asyncio.sleep(0)  # the connects above have looked in the pool
                    for got in held:
                        if not isinstance(got, BaseException):
                            got.release()
                elif not opening:
                    return
                await self._demand.wait()
                for done in [t for t in opening if t.done()]:
                    opening.discard(done)
                    opened = done.result()
                    if isinstance(opened, BaseException):
                        raise opened
                    opened.release()  # into the pool, idle, for the requests that follow
                    self.connections_opened_ahead += 1
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Only a head start lost: each request connects as it always did.
            log_event(log, "twilio.connect_ahead_failed", logging.INFO, error=_describe(exc))
        except Exception:
            log.exception("twilio: opening connections ahead failed")
        finally:
            for left in opening:
                if not left.done():
                    left.cancel()
                elif not left.cancelled() and not isinstance(left.result(), BaseException):
                    left.result().release()  # opened, not yet counted: still the pool's

    async def _with_retries(self, operation: str, call_sid: str, op: Callable[[], Awaitable[T]]) -> T:
        what = f"{operation} of {call_sid}"
        policy = self.retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.deadline
        last: BaseException | None = None
        for attempt in range(1, policy.attempts + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            hint: dict[str, float] = {}
            _retry_after.set(hint)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the request in a
                # task of its own, two more turns of the event loop, which near saturation
                # cost a hang-up tens of milliseconds.
                async with asyncio.timeout(min(policy.request_timeout, remaining)):
                    return await op()
            except (TwilioRestException, TimeoutError, aiohttp.ClientError, OSError) as exc:
                last = exc
                if not _retryable(exc) or attempt == policy.attempts:
                    break
                delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
                delay *= 0.5 + random.random()  # jitter: calls ending together must not retry in step
                hinted = hint.get("seconds")
                if hinted is not None:
                    delay = min(max(delay, hinted), policy.max_delay)
                if loop.time() + delay >= deadline:
                    break
                log_event(
                    log,
                    "twilio.retry",
                    logging.WARNING,
                    operation=operation,
                    call_sid=call_sid,
                    error=_describe(exc),
                    attempt=f"{attempt}/{policy.attempts}",
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
        assert last is not None or deadline - loop.time() <= 0
        detail = _describe(last) if last is not None else "deadline exceeded"
        raise CallControlError(f"{what} failed: {detail}") from last

    async def hangup(self, call_sid: str) -> HangupOutcome:
        self._expected.pop(call_sid, None)

        async def op() -> HangupOutcome:
            try:
                await self.client.calls(call_sid).update_async(status="completed")
            except TwilioRestException as exc:
                if exc.code in ALREADY_ENDED_CODES or exc.status == 404:
                    return HangupOutcome.ALREADY_ENDED
                raise
            return HangupOutcome.COMPLETED

        return await self._with_retries("hangup", call_sid, op)

    async def redirect(self, call_sid: str, destination: Destination) -> None:
        """Hand the call to `destination`: its TwiML as given, or a `<Dial>` to its
        number or SIP URI (with its caller ID)."""
        twiml = destination.instructions or dial_twiml(destination)
        self._expected.pop(call_sid, None)

        async def op() -> None:
            await self.client.calls(call_sid).update_async(twiml=twiml)

        await self._with_retries("redirect", call_sid, op)

    async def fetch_status(self, call_sid: str) -> str | None:
        """The call's status, or None if Twilio has no such call."""

        async def op() -> str | None:
            try:
                call = await self.client.calls(call_sid).fetch_async()
            except TwilioRestException as exc:
                if exc.status == 404:
                    return None
                raise
            return str(call.status)

        return await self._with_retries("fetch", call_sid, op)

    async def place_call(
        self,
        to: str,
        from_: str,
        stream_url: str,
        parameters: Mapping[str, str],
        status_url: str | None = None,
        machine_detection_url: str | None = None,
    ) -> PlacedCall:
        """Place an outbound call answered with `<Connect><Stream>` to the bridge; with
        `machine_detection_url`, Twilio's asynchronous answering-machine detection (waiting
        for the end of a machine's greeting) reports there."""
        twiml = connect_twiml(stream_url, parameters)
        return await self.create_call(to, from_, twiml, status_url, machine_detection_url)

    async def create_call(
        self,
        to: str,
        from_: str,
        twiml: str,
        status_callback: str | None = None,
        machine_detection_url: str | None = None,
    ) -> PlacedCall:
        """Place an outbound call whose TwiML connects it to the bridge.

        Not retried on 5xx: a create that timed out may have placed the call, and
        a retry would ring the person twice.
        """
        kwargs: dict[str, Any] = {"to": to, "from_": from_, "twiml": twiml}
        if status_callback:
            kwargs["status_callback"] = status_callback
            kwargs["status_callback_event"] = ["initiated", "ringing", "answered", "completed"]
            kwargs["status_callback_method"] = "POST"
        if machine_detection_url:
            # The TwiML runs at once (the agent speaks to whoever answers); the verdict comes
            # later, after a machine's greeting has ended (its beep).
            kwargs["machine_detection"] = "DetectMessageEnd"
            kwargs["async_amd"] = "true"
            kwargs["async_amd_status_callback"] = machine_detection_url
            kwargs["async_amd_status_callback_method"] = "POST"
        try:
            async with asyncio.timeout(self.retry.request_timeout):
                call = await self.client.calls.create_async(**kwargs)
        except (TwilioRestException, TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise CallControlError(f"outbound call to {to} failed: {_describe(exc)}") from exc
        return PlacedCall(call_sid=str(call.sid), status=str(call.status))
