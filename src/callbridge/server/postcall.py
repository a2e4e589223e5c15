"""Post-call analysis: what ElevenLabs knows about a finished call, kept in its record.

Two ways in, the first to arrive wins (the store's `analysis` operation keeps a record's
first analysis; the other is a no-op):

- after a call has ended and its record is saved (an `on_call_end` hook), a background
  task asks the conversation details API until ElevenLabs reports the conversation
  processed (`ConversationsClient.wait_processed`: backoff, bounded by
  `CALLBRIDGE_POST_CALL_FETCH_SECONDS`); it never delays the call's teardown, and the
  tasks still running are cancelled at shutdown;
- `POST /elevenlabs/post-call`: ElevenLabs' post-call webhook, its `ElevenLabs-Signature`
  checked with `CALLBRIDGE_ELEVENLABS_WEBHOOK_SECRET` and the timestamp tolerance.

A failure here is a log line; it never changes the call's end reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from callbridge.agents.elevenlabs.conversations import (
    ConversationsClient,
    FetchFailed,
    analysis_of,
    verify_webhook,
)
from callbridge.logs import call_extra, log_event
from callbridge.record import CallRecord
from callbridge.store import CallStore
from callbridge.telephony.twilio.webhooks import CALL_SID_RE, error, read_body

__all__ = ["MAX_WEBHOOK_BYTES", "PostCall", "post_call_webhook"]

log = logging.getLogger("callbridge.postcall")

# A post_call_transcription body carries the whole transcript; post_call_audio (base64 MP3
# of the call) is not wanted here and is refused by size rather than read.
MAX_WEBHOOK_BYTES = 8 * 1024 * 1024


class PostCall:
    """The post-call fetches of one process, and the webhook's settings."""

    def __init__(
        self,
        store: CallStore,
        client: ConversationsClient | None,
        secret: str | None,
        tolerance: float,
    ) -> None:
        self.store = store
        self.client = client  # None: no API key, or fetching turned off
        self.secret = secret
        self.tolerance = tolerance
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def call_ended(self, record: CallRecord) -> None:
        """The `on_call_end` hook: start fetching the analysis in the background."""
        sid, conversation = record.call_sid, record.conversation_id
        if self.client is None or self._closed or not sid or not conversation or sid in self._tasks:
            return
        task = asyncio.ensure_future(self._fetch(sid, conversation))
        self._tasks[sid] = task
        task.add_done_callback(lambda _t: self._tasks.pop(sid, None))

    async def _fetch(self, call_sid: str, conversation_id: str) -> None:
        assert self.client is not None
        try:
            details = await self.client.wait_processed(conversation_id)
        except FetchFailed as exc:
            log_event(log, "postcall.fetch_failed", logging.WARNING, call_sid=call_sid, error=str(exc))
            return
        except Exception:
            log.exception("post-call fetch of %s failed", call_sid, extra=call_extra(call_sid))
            return
        await self.store.set_analysis(call_sid, analysis_of(details, "api"))
        log_event(log, "postcall.analysis", call_sid=call_sid, source="api", status=details.get("status"))

    def arrived(self, call_sid: str) -> None:
        """The webhook brought the analysis: the fetch still asking is no longer needed."""
        task = self._tasks.pop(call_sid, None)
        if task is not None:
            task.cancel()

    @property
    def fetching(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 2.0) -> None:
        """Cancel the fetches still running (at shutdown), and wait for them, bounded."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


def _call_sid_of(data: dict[str, Any]) -> str | None:
    """The call SID callbridge gave the agent as a dynamic variable, if ElevenLabs echoes it."""
    client_data = data.get("conversation_initiation_client_data")
    variables = client_data.get("dynamic_variables") if isinstance(client_data, dict) else None
    sid = variables.get("call_sid") if isinstance(variables, dict) else None
    return sid if isinstance(sid, str) and CALL_SID_RE.fullmatch(sid) else None


async def _record_for(store: CallStore, data: dict[str, Any], conversation_id: str) -> dict[str, Any] | None:
    sid = _call_sid_of(data)
    if sid is not None:
        record = await store.get(sid)
        if record is not None and record.get("conversation_id") == conversation_id:
            return record
    return await store.find_by_conversation(conversation_id)


async def post_call_webhook(request: Request) -> Response:
    """`POST /elevenlabs/post-call`: ElevenLabs' post-call webhook."""
    postcall: PostCall | None = getattr(request.app.state.callbridge, "postcall", None)
    if postcall is None or not postcall.secret:
        return error(503, "post-call webhooks are off: CALLBRIDGE_ELEVENLABS_WEBHOOK_SECRET is not set")
    body = await read_body(request, MAX_WEBHOOK_BYTES)
    if body is None:
        log_event(log, "postcall.webhook_refused", logging.WARNING, why="body too large")
        return error(413, "request body too large (subscribe this URL to post_call_transcription only)")
    problem = verify_webhook(
        body, request.headers.get("elevenlabs-signature"), postcall.secret, postcall.tolerance
    )
    if problem is not None:
        log_event(log, "postcall.bad_signature", logging.WARNING, why=problem)
        return error(401, f"invalid ElevenLabs signature: {problem}")
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return error(400, "body must be JSON")
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return error(400, "body must be an object with a 'data' object")
    kind = event.get("type")
    if kind != "post_call_transcription":
        log_event(log, "postcall.webhook_ignored", type=str(kind))
        return JSONResponse({"status": "ignored", "reason": f"event type {kind!r} is not used"})
    data: dict[str, Any] = event["data"]
    conversation_id = data.get("conversation_id")
    if not isinstance(conversation_id, str) or not conversation_id:
        return error(400, "data.conversation_id is required")
    record = await _record_for(postcall.store, data, conversation_id)
    if record is None:
        # Not one of our calls (the agent also takes web or other calls): not an error for
        # ElevenLabs, which disables a webhook that keeps failing.
        log_event(log, "postcall.unknown_conversation", logging.WARNING, conversation_id=conversation_id)
        return JSONResponse({"status": "ignored", "reason": "no call with this conversation"})
    call_sid = record["call_sid"]
    if record.get("analysis"):
        log_event(log, "postcall.already_recorded", call_sid=call_sid, source="webhook")
        return JSONResponse({"status": "already recorded", "call_sid": call_sid})
    postcall.arrived(call_sid)
    await postcall.store.set_analysis(call_sid, analysis_of(data, "webhook"))
    log_event(log, "postcall.analysis", call_sid=call_sid, source="webhook", status=data.get("status"))
    return JSONResponse({"status": "recorded", "call_sid": call_sid})
