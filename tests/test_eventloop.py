"""The event loop `callbridge serve` runs on (eventloop.py): IP literals resolved in place."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn

from callbridge.eventloop import new_event_loop, numeric_addrinfo
from callbridge.server.run import UVICORN_OPTIONS


def run(coro_fn: Any, loop_factory: Any = new_event_loop) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro_fn())


@pytest.mark.parametrize(
    ("host", "port", "kwargs"),
    [
        ("127.0.0.1", 443, {}),
        ("127.0.0.1", "8080", {"type": socket.SOCK_STREAM}),
        (b"127.0.0.1", 80, {"family": socket.AF_INET}),
        ("::1", 443, {"family": socket.AF_INET6, "type": socket.SOCK_STREAM}),
        ("10.1.2.3", None, {}),
    ],
)
def test_an_ip_literal_gets_the_c_librarys_own_answer(host: Any, port: Any, kwargs: dict[str, int]) -> None:
    expected = socket.getaddrinfo(host, port, **kwargs)
    assert numeric_addrinfo(host, port, **kwargs) == expected


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("localhost", 80),  # a name: looked up by the loop's resolver
        ("api.twilio.com", 443),
        ("127.0.0.1", "https"),  # a service name
        (None, 80),
        ("127.0.0.1", 1.5),
        ("256.1.1.1", 80),
    ],
)
def test_anything_that_needs_a_lookup_is_left_to_the_loop(host: Any, port: Any) -> None:
    assert numeric_addrinfo(host, port) is None


def test_a_numeric_address_resolves_without_waiting_for_a_thread() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Every socket type, as uvloop's sock_connect asks (uvloop alone sends that to a thread).
        coro = loop.getaddrinfo("127.0.0.1", 5060)
        # A coroutine that finishes on its first step awaited nothing: no thread pool.
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        assert done.value.value == socket.getaddrinfo("127.0.0.1", 5060)
        # A name still resolves, through the loop's resolver.
        found = await loop.getaddrinfo("localhost", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
        assert found and found[0][4][0] == "127.0.0.1"

    run(main)


def test_uvloops_sock_connect_resolves_through_it() -> None:
    """aiohttp connects with `sock_connect`, which resolves the address again: it must come here."""
    pytest.importorskip("uvloop")
    asked: list[tuple[Any, ...]] = []
    base = type(new_event_loop())

    class Spy(base):  # type: ignore[misc, valid-type]
        async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> list[Any]:
            asked.append((host, port))
            result: list[Any] = await super().getaddrinfo(host, port, **kwargs)
            return result

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted = asyncio.Event()
        server = await asyncio.start_server(lambda r, w: (accepted.set(), w.close()), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await asyncio.wait_for(accepted.wait(), 5)
        finally:
            sock.close()
            server.close()
        assert ("127.0.0.1", port) in asked

    run(main, Spy)


def test_serve_runs_on_it() -> None:
    config = uvicorn.Config(lambda: None, **UVICORN_OPTIONS)
    assert config.get_loop_factory() is new_event_loop
