"""Audio formats, G.711 mu-law codecs and streaming resampling for the call bridge.

Twilio Media Streams carry G.711 mu-law at 8 kHz; the ElevenLabs agent speaks and listens in
one of a handful of formats (``ulaw_8000`` or 16-bit little-endian PCM at several rates). An
:class:`AudioConverter` handles one direction of one call, chunk by chunk, keeping the
resampler's state and any half sample between chunks.

Everything is vectorised with numpy lookup tables (and libsoxr for resampling) so that no
Python code runs per sample: the bridge calls this on every 20 ms frame of every call.
``audioop`` is deliberately not used: it is deprecated and removed in Python 3.13.
"""

from __future__ import annotations

import sys
from typing import Final

import numpy as np
import soxr
from numpy.typing import NDArray

from callbridge.formats import AGENT_FORMATS, ULAW_8000, AudioFormat, parse_format

__all__ = [
    "AGENT_FORMATS",
    "RESAMPLE_QUALITY",
    "ULAW_8000",
    "ULAW_SILENCE",
    "AudioConverter",
    "AudioFormat",
    "StreamResampler",
    "agent_to_telephony",
    "parse_format",
    "pcm16_to_ulaw",
    "telephony_to_agent",
    "ulaw_peak",
    "ulaw_to_pcm16",
]

# Mu-law code of a zero sample: what a silent telephony frame is filled with.
ULAW_SILENCE: Final[int] = 0xFF


# --------------------------------------------------------------------------------------------
# G.711 mu-law
#
# Both tables are built once, vectorised, from the same arithmetic as CPython's audioop
# (st_ulaw2linear16 / st_14linear2ulaw), so the output matches audioop byte for byte; the tests
# check every one of the 256 codes and 65536 samples.


def _build_decode_table() -> NDArray[np.int16]:
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    lin = np.where(u & 0x80, 0x84 - t, t - 0x84)
    # Little-endian explicitly: the wire format is LE whatever the host is.
    return lin.astype("<i2")


def _build_encode_table() -> NDArray[np.uint8]:
    # Indexed by the int16 sample's bit pattern read as uint16, so that encoding is a single
    # take() with no sign handling or arithmetic per call.
    sample = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    # audioop works on the 14-bit value (arithmetic shift, so negatives round towards -inf),
    # clips the magnitude at 8159 (= 32635 >> 2 in 16-bit terms) and adds the bias 0x84 >> 2.
    # The textbook 16-bit form (|x| clipped at 32635, + 0x84) differs from this, and from
    # audioop, by one code step on 381 negative samples, because |x| >> 2 != -(x >> 2) there.
    v = sample >> 2
    negative = v < 0
    magnitude = np.minimum(np.where(negative, -v, v), 8159) + (0x84 >> 2)
    seg_end = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
    seg = np.searchsorted(seg_end, magnitude, side="left").astype(np.int32)
    mantissa = (magnitude >> np.minimum(seg + 1, 8)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | mantissa)
    mask = np.where(negative, 0x7F, 0xFF)
    return (code ^ mask).astype(np.uint8)


_ULAW_TO_PCM16: Final = _build_decode_table()
# Mu-law straight to the resampler's input representation (see _to_q16): one lookup, no
# int16 intermediate.
_ULAW_TO_Q16: Final = _ULAW_TO_PCM16.astype(np.int32) << 16
_PCM16_TO_ULAW: Final = _build_encode_table()


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Decode G.711 mu-law bytes to 16-bit signed little-endian PCM (twice as many bytes)."""
    return _ULAW_TO_PCM16.take(np.frombuffer(data, dtype=np.uint8)).tobytes()


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Encode 16-bit signed little-endian PCM to G.711 mu-law, identical to audioop.lin2ulaw.

    A trailing odd byte (half a sample) is ignored; use :class:`AudioConverter` for streams
    whose chunks may split a sample.
    """
    usable = len(data) & ~1
    mv = memoryview(data)[:usable] if usable != len(data) else data
    return _PCM16_TO_ULAW.take(np.frombuffer(mv, dtype="<u2")).tobytes()


_ULAW_ABS: Final = np.abs(_ULAW_TO_PCM16.astype(np.int32))


def ulaw_peak(data: bytes) -> int:
    """Peak absolute linear (int16-scale) amplitude of mu-law audio; 0 for no audio.

    Cheap enough to run on every 20 ms caller frame for silence detection, without decoding.
    """
    if not data:
        return 0
    return int(_ULAW_ABS.take(np.frombuffer(data, dtype=np.uint8)).max())


def _encode_i16(samples: NDArray[np.int16]) -> bytes:
    return _PCM16_TO_ULAW.take(samples.view("<u2")).tobytes()


# --------------------------------------------------------------------------------------------
# Resampling
#
# Quality vs latency of soxr.ResampleStream, measured here (libsoxr 0.1.3, python-soxr 1.1.0)
# feeding 20 ms chunks: "latency" is input time fed minus output time returned in steady state
# (mean / worst case), i.e. audio held back inside the resampler; "rejection" is how far a tone
# that would alias (downsampling, 0.75 * out_rate) or image (upsampling, in_rate - 3 kHz) is
# suppressed.
#
#   quality  8k->16k        16k->8k        24k->8k        8k->44.1k      44.1k->8k      rejection
#   QQ        0.3 /  0.3 ms  0.1 /  0.1 ms  0.0 /  0.0 ms  0.2 /  0.2 ms  0.0 /  0.0 ms  0-12 dB
#   LQ       33   / 61   ms 33   / 61   ms 22   / 40   ms 44   / 75   ms 25   / 44   ms  >110 dB
#   MQ       64   /118   ms 64   /118   ms 43   / 75   ms 79   /135   ms 48   / 82   ms  >120 dB
#   HQ       64   /115   ms 64   /115   ms 43   / 73   ms 78   /126   ms 47   / 80   ms  >139 dB
#
# (HQ at 48k->8k / 8k->48k was worse still: 86-96 ms mean, 157-175 ms worst.) A 1 kHz tone came
# through LQ, MQ and HQ alike at 84-103 dB SNR, i.e. at the int16 noise floor, while QQ (cubic
# interpolation, no anti-alias filter) folds everything above 4 kHz straight back into the
# telephone band when downsampling the agent's voice and reached only 44 dB when upsampling.
# LQ halves MQ/HQ's added delay while its filter error stays far below mu-law's own ~38 dB SNR,
# so it is the default: every millisecond held here is added to each conversational turn.
RESAMPLE_QUALITY: Final = "LQ"


# The resampler runs on int32 samples carrying the int16 value in their high 16 bits ("Q16").
# soxr's int16 mode is out: libsoxr adds TPDF dither to int16 output, which turns digital
# silence into +-1 noise (and mu-law 0xFF into a 0xFF/0x7F mix). float32 works but then needs
# rint + clip + cast per chunk (~3-5 us of numpy dispatch on a 20 ms frame, np.clip alone ~3).
# With int32, libsoxr saturates overshoot itself (no wrap-around, no clip pass) and does not
# dither, and the int16 result is just the high halves: a strided view, no arithmetic. Taking
# the high half floors instead of rounding: error in [-1, 0) LSB, a -96 dBFS bias that is far
# below mu-law's own quantisation step (>= 8 LSB) and any ASR's noise floor.


def _to_q16(pcm: NDArray[np.int16]) -> NDArray[np.int32]:
    return np.left_shift(pcm, 16, dtype=np.int32)


if sys.byteorder == "little":

    def _from_q16(samples: NDArray[np.int32]) -> NDArray[np.int16]:
        return samples.view("<i2")[1::2]

else:  # pragma: no cover - no big-endian CI

    def _from_q16(samples: NDArray[np.int32]) -> NDArray[np.int16]:
        return (samples >> 16).astype("<i2")


class StreamResampler:
    """Stateful int16 mono resampler fed chunk by chunk (libsoxr's streaming mode).

    Chunks may have any length, including odd byte counts: a trailing half sample is kept and
    prepended to the next chunk. ``process(..., last=True)`` returns the tail the filter was
    holding back and readies the resampler for a fresh stream. When the two rates are equal it
    is an identity (no copy, no delay).
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = RESAMPLE_QUALITY) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.identity = in_rate == out_rate
        self._carry = b""
        self._stream: soxr.ResampleStream | None = (
            None
            if self.identity
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int32", quality=quality)
        )

    def _take_whole_samples(self, pcm16: bytes, last: bool) -> bytes:
        if self._carry:
            pcm16 = self._carry + pcm16
            self._carry = b""
        if len(pcm16) & 1:
            # A half sample at the end of the stream can never be completed: drop it then.
            if not last:
                self._carry = pcm16[-1:]
            pcm16 = pcm16[:-1]
        return pcm16

    def process(self, pcm16: bytes, last: bool = False) -> bytes:
        """Resample a chunk of int16 LE PCM; may return fewer (or no) bytes while the filter
        fills, which ``last=True`` makes up at the end of the stream."""
        pcm16 = self._take_whole_samples(pcm16, last)
        if self._stream is None:
            return pcm16
        samples = _to_q16(np.frombuffer(pcm16, dtype="<i2"))
        return _from_q16(self._process_q16(samples, last)).tobytes()

    def _process_q16(self, samples: NDArray[np.int32], last: bool) -> NDArray[np.int32]:
        # Array form of process(), so the converter needs no bytes between decode and encode.
        if self._stream is None:
            return samples
        out: NDArray[np.int32] = self._stream.resample_chunk(samples, last=last)
        if last:
            # soxr refuses input after the final chunk; clearing lets the same object serve the
            # next stream without paying for a new filter design.
            self._stream.clear()
        return out

    def reset(self) -> None:
        """Discard buffered audio (e.g. the agent was interrupted) without emitting it."""
        self._carry = b""
        if self._stream is not None:
            self._stream.clear()


class AudioConverter:
    """Converts a stream of ``src`` bytes to ``dst`` bytes for one direction of one call.

    ``convert`` may be called with chunks of any size (a pcm chunk split mid-sample is fine);
    ``flush`` returns what the resampler still holds at the end of the stream.
    """

    def __init__(self, src: AudioFormat, dst: AudioFormat) -> None:
        self.src = src
        self.dst = dst
        self.passthrough = src == dst
        self._carry = b""
        self._resampler = StreamResampler(src.sample_rate, dst.sample_rate)

    def _whole_samples(self, data: bytes, last: bool) -> bytes:
        if self._carry:
            data = self._carry + data
            self._carry = b""
        if len(data) & 1:
            if not last:
                self._carry = data[-1:]
            data = data[:-1]
        return data

    def _run(self, data: bytes, last: bool) -> bytes:
        # Samples stay numpy arrays from decode to encode; the tables decode mu-law straight
        # to whichever dtype the next stage wants.
        out: NDArray[np.int16]
        if self._resampler.identity:
            if self.src.encoding == "ulaw":
                out = _ULAW_TO_PCM16.take(np.frombuffer(data, dtype=np.uint8))
            else:
                out = np.frombuffer(self._whole_samples(data, last), dtype="<i2")
        else:
            samples: NDArray[np.int32]
            if self.src.encoding == "ulaw":
                samples = _ULAW_TO_Q16.take(np.frombuffer(data, dtype=np.uint8))
            else:
                samples = _to_q16(np.frombuffer(self._whole_samples(data, last), dtype="<i2"))
            out = _from_q16(self._resampler._process_q16(samples, last))
        if self.dst.encoding == "ulaw":
            return _encode_i16(out)
        return out.tobytes()

    def convert(self, data: bytes) -> bytes:
        """Convert the next chunk. Returns ``data`` itself when ``passthrough``."""
        if self.passthrough:
            return data
        return self._run(data, last=False)

    def flush(self) -> bytes:
        """End of stream: the resampler's remaining tail. The converter can then be reused."""
        if self.passthrough:
            return b""
        return self._run(b"", last=True)

    def reset(self) -> None:
        """Drop buffered audio without emitting it (barge-in: the old speech is obsolete)."""
        self._carry = b""
        self._resampler.reset()


def telephony_to_agent(agent_input: AudioFormat) -> AudioConverter:
    """Caller audio (Twilio ulaw_8000) to the agent's ``user_input_audio_format``."""
    return AudioConverter(ULAW_8000, agent_input)


def agent_to_telephony(agent_output: AudioFormat) -> AudioConverter:
    """Agent audio (its ``agent_output_audio_format``) to Twilio's ulaw_8000."""
    return AudioConverter(agent_output, ULAW_8000)
