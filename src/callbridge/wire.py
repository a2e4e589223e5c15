"""What both protocol modules do first with a WebSocket frame: get one JSON object out of it."""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["decode_object", "describe", "shorten"]


def shorten(text: str | bytes, limit: int = 120) -> str:
    """A frame as it may appear in a log line: bounded, binary shown as repr."""
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def describe(value: Any, limit: int = 60) -> str:
    """A JSON value from a peer, for a warning: scalars bounded, containers by type only
    (their repr can be huge, or deep enough to hit the recursion limit)."""
    if value is None or isinstance(value, str | int | float | bool):
        return shorten(repr(value), limit)
    return f"<{type(value).__name__}>"


def decode_object(frame: str | bytes, peer: str) -> dict[str, Any] | str:
    """The frame's JSON object, or a readable reason why there is none (never raises)."""
    if isinstance(frame, bytes):
        return f"binary frame of {len(frame)} bytes ({peer} sends JSON text)"
    try:
        # orjson: a few times faster than the standard library's, on the 50 messages a second
        # of each call. What it refuses and the standard library reads (NaN, integers past 64
        # bits, nesting past its depth limit) is read again by the standard library, so the
        # bridge accepts exactly what it did before; only odd input pays for two parses.
        msg = orjson.loads(frame)
    except ValueError:
        try:
            msg = json.loads(frame)
        except (ValueError, RecursionError):
            # ValueError, not only JSONDecodeError: an integer literal over 4300 digits is
            # valid JSON that Python refuses to convert (int_max_str_digits).
            return f"malformed JSON from {peer}: {shorten(frame)}"
    if not isinstance(msg, dict):
        return f"{peer} message is not a JSON object: {shorten(frame)}"
    return msg
