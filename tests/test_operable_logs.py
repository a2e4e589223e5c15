"""Log lines an operator can filter on: a call's SID is a field of the line (JSON key
`call_sid`, `call_sid=` in text mode), not only words inside a message."""

from __future__ import annotations

import json
import logging

import pytest

from callbridge.emulators.twilio import TwilioEmulator
from callbridge.logs import JsonFormatter
from callbridge.telephony.base import HangupOutcome
from callbridge.telephony.twilio.control import RetryPolicy, TwilioCallControl

CALL_SID = "CA" + "5" * 32


async def test_a_rest_retry_line_carries_the_call_sid_as_a_field(
    twilio: TwilioEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callbridge")
    twilio.inject_fault("update", status=503)
    policy = RetryPolicy(attempts=3, request_timeout=2.0, deadline=5.0, base_delay=0.01, max_delay=0.05)
    control = TwilioCallControl(twilio.account_sid, twilio.auth_token, twilio.base_url, retry=policy)
    try:
        outcome = await control.hangup(CALL_SID)  # 503, then 404: a call long gone
    finally:
        await control.aclose()
    assert outcome is HangupOutcome.ALREADY_ENDED
    retries = [r for r in caplog.records if getattr(r, "cb_event", None) == "twilio.retry"]
    assert len(retries) == 1, caplog.text
    line = json.loads(JsonFormatter().format(retries[0]))
    assert line["level"] == "warning"
    assert line["call_sid"] == CALL_SID
    assert line["operation"] == "hangup" and line["error"].startswith("HTTP 503")
    assert line["attempt"] == "1/3" and 0 < line["retry_in_s"] <= 0.05
    assert f"call_sid={CALL_SID}" in retries[0].getMessage()
