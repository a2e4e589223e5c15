"""The contract between our TwiML and the media streams it opens: one home for it.

The webhook (or an outbound call) answers `<Connect><Stream>` with `<Parameter>`s
that Twilio hands back in the stream's `start` message (`customParameters`):

- `from`, `to`, `direction`: the call's parties (Twilio's webhook form knows them,
  the stream's `start` does not);
- `cb_ref`, `cb_token`: the per-call stream token (the server checks it; never kept
  in records);
- `agent_id`: a per-call choice of agent (outbound calls may pick one);
- `dv_<name>`: dynamic variables for the agent.

`read_stream_parameters` turns them into `StreamInfo`'s carrier-neutral fields, so
nothing outside this package knows these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from callbridge.telephony.base import StreamInfo

__all__ = [
    "AGENT_ID",
    "BRIDGE_PREFIX",
    "DYNAMIC_VARIABLE_PREFIX",
    "TOKEN",
    "TOKEN_REF",
    "read_stream_parameters",
    "stream_parameters",
]

BRIDGE_PREFIX = "cb_"  # the bridge's own parameters: never recorded
TOKEN_REF = "cb_ref"
TOKEN = "cb_token"
AGENT_ID = "agent_id"
DYNAMIC_VARIABLE_PREFIX = "dv_"


def stream_parameters(
    *,
    from_: str,
    to: str,
    direction: str,
    token_ref: str,
    token: str,
    agent_id: str | None = None,
    variables: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The `<Parameter>`s of a stream we open."""
    params = {"from": from_, "to": to, "direction": direction, TOKEN_REF: token_ref, TOKEN: token}
    if agent_id:
        params[AGENT_ID] = agent_id
    for name, value in (variables or {}).items():
        params[DYNAMIC_VARIABLE_PREFIX + name] = value
    return params


def read_stream_parameters(info: StreamInfo) -> StreamInfo:
    """`info` with its neutral fields read from the stream's custom parameters."""
    params = info.custom_parameters
    prefix = DYNAMIC_VARIABLE_PREFIX
    variables = {
        k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix) and len(k) > len(prefix)
    }
    direction = params.get("direction", "inbound")
    return replace(
        info,
        from_number=params.get("from") or None,
        to_number=params.get("to") or None,
        direction=direction if direction in ("inbound", "outbound") else "inbound",
        agent_id=params.get(AGENT_ID) or None,
        variables=variables,
        recorded_parameters={k: v for k, v in params.items() if not k.startswith(BRIDGE_PREFIX)},
    )
