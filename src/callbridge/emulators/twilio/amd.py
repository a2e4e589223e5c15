"""Answering Machine Detection on outbound calls created through the REST API.

From Twilio's "Answering Machine Detection" page: ``MachineDetection`` is ``Enable`` (a verdict
as soon as the called party is identified) or ``DetectMessageEnd`` (for a machine, wait for
the end of its greeting, usually the beep); ``AsyncAmd=true`` runs the call's TwiML at once
and posts the verdict to ``AsyncAmdStatusCallback`` (``AsyncAmdStatusCallbackMethod``,
default POST), signed like any webhook, with ``AccountSid``, ``CallSid``, ``AnsweredBy``
(``human``, ``machine_start``, ``machine_end_beep``, ``machine_end_silence``,
``machine_end_other``, ``fax``, ``unknown``) and ``MachineDetectionDuration`` (ms).

Only asynchronous detection is modelled: a create asking for synchronous detection is
refused (400) so that a test relying on it notices.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from callbridge.emulators.twilio.calls import EmulatedCall, WebhookRecord

if TYPE_CHECKING:
    from callbridge.emulators.twilio.core import EmulatorCore

__all__ = ["ANSWERED_BY", "MachineDetection"]

ANSWERED_BY = frozenset(
    {
        "human",
        "machine_start",
        "machine_end_beep",
        "machine_end_silence",
        "machine_end_other",
        "fax",
        "unknown",
    }
)
MODES = ("Enable", "DetectMessageEnd")


@dataclass
class MachineDetection:
    """Who answers outbound calls, as detection reports it (tests set these)."""

    #: What answers every outbound call, unless ``by_number`` names its ``To``.
    answered_by: str = "human"
    by_number: dict[str, str] = field(default_factory=dict)
    #: Seconds from the answer to the verdict (a machine's greeting, up to its beep).
    seconds: float = 0.3
    #: Every verdict sent, with the application's answer.
    callbacks: list[WebhookRecord] = field(default_factory=list)

    @staticmethod
    def check(form: dict[str, str]) -> str | None:
        """Why a create's detection parameters are refused, or None."""
        mode = form.get("MachineDetection")
        if mode is None:
            return None
        if mode not in MODES:
            return f"MachineDetection must be Enable or DetectMessageEnd, not {mode!r}"
        if form.get("AsyncAmd", "false").lower() != "true":
            return "the emulator models asynchronous detection only: send AsyncAmd=true"
        if form.get("AsyncAmdStatusCallbackMethod", "POST").upper() not in ("GET", "POST"):
            return "AsyncAmdStatusCallbackMethod must be GET or POST"
        return None

    def verdict(self, call: EmulatedCall, mode: str) -> str:
        value = self.by_number.get(call.to, self.answered_by)
        if value not in ANSWERED_BY:
            raise ValueError(f"answered_by must be one of {sorted(ANSWERED_BY)}, not {value!r}")
        if mode == "Enable" and value.startswith("machine_end"):
            return "machine_start"  # Enable answers at once, without waiting for the beep
        return value

    def start(self, core: EmulatorCore, call: EmulatedCall, form: dict[str, str]) -> None:
        """Run detection on a call just created with ``form`` (if it asks for it)."""
        mode = form.get("MachineDetection")
        if mode is None:
            return
        url = form.get("AsyncAmdStatusCallback")
        method = form.get("AsyncAmdStatusCallbackMethod", "POST").upper() or "POST"
        core._spawn(self._run(core, call, mode, url, method), name=f"twilio-emu-amd-{call.sid}")

    async def _run(
        self, core: EmulatorCore, call: EmulatedCall, mode: str, url: str | None, method: str
    ) -> None:
        while call.status in ("queued", "ringing"):
            await core._sleep(0.01)
        if call.is_ended:
            return  # never answered: no verdict
        started = asyncio.get_running_loop().time()
        await core._sleep(self.seconds)
        if call.is_ended:
            return
        verdict = self.verdict(call, mode)
        call.answered_by = verdict
        if not url:
            return  # Twilio's warning 21262: the result is only on the Call resource
        elapsed_ms = round((asyncio.get_running_loop().time() - started) * 1000)
        params = {
            "AccountSid": core.account_sid,
            "CallSid": call.sid,
            "AnsweredBy": verdict,
            "MachineDetectionDuration": str(elapsed_ms),
        }
        self.callbacks.append(await core._signed_request("amd", call, url, method, params))
