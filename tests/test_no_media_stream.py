"""A call answered with stream TwiML whose media stream never connects ends `no_media_stream`.

End to end: the real server (uvicorn on loopback) and the Twilio emulator, whose
`stream_upgrade_fault` sends the stream's WebSocket upgrade through a loopback proxy
that drops it ("drop") or never answers it ("hang"): the server never sees the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say
from callbridge.emulators.twilio import EmulatedCall, TwilioEmulator
from callbridge.server.streamwatch import ExpectedCall, StreamWatch
from callbridge.store import StoreUnavailable
from callbridge.telephony.base import CallControlError, HangupOutcome
from tests.serverkit import RunningServer, running_server, settings_for, short_script

CALLER, NUMBER = "+15551230001", "+15551230002"


def talkative() -> AgentScript:
    return AgentScript(steps=[Say("Hello, I can talk for a long time.", seconds=30.0)], realtime_factor=1.0)


async def wait_record(
    srv: RunningServer, sid: str, done: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """Poll the /calls API until the record satisfies `done`."""
    last: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                resp = await srv.api.get(f"/calls/{sid}")
                if resp.status_code == 200:
                    last = resp.json()
                    if done(last):
                        return last
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"record of {sid} never got there; last seen: {last}") from None


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll a condition that has no event of its own."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.01)


def rest_requests(twilio: TwilioEmulator, sid: str) -> list[tuple[str, str | None]]:
    """What the emulated REST API received about this call: (method, Status field)."""
    return [
        (r.method, r.form.get("Status")) for r in twilio.requests if r.path.endswith(f"/Calls/{sid}.json")
    ]


async def ended_count(srv: RunningServer, reason: str) -> float:
    text = (await srv.api.get("/metrics")).text
    line = next(
        x for x in text.splitlines() if x.startswith(f'callbridge_calls_ended_total{{reason="{reason}"}}')
    )
    return float(line.rsplit(" ", 1)[1])


def voice_webhook(twilio: TwilioEmulator, sid: str) -> Any:
    return next(w for w in twilio.webhooks if w.kind == "voice" and w.call_sid == sid)


async def test_inbound_stream_never_connects_completed_callback_closes_the_record_at_once(
    twilio: TwilioEmulator, tmp_path: Path
) -> None:
    twilio.stream_upgrade_fault = "drop"
    async with AgentEmulator(short_script()) as agent:
        # A long connect timeout: only the status callback can close the record in time.
        settings = settings_for(twilio, agent, tmp_path / "calls.db", stream_connect_timeout=60.0)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound",
                from_=CALLER,
                to=NUMBER,
                status_callback=f"{srv.url}/twilio/status",
            )
            await call.wait_ended(5)
            record = await wait_record(srv, call.sid, lambda r: r["status"] == "ended")
            assert srv.state.streamwatch is not None and srv.state.streamwatch.pending == 0
            assert await ended_count(srv, "no_media_stream") == 1
            assert srv.state.bridge.stats.calls_started == 0
        conversations = agent.conversations
    # Twilio got stream TwiML, but the stream's upgrade was dropped before the server saw it.
    assert voice_webhook(twilio, call.sid).status_code == 200
    assert "<Stream" in voice_webhook(twilio, call.sid).body
    assert call.stream is not None and not call.stream.started.is_set() and call.stream.connect_error
    assert call.status == "completed" and call.end_cause == "stream_connect_failed"
    assert record["end_reason"] == "no_media_stream"
    assert "never connected" in record["end_detail"] and "(completed)" in record["end_detail"]
    assert (record["direction"], record["from"], record["to"]) == ("inbound", CALLER, NUMBER)
    assert record["twilio_status"] == "completed"
    # The callback said it all: no REST fetch, no hang-up, and no agent was ever called.
    assert rest_requests(twilio, call.sid) == []
    assert conversations == []


async def test_inbound_stream_never_connects_no_callback_is_fetched_and_hung_up(
    twilio: TwilioEmulator, tmp_path: Path
) -> None:
    twilio.stream_upgrade_fault = "hang"  # Twilio waits 5 s (stream_open_timeout) for the upgrade
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "calls.db", stream_connect_timeout=0.5)
        async with running_server(settings) as srv:
            # Status callbacks only for `completed`: none arrives before the call is hung up.
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound",
                from_=CALLER,
                to=NUMBER,
                status_callback=f"{srv.url}/twilio/status",
            )
            await call.wait_ended(5)
            record = await wait_record(srv, call.sid, lambda r: r["status"] == "ended")
            # The hang-up's own `completed` callback arrives later and must not relabel the record.
            after = await wait_record(srv, call.sid, lambda r: r["twilio_status"] == "completed")
            assert await ended_count(srv, "no_media_stream") == 1
            assert srv.state.streamwatch is not None and srv.state.streamwatch.hung_up == 1
    # What Twilio saw: a fetch of the call, then a hang-up, no sooner than the timeout.
    assert rest_requests(twilio, call.sid) == [("GET", None), ("POST", "completed")]
    fetch = next(r for r in twilio.requests if r.method == "GET" and call.sid in r.path)
    waited = fetch.time - voice_webhook(twilio, call.sid).time
    assert 0.5 <= waited < 3.0, waited  # the watchdog, not the emulator's 5 s upgrade timeout
    assert call.status == "completed" and call.end_cause == "rest_completed"
    assert call.stream is not None and not call.stream.started.is_set()
    assert record["end_reason"] == "no_media_stream"
    assert record["end_detail"] == (
        "the media stream did not connect within 0.5s; Twilio reported it in-progress: hung up"
    )
    assert (record["direction"], record["from"], record["to"]) == ("inbound", CALLER, NUMBER)
    assert (after["end_reason"], after["end_detail"]) == (record["end_reason"], record["end_detail"])


async def test_outbound_stream_never_connects_is_fetched_and_hung_up(
    twilio: TwilioEmulator, tmp_path: Path
) -> None:
    twilio.stream_upgrade_fault = "hang"
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "calls.db", stream_connect_timeout=0.5)
        async with running_server(settings) as srv:
            resp = await srv.api.post("/calls", json={"to": NUMBER, "from": CALLER})
            assert resp.status_code == 201, resp.text
            sid = resp.json()["call_sid"]
            assert resp.json()["status"] == "active"
            call = twilio.calls[sid]
            await call.wait_ended(5)
            record = await wait_record(srv, sid, lambda r: r["status"] == "ended")
            after = await wait_record(srv, sid, lambda r: r["twilio_status"] == "completed")
        conversations = agent.conversations
    assert rest_requests(twilio, sid) == [("GET", None), ("POST", "completed")]
    assert call.status == "completed" and call.end_cause == "rest_completed"
    assert call.answered_time is not None and call.stream is not None and not call.stream.started.is_set()
    assert record["end_reason"] == "no_media_stream"
    assert record["end_detail"] == (
        "the media stream did not connect within 0.5s; Twilio reported it in-progress: hung up"
    )
    assert (record["direction"], record["from"], record["to"]) == ("outbound", CALLER, NUMBER)
    assert after["end_reason"] == "no_media_stream" and conversations == []


async def test_a_call_whose_stream_connects_is_left_alone(twilio: TwilioEmulator, tmp_path: Path) -> None:
    async with AgentEmulator(talkative()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "calls.db", stream_connect_timeout=0.3)
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound",
                from_=CALLER,
                to=NUMBER,
                status_callback=f"{srv.url}/twilio/status",
            )
            stream = await call.wait_stream(5)
            watch = srv.state.streamwatch
            assert watch is not None
            # The stream's `start` reached the server and proved the call: its watchdog is off.
            await eventually(lambda: srv.state.bridge.find(call.sid) is not None, "the call is live")
            assert watch.pending == 0
            # The caller hears the agent (played in real time) for twice the connect timeout.
            await stream.wait_until(lambda: len(stream.played_audio) >= 8000 * 0.6, timeout=10)
            assert not call.is_ended
            await call.hangup()
            await srv.wait_records(1)
            record = await wait_record(srv, call.sid, lambda r: r["twilio_status"] == "completed")
            assert await ended_count(srv, "no_media_stream") == 0
    assert record["end_reason"] == "caller_hung_up" and record["status"] == "ended"
    assert call.end_cause == "caller_hangup"
    # Neither the watchdog nor anything else touched the call through the REST API.
    assert rest_requests(twilio, call.sid) == []


async def test_outbound_call_ringing_past_the_timeout_is_not_hung_up(
    twilio: TwilioEmulator, tmp_path: Path
) -> None:
    twilio.answer_delay = 1.0  # the callee picks up after 1 s; the connect timeout is 0.3 s
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "calls.db", stream_connect_timeout=0.3)
        async with running_server(settings) as srv:
            resp = await srv.api.post("/calls", json={"to": NUMBER, "from": CALLER})
            assert resp.status_code == 201, resp.text
            sid = resp.json()["call_sid"]
            records = await srv.wait_records(1)
            call = twilio.calls[sid]
            await call.wait_ended(5)
    assert records[0].end_reason == "agent_ended"
    answered_at = next(t for t, status in call.history if status == "in-progress")
    fetches = [r.time for r in twilio.requests if r.method == "GET" and sid in r.path]
    # The watchdog looked while it rang (and saw it ringing), then let the call be answered.
    assert fetches and all(t < answered_at for t in fetches)
    assert call.stream is not None and call.stream.started.is_set()


async def test_shutdown_cancels_pending_watchdogs(twilio: TwilioEmulator, tmp_path: Path) -> None:
    twilio.stream_upgrade_fault = "hang"
    twilio.stream_open_timeout = 30.0
    placing: asyncio.Task[EmulatedCall] | None = None
    async with AgentEmulator(short_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "calls.db", stream_connect_timeout=30.0)
        async with running_server(settings) as srv:
            watch = srv.state.streamwatch
            assert watch is not None
            placing = asyncio.ensure_future(
                twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_=CALLER, to=NUMBER)
            )
            await eventually(lambda: watch.pending == 1, "the webhook answered")
            loop = asyncio.get_running_loop()
            stopping = loop.time()
        # The server stopped promptly, and the watchdog with it (conftest: no task left).
        assert loop.time() - stopping < 5
        assert watch.pending == 0 and watch.closed_no_stream == 0
        call = await twilio.wait_for_call(1)
        assert rest_requests(twilio, call.sid) == []
        await call.hangup()
        await placing
    assert call.end_cause == "caller_hangup"


# -- the watchdog on its own: decisions that an end-to-end test cannot reach cheaply ---------


class FakeControl:
    def __init__(self, status: str | Exception | None = "in-progress") -> None:
        self.status = status
        self.calls: list[tuple[str, str]] = []

    async def fetch_status(self, call_sid: str) -> str | None:
        self.calls.append(("fetch", call_sid))
        if isinstance(self.status, Exception):
            raise self.status
        return self.status

    async def hangup(self, call_sid: str) -> HangupOutcome:
        self.calls.append(("hangup", call_sid))
        return HangupOutcome.COMPLETED

    async def redirect(self, call_sid: str, twiml: str) -> None:
        raise AssertionError("never redirects")


class FakeStore:
    def __init__(self) -> None:
        self.ops: list[tuple[Any, ...]] = []
        self.changed = asyncio.Event()

    async def create_placeholder(self, call_sid: str, direction: str, from_: str, to: str) -> None:
        self.ops.append(("placeholder", call_sid, direction, from_, to))

    async def close_record(self, call_sid: str, reason: str, detail: str, force: bool = False) -> None:
        self.ops.append(("close", call_sid, reason, detail, force))
        self.changed.set()

    async def wait_call_written(self, call_sid: str, timeout: float) -> bool:
        self.ops.append(("written", call_sid))
        return True


SID = "CA" + "a" * 32


async def _closed(store: FakeStore) -> None:
    async with asyncio.timeout(5):
        while not any(op[0] == "close" for op in store.ops):
            store.changed.clear()
            await store.changed.wait()


async def test_watchdog_leaves_a_stream_taken_by_another_process() -> None:
    control, store = FakeControl(), FakeStore()
    looked: list[str] = []

    async def settled(call_sid: str) -> bool:
        looked.append(call_sid)
        return True  # the shared records show the stream started on another worker

    watch = StreamWatch(control, store, 0.05, settled)
    watch.expect(SID, ExpectedCall("inbound", CALLER, NUMBER))
    await eventually(lambda: bool(looked) and watch.pending == 0, "the watchdog looked")
    await watch.close()
    assert control.calls == [] and store.ops == []


async def test_watchdog_never_hangs_up_while_the_shared_records_cannot_be_read() -> None:
    """With the records database down, a stream live on another worker cannot be told
    from a missing one: the watchdog checks again later instead of hanging up."""
    control, store = FakeControl("in-progress"), FakeStore()
    looked: list[str] = []
    database_down = True

    async def settled(call_sid: str) -> bool:
        looked.append(call_sid)
        if database_down:
            raise StoreUnavailable("the call records database did not answer in time")
        return True  # back: the stream is live on another worker

    watch = StreamWatch(control, store, 0.05, settled)
    watch.expect(SID, ExpectedCall("inbound", CALLER, NUMBER))
    await eventually(lambda: len(looked) >= 3, "the watchdog looked three times")
    assert control.calls == [] and store.ops == [] and watch.pending == 1
    database_down = False
    await eventually(lambda: watch.pending == 0, "the watchdog saw the stream elsewhere")
    await watch.close()
    assert control.calls == [] and store.ops == []


async def test_watchdog_hangs_up_even_when_twilio_cannot_be_read() -> None:
    control, store = FakeControl(CallControlError("fetch failed: HTTP 500")), FakeStore()
    counts: dict[str, int] = {}
    watch = StreamWatch(control, store, 0.05, counts=counts)
    watch.expect(SID, ExpectedCall("inbound", CALLER, NUMBER))
    await _closed(store)
    await eventually(lambda: ("hangup", SID) in control.calls, "the hang-up")
    await watch.close()
    assert store.ops[0] == ("placeholder", SID, "inbound", CALLER, NUMBER)
    assert store.ops[1][:3] == ("close", SID, "no_media_stream")
    assert "could not be read" in store.ops[1][3] and "hung up" in store.ops[1][3]
    assert store.ops[2] == ("written", SID)  # waited for before the hang-up was asked for
    assert counts == {"no_media_stream": 1}


@pytest.mark.parametrize("status", ["completed", "busy", "no-answer", "canceled", "failed"])
async def test_watchdog_end_callback_closes_at_once(status: str) -> None:
    control, store = FakeControl(), FakeStore()
    watch = StreamWatch(control, store, 60.0)
    watch.expect(SID, ExpectedCall("outbound", CALLER, NUMBER))
    assert await watch.carrier_ended(SID, status) is True
    assert watch.pending == 0
    await watch.close()
    assert control.calls == []
    assert store.ops[-1][:3] == ("close", SID, "no_media_stream") and f"({status})" in store.ops[-1][3]


async def test_watchdog_ignores_connected_calls_and_unknown_ones_without_shared_records() -> None:
    control, store = FakeControl(), FakeStore()
    watch = StreamWatch(control, store, 60.0)
    watch.expect(SID, ExpectedCall("inbound"))
    watch.connected(SID)
    assert await watch.carrier_ended(SID, "completed") is False
    watch.expect(SID, ExpectedCall("inbound"))  # a late webhook retry for a connected call
    assert watch.pending == 0
    assert await watch.carrier_ended("CA" + "b" * 32, "completed") is False
    assert await watch.carrier_ended("CA" + "c" * 32, "in-progress") is False
    await watch.close()
    assert store.ops == [] and control.calls == []
