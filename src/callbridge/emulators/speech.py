"""Recorded speech for the emulators: short caller and agent lines as mu-law 8 kHz audio.

The files in ``audio/`` were synthesised once with espeak-ng and sox (see
``scripts/make_speech.sh``) and are committed, so tests and demos play real speech without
any text-to-speech at run time. They are raw G.711 mu-law, 8 kHz mono, i.e. exactly the bytes
a Twilio Media Stream carries.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

__all__ = ["SPEECH_LINES", "load_speech"]

SPEECH_LINES: Final[dict[str, str]] = {
    "caller_hello": "Hi, I would like to book an appointment for Monday morning, please.",
    "caller_confirm": "Yes, ten o'clock is perfect. Thank you.",
    "caller_interrupt": "Sorry, wait, can I change that?",
    "agent_greeting": "Hello! Thanks for calling Bright Smile Dental. How can I help you today?",
    "agent_slot": "Monday at ten o'clock is free. Shall I book it for you?",
    "agent_goodbye": "You're all set for Monday at ten. Goodbye!",
}


@cache
def load_speech(name: str) -> bytes:
    """The mu-law 8 kHz audio of the line ``name`` (a key of :data:`SPEECH_LINES`)."""
    if name not in SPEECH_LINES:
        known = ", ".join(SPEECH_LINES)
        raise KeyError(f"unknown speech line {name!r}; expected one of: {known}")
    return resources.files("callbridge.emulators").joinpath("audio", f"{name}.ulaw").read_bytes()
