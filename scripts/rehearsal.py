"""What the rehearsal scripts (`make doctor-demo`, `make fleet`) share: a check that prints
✓ or ✗ and remembers what failed, and a free loopback port."""

from __future__ import annotations

import socket

__all__ = ["Checks", "free_port"]


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        print(f"  {'✓' if ok else '✗'} {what}{f'  ({detail})' if detail else ''}", flush=True)
        if not ok:
            self.failures.append(what)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
