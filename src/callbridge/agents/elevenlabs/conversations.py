"""The ElevenLabs conversation details API and post-call webhooks: what ElevenLabs knows
about a conversation once it has ended (its analysis, cost and duration).

- `ConversationsClient.wait_processed(conversation_id)`: `GET /v1/convai/conversations/{id}`
  with the `xi-api-key` header, asked again with capped exponential backoff (tenacity)
  until ElevenLabs reports the conversation `done` or `failed`, within a deadline;
- `verify_webhook(body, header, secret, tolerance)`: the `ElevenLabs-Signature` header
  (`t=<unix seconds>,v0=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`) of a post-call webhook;
- `analysis_of(details, source)`: the part callbridge keeps in a call's record, from the
  details or from a `post_call_transcription` webhook's `data` (the same shape).

Sources: specs/post-call-and-amd.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_exponential_jitter,
)

__all__ = [
    "CONVERSATIONS_PATH",
    "ConversationsClient",
    "FetchFailed",
    "FetchPolicy",
    "analysis_of",
    "verify_webhook",
]

CONVERSATIONS_PATH = "/v1/convai/conversations"
# The conversation's status once ElevenLabs is done with it (its analysis is final).
FINAL_STATUSES = frozenset({"done", "failed"})
SIGNATURE_HEADER = "ElevenLabs-Signature"


class FetchFailed(Exception):
    """The conversation's details could not be had (said in one line)."""


class _Transient(Exception):
    """Worth asking again: 429, 5xx, a timeout, a refused connection."""


@dataclass(frozen=True)
class FetchPolicy:
    first_delay: float = 1.0  # before the first request: processing starts when the call ends
    base_delay: float = 1.0  # then doubling (jittered) ...
    max_delay: float = 30.0  # ... up to this between requests
    deadline: float = 600.0  # all requests together
    request_timeout: float = 10.0  # one request


class ConversationsClient:
    """`GET /v1/convai/conversations/{conversation_id}` (needs the API key)."""

    def __init__(
        self,
        api_base_url: str,
        api_key: str,
        policy: FetchPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_base_url = api_base_url.rstrip("/")
        self.policy = policy or FetchPolicy()
        self._api_key = api_key
        self._http = http
        self._own_http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never show the key
        return f"ConversationsClient(api_base_url={self.api_base_url!r})"

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is not None:
            return self._http
        if self._own_http is None:
            self._own_http = httpx.AsyncClient()
        return self._own_http

    async def aclose(self) -> None:
        if self._own_http is not None:
            await self._own_http.aclose()
            self._own_http = None

    async def get(self, conversation_id: str) -> dict[str, Any]:
        """One request. Raises `FetchFailed` (404, 401, ...) or `_Transient` (429, 5xx, network)."""
        url = f"{self.api_base_url}{CONVERSATIONS_PATH}/{quote(conversation_id, safe='')}"
        try:
            resp = await self.http.get(
                url, headers={"xi-api-key": self._api_key}, timeout=self.policy.request_timeout
            )
        except httpx.HTTPError as exc:
            raise _Transient(f"{type(exc).__name__}") from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}")
        if resp.status_code == 404:
            raise FetchFailed(f"ElevenLabs has no conversation {conversation_id} (HTTP 404)")
        if resp.status_code != 200:
            raise FetchFailed(
                f"ElevenLabs answered HTTP {resp.status_code} for conversation {conversation_id}"
            )
        try:
            details = resp.json()
        except ValueError:
            raise FetchFailed("ElevenLabs answered with a body that is not JSON") from None
        if not isinstance(details, dict):
            raise FetchFailed("ElevenLabs answered with JSON that is not an object")
        return details

    async def wait_processed(self, conversation_id: str) -> dict[str, Any]:
        """The conversation's details once its status is `done` or `failed`; asked again
        (backoff) while it is still being processed or ElevenLabs has a passing problem.
        Raises `FetchFailed` when it answers for good otherwise or the deadline passes."""
        policy = self.policy
        last: list[str] = []

        def still_processing(details: dict[str, Any] | None) -> bool:
            status = details.get("status") if details else None
            if status not in FINAL_STATUSES:
                last[:] = [f"still {status!r}"]
                return True
            return False

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient) | retry_if_result(still_processing),
            wait=wait_exponential_jitter(
                multiplier=policy.base_delay, max=policy.max_delay, jitter=policy.base_delay
            ),
            stop=stop_after_delay(max(policy.deadline - policy.first_delay, 0.0)),
            reraise=False,
        )
        await asyncio.sleep(policy.first_delay)
        details: dict[str, Any] = {}
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        details = await self.get(conversation_id)
                    except _Transient as exc:
                        last[:] = [str(exc)]
                        raise
                outcome = attempt.retry_state.outcome
                if outcome is None or not outcome.failed:
                    attempt.retry_state.set_result(details)
        except RetryError:
            why = last[0] if last else "no answer"
            raise FetchFailed(
                f"conversation {conversation_id} not processed within {policy.deadline:g} s ({why})"
            ) from None
        return details


def verify_webhook(
    body: bytes, header: str | None, secret: str, tolerance: float, now: float | None = None
) -> str | None:
    """Why a post-call webhook's signature is refused, or None when it is good."""
    if not header:
        return f"no {SIGNATURE_HEADER} header"
    stamp: str | None = None
    given: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamp = value
        elif key == "v0":
            given.append(value)
    if stamp is None or not stamp.isdigit() or not given:
        return f"{SIGNATURE_HEADER} is not t=<unix seconds>,v0=<hex>"
    age = (time.time() if now is None else now) - int(stamp)
    if age > tolerance:
        return f"timestamp {int(age)} s old (tolerance {tolerance:g} s): too old, or a replay"
    if age < -tolerance:
        return f"timestamp {int(-age)} s in the future (tolerance {tolerance:g} s)"
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, v) for v in given):
        return "signature does not match (wrong secret, or the body was altered)"
    return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def analysis_of(details: dict[str, Any], source: str) -> dict[str, Any]:
    """What a call's record keeps of ElevenLabs' conversation details (or of a webhook's
    `data`): the analysis as ElevenLabs reports it, with cost and duration."""
    analysis, metadata = _obj(details.get("analysis")), _obj(details.get("metadata"))
    return {
        "source": source,  # "api" (fetched) or "webhook"
        "conversation_id": details.get("conversation_id"),
        "conversation_status": details.get("status"),
        "call_successful": analysis.get("call_successful"),
        "call_summary_title": analysis.get("call_summary_title"),
        "transcript_summary": analysis.get("transcript_summary"),
        "data_collection_results": analysis.get("data_collection_results") or {},
        "evaluation_criteria_results": analysis.get("evaluation_criteria_results") or {},
        "cost": metadata.get("cost"),
        "call_duration_secs": metadata.get("call_duration_secs"),
        "termination_reason": metadata.get("termination_reason"),
        "received_at": datetime.now(UTC).isoformat(),
    }
