"""What ElevenLabs knows about a conversation once it has ended: the conversation details
endpoint (``GET /v1/convai/conversations/{conversation_id}``, ``xi-api-key``) and the signed
post-call webhooks (``post_call_transcription``) the emulator can send.

Modelled on ElevenLabs' API reference ("Get conversation details") and its "Post-call
webhooks" page: a conversation is ``in-progress`` while its socket is open, then
``processing`` for :attr:`ConversationDetails.processing_polls` requests, then ``done`` with
its ``analysis`` and ``metadata`` (cost, duration, termination reason). A webhook body is
``{"type", "event_timestamp", "data": <the details>}``, signed in the ``ElevenLabs-Signature``
header as ``t=<unix seconds>,v0=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from callbridge.emulators._common import require_loopback_url
from callbridge.emulators.elevenlabs.conversation import EmulatedConversation

__all__ = ["CONVERSATIONS_PATH", "ConversationDetails", "SentWebhook", "sign_webhook"]

CONVERSATIONS_PATH: Final = "/v1/convai/conversations"
WHO: Final = "the ElevenLabs emulator"


def sign_webhook(secret: str, timestamp: int, body: bytes) -> str:
    """The ``ElevenLabs-Signature`` header value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v0={digest}"


@dataclass
class SentWebhook:
    """One webhook the emulator sent (kept so a test can send it again: a replay)."""

    url: str
    body: bytes
    headers: dict[str, str]
    status_code: int | None = None
    response: str = ""


@dataclass
class ConversationDetails:
    """The details endpoint's behaviour and what it reports (tests set these)."""

    #: Requests answered ``processing`` after the conversation closed, before ``done``.
    processing_polls: int = 1
    #: Status codes answered to the next requests instead of the details (404, 500, 429, ...).
    faults: deque[int] = field(default_factory=deque)
    #: The ``analysis`` reported once done (``None``: one derived from the conversation).
    analysis: dict[str, Any] | None = None
    cost: int = 0
    #: Every request: (conversation id, the ``xi-api-key`` given, the status answered).
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)
    _polls: dict[str, int] = field(default_factory=dict)

    def status_of(self, conv: EmulatedConversation, count: bool = True) -> str:
        if not conv.closed.is_set():
            return "in-progress"
        polls = self._polls.get(conv.conversation_id, 0)
        if count:
            self._polls[conv.conversation_id] = polls + 1
        return "processing" if polls < self.processing_polls else "done"

    def details(self, conv: EmulatedConversation, status: str) -> dict[str, Any]:
        """The GetConversationResponseModel of ``conv`` in ``status``."""
        transcript: list[dict[str, Any]] = []
        for at, message in conv.sent:
            if not isinstance(message, dict):
                continue
            if message.get("type") == "agent_response":
                text = message.get("agent_response_event", {}).get("agent_response")
                role = "agent"
            elif message.get("type") == "user_transcript":
                text = message.get("user_transcription_event", {}).get("user_transcript")
                role = "user"
            else:
                continue
            offset = round(at - conv.started_at, 3)
            transcript.append({"role": role, "message": text, "time_in_call_secs": int(offset)})
        ended = conv.ended_at or time.monotonic()
        duration = max(0, round(ended - conv.started_at))
        done = status == "done"
        analysis = self.analysis
        if analysis is None:
            agent_lines = [t["message"] for t in transcript if t["role"] == "agent" and t["message"]]
            analysis = {
                "call_successful": "success",
                "call_summary_title": "Emulated call",
                "transcript_summary": " ".join(agent_lines) or "Nothing was said.",
                "data_collection_results": {},
                "evaluation_criteria_results": {},
            }
        return {
            "agent_id": conv.agent_id,
            "conversation_id": conv.conversation_id,
            "status": status,
            "transcript": transcript,
            "metadata": {
                "start_time_unix_secs": int(time.time() - (time.monotonic() - conv.started_at)),
                "call_duration_secs": duration,
                "cost": self.cost if done else None,
                "termination_reason": (conv.close_reason or "") if done else "",
            },
            "analysis": analysis if done else None,
            "conversation_initiation_client_data": conv.client_data or {},
            "has_audio": True,
            "has_user_audio": True,
            "has_response_audio": True,
        }

    def answer(
        self, conversations: list[EmulatedConversation], conversation_id: str, api_key: str | None
    ) -> tuple[int, dict[str, Any]]:
        """(status code, JSON body) of ``GET .../conversations/{conversation_id}``."""
        if self.faults:
            status = self.faults.popleft()
            self.requests.append((conversation_id, api_key, status))
            return status, {"detail": {"status": "error", "message": f"emulated HTTP {status}"}}
        conv = next((c for c in conversations if c.conversation_id == conversation_id), None)
        if conv is None:
            self.requests.append((conversation_id, api_key, 404))
            return 404, {"detail": {"status": "conversation_not_found", "message": "Conversation not found"}}
        self.requests.append((conversation_id, api_key, 200))
        return 200, self.details(conv, self.status_of(conv))

    async def send_webhook(
        self,
        conv: EmulatedConversation,
        url: str,
        secret: str,
        *,
        timestamp: int | None = None,
        event_type: str = "post_call_transcription",
        signature: str | None = None,
    ) -> SentWebhook:
        """POST a signed post-call webhook of ``conv`` (processed: ``done``) to ``url``.
        ``signature`` replaces the computed header (a forged or broken one)."""
        require_loopback_url(url, WHO)
        stamp = int(time.time()) if timestamp is None else timestamp
        event = {"type": event_type, "event_timestamp": stamp, "data": self.details(conv, "done")}
        body = json.dumps(event).encode()
        headers = {
            "Content-Type": "application/json",
            "ElevenLabs-Signature": signature if signature is not None else sign_webhook(secret, stamp, body),
        }
        sent = SentWebhook(url, body, headers)
        return await self.deliver(sent)

    @staticmethod
    async def deliver(sent: SentWebhook) -> SentWebhook:
        """Send (or send again) a webhook as it was; its answer is kept on it."""
        require_loopback_url(sent.url, WHO)
        out = SentWebhook(sent.url, sent.body, dict(sent.headers))
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.post(out.url, content=out.body, headers=out.headers)
        out.status_code, out.response = resp.status_code, resp.text
        return out
