"""What both emulators need and neither owns: loopback addresses, task sets, waiters, ``async with``.

Only plumbing lives here, nothing of either protocol, and nothing of the bridge: the emulators
still import nothing from ``callbridge`` outside ``callbridge.emulators``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

__all__ = [
    "AsyncService",
    "TaskSet",
    "Waiters",
    "bind_loopback",
    "cancel_and_wait",
    "is_loopback_host",
    "loopback_ip",
    "netloc",
    "require_loopback_url",
]


# --------------------------------------------------------------------------------------------- loopback


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback IP literal (``[::1]`` brackets allowed); never resolves a name."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_loopback_url(url: str, who: str) -> None:
    """ValueError unless ``url`` points at a loopback host (``who`` names the emulator)."""
    if not is_loopback_host(urlsplit(url).hostname):
        raise ValueError(f"{who} only talks to loopback addresses, not {url!r}")


def loopback_ip(host: str) -> str:
    """The loopback IP literal to bind for ``host`` (``localhost`` -> ``127.0.0.1``); ValueError otherwise."""
    if host == "localhost":
        return "127.0.0.1"  # an IP literal also spares the loop a resolver thread
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the emulator only binds loopback addresses, not {host!r}")
    return host


def netloc(host: str, port: int) -> str:
    """``host:port`` as it goes in a URL (an IPv6 literal in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_loopback(host: str, port: int = 0, *, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------------------------- tasks


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (unless it is the current one) and wait until it has ended."""
    if task is None or task is asyncio.current_task():
        return
    if not task.done():
        task.cancel()
        # asyncio.wait neither raises the task's error nor swallows our own cancellation.
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


class TaskSet:
    """The background tasks of one emulator object, so that closing it leaves none behind.

    A task that fails is logged on ``logger`` as "``label`` task NAME failed".
    """

    def __init__(self, logger: logging.Logger, label: str) -> None:
        self._logger = logger
        self._label = label
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._logger.error("%s task %s failed", self._label, task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def cancel_all(self) -> None:
        """Cancel every task (and any a cancelled one spawns) and wait until all have ended."""
        current = asyncio.current_task()
        while True:
            tasks = [task for task in self._tasks if task is not current and not task.done()]
            if not tasks:
                return
            for task in tasks:
                await cancel_and_wait(task)


class Waiters:
    """Wait for a condition without polling: whoever changes what it reads calls :meth:`wake`."""

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        """Wake everyone waiting in :meth:`changed`."""
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.done():
                future.set_result(None)

    async def changed(self) -> None:
        """Return at the next :meth:`wake`; the caller re-checks its condition."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        try:
            await future
        finally:
            if future in self._futures:
                self._futures.remove(future)


# --------------------------------------------------------------------------------------------- async with


class AsyncService:
    """``async with thing:`` opens it (:meth:`_open`) and closes it (:meth:`aclose`) on the way out."""

    async def _open(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
