"""The account and its phone numbers: ``Accounts/{AccountSid}.json`` and ``IncomingPhoneNumbers``.

From Twilio's IncomingPhoneNumber resource reference (list: ``GET .../IncomingPhoneNumbers.json``,
optional ``PhoneNumber`` filter; fetch and update: ``.../IncomingPhoneNumbers/{Sid}.json``, update
taking ``VoiceUrl``, ``VoiceMethod``, ``StatusCallback``, ``StatusCallbackMethod``,
``VoiceApplicationSid``, ``FriendlyName``) and the Account resource (``status`` ``active``,
``suspended`` or ``closed``). Pages have the list key beside the paging keys, as every 2010-04-01
list does.

Knobs for tests: :meth:`PhoneNumbers.add` puts a number in the account pointed anywhere (or
nowhere); ``account_status`` makes the account suspended or closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callbridge.emulators.twilio.calls import API_VERSION, new_sid, rfc2822, utcnow

__all__ = ["EmulatedNumber", "PhoneNumbers"]

Authenticate = Callable[[Request], Response | None]
Record = Callable[[Request], Awaitable[list[tuple[str, str]]]]

_METHODS = ("GET", "POST")


def _error(status: int, code: int, message: str) -> JSONResponse:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return JSONResponse(body, status_code=status)


@dataclass
class EmulatedNumber:
    """One IncomingPhoneNumber of the account."""

    phone_number: str
    sid: str = field(default_factory=lambda: new_sid("PN"))
    friendly_name: str = ""
    voice_url: str | None = None
    voice_method: str = "POST"
    voice_fallback_url: str | None = None
    voice_application_sid: str | None = None
    status_callback: str | None = None
    status_callback_method: str = "POST"
    trunk_sid: str | None = None
    date_created: datetime = field(default_factory=utcnow)
    date_updated: datetime = field(default_factory=utcnow)
    #: Every update applied, as the form it came with.
    updates: list[dict[str, str]] = field(default_factory=list)

    def to_resource(self, account_sid: str) -> dict[str, Any]:
        uri = f"/{API_VERSION}/Accounts/{account_sid}/IncomingPhoneNumbers/{self.sid}.json"
        return {
            "account_sid": account_sid,
            "address_requirements": "none",
            "api_version": API_VERSION,
            "beta": False,
            "capabilities": {"voice": True, "sms": True, "mms": False, "fax": False},
            "date_created": rfc2822(self.date_created),
            "date_updated": rfc2822(self.date_updated),
            "friendly_name": self.friendly_name or self.phone_number,
            "origin": "twilio",
            "phone_number": self.phone_number,
            "sid": self.sid,
            "sms_application_sid": "",
            "sms_fallback_method": "POST",
            "sms_fallback_url": "",
            "sms_method": "POST",
            "sms_url": "",
            "status": "in-use",
            "status_callback": self.status_callback or "",
            "status_callback_method": self.status_callback_method,
            "trunk_sid": self.trunk_sid,
            "uri": uri,
            "voice_application_sid": self.voice_application_sid or "",
            "voice_caller_id_lookup": False,
            "voice_fallback_method": "POST",
            "voice_fallback_url": self.voice_fallback_url or "",
            "voice_method": self.voice_method,
            "voice_url": self.voice_url or "",
            "voice_receive_mode": "voice",
        }


# Form field -> attribute, for an update.
_UPDATABLE = {
    "VoiceUrl": "voice_url",
    "VoiceMethod": "voice_method",
    "VoiceFallbackUrl": "voice_fallback_url",
    "VoiceApplicationSid": "voice_application_sid",
    "StatusCallback": "status_callback",
    "StatusCallbackMethod": "status_callback_method",
    "FriendlyName": "friendly_name",
}


class PhoneNumbers:
    """The account's numbers and the REST routes over them."""

    def __init__(self, account_sid: str) -> None:
        self.account_sid = account_sid
        self.account_status = "active"
        self.friendly_name = "Emulated account"
        self.numbers: dict[str, EmulatedNumber] = {}  # by SID

    def add(self, phone_number: str, **attributes: Any) -> EmulatedNumber:
        """A number in the account, e.g. ``add("+15550002222", voice_url="https://elsewhere/")``."""
        number = EmulatedNumber(phone_number=phone_number, **attributes)
        self.numbers[number.sid] = number
        return number

    def by_phone(self, phone_number: str) -> EmulatedNumber | None:
        return next((n for n in self.numbers.values() if n.phone_number == phone_number), None)

    # ---- REST

    def routes(self, authenticate: Authenticate, record: Record) -> list[Route]:
        base = f"/{API_VERSION}/Accounts/{{account_sid}}"

        async def account(request: Request) -> Response:
            await record(request)
            denied = authenticate(request)
            if denied is not None:
                return denied
            if request.method != "GET":
                return _error(405, 20004, "Method not allowed")
            return JSONResponse(self._account_resource())

        async def number_list(request: Request) -> Response:
            items = dict(await record(request))
            denied = authenticate(request)
            if denied is not None:
                return denied
            if request.method != "GET":
                return _error(405, 20004, "Method not allowed (buying numbers is not emulated)")
            return self._list(request, items)

        async def number(request: Request) -> Response:
            form = dict(await record(request))
            denied = authenticate(request)
            if denied is not None:
                return denied
            found = self.numbers.get(request.path_params["sid"])
            if found is None:
                return _error(404, 20404, f"The requested resource {request.url.path} was not found")
            if request.method == "POST":
                self._update(found, form)
            return JSONResponse(found.to_resource(self.account_sid))

        return [
            Route(f"{base}.json", account, methods=list(_METHODS)),
            Route(f"{base}/IncomingPhoneNumbers.json", number_list, methods=list(_METHODS)),
            Route(f"{base}/IncomingPhoneNumbers/{{sid}}.json", number, methods=list(_METHODS)),
        ]

    def _account_resource(self) -> dict[str, Any]:
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}.json"
        return {
            "auth_token": "",  # Twilio shows it to its owner; the emulator never does
            "date_created": rfc2822(utcnow()),
            "date_updated": rfc2822(utcnow()),
            "friendly_name": self.friendly_name,
            "owner_account_sid": self.account_sid,
            "sid": self.account_sid,
            "status": self.account_status,
            "subresource_uris": {},
            "type": "Full",
            "uri": uri,
        }

    def _list(self, request: Request, query: dict[str, str]) -> Response:
        numbers = sorted(self.numbers.values(), key=lambda n: n.date_created)
        if query.get("PhoneNumber"):
            numbers = [n for n in numbers if n.phone_number == query["PhoneNumber"]]
        try:
            page_size = max(1, min(1000, int(query.get("PageSize", "50"))))
        except ValueError:
            page_size = 50
        numbers = numbers[:page_size]
        uri = f"{request.url.path}?PageSize={page_size}&Page=0"
        return JSONResponse(
            {
                "incoming_phone_numbers": [n.to_resource(self.account_sid) for n in numbers],
                "end": max(len(numbers) - 1, 0),
                "first_page_uri": uri,
                "next_page_uri": None,
                "page": 0,
                "page_size": page_size,
                "previous_page_uri": None,
                "start": 0,
                "uri": uri,
            }
        )

    @staticmethod
    def _update(number: EmulatedNumber, form: dict[str, str]) -> None:
        for key, attribute in _UPDATABLE.items():
            if key in form:
                value: str | None = form[key]
                if attribute.endswith("_method"):
                    value = (value or "POST").upper()
                elif not value:
                    value = None  # an empty value clears a URL or an application
                setattr(number, attribute, value)
        number.updates.append(dict(form))
        number.date_updated = utcnow()
