"""The server's state: one `AppState` per app, on `app.state.callbridge`.

Every route reads what it needs from there (`request.app.state.callbridge`). For the
Twilio routes (`telephony/twilio/webhooks.py`) it is the `TwilioHost`: it decides
whether a call is answered, what a status callback means for the records, and runs
the call of a verified media stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from callbridge.bridge import Bridge
from callbridge.call import EndReason
from callbridge.config import Settings
from callbridge.logs import log_event
from callbridge.server.fleet import Fleet
from callbridge.server.postcall import PostCall
from callbridge.server.streamwatch import END_STATUSES, ExpectedCall, StreamWatch
from callbridge.server.tokens import StreamTokens
from callbridge.store import CallStore
from callbridge.telephony.base import CallControl, StreamInfo
from callbridge.telephony.twilio.params import stream_parameters
from callbridge.telephony.twilio.webhooks import TwilioSignatures
from callbridge.transport import MessageSocket

__all__ = ["AppState", "stream_settled"]

log = logging.getLogger("callbridge.server")
# A status callback saying a live call is over waits this long for the call's own media
# stream to report how it ended (`stop`: the caller hung up; a dropped connection).
STREAM_FIRST_SECONDS = 0.25


@dataclass
class AppState:
    settings: Settings
    bridge: Bridge
    store: CallStore
    control: CallControl
    tokens: StreamTokens
    signatures: TwilioSignatures
    streamwatch: StreamWatch  # closes calls whose stream never connects
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    fleet: Fleet | None = None  # this process among the instances on the database (server/fleet.py)
    postcall: PostCall | None = None  # post-call analysis: fetches and the webhook (server/postcall.py)
    unwritten: int = 0  # calls whose records were left in the spool at shutdown

    # -- capacity and stream tokens -------------------------------------------------

    def has_capacity(self) -> bool:
        """Live calls plus streams answered but not connected yet, against the maximum."""
        return self.bridge.live_calls + self.tokens.reserved() < self.settings.max_concurrent_calls

    def stream_token(self, ref: str) -> str:
        return self.tokens.token(ref)

    def expect_stream(self, call_sid: str, expected: ExpectedCall) -> None:
        """`call_sid` was answered with stream TwiML: hold its place, watch for its stream."""
        self.tokens.reserve(call_sid)
        self.streamwatch.expect(call_sid, expected)

    async def check_stream(self, info: StreamInfo) -> str | None:
        """The bridge's stream validator: why a stream is refused, or None. The token is
        checked here, then (PostgreSQL) taken once across the fleet."""
        problem = self.tokens.check(info)
        if problem is None and self.fleet is not None and not await self.fleet.stream_started(info.call_sid):
            problem = "stream token already used (the call's stream was taken on another instance)"
        if problem is None:
            self.streamwatch.connected(info.call_sid)
        return problem

    # -- TwilioHost: what the Twilio routes ask of the server -----------------------

    @property
    def public_url(self) -> str | None:
        return self.settings.public_url

    @property
    def stream_url(self) -> str:
        return self.settings.stream_url()

    @property
    def accepting(self) -> bool:
        return self.bridge.accepting

    async def answer_call(self, call_sid: str, direction: str, from_: str, to: str) -> dict[str, str] | None:
        full = not self.bridge.accepting or not self.has_capacity()
        fleet_full = not full and self.fleet is not None and not await self.fleet.answered(call_sid)
        if full or fleet_full:
            self.bridge.stats.calls_rejected += 1
            log_event(
                log,
                "call.rejected",
                logging.WARNING,
                call_sid=call_sid,
                live_calls=self.bridge.live_calls,
                why="fleet at CALLBRIDGE_FLEET_MAX_CONCURRENT_CALLS"
                if fleet_full
                else "instance full or draining",
            )
            return None
        token = self.tokens.token(call_sid)
        params = stream_parameters(from_=from_, to=to, direction=direction, token_ref=call_sid, token=token)
        self.expect_stream(call_sid, ExpectedCall(direction, from_, to))
        return params

    async def call_status(
        self, call_sid: str, status: str, details: dict[str, Any], form: dict[str, str]
    ) -> None:
        await self.store.set_twilio_status(call_sid, status, details, form)  # queued: never fails here
        if status not in END_STATUSES:
            return
        call = self.bridge.find(call_sid)
        if call is not None:
            call.carrier_ended(f"status callback: {status}", after=STREAM_FIRST_SECONDS)
        elif self.fleet is not None and await self.fleet.status_elsewhere(call_sid, status):
            self.streamwatch.connected(call_sid)  # its stream runs on the instance told
        elif await self.streamwatch.carrier_ended(call_sid, status):
            pass  # answered here but its stream never connected: closed `no_media_stream`
        elif status != "completed":
            # An outbound call that never connected its stream: close its placeholder.
            await self.store.close_record(call_sid, EndReason.TELEPHONY_ERROR.value, f"call {status}")

    async def take_stream(self, socket: MessageSocket) -> None:
        record = await self.bridge.handle_media_stream(socket)
        if self.fleet is not None and record.call_sid is not None:
            self.fleet.call_ended(record.call_sid)


async def stream_settled(store: CallStore, fleet: Fleet | None, call_sid: str) -> bool:
    """Whether another worker or instance took the call's stream (the fleet says so, or it
    has written its record, with its stream SID) or the record is already ended:
    `StreamWatch`'s check."""
    if fleet is not None and await fleet.stream_taken(call_sid):
        return True
    record = await store.get(call_sid)
    return record is not None and (bool(record.get("stream_sid")) or record.get("status") == "ended")
