"""The console's live feed with 200 live calls: one message carries every call that changed
(not one per call, nor one per audio frame), and only those; an ended call leaves with its
end reason. The bridge's calls are stand-ins with the attributes the feed reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from callbridge.bridge import Bridge
from callbridge.call import CallRecord, CallState, EndReason
from callbridge.server.console import LiveFeed, Subscriber


@dataclass
class Leg:
    is_open: bool = True
    pending_marks: int = 0


@dataclass
class LiveCall:
    call_sid: str
    record: CallRecord
    state: CallState = CallState.ACTIVE
    telephony: Leg = field(default_factory=Leg)
    end_reason: EndReason | None = None


def live_calls(n: int) -> dict[str, LiveCall]:
    calls = {}
    for i in range(n):
        sid = f"CA{i:032x}"
        record = CallRecord(call_sid=sid, from_number=f"+1555{i:07d}", started_at=datetime.now(UTC))
        record.transcript = [{"role": "agent", "text": f"line {k}", "t": float(k)} for k in range(20)]
        calls[sid] = LiveCall(sid, record)
    return calls


def test_two_hundred_calls_one_message_of_what_changed() -> None:
    calls = live_calls(200)
    bridge = cast(Bridge, type("B", (), {"calls": calls})())
    feed = LiveFeed(bridge, interval=0.0)  # sampled at every call of changes() here
    sub = Subscriber(cast(Any, None), feed)

    first = sub.changes()
    assert first is not None and len(first["calls"]) == 200 and first["ended"] == []
    assert sub.changes() is None  # nothing changed: nothing to send

    # Audio flows (counters move) but nothing the list shows changes: still nothing.
    calls["CA" + "0" * 32].record.metrics["frames_from_caller"] = 5000
    assert sub.changes() is None

    calls[f"CA{3:032x}"].telephony.pending_marks = 2  # the agent speaks
    calls[f"CA{7:032x}"].record.transcript.append({"role": "user", "text": "<b>hi</b>", "t": 21.0})
    gone = calls.pop(f"CA{9:032x}")
    gone.end_reason, gone.state = EndReason.CALLER_HUNG_UP, CallState.ENDED
    update = sub.changes()
    assert update is not None
    changed = {c["call_sid"]: c for c in update["calls"]}
    assert set(changed) == {f"CA{3:032x}", f"CA{7:032x}"}
    assert changed[f"CA{3:032x}"]["speaking"] == "agent"
    assert changed[f"CA{7:032x}"]["last_line"] == {"role": "user", "text": "<b>hi</b>"}
    assert update["ended"] == [{"call_sid": f"CA{9:032x}", "end_reason": "caller_hung_up"}]
    assert sub.changes() is None
