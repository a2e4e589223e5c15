"""The agent leg's WebSocket client (callbridge.wsclient) against real servers on loopback:
the `websockets` server for the protocol, and a raw TCP server where a peer must misbehave."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.http11 import Response

from callbridge.wsclient import connect
from tests.serverkit import wait_until

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler, **kwargs: object) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, compression=None, **kwargs) as srv:  # type: ignore[arg-type]
        port = srv.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/convai/conversation?agent_id=a"


async def open_client(url: str, **kwargs: object):  # type: ignore[no-untyped-def]
    options: dict[str, object] = {"max_size": 1 << 20, "close_timeout": 1.0, "user_agent": "callbridge"}
    options.update(kwargs)
    return await connect(url, **options)  # type: ignore[arg-type]


async def test_messages_both_ways_in_order_and_a_clean_close() -> None:
    seen: list[str] = []
    headers: dict[str, str] = {}

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        for name in ("User-Agent", "Sec-WebSocket-Extensions"):
            headers[name] = ws.request.headers.get(name, "")
        await ws.send("hello")
        await ws.send(["frag", "mented", " message"])  # one message in three frames
        async for message in ws:
            seen.append(str(message))
            if message == "bye":
                await ws.close(1000, "done")

    async with server(handler) as url:
        conn = await open_client(url)
        assert await conn.recv() == "hello"
        assert await conn.recv() == "fragmented message"
        for i in range(100):
            await conn.send(f"m{i}")
        await conn.send("bye")
        with pytest.raises(ConnectionClosedOK) as closed:
            await conn.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert closed.value.rcvd.reason == "done"
    assert seen == [f"m{i}" for i in range(100)] + ["bye"]  # every frame was masked, or the server fails
    assert headers["User-Agent"] == "callbridge"
    assert headers["Sec-WebSocket-Extensions"] == ""  # no compression offered


async def test_close_from_the_client_completes_the_handshake() -> None:
    codes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        codes.append(ws.close_code)

    async with server(handler) as url:
        conn = await open_client(url)
        await conn.close(1000, "call ended")
        with pytest.raises(ConnectionClosedOK):
            await conn.send("late")
        await wait_until(lambda: bool(codes), 5, "the server saw the close")
    assert codes == [1000]


async def test_agent_close_with_an_error_code_is_reported_with_it() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(1011, "server error")

    async with server(handler) as url:
        conn = await open_client(url)
        with pytest.raises(ConnectionClosedError) as closed:
            await conn.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_a_refused_upgrade_raises_invalid_status() -> None:
    def refuse(conn: ServerConnection, request: object) -> Response:
        return conn.respond(403, "no\n")

    async def handler(ws: ServerConnection) -> None:
        raise AssertionError("not reached")

    async with server(handler, process_request=refuse) as url:
        with pytest.raises(InvalidStatus) as refused:
            await open_client(url)
        assert refused.value.response.status_code == 403


async def test_a_message_over_max_size_fails_the_connection_with_1009() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("x" * 5000)
        await asyncio.sleep(1)

    async with server(handler) as url:
        conn = await open_client(url, max_size=1000)
        with pytest.raises(ConnectionClosedError) as closed:
            await conn.recv()
        assert closed.value.sent is not None and closed.value.sent.code == 1009


async def test_many_unread_messages_pause_reading_and_all_arrive_in_order() -> None:
    async def handler(ws: ServerConnection) -> None:
        for i in range(500):
            await ws.send(f"{i}")
        await ws.close()

    async with server(handler) as url:
        conn = await open_client(url)
        await asyncio.sleep(0.3)  # the server sends all it can while nobody reads
        got = []
        with pytest.raises(ConnectionClosedOK):
            while True:
                got.append(await conn.recv())
    assert got == [str(i) for i in range(500)]


# -- a raw peer, for what a well-behaved server never does -------------------------------------


@asynccontextmanager
async def raw_server(after_upgrade: bytes = b"") -> AsyncIterator[str]:
    """Answers the upgrade correctly, optionally sends raw bytes, then never reads or answers."""
    writers: list[asyncio.StreamWriter] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + after_upgrade
        )
        await writer.drain()
        await done.wait()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/"
    finally:
        done.set()
        for w in writers:
            w.transport.abort()
        srv.close()
        await srv.wait_closed()
        await asyncio.sleep(0.01)  # the handlers return


async def test_unanswered_pings_fail_the_connection_1011() -> None:
    async with raw_server() as url:
        conn = await open_client(url, ping_interval=0.1, ping_timeout=0.2, close_timeout=0.2)
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(conn.recv(), 5)
        assert closed.value.sent is not None and closed.value.sent.code == 1011
        assert "keepalive ping timeout" in closed.value.sent.reason
        assert conn.transport.is_closing()


async def test_invalid_utf8_in_a_text_frame_fails_the_connection_1007() -> None:
    bad = b"\xff\xfe"
    frame = bytes((0x81, len(bad))) + bad  # server frames are not masked
    async with raw_server(after_upgrade=frame) as url:
        conn = await open_client(url, close_timeout=0.2)
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(conn.recv(), 5)
        assert closed.value.sent is not None and closed.value.sent.code == 1007


async def test_a_tcp_drop_is_a_close_with_no_frame() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("one")
        ws.transport.abort()

    async with server(handler) as url:
        conn = await open_client(url)
        assert await conn.recv() == "one"
        with pytest.raises(ConnectionClosedError) as closed:
            await conn.recv()
        assert closed.value.rcvd is None and closed.value.sent is None
