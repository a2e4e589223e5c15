"""A media stream that never connects: a loopback "proxy" that fails the WebSocket upgrade.

``"drop"``: the connection is closed as soon as the upgrade request arrives.  ``"hang"``: the
request is never answered; the connection is held until the client gives up or goes away.
The application never sees the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["UPGRADE_FAULTS", "UpgradeFaultProxies"]

UPGRADE_FAULTS = ("drop", "hang")


class UpgradeFaultProxies:
    """One listening proxy per fault, started when first needed, on ``host``."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._servers: dict[str, asyncio.Server] = {}
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def address(self, fault: str | None) -> tuple[str, int] | None:
        """The address of the proxy that fails upgrades the ``fault`` way (None: no fault)."""
        if fault is None:
            return None
        if fault not in UPGRADE_FAULTS:
            raise ValueError(f"stream_upgrade_fault must be None, 'drop' or 'hang', not {fault!r}")
        server = self._servers.get(fault)
        if server is None:

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._connection(fault, reader, writer)

            server = await asyncio.start_server(handle, self.host, 0)
            self._servers[fault] = server
        host, port = server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _connection(
        self, fault: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        try:
            # The upgrade request arrives (its head ends with an empty line)...
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                await reader.readuntil(b"\r\n\r\n")
                if fault == "hang":
                    # ... and is never answered: held until the client gives up or goes away.
                    while await reader.read(4096):
                        pass
            # "drop": closed at once, no answer at all.
        finally:
            del self._conns[task]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.close()
        for writer in list(self._conns.values()):
            writer.close()
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=2.0)
        for server in servers:
            await server.wait_closed()
