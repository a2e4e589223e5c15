"""Agent audio: the contract's formats, G.711 mu-law, resampling, tones, and chunking.

numpy only; written for the emulator, not shared with the bridge's own codec.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "AUDIO_FORMATS",
    "audio_chunks",
    "bytes_per_second",
    "convert_mulaw8k",
    "mulaw_decode",
    "mulaw_encode",
    "resample_linear",
    "sample_rate",
    "synth_tone",
]

#: ``AudioFormat`` / ``UserInputAudioFormat`` of the contract.
AUDIO_FORMATS: Final = (
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_44100",
    "pcm_48000",
    "ulaw_8000",
)

_TONE_AMPLITUDE: Final = 0.3 * 32767  # about -10 dBFS: plainly audible, far from clipping
_FADE_S: Final = 0.005  # ramps so tone edges do not click


def sample_rate(fmt: str) -> int:
    return int(fmt.split("_", 1)[1])


def bytes_per_second(fmt: str) -> int:
    return sample_rate(fmt) * (1 if fmt.startswith("ulaw") else 2)


def _mulaw_table() -> npt.NDArray[np.int16]:
    # G.711: the code is stored inverted; 4 mantissa bits, 3 exponent bits, a 0x84 bias.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


_MULAW_TO_PCM: Final = _mulaw_table()


def mulaw_decode(data: bytes) -> npt.NDArray[np.int16]:
    """G.711 mu-law bytes to 16-bit linear samples."""
    return _MULAW_TO_PCM[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(samples: npt.NDArray[Any]) -> bytes:
    """16-bit linear samples to G.711 mu-law bytes."""
    x = np.asarray(samples, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    biased = np.minimum(np.abs(x), 32635) + 0x84
    # Position of the highest set bit above bit 7 gives the segment (exponent).
    exponent = np.clip(np.floor(np.log2(biased)).astype(np.int32) - 7, 0, 7)
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return bytes((~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes())


def resample_linear(samples: npt.NDArray[Any], src_rate: int, dst_rate: int) -> npt.NDArray[np.float64]:
    """Resample by linear interpolation; good enough for test speech, and keeps durations exact."""
    x = np.asarray(samples, dtype=np.float64)
    if src_rate == dst_rate or x.size == 0:
        return x
    n_out = round(x.size * dst_rate / src_rate)
    positions = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    return np.interp(positions, np.arange(x.size, dtype=np.float64), x)


def _pcm16_bytes(samples: npt.NDArray[Any]) -> bytes:
    clipped = np.clip(np.rint(samples), -32768, 32767)
    return bytes(clipped.astype("<i2").tobytes())


def convert_mulaw8k(audio: bytes, fmt: str) -> bytes:
    """Mu-law 8 kHz audio in the output format ``fmt``."""
    if fmt == "ulaw_8000":
        return audio
    return _pcm16_bytes(resample_linear(mulaw_decode(audio), 8000, sample_rate(fmt)))


def synth_tone(seconds: float, fmt: str, tone_hz: float = 440.0) -> bytes:
    """A sine tone of ``seconds`` in format ``fmt``, with short fades at both ends."""
    rate = sample_rate(fmt)
    n = max(0, round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    wave = _TONE_AMPLITUDE * np.sin(2 * np.pi * tone_hz * t)
    fade = min(n // 2, round(_FADE_S * rate))
    if fade:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
        wave[:fade] *= ramp
        wave[n - fade :] *= ramp[::-1]
    if fmt == "ulaw_8000":
        return mulaw_encode(np.rint(wave))
    return _pcm16_bytes(wave)


def audio_chunks(audio: bytes, fmt: str, chunk_ms: int) -> Iterator[bytes]:
    width = 1 if fmt.startswith("ulaw") else 2
    size = max(1, sample_rate(fmt) * chunk_ms // 1000) * width
    for start in range(0, len(audio), size):
        yield audio[start : start + size]
