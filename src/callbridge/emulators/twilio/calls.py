"""Calls as Twilio sees them: the Call resource, its statuses and what each call did."""

from __future__ import annotations

import asyncio
import email.utils
import math
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from callbridge.emulators._common import Waiters

if TYPE_CHECKING:
    from callbridge.emulators.twilio.core import EmulatorCore
    from callbridge.emulators.twilio.media_stream import MediaStreamCaller

__all__ = [
    "API_VERSION",
    "DEFAULT_ACCOUNT_SID",
    "TERMINAL_STATUSES",
    "DialedParty",
    "EmulatedCall",
    "RecordedRequest",
    "WebhookRecord",
    "new_sid",
]

DEFAULT_ACCOUNT_SID = "AC" + "0" * 32
API_VERSION = "2010-04-01"

TERMINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
# StatusCallbackEvent names by the call status that triggers them.
EVENT_OF_STATUS = {
    "queued": "initiated",
    "ringing": "ringing",
    "in-progress": "answered",
    **{status: "completed" for status in TERMINAL_STATUSES},
}
# end_cause of a call whose <Connect><Stream> ended without Twilio ending it, by MediaStreamCaller.closed_by.
CAUSE_OF_STREAM_END = {
    "server": "stream_closed",
    "drop": "stream_dropped",
    "connect_failed": "stream_connect_failed",
    "twilio": "stream_closed_by_twilio",  # close_without_stop(): a Twilio-side close, not a hang-up
}


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc2822(value: datetime | None) -> str | None:
    # Twilio's REST dates look like "Tue, 31 Aug 2010 20:36:28 +0000".
    return email.utils.format_datetime(value) if value is not None else None


def _format_number(number: str) -> str:
    # Twilio's *_formatted fields show NANP numbers as "(415) 555-1212", others as given.
    digits = number[2:] if number.startswith("+1") else ""
    if len(digits) == 10 and digits.isdigit():
        return f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"
    return number


@dataclass
class RecordedRequest:
    """One request the REST API received (form holds the last value of each field)."""

    time: float
    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]
    items: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class DialedParty:
    """One party a ``<Dial>`` tried to connect the call to."""

    kind: str  # "number" | "sip" | "client"
    target: str
    caller_id: str | None
    status: str  # "completed" (connected) | "failed" (refused before dialling, see problem)
    problem: str | None = None
    time: float = 0.0


@dataclass
class WebhookRecord:
    """One HTTP request the emulator made to the application (voice webhook or status callback)."""

    time: float
    kind: str  # "voice" | "status" | "amd"
    call_sid: str
    method: str
    url: str
    params: dict[str, str]
    signature: str | None
    status_code: int | None
    body: str = ""
    error: str | None = None


class EmulatedCall:
    """One call as Twilio sees it."""

    def __init__(
        self,
        emulator: EmulatorCore,
        *,
        sid: str,
        from_: str,
        to: str,
        direction: str,
        status: str,
    ) -> None:
        self._emulator = emulator
        self.sid = sid
        self.account_sid = emulator.account_sid
        self.from_ = from_
        self.to = to
        self.direction = direction  # "inbound" | "outbound-api"
        self.status = status
        self.date_created = utcnow()
        self.date_updated = self.date_created
        self.start_time: datetime | None = self.date_created
        self.answered_time: datetime | None = None
        self.end_time: datetime | None = None
        self.ended = asyncio.Event()
        self.ended_at: float | None = None  # loop time
        self.end_cause: str | None = None
        self.end_detail: str | None = (
            None  # e.g. what the redirected TwiML did ("twiml_hangup", "dial_finished")
        )
        self.redirect_twiml: str | None = None  # the Twiml (or Url) of the latest REST redirect
        self.redirects: list[dict[str, str]] = []
        self.twiml_documents: list[str] = []
        self.twiml_errors: list[str] = []
        self.said: list[str] = []
        self.played: list[str] = []
        self.dialed: list[str] = []
        self.dials: list[DialedParty] = []  # what each <Dial> noun was, with its callerId
        self.unsupported_verbs: list[str] = []
        self.reject_reason: str | None = None
        self.status_callback: str | None = None
        self.status_callback_method = "POST"
        self.status_callback_events: set[str] = {"completed"}
        self.status_callbacks_sent: list[dict[str, str]] = []
        self.stream: MediaStreamCaller | None = None
        self.streams: list[MediaStreamCaller] = []
        self.caller_audio = b""
        self.history: list[tuple[float, str]] = [(asyncio.get_running_loop().time(), status)]
        self.stream_connected = asyncio.Event()
        self.stream_upgrade_fault: str | None = None  # set when its stream was sent through one
        self.answered_by: str | None = None  # answering-machine detection's verdict (amd.py)

        self._status_changed = Waiters()
        self._callback_seq = 0
        self._callback_chain: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._stream_signature: str | None = None
        self._pending_twiml: str | None = None
        self._pending_url: str | None = None
        self._pending_method = "POST"

    def __repr__(self) -> str:
        return f"<EmulatedCall {self.sid} {self.direction} {self.status} end_cause={self.end_cause}>"

    @property
    def is_ended(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration(self) -> int | None:
        """Seconds from answer to end, as Twilio reports it (only for completed calls)."""
        if self.status != "completed" or self.end_time is None:
            return None
        if self.answered_time is None:
            return 0
        return math.ceil((self.end_time - self.answered_time).total_seconds())

    async def wait_ended(self, timeout: float | None = None) -> str | None:
        """Wait for the call to end; returns its end_cause."""
        async with asyncio.timeout(timeout):
            await self.ended.wait()
        return self.end_cause

    async def wait_status(self, *statuses: str, timeout: float | None = None) -> str:
        """Wait until the call's status is one of ``statuses``; returns it."""
        async with asyncio.timeout(timeout):
            while self.status not in statuses:
                await self._status_changed.changed()
        return self.status

    async def wait_stream(self, timeout: float | None = None) -> MediaStreamCaller:
        """Wait until a media stream is connected (``start`` sent) and return it."""
        async with asyncio.timeout(timeout):
            await self.stream_connected.wait()
        assert self.stream is not None
        return self.stream

    async def hangup(self) -> None:
        """The caller hangs up, whatever the call is doing."""
        if self.stream is not None and self.stream.is_open:
            await self.stream.hangup()
        else:
            self._emulator._finish_call(
                self, "completed" if self.answered_time else "canceled", "caller_hangup"
            )

    def to_resource(self) -> dict[str, Any]:
        """The Call resource's JSON, with the fields the official SDK's CallInstance reads."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}"
        duration = self.duration
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": rfc2822(self.date_created),
            "date_updated": rfc2822(self.date_updated),
            "direction": self.direction,
            "duration": str(duration) if duration is not None else None,
            "end_time": rfc2822(self.end_time),
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": _format_number(self.from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": rfc2822(self.start_time),
            "status": self.status,
            "stir_verstat": None,
            "subresource_uris": {
                name: f"{base}/{path}.json"
                for name, path in (
                    ("feedback", "Feedback"),
                    ("notifications", "Notifications"),
                    ("recordings", "Recordings"),
                    ("streams", "Streams"),
                    ("payments", "Payments"),
                    ("siprec", "Siprec"),
                    ("events", "Events"),
                    ("transcriptions", "Transcriptions"),
                    ("user_defined_messages", "UserDefinedMessages"),
                    ("user_defined_message_subscriptions", "UserDefinedMessageSubscriptions"),
                )
            },
            "to": self.to,
            "to_formatted": _format_number(self.to),
            "trunk_sid": None,
            "uri": f"{base}.json",
        }
