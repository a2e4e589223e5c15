"""What is kept of a call: `CallRecord` (the database row and the API's JSON), and the
`RecordSink` that keeps it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Protocol

__all__ = ["CallRecord", "RecordSink"]


@dataclass
class CallRecord:
    """What is kept of a call: the database row and the JSON of the API."""

    call_sid: str | None = None
    stream_sid: str | None = None
    conversation_id: str | None = None
    direction: str = "inbound"
    from_number: str | None = None
    to_number: str | None = None
    status: str = "active"
    end_reason: str | None = None
    end_detail: str | None = None
    started_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    duration_s: float | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    custom_parameters: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["from"] = out.pop("from_number")
        out["to"] = out.pop("to_number")
        for key in ("started_at", "answered_at", "ended_at"):
            value = out[key]
            out[key] = value.isoformat() if value is not None else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallRecord:
        """The inverse of `to_dict` (records spooled to a file come back this way)."""
        values = dict(data)
        values["from_number"] = values.pop("from", None)
        values["to_number"] = values.pop("to", None)
        for key in ("started_at", "answered_at", "ended_at"):
            if values.get(key):
                values[key] = datetime.fromisoformat(values[key])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class RecordSink(Protocol):
    """Where records go (the database store); `save` is called at start and at end."""

    async def save(self, record: CallRecord) -> None: ...
