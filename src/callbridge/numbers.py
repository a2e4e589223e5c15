"""`callbridge numbers list | connect`: the Twilio account's numbers and where their calls go.

Through the official `twilio` SDK (the IncomingPhoneNumber resource), with `TWILIO_API_BASE_URL`
honoured the way `TwilioCallControl` does it (the client it builds is reused here). A number
reaches this server when its voice webhook is exactly `CALLBRIDGE_PUBLIC_URL` + `/twilio/inbound`
with HTTP POST: Twilio signs the URL it calls, and the server checks the signature against that
very URL, so a different scheme, host, port or path fails every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from twilio.base.exceptions import TwilioRestException

from callbridge.config import Settings
from callbridge.telephony.twilio.control import TwilioCallControl

__all__ = [
    "INBOUND_PATH",
    "STATUS_PATH",
    "NumberView",
    "NumbersError",
    "connect_number",
    "describe_route",
    "list_numbers",
    "render_numbers",
    "run_numbers",
]

INBOUND_PATH = "/twilio/inbound"
STATUS_PATH = "/twilio/status"


class NumbersError(Exception):
    """One line for the user: the Twilio API refused, or there is no such number."""


@dataclass(frozen=True)
class NumberView:
    """What matters of one IncomingPhoneNumber for callbridge."""

    sid: str
    phone_number: str
    voice_url: str
    voice_method: str
    status_callback: str
    status_callback_method: str
    voice_application_sid: str
    trunk_sid: str

    @classmethod
    def of(cls, instance: Any) -> NumberView:
        def text(name: str) -> str:
            value = getattr(instance, name, None)
            return value if isinstance(value, str) else ""

        return cls(
            sid=text("sid"),
            phone_number=text("phone_number"),
            voice_url=text("voice_url"),
            voice_method=(text("voice_method") or "POST").upper(),
            status_callback=text("status_callback"),
            status_callback_method=(text("status_callback_method") or "POST").upper(),
            voice_application_sid=text("voice_application_sid"),
            trunk_sid=text("trunk_sid"),
        )


def _origin(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.path.rstrip("/")


def describe_route(number: NumberView, settings: Settings) -> tuple[Literal["ok", "warn", "fail"], str]:
    """("ok" | "warn" | "fail", what it means and the fix) for where the number's calls go."""
    expected = settings.public(INBOUND_PATH)
    if number.trunk_sid:
        return "warn", f"calls go to SIP trunk {number.trunk_sid} (its voice URL is not used)"
    if number.voice_application_sid:
        return "warn", (
            f"calls go to TwiML app {number.voice_application_sid}, not to a voice URL: "
            f"`callbridge numbers connect {number.phone_number}` points it here"
        )
    if number.voice_url == expected:
        if number.voice_method != "POST":
            return "fail", (
                f"voice webhook is this server but with HTTP {number.voice_method}: set HTTP POST "
                f"(`callbridge numbers connect {number.phone_number}`)"
            )
        return "ok", "voice webhook is this server"
    if not number.voice_url:
        return "warn", "no voice webhook: calls to it are not answered by anyone"
    got, want = _origin(number.voice_url), _origin(expected)
    if got[1] == want[1]:
        # The same host, yet not the URL the server validates: every signature would fail.
        return "fail", (
            f"voice webhook {number.voice_url} is this host but not exactly {expected} (scheme, "
            f"port and path must match, or every call fails its signature check): "
            f"`callbridge numbers connect {number.phone_number}`"
        )
    return "warn", f"voice webhook points elsewhere ({number.voice_url})"


def _with_control(settings: Settings) -> TwilioCallControl:
    return TwilioCallControl(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )


def twilio_problem(exc: Exception, settings: Settings) -> str:
    """One line for a failed Twilio request (never the token)."""
    if isinstance(exc, TwilioRestException):
        if int(exc.status) == 401:
            return (
                f"Twilio refused the credentials of account {settings.twilio_account_sid} (HTTP 401): "
                "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (the console's Account Info)"
            )
        return f"Twilio answered HTTP {exc.status} (code {exc.code}): {exc.msg}"
    return f"cannot reach the Twilio API at {settings.twilio_api_base_url}: {type(exc).__name__}"


async def fetch_account_status(settings: Settings) -> str:
    """The account's status (`active`, `suspended`, `closed`); raises NumbersError."""
    control = _with_control(settings)
    try:
        account = await control.client.api.v2010.accounts(settings.twilio_account_sid).fetch_async()
        return str(account.status or "")
    except Exception as exc:
        raise NumbersError(twilio_problem(exc, settings)) from None
    finally:
        await control.aclose()


async def list_numbers(settings: Settings) -> list[NumberView]:
    control = _with_control(settings)
    try:
        found = await control.client.incoming_phone_numbers.list_async()
        return [NumberView.of(n) for n in found]
    except Exception as exc:
        raise NumbersError(twilio_problem(exc, settings)) from None
    finally:
        await control.aclose()


async def connect_number(settings: Settings, phone_number: str) -> tuple[NumberView, NumberView]:
    """Point the number's voice webhook (POST) and status callback (POST) at this server;
    a TwiML app set on the number is cleared (it would override the voice URL).
    Returns the number before and after."""
    control = _with_control(settings)
    try:
        client = control.client
        matches = await client.incoming_phone_numbers.list_async(phone_number=phone_number)
        if not matches:
            raise NumbersError(
                f"no number {phone_number} in account {settings.twilio_account_sid}: "
                "`callbridge numbers list` shows the account's numbers (E.164, e.g. +15551234567)"
            )
        before = NumberView.of(matches[0])
        fields: dict[str, str] = {
            "voice_url": settings.public(INBOUND_PATH),
            "voice_method": "POST",
            "status_callback": settings.public(STATUS_PATH),
            "status_callback_method": "POST",
        }
        if before.voice_application_sid:
            fields["voice_application_sid"] = ""
        updated = await client.incoming_phone_numbers(before.sid).update_async(**fields)
        return before, NumberView.of(updated)
    except NumbersError:
        raise
    except Exception as exc:
        raise NumbersError(twilio_problem(exc, settings)) from None
    finally:
        await control.aclose()


def _route(url: str, method: str) -> str:
    return f"{method} {url}" if url else "(none)"


def render_numbers(numbers: Sequence[NumberView], settings: Settings) -> str:
    if not numbers:
        return f"account {settings.twilio_account_sid} has no phone numbers"
    marks = {"ok": "✓", "warn": "!", "fail": "✗"}
    lines = []
    for n in numbers:
        status, meaning = describe_route(n, settings) if settings.public_url else ("warn", "")
        lines.append(f"{marks[status]} {n.phone_number}  ({n.sid})")
        lines.append(f"    voice webhook    {_route(n.voice_url, n.voice_method)}")
        lines.append(f"    status callback  {_route(n.status_callback, n.status_callback_method)}")
        if meaning:
            lines.append(f"    {meaning}")
    return "\n".join(lines)


def render_change(before: NumberView, after: NumberView) -> str:
    lines = [f"{after.phone_number}  ({after.sid})"]
    rows = [
        (
            "voice webhook",
            _route(before.voice_url, before.voice_method),
            _route(after.voice_url, after.voice_method),
        ),
        (
            "status callback",
            _route(before.status_callback, before.status_callback_method),
            _route(after.status_callback, after.status_callback_method),
        ),
    ]
    if before.voice_application_sid or after.voice_application_sid:
        rows.append(
            ("TwiML app", before.voice_application_sid or "(none)", after.voice_application_sid or "(none)")
        )
    for label, old, new in rows:
        lines.append(f"  {label:<16} before: {old}")
        lines.append(f"  {'':<16} after:  {new}")
    return "\n".join(lines)


def run_numbers(settings: Settings, command: str, phone_number: str | None = None) -> int:
    """`numbers list` / `numbers connect NUMBER`: prints, returns the exit status; NumbersError
    is the one line to show."""
    if command == "list":
        print(render_numbers(asyncio.run(list_numbers(settings)), settings))
        return 0
    assert phone_number is not None
    before, after = asyncio.run(connect_number(settings, phone_number))
    print(render_change(before, after))
    return 0
