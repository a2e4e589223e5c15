"""Keypad presses gathered into one message for the agent.

Digits the caller presses are collected until `#` or until no further key for
`gap` seconds; then the whole entry is handed on at once, in the order pressed.
A flood of presses (a stuck key, a tone generator, a fuzzer) is bounded three
times: a token bucket admits at most `rate` digits a second (bursts of `burst`),
one entry holds at most `max_digits`, and one call at most `max_total` (no caller
keys in hundreds of digits; a record must not grow for an hour at `rate`). What is
refused is counted, never queued.
Pure bookkeeping on the event loop's clock: no I/O, no vendor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KEYPAD_DIGITS", "KeypadEntry", "KeypadGatherer", "render_digits"]

KEYPAD_DIGITS = frozenset("0123456789*#ABCD")
END_KEY = "#"


@dataclass(frozen=True, slots=True)
class KeypadEntry:
    digits: str  # in the order pressed, `#` included when it ended the entry
    ended_by: str  # "#" | "gap" | "full"
    dropped: int  # presses refused while this entry was gathered (flood)


def render_digits(template: str, digits: str) -> str:
    """The message text: `{digits}` in `template` replaced by the digits, space-separated."""
    return template.replace("{digits}", " ".join(digits))


class KeypadGatherer:
    """Collects presses; calls `on_entry` once per finished entry (from the loop)."""

    def __init__(
        self,
        on_entry: Callable[[KeypadEntry], None],
        gap: float = 2.0,
        max_digits: int = 32,
        rate: float = 10.0,
        burst: int = 32,
        max_total: int = 500,
    ) -> None:
        self._on_entry = on_entry
        self.gap = gap
        self.max_digits = max_digits
        self.rate = rate
        self.burst = burst
        self.max_total = max_total
        self._loop = asyncio.get_running_loop()
        self._digits: list[str] = []
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = float(burst)
        self._refilled = self._loop.time()
        self.accepted = 0
        self.dropped = 0

    def _take_token(self) -> bool:
        now = self._loop.time()
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def press(self, digit: str) -> bool:
        """One key; False when it was refused (not a keypad key, or over the limits)."""
        digit = digit.upper()
        if digit not in KEYPAD_DIGITS or self.accepted >= self.max_total or not self._take_token():
            self._dropped += 1
            self.dropped += 1
            if self._digits and self._timer is None:
                self._arm()
            return False
        self.accepted += 1
        self._digits.append(digit)
        if digit == END_KEY:
            self._finish("#")
        elif len(self._digits) >= self.max_digits:
            self._finish("full")
        else:
            self._arm()
        return True

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.gap, self._finish, "gap")

    def _finish(self, ended_by: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        digits, dropped = "".join(self._digits), self._dropped
        self._digits, self._dropped = [], 0
        if digits:
            self._on_entry(KeypadEntry(digits, ended_by, dropped))

    @property
    def pending(self) -> str:
        return "".join(self._digits)

    def close(self) -> str:
        """Stop gathering; returns the digits of an entry left unfinished (not handed on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        left, self._digits = "".join(self._digits), []
        return left
