"""The lifecycle of a call as data: its states, its end reasons, and what ending does.

`END_POLICY` is the one table from an `EndReason` to what teardown does with the two
legs: whether the agent's last words are played out first, what happens to the phone
leg (hang up, leave it, or hand it to the fallback), and the close code the agent
session gets. `Call` reads it; ARCHITECTURE.md shows it (`render_policy_table()`, and
a test checks the two agree). States move only along `TRANSITIONS`: a move elsewhere
is a bug and raises `IllegalTransition`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "END_POLICY",
    "TRANSITIONS",
    "CallState",
    "EndPolicy",
    "EndReason",
    "IllegalTransition",
    "PhoneAction",
    "PhoneLeg",
    "render_policy_table",
]


class EndReason(StrEnum):
    """Why a call ended. Stable names: part of the public API and of the records."""

    AGENT_ENDED = "agent_ended"
    CALLER_HUNG_UP = "caller_hung_up"
    AGENT_ERROR = "agent_error"
    AGENT_UNREACHABLE = "agent_unreachable"
    MAX_DURATION = "max_duration"
    SILENCE_TIMEOUT = "silence_timeout"
    TRANSFERRED = "transferred"
    HANGUP_REQUESTED = "hangup_requested"
    SHUTDOWN = "shutdown"
    TELEPHONY_ERROR = "telephony_error"
    # The call was answered with stream TwiML but its media stream never connected
    # (closed by the server's stream watchdog; a `Call` never ends this way).
    NO_MEDIA_STREAM = "no_media_stream"
    # The instance that held the call stopped (crashed, killed, lost its database lease):
    # another instance (or its own next run) hung the call up and closed its record.
    INSTANCE_LOST = "instance_lost"
    # An outbound call reached an answering machine and was hung up (machine detection `hangup`).
    VOICEMAIL = "voicemail"


class CallState(StrEnum):
    CONNECTING = "connecting"
    ACTIVE = "active"
    ENDING = "ending"
    ENDED = "ended"


TRANSITIONS: Mapping[CallState, frozenset[CallState]] = {
    CallState.CONNECTING: frozenset({CallState.ACTIVE, CallState.ENDING}),
    CallState.ACTIVE: frozenset({CallState.ENDING}),
    CallState.ENDING: frozenset({CallState.ENDED}),
    CallState.ENDED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A call was moved between states the lifecycle does not connect (a bug)."""


class PhoneLeg(StrEnum):
    """What is known of the phone call itself (one status instead of flags)."""

    UP = "up"  # as far as we know the caller is on the line
    GONE = "gone"  # the carrier said the call is over (stop, status callback, already ended)
    TRANSFERRED = "transferred"  # handed to another destination: no longer ours to end
    HUNG_UP = "hung_up"  # we hung it up


class PhoneAction(StrEnum):
    """What teardown does with a phone leg that is still up."""

    HANG_UP = "hang up"
    LEAVE = "leave"  # the call is over or not ours any more
    FALLBACK = "fallback"  # hand it to the fallback destination if one is set, else hang up


@dataclass(frozen=True)
class EndPolicy:
    play_goodbye: bool  # wait until the caller heard the agent's last audio (its last mark)
    phone: PhoneAction
    agent_close_code: int = 1000


END_POLICY: Mapping[EndReason, EndPolicy] = {
    EndReason.AGENT_ENDED: EndPolicy(play_goodbye=True, phone=PhoneAction.HANG_UP),
    EndReason.CALLER_HUNG_UP: EndPolicy(play_goodbye=False, phone=PhoneAction.LEAVE),
    EndReason.AGENT_ERROR: EndPolicy(play_goodbye=False, phone=PhoneAction.FALLBACK),
    EndReason.AGENT_UNREACHABLE: EndPolicy(play_goodbye=False, phone=PhoneAction.FALLBACK),
    EndReason.MAX_DURATION: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.SILENCE_TIMEOUT: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.TRANSFERRED: EndPolicy(play_goodbye=False, phone=PhoneAction.LEAVE),
    EndReason.HANGUP_REQUESTED: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.SHUTDOWN: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.TELEPHONY_ERROR: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.NO_MEDIA_STREAM: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.INSTANCE_LOST: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
    EndReason.VOICEMAIL: EndPolicy(play_goodbye=False, phone=PhoneAction.HANG_UP),
}


def render_policy_table() -> str:
    """END_POLICY as the Markdown table ARCHITECTURE.md shows."""
    rows = [
        "| end reason | goodbye played first | phone leg, if still up | agent session closed with |",
        "|---|---|---|---|",
    ]
    for reason in EndReason:
        policy = END_POLICY[reason]
        phone = {
            PhoneAction.HANG_UP: "hung up",
            PhoneAction.LEAVE: "left as it is",
            PhoneAction.FALLBACK: "fallback destination if set, else hung up",
        }[policy.phone]
        goodbye = "yes" if policy.play_goodbye else "no"
        rows.append(f"| `{reason.value}` | {goodbye} | {phone} | {policy.agent_close_code} |")
    return "\n".join(rows) + "\n"
