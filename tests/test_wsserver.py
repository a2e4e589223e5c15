"""The WebSocket connection's own frame parser (wsconn.py, "fast mode") and its hand-over to the
library ("slow mode"), through `wsserver.serve` on loopback and a raw TCP client that writes
exact frame bytes at exact write boundaries; and the client side (wsclient) against it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import pytest

from callbridge.transport import SocketClosed
from callbridge.wsclient import connect
from callbridge.wsserver import ServerSocket, serve
from tests.serverkit import wait_until

T = 5.0  # every wait's bound, in seconds
MAX = 1000  # the server's max_size
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"\x37\xfa\x21\x3d"  # a mask key that changes every byte (a parser ignoring it reads garbage)


def frame(data: bytes | str, op: int = 0x1, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One frame as a client writes it (masked unless told), built by hand."""
    payload = data.encode() if isinstance(data, str) else data
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | op
    bit = 0x80 if masked else 0
    assert n < 65536  # no client frame here needs a 64-bit length
    head = bytes((first, bit | n)) if n < 126 else bytes((first, bit | 126)) + n.to_bytes(2, "big")
    if not masked:
        return head + payload
    return head + KEY + bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))


class Recorder:
    """A handler: records every message the server receives, and how receive() ended."""

    def __init__(self) -> None:
        self.got: list[str | bytes] = []
        self.closed: SocketClosed | None = None
        self.sock: ServerSocket | None = None
        self.nbytes = 0  # bytes the server's connection was handed (data_received)
        self.reads = 0

    async def __call__(self, sock: ServerSocket) -> None:
        self.attach(sock)
        await self.read(sock)

    def attach(self, sock: ServerSocket) -> None:
        original = sock.data_received

        def counting(data: bytes) -> None:
            self.nbytes += len(data)
            self.reads += 1
            original(data)

        sock.data_received = counting  # type: ignore[method-assign]
        self.sock = sock

    async def read(self, sock: ServerSocket) -> None:
        try:
            while True:
                self.got.append(await sock.receive())
        except SocketClosed as exc:
            self.closed = exc

    async def until_got(self, n: int) -> list[str | bytes]:
        await wait_until(lambda: len(self.got) >= n, T, f"{n} messages received")
        return self.got

    async def until_closed(self) -> SocketClosed:
        await wait_until(lambda: self.closed is not None, T, "receive() raised SocketClosed")
        return self.closed  # type: ignore[return-value]


@asynccontextmanager
async def served(handler: Callable[[ServerSocket], object], **kwargs: object) -> AsyncIterator[int]:
    options = {"max_size": MAX, "close_timeout": 1.0, **kwargs}
    async with serve(handler, "127.0.0.1", 0, **options) as srv:  # type: ignore[arg-type]
        yield srv.sockets[0].getsockname()[1]


class Raw:
    """A WebSocket client by hand: upgrade request, crafted frames, server frames read plainly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: Recorder | None):
        self.reader, self.writer, self.rec = reader, writer, rec
        self.sent = 0
        self.head = b""

    @classmethod
    @asynccontextmanager
    async def open(
        cls, port: int, rec: Recorder | None = None, path: str = "/ws", early: bytes = b""
    ) -> AsyncIterator[Raw]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer, rec)
        try:
            key = base64.b64encode(b"0123456789abcdef")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
                + early
            )
            raw.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
            if raw.head.startswith(b"HTTP/1.1 101"):
                accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
                assert b"Sec-WebSocket-Accept: " + accept in raw.head
                if rec is not None:
                    await wait_until(lambda: rec.sock is not None, T, "the handler started", interval=0)
                    raw.sent = rec.nbytes
            yield raw
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def write(self, data: bytes, step: int | None = None) -> None:
        """Write `data` in one write, or `step` bytes a write, each read by the server before the next."""
        for i in range(0, len(data), step or len(data)):
            piece = data[i : i + step] if step else data
            self.writer.write(piece)
            await self.writer.drain()
            self.sent += len(piece)
            if step and self.rec is not None:
                await wait_until(
                    lambda rec=self.rec, n=self.sent: rec.nbytes >= n, T, "the server read it", interval=0
                )

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame: (first byte, payload). Server frames are never masked."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), T)
        assert not second & 0x80, "a server frame was masked"
        n = second & 0x7F
        if n >= 126:
            n = int.from_bytes(await asyncio.wait_for(self.reader.readexactly(2 if n == 126 else 8), T))
        return first, await asyncio.wait_for(self.reader.readexactly(n), T)

    async def close_frame(self) -> tuple[int, str]:
        """Skip to the server's close frame; its (code, reason). Then the server's EOF follows."""
        while True:
            first, payload = await self.frame()
            if first == 0x88:
                return int.from_bytes(payload[:2]), payload[2:].decode()

    async def eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), T) == b""


# -- fast mode: plain frames parsed by the connection itself -----------------------------------

STREAM: list[str | bytes] = [
    "first",
    "",
    b"\x00\xffbinary\x80",
    "héllo € 𝄞 — ünïcödé",  # 2-, 3- and 4-byte UTF-8: byte-by-byte writes split inside them
    "a" * 125,  # the largest 7-bit length
    "b" * 126,  # the smallest 16-bit length
    "c" * MAX,  # 16-bit length, exactly max_size
    b"\x01" * 300,
    "last",
]


@pytest.mark.parametrize("step", [None, 1, 2, 5, 127])
async def test_plain_frames_arrive_intact_and_in_order_at_any_write_boundary(step: int | None) -> None:
    rec = Recorder()
    data = b"".join(frame(m, 0x2 if isinstance(m, bytes) else 0x1) for m in STREAM)
    async with served(rec) as port, Raw.open(port, rec) as raw:
        reads = rec.reads
        await raw.write(data, step)
        assert await rec.until_got(len(STREAM)) == STREAM
        assert isinstance(rec.got[2], bytes) and isinstance(rec.got[0], str)
        if step == 1:
            assert rec.reads - reads == len(data)  # the split really reached the parser
        raw.writer.write(frame("after"))
        assert (await rec.until_got(len(STREAM) + 1))[-1] == "after"


async def test_many_small_frames_in_one_write_then_more() -> None:
    rec = Recorder()
    async with served(rec) as port, Raw.open(port, rec) as raw:
        await raw.write(b"".join(frame(f"m{i}") for i in range(300)))  # beyond the unread queue bound
        await raw.write(frame("tail"))  # reading resumed after the pause
        assert await rec.until_got(301) == [f"m{i}" for i in range(300)] + ["tail"]


@pytest.mark.parametrize("step", [None, 1, 3])
async def test_a_ping_between_data_frames_is_answered_and_the_data_kept_in_order(step: int | None) -> None:
    rec = Recorder()
    data = frame("before") + frame("ping-data", 0x9) + frame(b"\x02bin", 0x2) + frame("after")
    async with served(rec) as port, Raw.open(port, rec) as raw:
        await raw.write(data, step)
        assert await raw.frame() == (0x8A, b"ping-data")
        assert await rec.until_got(3) == ["before", b"\x02bin", "after"]
        await raw.write(frame("", 0xA) + frame("more"))  # an unsolicited pong is ignored
        assert (await rec.until_got(4))[-1] == "more"


async def test_frames_in_the_same_write_as_the_upgrade_request() -> None:
    rec = Recorder()
    async with served(rec) as port, Raw.open(port, rec, early=frame("early") + frame("two")) as raw:
        assert raw.head.startswith(b"HTTP/1.1 101")
        await raw.write(frame("three"), 1)
        assert await rec.until_got(3) == ["early", "two", "three"]


# -- slow mode: the library takes over ---------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1])
async def test_a_fragmented_message_is_whole_and_frames_after_it_still_arrive(step: int | None) -> None:
    rec = Recorder()
    parts = [frame("plain"), frame("frag", fin=False), frame("ping", 0x9), frame("mént", 0x0, fin=False)]
    parts += [frame("ed", 0x0), frame(b"\x01\x02", 0x2, fin=False), frame(b"\x03", 0x0)]
    data = b"".join([*parts, frame("x" * 200), frame("end")])  # a ping between fragments, too
    async with served(rec) as port, Raw.open(port, rec) as raw:
        await raw.write(data, step)
        assert await raw.frame() == (0x8A, b"ping")
        assert await rec.until_got(5) == ["plain", "fragménted", b"\x01\x02\x03", "x" * 200, "end"]
        await raw.write(frame("later"))
        assert (await rec.until_got(6))[-1] == "later"


BAD = [
    pytest.param(frame(b"ok\xff\xfe"), 1007, id="invalid-utf8"),
    pytest.param(frame(b"cut \xe2\x82"), 1007, id="utf8-cut-short"),
    pytest.param(frame("plain", masked=False), 1002, id="unmasked"),
    pytest.param(frame("x" * (MAX + 1)), 1009, id="over-max-size"),
    pytest.param(frame(b"x" * (MAX + 1), 0x2), 1009, id="binary-over-max-size"),
    pytest.param(frame("r", rsv=0x40), 1002, id="rsv1"),
    pytest.param(frame("r", rsv=0x10), 1002, id="rsv3"),
    pytest.param(frame("?", 0x3), 1002, id="reserved-opcode"),
    pytest.param(frame("c", 0x0), 1002, id="continuation-first"),
    pytest.param(frame("p" * 126, 0x9), 1002, id="long-ping"),
    pytest.param(frame("p", 0x9, fin=False), 1002, id="fragmented-ping"),
    pytest.param(frame(b"\x03", 0x8), 1002, id="close-one-byte"),
    pytest.param(frame("x" * 100, fin=False) + frame("y" * 901, 0x0), 1009, id="fragments-over-max-size"),
    pytest.param(frame(b"\xe2", fin=False) + frame(b"\xff", 0x0), 1007, id="frag-bad-utf8"),
    pytest.param(frame("a", fin=False) + frame("b", 0x0) + frame(b"\xff"), 1007, id="slow-bad-utf8"),
]


@pytest.mark.parametrize(("bad", "code"), BAD)
async def test_a_bad_frame_after_good_ones_closes_with_the_right_code(bad: bytes, code: int) -> None:
    rec = Recorder()
    async with served(rec) as port, Raw.open(port, rec) as raw:
        await raw.write(frame("one") + frame(b"two", 0x2) + bad + frame("never"))
        assert (await raw.close_frame())[0] == code
        assert await raw.eof()
        raw.writer.close()
        closed = await rec.until_closed()
        assert closed.code == code
        assert rec.got[:2] == ["one", b"two"]
        assert "never" not in rec.got  # nothing after a failure is processed (RFC 6455 7.1.7)


# -- closing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
async def test_a_client_close_is_answered_and_receive_raises_with_its_code_and_reason(fast: bool) -> None:
    rec = Recorder()
    async with served(rec) as port, Raw.open(port, rec) as raw:
        start = b"" if fast else frame("a", fin=False) + frame("b", 0x0)  # slow mode first
        await raw.write(start + frame("last") + frame(b"\x03\xe8bye", 0x8) + frame("gone"))
        assert await raw.close_frame() == (1000, "bye")
        assert await raw.eof()  # the server closes its side of the TCP connection
        raw.writer.close()
        closed = await rec.until_closed()
        assert (closed.code, closed.reason) == (1000, "bye")
        assert rec.got == ([] if fast else ["ab"]) + ["last"]


async def test_server_send_many_then_close() -> None:
    done: list[SocketClosed] = []

    async def handler(sock: ServerSocket) -> None:
        await sock.send_many(["a", "b"])
        await sock.send_bytes(b"\x00\x01")
        await sock.close(1000, "done")
        with pytest.raises(SocketClosed) as closed:
            await sock.send("late")
        done.append(closed.value)

    async with served(handler, close_timeout=5.0) as port, Raw.open(port) as raw:
        assert await raw.frame() == (0x81, b"a")
        assert await raw.frame() == (0x81, b"b")
        assert await raw.frame() == (0x82, b"\x00\x01")
        assert await raw.close_frame() == (1000, "done")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await raw.write(frame(b"\x03\xe8done", 0x8))
        assert await raw.eof()
        assert loop.time() - started < 2.0  # the handshake ended it, not the 5 s close timeout
        raw.writer.close()
        await wait_until(lambda: bool(done), T, "the handler's close() returned")
    assert done[0].code == 1000


async def test_paths_other_than_the_listed_ones_get_404() -> None:
    rec = Recorder()
    async with served(rec, paths=["/x"]) as port:
        async with Raw.open(port, path="/y") as raw:
            assert raw.head.startswith(b"HTTP/1.1 404")
        async with Raw.open(port, rec, path="/x?q=1") as raw:
            assert raw.head.startswith(b"HTTP/1.1 101")
            await raw.write(frame("in"))
            assert await rec.until_got(1) == ["in"]


# -- the client side (AgentSocket) against the server side -------------------------------------


async def test_agent_socket_against_the_server() -> None:
    rec: list[str | bytes] = []
    closed: list[SocketClosed] = []

    async def handler(sock: ServerSocket) -> None:
        try:
            while True:
                message = await sock.receive()
                rec.append(message)
                if message == "send":
                    await sock.send_many([f"s{i}" for i in range(100)])
                    await sock.send_bytes("binäry".encode())
                    await sock.send("z" * 70000)  # 64-bit length, to the client's parser
        except SocketClosed as exc:
            closed.append(exc)

    async with served(handler, max_size=1 << 20) as port:
        conn = await connect(
            f"ws://127.0.0.1:{port}/ws", max_size=1 << 20, close_timeout=1.0, user_agent="test"
        )
        for i in range(100):
            await conn.send(f"c{i}")
        await conn.send("é" * 2000)
        await conn.send("send")
        got = [await asyncio.wait_for(conn.recv(), T) for _ in range(102)]
        assert got == [f"s{i}" for i in range(100)] + ["binäry", "z" * 70000]
        await asyncio.wait_for(conn.close(1000, "call ended"), T)
        await wait_until(lambda: bool(closed), T, "the server saw the close")
    assert rec == [f"c{i}" for i in range(100)] + ["é" * 2000, "send"]
    assert (closed[0].code, closed[0].reason) == (1000, "call ended")


# -- on_text: messages taken as they are parsed -------------------------------------------------


class Taker(Recorder):
    """Takes `take:` messages on arrival (on_text); receive() gets the rest once `reading` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[str] = []
        self.reading = asyncio.Event()

    def offer(self, text: str) -> bool:
        if text == "boom":
            raise RuntimeError("handler bug")
        if text.startswith("take:"):
            self.taken.append(text)
            return True
        return False

    async def __call__(self, sock: ServerSocket) -> None:
        sock.on_text = self.offer
        self.attach(sock)
        await self.reading.wait()
        await self.read(sock)


async def test_a_message_taken_on_arrival_skips_receive_but_never_jumps_an_unread_one() -> None:
    rec = Taker()
    async with served(rec) as port, Raw.open(port, rec) as raw:
        # Nobody reads yet: "keep1" waits, and what follows it waits behind it, taken or not.
        await raw.write(frame("keep1") + frame("take:a") + frame(b"bin", 0x2))
        await wait_until(lambda: rec.nbytes >= raw.sent, T, "the server parsed them", interval=0)
        await raw.write(frame("take:b"))  # a read of its own, with "keep1" still unread
        await wait_until(lambda: rec.nbytes >= raw.sent, T, "the server parsed it", interval=0)
        rec.reading.set()
        assert await rec.until_got(4) == ["keep1", "take:a", b"bin", "take:b"]
        assert rec.taken == []
        # Now the reader waits with nothing queued: a message is taken the moment it is parsed.
        await raw.write(frame("take:c") + frame("keep2") + frame("take:d"))
        assert await rec.until_got(6) == ["keep1", "take:a", b"bin", "take:b", "keep2", "take:d"]
        assert rec.taken == ["take:c"]


async def test_a_handler_that_raises_is_logged_and_dropped_and_nothing_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Taker()
    rec.reading.set()
    async with served(rec) as port, Raw.open(port, rec) as raw:
        await raw.write(frame("take:a"))
        await wait_until(lambda: rec.taken == ["take:a"], T, "the first message taken")
        await raw.write(frame("boom") + frame("take:b"))
        assert await rec.until_got(2) == ["boom", "take:b"]
        assert rec.taken == ["take:a"]
    assert any("message handler failed" in r.getMessage() for r in caplog.records)
