"""Our Twilio HTTP client sends Basic auth itself (aiohttp deprecated `auth=` and
`BasicAuth`): the same header on the wire, and no DeprecationWarning from our code or
from the SDK's BasicAuth path."""

from __future__ import annotations

import base64
import warnings

import aiohttp

from callbridge.emulators.twilio import TwilioEmulator
from callbridge.telephony.base import HangupOutcome
from callbridge.telephony.twilio.control import TwilioCallControl

CALL_SID = "CA" + "6" * 32


async def test_basic_auth_is_the_same_header_and_warns_nothing(twilio: TwilioEmulator) -> None:
    control = TwilioCallControl(twilio.account_sid, twilio.auth_token, twilio.base_url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            assert await control.fetch_status(CALL_SID) is None  # authenticated, then 404
            assert await control.hangup(CALL_SID) is HangupOutcome.ALREADY_ENDED
        finally:
            await control.aclose()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecations == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations]
    sent = [r.headers["authorization"] for r in twilio.requests if CALL_SID in r.path]
    assert len(sent) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        before = aiohttp.BasicAuth(twilio.account_sid, twilio.auth_token).encode()  # what the SDK sent
    creds = f"{twilio.account_sid}:{twilio.auth_token}".encode("latin1")
    assert before == "Basic " + base64.b64encode(creds).decode()
    assert sent == [before, before]


async def test_wrong_credentials_are_still_refused(twilio: TwilioEmulator) -> None:
    control = TwilioCallControl(twilio.account_sid, "not-the-token", twilio.base_url)
    try:
        try:
            await control.fetch_status(CALL_SID)
        except Exception as exc:
            assert "HTTP 401" in str(exc)
        else:
            raise AssertionError("a wrong auth token was accepted")
    finally:
        await control.aclose()
