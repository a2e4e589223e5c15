"""Tests for callbridge.audio (codecs, resampling, conversion paths) and the speech fixtures."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from callbridge.audio import (
    AGENT_FORMATS,
    ULAW_8000,
    ULAW_SILENCE,
    AudioConverter,
    AudioFormat,
    StreamResampler,
    agent_to_telephony,
    parse_format,
    pcm16_to_ulaw,
    telephony_to_agent,
    ulaw_peak,
    ulaw_to_pcm16,
)
from callbridge.emulators.speech import SPEECH_LINES, load_speech

PCM_FORMATS = [f for f in AGENT_FORMATS.values() if f.encoding == "pcm"]
ALL_INT16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16)


def _audioop() -> ModuleType:
    # audioop is only a reference implementation here (deprecated in 3.11, gone in 3.13).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:  # pragma: no cover - Python >= 3.13
            pytest.skip("audioop is not available on this Python")
    return audioop


# ---------------------------------------------------------------------------------- formats


def test_agent_formats_parse() -> None:
    assert set(AGENT_FORMATS) == {
        "ulaw_8000",
        "pcm_8000",
        "pcm_16000",
        "pcm_22050",
        "pcm_24000",
        "pcm_44100",
        "pcm_48000",
    }
    for name, fmt in AGENT_FORMATS.items():
        assert parse_format(name) == fmt
        assert fmt.name == name
    assert parse_format("ulaw_8000") == ULAW_8000 == AudioFormat("ulaw_8000", "ulaw", 8000)
    assert parse_format("pcm_22050") == AudioFormat("pcm_22050", "pcm", 22050)


def test_bytes_per_second_and_duration() -> None:
    assert ULAW_8000.bytes_per_second == 8000
    assert parse_format("pcm_16000").bytes_per_second == 32000
    assert parse_format("pcm_44100").bytes_per_second == 88200
    assert ULAW_8000.duration(160) == pytest.approx(0.020)
    assert parse_format("pcm_24000").duration(960) == pytest.approx(0.020)


@pytest.mark.parametrize(
    "name", ["", "pcm", "pcm_11025", "ulaw_16000", "mp3_44100_128", "alaw_8000", "PCM 16000"]
)
def test_parse_format_rejects_unknown(name: str) -> None:
    with pytest.raises(ValueError, match="unknown audio format") as exc:
        parse_format(name)
    assert "pcm_16000" in str(exc.value)  # the message lists what would have been accepted


# ----------------------------------------------------------------------------------- mu-law


def test_ulaw_decode_matches_audioop_for_all_codes() -> None:
    audioop = _audioop()
    codes = bytes(range(256))
    assert ulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)


def test_ulaw_encode_matches_audioop_for_all_samples() -> None:
    audioop = _audioop()
    pcm = ALL_INT16.astype("<i2").tobytes()
    assert pcm16_to_ulaw(pcm) == audioop.lin2ulaw(pcm, 2)


def test_ulaw_round_trip() -> None:
    codes = bytes(range(256))
    back = pcm16_to_ulaw(ulaw_to_pcm16(codes))
    # Every code survives except 0x7F, "negative zero", which decodes to 0 and re-encodes as
    # the positive zero 0xFF.
    expected = bytearray(codes)
    expected[0x7F] = 0xFF
    assert back == bytes(expected)
    # And decode(encode(x)) is idempotent: a second pass through the codec changes nothing.
    once = ulaw_to_pcm16(pcm16_to_ulaw(ALL_INT16.astype("<i2").tobytes()))
    assert ulaw_to_pcm16(pcm16_to_ulaw(once)) == once


def test_ulaw_encode_error_is_bounded() -> None:
    decoded = np.frombuffer(ulaw_to_pcm16(pcm16_to_ulaw(ALL_INT16.tobytes())), "<i2")
    err = np.abs(decoded.astype(np.int32) - ALL_INT16)
    mag = np.abs(ALL_INT16.astype(np.int32))
    # Mu-law is logarithmic: the error is at most ~1/32 of the magnitude (plus the clip).
    assert np.all(err[mag < 32000] <= mag[mag < 32000] / 16 + 8)


def test_silence_constants() -> None:
    assert ulaw_to_pcm16(bytes([ULAW_SILENCE]) * 4) == bytes(8)
    assert pcm16_to_ulaw(bytes(8)) == bytes([ULAW_SILENCE]) * 4


def test_ulaw_peak() -> None:
    assert ulaw_peak(b"") == 0
    assert ulaw_peak(bytes([ULAW_SILENCE, 0x7F]) * 80) == 0
    for code in range(256):
        assert ulaw_peak(bytes([ULAW_SILENCE, code])) == abs(
            int(np.frombuffer(ulaw_to_pcm16(bytes([code])), "<i2")[0])
        )
    frame = pcm16_to_ulaw(tone(440.0, 8000, 0.02, amplitude=3000.0).tobytes())
    assert 2800 < ulaw_peak(frame) < 3200


def test_codecs_accept_empty_and_odd() -> None:
    assert ulaw_to_pcm16(b"") == b""
    assert pcm16_to_ulaw(b"") == b""
    assert pcm16_to_ulaw(b"\x00") == b""
    assert pcm16_to_ulaw(b"\x00\x00\x01") == bytes([ULAW_SILENCE])


# ------------------------------------------------------------------------------- resampling


def tone(freq: float, rate: int, seconds: float, amplitude: float = 8000.0) -> NDArray[np.int16]:
    t = np.arange(round(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2")


def peak_frequency(samples: NDArray[np.int16], rate: int) -> float:
    x = samples.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def tone_purity_db(samples: NDArray[np.int16], rate: int, freq: float) -> float:
    """Energy within 10 Hz of ``freq`` over the energy everywhere else, in dB."""
    x = samples.astype(np.float64)
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    near = np.abs(freqs - freq) <= 10
    return float(10 * np.log10(power[near].sum() / max(power[~near].sum(), 1e-12)))


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def run_converter(conv: AudioConverter, data: bytes, chunk_size: int) -> bytes:
    return b"".join(conv.convert(c) for c in chunks(data, chunk_size)) + conv.flush()


def as_int16(fmt: AudioFormat, data: bytes) -> NDArray[np.int16]:
    pcm = ulaw_to_pcm16(data) if fmt.encoding == "ulaw" else data
    return np.frombuffer(pcm, dtype="<i2")


def encode(fmt: AudioFormat, samples: NDArray[np.int16]) -> bytes:
    pcm = samples.astype("<i2").tobytes()
    return pcm16_to_ulaw(pcm) if fmt.encoding == "ulaw" else pcm


SECONDS = 2.0  # 0.5 Hz FFT bins


def check_tone(dst: AudioFormat, out: bytes, freq: float, expected_seconds: float) -> None:
    # Length: soxr's flush hands back exactly what it held, so within a sample of the ideal.
    expected = round(expected_seconds * dst.sample_rate) * dst.sample_width
    assert abs(len(out) - expected) <= dst.sample_width
    samples = as_int16(dst, out)
    assert abs(peak_frequency(samples, dst.sample_rate) - freq) <= 1.0
    # Mu-law limits the SNR to ~38 dB; anything well above 30 dB means no aliasing, images or
    # glitches at chunk boundaries.
    assert tone_purity_db(samples, dst.sample_rate, freq) > 30
    rms = np.sqrt(np.mean(samples[len(samples) // 4 : -len(samples) // 4].astype(float) ** 2))
    assert rms == pytest.approx(8000 / np.sqrt(2), rel=0.05)


def chunk_sizes(fmt: AudioFormat) -> list[int]:
    # 20 ms frames (the real call pattern), odd sizes that split pcm samples, and all at once.
    return [fmt.bytes_per_second // 50, 37, 333, 10**9]


@pytest.mark.parametrize("freq", [440.0, 1000.0])
@pytest.mark.parametrize("dst", PCM_FORMATS, ids=lambda f: f.name)
def test_tone_telephony_to_agent(dst: AudioFormat, freq: float) -> None:
    data = encode(ULAW_8000, tone(freq, 8000, SECONDS))
    outputs = []
    for size in chunk_sizes(ULAW_8000):
        out = run_converter(telephony_to_agent(dst), data, size)
        check_tone(dst, out, freq, SECONDS)
        outputs.append(out)
    # The stream state makes chunking invisible: every chunking gives the very same bytes.
    assert all(o == outputs[0] for o in outputs)


@pytest.mark.parametrize("freq", [440.0, 1000.0])
@pytest.mark.parametrize("src", PCM_FORMATS, ids=lambda f: f.name)
def test_tone_agent_to_telephony(src: AudioFormat, freq: float) -> None:
    data = encode(src, tone(freq, src.sample_rate, SECONDS))
    outputs = []
    for size in chunk_sizes(src):
        out = run_converter(agent_to_telephony(src), data, size)
        check_tone(ULAW_8000, out, freq, SECONDS)
        outputs.append(out)
    assert all(o == outputs[0] for o in outputs)


@pytest.mark.parametrize("fmt", AGENT_FORMATS.values(), ids=lambda f: f.name)
def test_round_trip_through_agent_format(fmt: AudioFormat) -> None:
    # Caller audio to the agent format and back, as an echo agent would do.
    data = encode(ULAW_8000, tone(1000.0, 8000, SECONDS))
    there = run_converter(telephony_to_agent(fmt), data, 160)
    back = run_converter(agent_to_telephony(fmt), there, fmt.bytes_per_second // 50)
    check_tone(ULAW_8000, back, 1000.0, SECONDS)


def test_downsampling_rejects_aliases() -> None:
    # A 6 kHz tone cannot be carried at 8 kHz; without an anti-alias filter it would fold down
    # to 2 kHz at full level. It must come out as (near) silence.
    src = parse_format("pcm_24000")
    out = run_converter(agent_to_telephony(src), encode(src, tone(6000.0, 24000, 1.0)), 960)
    samples = as_int16(ULAW_8000, out)
    assert np.sqrt(np.mean(samples.astype(float) ** 2)) < 8000 / np.sqrt(2) / 100  # < -40 dB


@pytest.mark.parametrize("fmt", PCM_FORMATS, ids=lambda f: f.name)
def test_silence_stays_digital_silence(fmt: AudioFormat) -> None:
    # No dither: a silent caller must reach the agent as zeros, and agent zeros as 0xFF.
    up = run_converter(telephony_to_agent(fmt), bytes([ULAW_SILENCE]) * 8000, 160)
    assert up == bytes(len(up)) and len(up) == fmt.bytes_per_second
    down = run_converter(agent_to_telephony(fmt), bytes(fmt.bytes_per_second), 333)
    assert down == bytes([ULAW_SILENCE]) * 8000


def test_full_scale_input_clips_instead_of_wrapping() -> None:
    # A full-scale square wave overshoots after filtering; it must saturate, not wrap around.
    src = parse_format("pcm_16000")
    square = np.where(np.arange(16000) % 40 < 20, 32767, -32768).astype("<i2")
    conv = AudioConverter(src, parse_format("pcm_8000"))
    out = np.frombuffer(run_converter(conv, square.tobytes(), 640), "<i2")
    # A wrap-around would show as a jump of ~65536 between neighbouring samples.
    assert np.max(np.abs(np.diff(out.astype(np.int32)))) < 65535


def test_passthrough_returns_same_object() -> None:
    for fmt in AGENT_FORMATS.values():
        conv = AudioConverter(fmt, fmt)
        assert conv.passthrough
        data = bytes(range(7)) * 23
        assert conv.convert(data) is data
        assert conv.flush() == b""
    assert telephony_to_agent(ULAW_8000).passthrough
    assert agent_to_telephony(ULAW_8000).passthrough
    assert not telephony_to_agent(parse_format("pcm_8000")).passthrough


def test_same_rate_transcode_is_exact_and_immediate() -> None:
    # pcm_8000 <-> ulaw_8000 needs no resampler, so nothing is held back.
    pcm8k = parse_format("pcm_8000")
    ulaw = bytes(range(256)) * 2
    to_pcm = telephony_to_agent(pcm8k)
    assert to_pcm.convert(ulaw) == ulaw_to_pcm16(ulaw)
    assert to_pcm.flush() == b""
    pcm = ulaw_to_pcm16(ulaw)
    to_ulaw = agent_to_telephony(pcm8k)
    # Split mid-sample: the odd byte waits for its partner.
    assert to_ulaw.convert(pcm[:101]) == pcm16_to_ulaw(pcm[:100])
    assert to_ulaw.convert(pcm[101:]) == pcm16_to_ulaw(pcm[100:])


def test_odd_byte_is_carried_not_dropped() -> None:
    src = parse_format("pcm_16000")
    data = tone(440.0, 16000, 0.5).tobytes()
    whole = run_converter(agent_to_telephony(src), data, len(data))
    one_byte_at_a_time = run_converter(agent_to_telephony(src), data, 1)
    assert one_byte_at_a_time == whole


def test_converter_reusable_after_flush_and_reset() -> None:
    fmt = parse_format("pcm_16000")
    data = encode(ULAW_8000, tone(1000.0, 8000, SECONDS))
    conv = telephony_to_agent(fmt)
    first = run_converter(conv, data, 160)
    assert run_converter(conv, data, 160) == first
    conv.convert(data[:1234])
    conv.reset()
    assert run_converter(conv, data, 160) == first


class TestStreamResampler:
    def test_identity(self) -> None:
        rs = StreamResampler(16000, 16000)
        data = tone(440.0, 16000, 0.1).tobytes()
        assert rs.process(data) is data
        assert rs.process(data[:5]) == data[:4]
        assert rs.process(data[5:]) == data[4:]
        assert rs.process(b"", last=True) == b""

    @pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (44100, 8000)])
    def test_streaming_length_and_tone(self, in_rate: int, out_rate: int) -> None:
        rs = StreamResampler(in_rate, out_rate)
        data = tone(1000.0, in_rate, SECONDS).tobytes()
        out = b"".join(rs.process(c) for c in chunks(data, 333)) + rs.process(b"", last=True)
        assert len(out) == 2 * round(SECONDS * out_rate)
        samples = np.frombuffer(out, "<i2")
        assert abs(peak_frequency(samples, out_rate) - 1000.0) <= 1.0
        assert tone_purity_db(samples, out_rate, 1000.0) > 60

    def test_holds_back_little(self) -> None:
        # The latency budget that motivated the quality choice: after 200 ms of 20 ms frames
        # the resampler must have released all but well under 100 ms.
        rs = StreamResampler(8000, 16000)
        frame = tone(440.0, 8000, 0.02).tobytes()
        released = sum(len(rs.process(frame)) for _ in range(10)) / 2 / 16000
        assert 0.2 - released < 0.1

    def test_rejects_bad_rates(self) -> None:
        with pytest.raises(ValueError):
            StreamResampler(0, 8000)


# ------------------------------------------------------------------------------- properties

FORMAT_LIST = list(AGENT_FORMATS.values())


@settings(max_examples=300, deadline=None)
@given(
    src=st.sampled_from(FORMAT_LIST),
    dst=st.sampled_from(FORMAT_LIST),
    pieces=st.lists(st.binary(max_size=2000), max_size=8),
)
def test_convert_never_raises(src: AudioFormat, dst: AudioFormat, pieces: list[bytes]) -> None:
    conv = AudioConverter(src, dst)
    out = [conv.convert(p) for p in pieces]
    out.append(conv.flush())
    assert all(isinstance(o, bytes) for o in out)
    total = b"".join(out)
    if conv.passthrough:
        # Passthrough is promised to hand back its input untouched, odd bytes and all.
        assert total == b"".join(pieces)
        return
    if dst.encoding == "pcm":
        assert len(total) % 2 == 0
    # Never more output than the input's duration allows (plus a sample of rounding).
    in_seconds = src.duration(sum(len(p) for p in pieces))
    assert dst.duration(len(total)) <= in_seconds + 2 / dst.sample_rate


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4000))
def test_codecs_never_raise(data: bytes) -> None:
    assert len(ulaw_to_pcm16(data)) == 2 * len(data)
    assert len(pcm16_to_ulaw(data)) == len(data) // 2


# ----------------------------------------------------------------------------- speech files

DURATION_RANGES = {
    # (min, max) seconds: loose bounds around what espeak-ng at 165 wpm produced.
    "caller_hello": (2.5, 6.5),
    "caller_confirm": (1.8, 5.0),
    "caller_interrupt": (1.2, 4.0),
    "agent_greeting": (3.0, 7.0),
    "agent_slot": (2.0, 5.5),
    "agent_goodbye": (1.8, 5.0),
}


def test_speech_lines_complete() -> None:
    assert set(SPEECH_LINES) == set(DURATION_RANGES)


@pytest.mark.parametrize("name", sorted(DURATION_RANGES))
def test_speech_file(name: str) -> None:
    audio = load_speech(name)
    assert len(audio) < 60_000
    low, high = DURATION_RANGES[name]
    assert low <= ULAW_8000.duration(len(audio)) <= high
    samples = as_int16(ULAW_8000, audio).astype(np.float64)
    rms = np.sqrt(np.mean(samples**2))
    assert rms > 500  # about -36 dBFS: clearly not silence or line noise
    # Speech comes in syllables: loud and quiet 20 ms frames alternate, unlike a steady tone or
    # noise. Frame energies spread over more than 20 dB.
    frames = samples[: len(samples) // 160 * 160].reshape(-1, 160)
    frame_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1)
    assert np.percentile(frame_db, 90) - np.percentile(frame_db, 10) > 20
    # espeak's padding was trimmed to ~0.1 s: the line starts and ends in silence.
    assert set(audio[:160]) == {ULAW_SILENCE}
    assert set(audio[-160:]) == {ULAW_SILENCE}


def median_pitch_hz(audio: bytes) -> float:
    """Median fundamental frequency of the louder half of 40 ms frames (autocorrelation)."""
    x = as_int16(ULAW_8000, audio).astype(np.float64)
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    energy = np.mean(frames**2, axis=1)
    pitches = []
    for frame in frames[energy > np.median(energy)]:
        frame = frame - frame.mean()
        ac = np.correlate(frame, frame, "full")[319:]
        lo, hi = 8000 // 400, 8000 // 60  # voices between 60 and 400 Hz
        pitches.append(8000 / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(pitches))


@pytest.mark.parametrize("name", sorted(DURATION_RANGES))
def test_caller_and_agent_voices_differ(name: str) -> None:
    # Different voices (a low male caller, a higher female agent) so that whoever listens to
    # a test call can tell who is speaking.
    pitch = median_pitch_hz(load_speech(name))
    if name.startswith("caller"):
        assert 70 < pitch < 140
    else:
        assert 160 < pitch < 300


def test_load_speech_unknown() -> None:
    with pytest.raises(KeyError, match="unknown speech line"):
        load_speech("nope")
