"""The spool and quarantine files: JSON lines, appended and fsync'd."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from callbridge.store.ops import Op

__all__ = ["QUARANTINE_NAME", "append_lines", "iter_spool"]

QUARANTINE_NAME = "callbridge-refused-records.jsonl"


def append_lines(path: str, lines: list[str]) -> None:
    new_file = not os.path.exists(path)
    with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new_file:  # the file's name must survive a crash too
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def iter_spool(path: str) -> Iterator[Op]:
    """The writes a spool file holds (for tools and tests)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as spool:
        for line in spool:
            if line.strip():
                yield json.loads(line)
