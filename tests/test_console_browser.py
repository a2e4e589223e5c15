"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright through
its executable_path; scripts/ensure-chromium.sh installs it), against the real server and the
emulators: what a person signed in to /ui/ sees and can do."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlalchemy import insert

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, EndCall, Say, Sleep, UserTranscript
from callbridge.emulators.twilio import TwilioEmulator
from callbridge.store.schema import CALLS
from tests.serverkit import API_TOKEN, RunningServer, running_server, settings_for, wait_until

# On SQLite only: what the console asks of the database is tested on both backends in
# tests/test_console_api.py.
pytestmark = pytest.mark.browser

# A line an agent (or a caller's speech recogniser) could produce: it must show as text.
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> & "quotes"'


def chromium_path() -> str:
    for candidate in (os.environ.get("CALLBRIDGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("no Chromium: run scripts/ensure-chromium.sh (apt-get install chromium)")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A fresh browser context (its own storage) on `url`; the page's console errors are kept."""
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(url)
    return page, problems


def live_script() -> AgentScript:
    """An agent whose conversation grows for a few seconds, then goes on talking."""
    return AgentScript(
        steps=[
            Say("Hello, how can I help?", seconds=0.4),
            Sleep(1.0),
            UserTranscript("I would like a slot on Tuesday."),
            Sleep(1.0),
            Say(HOSTILE, seconds=0.4),
            Sleep(1.0),
            Say("Tuesday at ten works.", seconds=0.4),
            Say("I can keep talking for a long time.", seconds=60.0),
        ],
        realtime_factor=1.0,
    )


async def test_live_call_appears_grows_and_is_hung_up_from_the_console(
    twilio: TwilioEmulator, tmp_path: Path, browser: Browser
) -> None:
    async with AgentEmulator(live_script()) as agent:
        async with running_server(settings_for(twilio, agent, tmp_path / "calls.db")) as srv:
            page, problems = await open_page(browser, f"{srv.url}/ui/#token={API_TOKEN}")
            # Signed in from the address: the token left the address bar, the feed is on.
            await expect(page.locator("#home")).to_be_visible()
            await expect(page.locator("#feed-status")).to_have_text("live feed: on")
            assert "token" not in page.url
            assert await page.evaluate("localStorage.getItem('callbridge.token')") == API_TOKEN

            call = await twilio.place_inbound_call(f"{srv.url}/twilio/inbound", from_="+15550101010")
            await wait_until(lambda: srv.state.bridge.find(call.sid) is not None, 5, "the call is live")
            live_at = time.monotonic()
            row = page.locator(f"#live-calls tr[data-sid='{call.sid}']")
            await expect(row).to_be_visible(timeout=2000)
            assert time.monotonic() - live_at < 2.0
            await expect(row.locator("td").nth(1)).to_have_text("+15550101010")
            await expect(row.locator("td.state")).to_have_text("active")

            # Its page: the transcript grows as the agent and the caller speak.
            await row.locator("a.sid-link").click()
            await expect(page.locator("#call-live")).to_be_visible()
            lines = page.locator("#transcript li")
            await expect(lines.first).to_contain_text("Hello, how can I help?")
            await expect(lines.nth(1)).to_contain_text("I would like a slot on Tuesday.")
            await expect(lines.nth(2)).to_contain_text(HOSTILE)  # as text, not as markup
            await expect(lines.nth(3)).to_contain_text("Tuesday at ten works.")
            assert await page.evaluate("window.__xss") is None
            assert await page.locator("#transcript img, #transcript script").count() == 0
            await expect(page.locator("#events tr[data-event='agent.connected']")).to_have_count(1)

            # Back to the list: hang up with the button, after the confirmation.
            await page.locator("a[href='#/']").first.click()
            asked: list[str] = []

            async def accept(dialog: Any) -> None:
                asked.append(dialog.message)
                await dialog.accept()

            page.on("dialog", accept)
            await row.locator("button.hangup").click()
            await expect(row).to_have_count(0, timeout=5000)
            await expect(page.locator("#message")).to_contain_text("hung up")
            assert asked and call.sid in asked[0]
            await call.wait_ended(5)
            record = await srv.call_record(call.sid)
            assert record["end_reason"] == "hangup_requested"
            assert call.status == "completed" and call.end_cause == "rest_completed"
            await page.context.close()
    assert not problems, problems


LAST_HOUR_SEEDED = 50


def seeded_rows(n: int, now: datetime) -> list[dict[str, Any]]:
    """`n` ended calls, one a minute back from `now`, end reasons in turn; none started 51 to 70
    minutes back, so the last hour holds the first 50 however long the test takes (under 10
    minutes), whatever minute its summary is read in."""
    reasons = ["agent_ended", "caller_hung_up", "silence_timeout", "max_duration"]
    rows = []
    for i in range(n):
        started = now - timedelta(minutes=i + 1 if i < LAST_HOUR_SEEDED else i + 21)
        rows.append(
            {
                "call_sid": f"CA{i:032x}",
                "direction": "inbound",
                "from_number": f"+1555{i:07d}",
                "to_number": "+15550002222",
                "status": "ended",
                "end_reason": reasons[i % len(reasons)],
                "end_detail": "seeded",
                "started_at": started,
                "ended_at": started + timedelta(seconds=30),
                "duration_s": 30.0,
                "transcript": [{"role": "user", "text": HOSTILE, "t": 1.0}] if i == 0 else [],
                "timeline": [],
                "twilio_events": [],
                "metrics": {},
                "instance": "seed",
                "updated_at": now,
            }
        )
    return rows


async def seed(srv: RunningServer, rows: list[dict[str, Any]]) -> None:
    async with srv.state.store.engine.begin() as conn:
        await conn.execute(insert(CALLS), rows)


def goodbye_script() -> AgentScript:
    return AgentScript(
        steps=[
            Say("Hello!", seconds=0.3),
            UserTranscript("Just checking, thanks."),
            EndCall("Goodbye, have a nice day.", seconds=0.4),
        ]
    )


async def rows_shown(page: Page) -> list[list[str]]:
    rows: list[list[str]] = await page.locator("#records tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    return rows


async def test_sign_in_records_filters_paging_and_a_finished_call(
    twilio: TwilioEmulator, tmp_path: Path, browser: Browser
) -> None:
    async with AgentEmulator(goodbye_script()) as agent:
        settings = settings_for(twilio, agent, tmp_path / "calls.db")
        async with running_server(settings) as srv:
            call = await twilio.place_inbound_call(
                f"{srv.url}/twilio/inbound",
                status_callback=f"{srv.url}/twilio/status",
                from_="+15550404040",
            )
            await srv.wait_records(1)
            await call.wait_ended(5)
            now = datetime.now(UTC).replace(second=0, microsecond=0)
            await seed(srv, seeded_rows(300, now))

            page, problems = await open_page(browser, f"{srv.url}/ui/")
            # Sign-in: a wrong token is refused with a clear message, the right one opens the console.
            await expect(page.locator("#sign-in")).to_be_visible()
            await page.fill("#token-input", "not-the-token")
            await page.click("#sign-in-form button")
            await expect(page.locator("#message")).to_contain_text("Wrong API token")
            await expect(page.locator("#home")).to_be_hidden()
            await page.fill("#token-input", API_TOKEN)
            await page.click("#sign-in-form button")
            await expect(page.locator("#home")).to_be_visible()

            # Recent calls, newest first (the real call), 25 a page.
            await expect(page.locator("#records tbody tr")).to_have_count(25)
            first = (await rows_shown(page))[0]
            assert first[1] == call.sid and first[2] == "+15550404040" and first[7] == "agent_ended"
            await expect(page.locator("#page-label")).to_contain_text("page 1")
            await page.click("#next-page")
            await expect(page.locator("#page-label")).to_contain_text("page 2 (calls 26-50)")
            page2 = await rows_shown(page)
            assert page2[0][1] == f"CA{24:032x}"  # the 25th seeded call (the real one is first)
            await page.click("#prev-page")
            await expect(page.locator("#page-label")).to_contain_text("page 1")

            # Filter by end reason: 75 seeded silence timeouts, 3 pages.
            await page.select_option("#f-reason", "silence_timeout")
            await page.click("#filters button")
            reason_cells = page.locator("#records td.reason")
            await expect(reason_cells.filter(has_not_text="silence_timeout")).to_have_count(0)
            await expect(reason_cells).to_have_count(25)
            await expect(page.locator("#page-label")).to_contain_text("page 1 (calls 1-25)")
            for label in ("page 2 (calls 26-50)", "page 3 (calls 51-75)"):
                await page.click("#next-page")
                await expect(page.locator("#page-label")).to_contain_text(label)
            await expect(page.locator("#next-page")).to_be_disabled()

            # And by time: the seeded calls started between 10 and 20 minutes ago, any reason.
            await page.select_option("#f-reason", "")
            local = await page.evaluate(
                """([a, b]) => [a, b].map(ms => {
                    const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000);
                    return d.toISOString().slice(0, 16);
                })""",
                [
                    (now - timedelta(minutes=20)).timestamp() * 1000,
                    (now - timedelta(minutes=10)).timestamp() * 1000,
                ],
            )
            await page.fill("#f-since", local[0])
            await page.fill("#f-until", local[1])
            await page.click("#filters button")
            await expect(page.locator("#page-label")).to_contain_text("page 1 (calls 1-10)")
            assert [r[1] for r in await rows_shown(page)] == [f"CA{i:032x}" for i in range(10, 20)]

            # At a glance: the last hour's calls per minute and end reasons, from the records.
            # The 50 seeded calls of the last hour and the real one.
            await expect(page.locator("#per-minute-caption")).to_contain_text("last hour: 51 in all")
            reasons = await page.locator("#end-reasons tbody tr").evaluate_all(
                "rows => Object.fromEntries(rows.map(r => [r.cells[0].textContent, r.cells[1].textContent]))"
            )
            assert reasons == {
                "agent_ended": "14",  # 13 seeded (the 1st, 5th, ... 49th) and the real call
                "caller_hung_up": "13",
                "silence_timeout": "12",
                "max_duration": "12",
            }

            # The finished call's page: transcript, end reason, timeline, latency, raw JSON.
            await page.goto(f"{srv.url}/ui/#/call/{call.sid}")
            await expect(page.locator("#call-sid")).to_have_text(call.sid)
            await expect(page.locator("dd[data-fact='end reason']")).to_have_text("agent_ended")
            lines = page.locator("#transcript li")
            await expect(lines).to_have_count(3)
            await expect(lines.nth(1)).to_contain_text("Just checking, thanks.")
            await expect(lines.nth(2)).to_contain_text("Goodbye, have a nice day.")
            record = await srv.call_record(call.sid)
            latency = record["metrics"]["hangup_latency_ms"]
            # As JavaScript prints a number: 1.0 is "1", 12.5 is "12.5".
            shown = str(int(latency)) if float(latency).is_integer() else str(latency)
            await expect(page.locator("#call-latency")).to_have_text(
                f"Hang-up requested {shown} ms after the caller heard the last goodbye mark."
            )
            for event in ("call.started", "agent.connected", "agent.end_call", "phone.hangup", "call.ended"):
                await expect(page.locator(f"#events tr[data-event='{event}']")).to_have_count(1)
                await expect(page.locator(f"#timeline [data-event='{event}']")).to_have_count(1)
            await expect(page.locator("#events tr[data-event='Twilio status completed']")).to_have_count(1)
            await expect(page.locator("#raw-json")).to_be_hidden()
            await page.click("#raw summary")
            await expect(page.locator("#raw-json")).to_contain_text(f'"call_sid": "{call.sid}"')

            # A stored transcript with markup in it is shown as text.
            await page.goto(f"{srv.url}/ui/#/call/CA{0:032x}")
            await expect(page.locator("#call-sid")).to_have_text(f"CA{0:032x}")
            await expect(page.locator("#transcript li")).to_have_count(1)
            await expect(page.locator("#transcript li")).to_contain_text(HOSTILE)
            assert await page.locator("#transcript img, #transcript script").count() == 0
            assert await page.evaluate("window.__xss") is None
            await page.context.close()
    # The sign-in probe and the wrong token were answered 401; nothing else went wrong.
    assert [p for p in problems if "status of 401" not in p] == [], problems


async def test_without_a_configured_token_the_console_says_so(
    twilio: TwilioEmulator, tmp_path: Path, browser: Browser
) -> None:
    async with AgentEmulator(goodbye_script()) as agent:
        settings = replace(settings_for(twilio, agent, tmp_path / "calls.db"), api_token="")
        async with running_server(settings) as srv:
            page, _ = await open_page(browser, f"{srv.url}/ui/#token=anything")
            await expect(page.locator("#message")).to_contain_text("CALLBRIDGE_API_TOKEN is not set")
            for hidden in ("#home", "#call", "#sign-in"):
                await expect(page.locator(hidden)).to_be_hidden()
            await page.context.close()
            await asyncio.sleep(0)
