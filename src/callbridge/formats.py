"""Audio formats as values (no codec here: see `audio.py`), importable by any layer.

A format is named `<encoding>_<sample rate>` (`ulaw_8000`, `pcm_16000`: 16-bit
little-endian mono PCM), the notation ElevenLabs uses too; each vendor's protocol
turns its own names into `AudioFormat` values with `parse_format` or its own table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["AGENT_FORMATS", "ULAW_8000", "AudioFormat", "Encoding", "parse_format"]

Encoding = Literal["ulaw", "pcm"]


@dataclass(frozen=True)
class AudioFormat:
    """A mono audio format: ``ulaw`` (1 byte per sample) or ``pcm`` (int16 LE, 2 bytes)."""

    name: str
    encoding: Encoding
    sample_rate: int

    @property
    def sample_width(self) -> int:
        return 1 if self.encoding == "ulaw" else 2

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.sample_width

    def duration(self, nbytes: int) -> float:
        """Seconds of audio in ``nbytes`` bytes of this format."""
        return nbytes / self.bytes_per_second


_AGENT_FORMAT_NAMES: Final = (
    "ulaw_8000",
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_44100",
    "pcm_48000",
)


def _make_format(name: str) -> AudioFormat:
    encoding, _, rate = name.partition("_")
    assert encoding in ("ulaw", "pcm"), name
    return AudioFormat(name=name, encoding="ulaw" if encoding == "ulaw" else "pcm", sample_rate=int(rate))


AGENT_FORMATS: Final[dict[str, AudioFormat]] = {n: _make_format(n) for n in _AGENT_FORMAT_NAMES}
ULAW_8000: Final[AudioFormat] = AGENT_FORMATS["ulaw_8000"]


def parse_format(name: str) -> AudioFormat:
    """The :class:`AudioFormat` named ``name`` (e.g. ``pcm_16000``); ValueError if unknown."""
    try:
        return AGENT_FORMATS[name]
    except (KeyError, TypeError):
        known = ", ".join(_AGENT_FORMAT_NAMES)
        raise ValueError(f"unknown audio format {name!r}; expected one of: {known}") from None
