"""Connections to Twilio's REST API opened ahead of an announced hang-up
(`TwilioCallControl.expect_request`): the hang-up then goes out on a connection that is
already open, and no more connections are opened than requests are expected.

The API here is a small HTTP server of the test's own, because what is asserted is which
TCP connection each request came on; it answers as Twilio does for a hang-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from callbridge.telephony.base import CallControlError, HangupOutcome
from callbridge.telephony.twilio.control import WARM_CONNECTIONS, RetryPolicy, TwilioCallControl
from tests.serverkit import free_port, wait_until

ACCOUNT_SID = "AC" + "0" * 32


def sid(i: int) -> str:
    return f"CA{i:032d}"


@dataclass
class Api:
    port: int = 0
    connections: int = 0  # TCP connections accepted, in order
    hangups: list[tuple[str, int]] = field(default_factory=list)  # (call sid, connection no.)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    (
                        int(v)
                        for k, _, v in (x.partition(":") for x in lines)
                        if k.lower() == "content-length"
                    ),
                    0,
                )
                body = (await reader.readexactly(length)).decode()
                call_sid = lines[0].split(" ")[1].rsplit("/", 1)[-1].removesuffix(".json")
                assert "Status=completed" in body
                self.hangups.append((call_sid, number))
                payload = json.dumps({"sid": call_sid, "account_sid": ACCOUNT_SID, "status": "completed"})
                writer.write(
                    f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n{payload}".encode()
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    state = Api()
    server = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


@pytest.fixture
async def control(api: Api) -> AsyncIterator[TwilioCallControl]:
    c = TwilioCallControl(ACCOUNT_SID, "token", f"http://127.0.0.1:{api.port}")
    yield c
    await c.aclose()


async def test_an_announced_hang_up_goes_out_on_the_connection_opened_for_it(
    api: Api, control: TwilioCallControl
) -> None:
    control.expect_request(sid(1))
    await wait_until(
        lambda: api.connections == 1 and control.connections_opened_ahead == 1, 5, "a connection opened ahead"
    )
    assert api.hangups == []  # a connection only: nothing was asked of the API
    assert await control.hangup(sid(1)) is HangupOutcome.COMPLETED
    assert api.hangups == [(sid(1), 1)]
    assert api.connections == 1


async def test_only_as_many_connections_are_opened_as_requests_are_expected(
    api: Api, control: TwilioCallControl
) -> None:
    await control.hangup(sid(0))  # one connection, now idle in the pool
    assert api.connections == 1
    control.expect_request(sid(1))  # one expected, one idle: nothing to open
    control.expect_request(sid(2))
    control.expect_request(sid(3))  # three expected: two more
    await wait_until(lambda: control.connections_opened_ahead == 2, 5, "two connections opened ahead")
    assert api.connections == 3
    outcomes = await asyncio.gather(*(control.hangup(sid(i)) for i in (1, 2, 3)))
    assert outcomes == [HangupOutcome.COMPLETED] * 3
    assert api.connections == 3  # the three hang-ups at once found three open connections
    assert sorted(n for _, n in api.hangups[1:]) == [1, 2, 3]
    control.expect_request(sid(4))  # three idle now
    await asyncio.sleep(0)
    assert control.connections_opened_ahead == 2


async def test_no_more_than_the_cap_are_opened_ahead(api: Api, control: TwilioCallControl) -> None:
    for i in range(WARM_CONNECTIONS + 5):
        control.expect_request(sid(i))
    await wait_until(lambda: control.connections_opened_ahead == WARM_CONNECTIONS, 5, "the cap opened ahead")
    await asyncio.sleep(0.05)
    assert api.connections == WARM_CONNECTIONS
    await asyncio.gather(*(control.hangup(sid(i)) for i in range(WARM_CONNECTIONS + 5)))
    assert len(api.hangups) == WARM_CONNECTIONS + 5


async def test_a_connection_that_cannot_be_opened_ahead_is_logged_and_the_hang_up_still_tried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    control = TwilioCallControl(
        ACCOUNT_SID, "token", f"http://127.0.0.1:{free_port()}", RetryPolicy(attempts=1)
    )
    try:
        with caplog.at_level(logging.INFO, logger="callbridge.twilio"):
            control.expect_request(sid(1))
            await wait_until(lambda: "twilio.connect_ahead_failed" in caplog.text, 5, "the failure logged")
            with pytest.raises(CallControlError, match="ClientConnectorError"):
                await control.hangup(sid(1))
    finally:
        await control.aclose()
    assert control.connections_opened_ahead == 0
