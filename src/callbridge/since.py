"""`--since` values: an ISO 8601 date or time, or a duration back from now (`30m`, `2h`, `1d`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["SinceError", "parse_since"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class SinceError(ValueError):
    """The value is neither an ISO 8601 time nor a duration; the message says what would do."""


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """The moment `text` names, timezone-aware. A time without a zone is taken as UTC."""
    match = _DURATION.fullmatch(text)
    if match:
        amount, unit = float(match.group(1)), match.group(2).lower()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SinceError(
            "--since takes an ISO 8601 date or time (2026-11-25, 2026-11-25T09:30:00+00:00; "
            f"UTC when no zone is given) or a duration back from now (30m, 2h, 1d, 1w); got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
