"""User code run at points of a call: hooks, and the client tools an agent may call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from callbridge.call import Call
    from callbridge.record import CallRecord

__all__ = ["CallHooks", "Hook", "Tool"]

Hook = Callable[..., Any]
Tool = Callable[[dict[str, Any]], Any]


@dataclass
class CallHooks:
    """User code run at points of a call. Each may be sync or async; one that
    raises or overruns `hook_timeout` is logged and never breaks the call."""

    on_call_start: list[Callable[[Call], Any]] = field(default_factory=list)
    on_call_end: list[Callable[[CallRecord], Any]] = field(default_factory=list)
    # Runs when the agent's end_call tool fires, before the hang-up: it may log,
    # or hand the call to a person (`await call.transfer("+15550001111")`).
    on_agent_end_call: list[Callable[[Call], Any]] = field(default_factory=list)
    # Sync only (called inline, per transcript line): for live transcripts, dashboards.
    on_transcript: list[Callable[[Call, dict[str, Any]], None]] = field(default_factory=list)
