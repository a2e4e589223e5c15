"""Ctrl-C during `callbridge demo`: the first press stops it at once and cleanly (exit
status 130, one line saying so, no traceback, no "demo OK"); more presses while it stops
never give a traceback. A real subprocess, signalled once the call is under way."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import pytest

from tests.serverkit import start_demo

STARTED = "media stream connected"


def started_demo() -> tuple[subprocess.Popen[str], str]:
    """`callbridge demo`, returned once its call's media stream is connected."""
    return start_demo(until=STARTED, what="its call started")


def finish(proc: subprocess.Popen[str], seen: str) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return seen + out, err


def assert_interrupted(proc: subprocess.Popen[str], out: str, err: str) -> None:
    assert proc.returncode == 130, (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("callbridge demo: interrupted"), err
    assert "Traceback" not in out + err
    assert "demo OK" not in out and "Call record" not in out, out


@pytest.mark.timeout(60)
def test_the_first_ctrl_c_stops_the_demo_at_once() -> None:
    proc, seen = started_demo()
    pressed = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc, seen)
    # The call would run ~15 s more; stopped means within a few seconds of the press.
    assert time.monotonic() - pressed < 5, time.monotonic() - pressed
    assert_interrupted(proc, out, err)


@pytest.mark.timeout(60)
def test_more_ctrl_c_while_it_stops_never_give_a_traceback() -> None:
    proc, seen = started_demo()
    presses = 0
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
            presses += 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.02)  # polls: pressed again every 20 ms until it is gone
    out, err = finish(proc, seen)
    assert presses >= 2
    assert_interrupted(proc, out, err)
