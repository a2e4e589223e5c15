"""The console's server side without a browser: its files and headers, the live feed's sign-in
and batching, the records list's paging and filters, and the last hour's counts."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say
from callbridge.emulators.twilio import TwilioEmulator
from callbridge.server.console import FEED_INTERVAL, SECURITY_HEADERS
from callbridge.store.schema import CALLS
from tests.serverkit import API_TOKEN, RunningServer, running_server, settings_for, wait_until

pytestmark = pytest.mark.database


def talkative() -> AgentScript:
    return AgentScript(steps=[Say("I can talk for a long time.", seconds=30.0)], realtime_factor=1.0)


def ws_url(srv: RunningServer) -> str:
    return srv.url.replace("http://", "ws://") + "/ui/api/live"


async def receive(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def test_console_files_carry_the_security_headers(twilio: TwilioEmulator, db_url: str) -> None:
    async with (
        AgentEmulator(talkative()) as agent,
        running_server(settings_for(twilio, agent, db_url)) as srv,
    ):
        async with httpx.AsyncClient(base_url=srv.url) as http:
            moved = await http.get("/ui")
            assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
            for path, kind in (
                ("/ui/", "text/html"),
                ("/ui/app.js", "text/javascript"),
                ("/ui/app.css", "text/css"),
            ):
                resp = await http.get(path)
                assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind)
                csp = resp.headers["content-security-policy"]
                assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp and "http" not in csp  # nothing third-party
                host = srv.url.removeprefix("http://")
                assert f"connect-src 'self' ws://{host} wss://{host};" in csp
                assert resp.headers["x-frame-options"] == "DENY"
                assert resp.headers["x-content-type-options"] == "nosniff"
                assert resp.headers["referrer-policy"] == "no-referrer"
            page = (await http.get("/ui/")).text
            assert "<script>" not in page and "style=" not in page  # no inline script or style
            assert (await http.get("/ui/../server/console.py")).status_code == 404
            assert (await http.get("/ui/console.py")).status_code == 404
            # A Host header that is no host name is not echoed into the policy.
            odd = await http.get("/ui/", headers={"host": "x; script-src http://evil.example"})
            assert odd.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
            # The counts need the token like the /calls API.
            assert (await http.get("/ui/api/summary")).status_code == 401


async def test_live_feed_needs_the_token_in_its_first_message(twilio: TwilioEmulator, db_url: str) -> None:
    async with (
        AgentEmulator(talkative()) as agent,
        running_server(settings_for(twilio, agent, db_url)) as srv,
    ):
        async with connect(ws_url(srv)) as ws:
            await ws.send(API_TOKEN.encode())  # a binary frame is no token message
            assert await receive(ws) == {"type": "error", "error": "missing or wrong token"}
            with pytest.raises(ConnectionClosed):
                await receive(ws)
            assert ws.close_code == 1008
        async with connect(ws_url(srv)) as ws:
            await ws.send(json.dumps({"token": "wrong"}))
            assert await receive(ws) == {"type": "error", "error": "missing or wrong token"}
            with pytest.raises(ConnectionClosed):
                await receive(ws)
            assert ws.close_code == 1008
    async with AgentEmulator(talkative()) as agent:
        settings = replace(settings_for(twilio, agent, db_url), api_token="")
        async with running_server(settings) as srv:
            async with connect(ws_url(srv)) as ws:
                assert (await receive(ws))["error"] == "CALLBRIDGE_API_TOKEN is not set"
                with pytest.raises(ConnectionClosed):
                    await receive(ws)
                assert ws.close_code == 1008


async def test_live_feed_batches_every_call_into_one_message_per_interval(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with (
        AgentEmulator(talkative()) as agent,
        running_server(settings_for(twilio, agent, db_url)) as srv,
    ):
        calls = [
            await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_=f"+1555000000{i}")
            for i in range(3)
        ]
        await wait_until(lambda: all(srv.state.bridge.find(c.sid) for c in calls), 5, "three live calls")
        await agent.wait_for_conversations(3, timeout=5)
        async with connect(ws_url(srv)) as ws:
            await ws.send(json.dumps({"token": API_TOKEN}))
            assert (await receive(ws))["type"] == "hello"
            first = await receive(ws)
            assert first["type"] == "update"
            assert sorted(c["call_sid"] for c in first["calls"]) == sorted(c.sid for c in calls)
            shown = {c["call_sid"]: c for c in first["calls"]}
            assert shown[calls[0].sid]["from"] == "+15550000000" and shown[calls[0].sid]["state"] == "active"
            # Audio flows all the while (50 frames a second a call); the feed sends at most
            # one message per interval, and only when something it shows changed.
            frames_before = sum(srv.state.bridge.calls[c.sid].metrics["frames_from_caller"] for c in calls)
            window = 1.5
            count, started = 0, time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(window):
                    while True:
                        await ws.recv()
                        count += 1
            frames = (
                sum(srv.state.bridge.calls[c.sid].metrics["frames_from_caller"] for c in calls)
                - frames_before
            )
            assert frames > 3 * 20  # the calls were carrying audio
            assert count <= (time.monotonic() - started) / FEED_INTERVAL + 1
            # Watching one call: its transcript and timeline arrive, then only what is new.
            await ws.send(json.dumps({"watch": calls[1].sid}))
            detail = None
            while detail is None:
                detail = (await receive(ws)).get("watched")
            assert detail["call_sid"] == calls[1].sid and detail["live"] is True
            assert detail["transcript_from"] == 0
            assert [line["text"] for line in detail["transcript"]] == ["I can talk for a long time."]
            assert [e["event"] for e in detail["timeline"]][:2] == ["call.started", "agent.connected"]
            await ws.send("not json")
            assert (await receive(ws))["type"] == "error"
            await ws.send(b"\x00binary")
            assert (await receive(ws))["type"] == "error"
            # A call hung up leaves the list with its end reason.
            assert (await srv.api.post(f"/calls/{calls[0].sid}/hangup")).status_code == 200
            ended: list[dict[str, Any]] = []
            while not ended:
                ended = (await receive(ws)).get("ended") or []
            assert ended == [{"call_sid": calls[0].sid, "end_reason": "hangup_requested"}]


def rows(n: int, now: datetime) -> list[dict[str, Any]]:
    reasons = ["agent_ended", "caller_hung_up", "max_duration"]
    out = []
    for i in range(n):
        started = now - timedelta(minutes=i // 2, seconds=10)  # two calls a minute
        out.append(
            {
                "call_sid": f"CA{i:032x}",
                "direction": "inbound",
                "from_number": "+15550001111",
                "to_number": "+15550002222",
                "status": "ended",
                "end_reason": reasons[i % 3],
                "started_at": started,
                "ended_at": started + timedelta(seconds=5),
                "duration_s": 5.0,
                "transcript": [{"role": "user", "text": "hello", "t": 1.0}],
                "timeline": [{"t": 0.0, "event": "call.started"}],
                "twilio_events": [],
                "metrics": {},
                "instance": "seed",
                "updated_at": now,
            }
        )
    return out


async def test_records_page_by_time_and_the_last_hour_is_counted_by_minute(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with (
        AgentEmulator(talkative()) as agent,
        running_server(settings_for(twilio, agent, db_url)) as srv,
    ):
        now = datetime.now(UTC).replace(second=30, microsecond=0) - timedelta(minutes=1)
        async with srv.state.store.engine.begin() as conn:
            await conn.execute(insert(CALLS), rows(400, now))  # 200 minutes of calls
        # The list view: columns only, filtered by a time range, paged.
        params = {
            "view": "brief",
            "since": (now - timedelta(minutes=10)).isoformat(),
            "until": (now - timedelta(minutes=5)).isoformat(),
            "limit": "4",
        }
        page = (await srv.api.get("/calls", params=params)).json()
        assert set(page["calls"][0]) == {
            "call_sid",
            "direction",
            "from",
            "to",
            "status",
            "end_reason",
            "started_at",
            "ended_at",
            "duration_s",
        }
        seen = [c["call_sid"] for c in page["calls"]]
        while page["next_offset"] is not None:
            page = (await srv.api.get("/calls", params={**params, "offset": page["next_offset"]})).json()
            seen += [c["call_sid"] for c in page["calls"]]
        # Minutes 5..9 back (started 10 s before each minute mark): calls 10..19 (two a minute).
        assert seen == [f"CA{i:032x}" for i in range(10, 20)]
        # Without view, a full record (backwards compatible), and an offset-less time is UTC.
        full = (
            await srv.api.get("/calls", params={"limit": "1", "until": now.replace(tzinfo=None).isoformat()})
        ).json()
        assert full["calls"][0]["transcript"] == [{"role": "user", "text": "hello", "t": 1.0}]
        assert (await srv.api.get("/calls", params={"view": "everything"})).status_code == 400
        assert (await srv.api.get("/calls", params={"until": "yesterday"})).status_code == 400

        summary = (await srv.api.get("/ui/api/summary")).json()
        per_minute = summary["per_minute"]
        # The last hour holds minutes 0..58 back in full (two calls each) and maybe part of 59.
        assert all(m["calls"] == 2 for m in per_minute)
        assert 59 <= len(per_minute) <= 60
        assert per_minute[-1]["minute"] == (now - timedelta(seconds=10)).replace(second=0).isoformat()
        total = sum(m["calls"] for m in per_minute)
        assert sum(summary["end_reasons"].values()) == total
        assert set(summary["end_reasons"]) == {"agent_ended", "caller_hung_up", "max_duration"}
        assert "silence_timeout" in summary["known_end_reasons"]
