"""What the caller and agent sides of the load generator agree on: frame tags, test
audio, onset detection, the schedule of a run. No bridge code here.

Passthrough (agent audio ulaw_8000): every caller frame and every agent chunk
starts with a 9-byte tag, MAGIC + 2-byte stream number + 4-byte sequence, still
plain mu-law bytes. A system that forwards the bytes as they are keeps the tag, so
the receiving side can say which frame arrived and when; the sending side logs
when it was sent; both use time.monotonic (CLOCK_MONOTONIC is one clock for all
processes of the machine).

Conversion (agent audio pcm_16000): resampling destroys tags, so each direction
carries onset markers instead: quiet audio with a loud 20 ms tone burst at a
known cadence (every 5th caller frame; the start of every agent chunk). The
receiver timestamps each quiet->loud onset; the latency of a marker is the onset
time minus the send time of the latest marker sent before it. This includes the
converter's own delay (what the listener really experiences).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import struct
from array import array
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:  # the load generators read every message: orjson where installed (it is a callbridge dependency)
    from orjson import loads as json_loads
except ImportError:  # pragma: no cover
    json_loads = json.loads

__all__ = [
    "FRAME_BYTES",
    "MAGIC",
    "OnsetDetector",
    "Schedule",
    "call_index_of",
    "call_sid_of",
    "find_tags",
    "json_loads",
    "loud_flags_pcm16",
    "loud_flags_ulaw",
    "pcm16_chunk_b64",
    "tag",
    "ulaw_frame_b64",
]

FRAME_BYTES = 160  # 20 ms of mu-law 8 kHz
FRAME_S = 0.02
MAGIC = b"\x5a\xa5\x3c"
TAG_BYTES = (
    9  # MAGIC + 2 + 4 base-127 digits (stream, seq): a multiple of 3, so base64(tag) + base64(rest) is valid
)
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
MARKER_EVERY = 5  # conversion mode: one loud caller frame in 5 (every 100 ms)
LOUD_THRESHOLD = 4000  # linear amplitude that counts as a marker


def _digits(value: int, n: int) -> bytes:
    # Base 127, so that no byte is 0x7F: mu-law 0x7F is "-0", which a system that decodes
    # to PCM and encodes back (Pipecat) returns as 0xFF. Every other byte survives that.
    out = bytearray(n)
    for i in range(n - 1, -1, -1):
        value, out[i] = divmod(value, 127)
    return bytes(out)


def _undigits(data: bytes) -> int:
    value = 0
    for b in data:
        value = value * 127 + b
    return value


_PAIRS = [_digits(v, 2) for v in range(127 * 127)]
_UNPAIRS = {pair: v for v, pair in enumerate(_PAIRS)}


def tag(stream: int, seq: int) -> bytes:
    hi, lo = divmod(seq, 127 * 127)
    return MAGIC + _PAIRS[stream] + _PAIRS[hi % (127 * 127)] + _PAIRS[lo]


def find_tags(audio: bytes) -> list[tuple[int, int]]:
    """Every (stream, seq) tag in a payload (a re-chunking system may put one mid-payload)."""
    out: list[tuple[int, int]] = []
    i = audio.find(MAGIC)
    unpairs = _UNPAIRS
    while i >= 0 and i + TAG_BYTES <= len(audio):
        try:
            seq = unpairs[audio[i + 5 : i + 7]] * (127 * 127) + unpairs[audio[i + 7 : i + 9]]
            out.append((unpairs[audio[i + 3 : i + 5]], seq))
        except KeyError:  # a digit byte of 0x7F or more: not a tag we wrote (a table, not a loop)
            out.append((_undigits(audio[i + 3 : i + 5]), _undigits(audio[i + 5 : i + 9])))
        i = audio.find(MAGIC, i + TAG_BYTES)
    return out


def call_sid_of(index: int) -> str:
    return f"CA{index:032x}"


def call_index_of(call_sid: str) -> int | None:
    try:
        return int(call_sid[2:], 16) if call_sid.startswith("CA") and len(call_sid) == 34 else None
    except ValueError:
        return None


# -- G.711 mu-law (for building test audio; the load generator never converts) ------------


def _ulaw_encode_sample(x: int) -> int:
    bias, clip = 0x84, 32635
    sign = 0x80 if x < 0 else 0
    x = min(abs(x), clip) + bias
    exp = 7
    mask = 0x4000
    while exp > 0 and not x & mask:
        exp -= 1
        mask >>= 1
    mant = (x >> (exp + 3)) & 0x0F
    return ~(sign | (exp << 4) | mant) & 0xFF


def _ulaw_decode_sample(b: int) -> int:
    b = ~b & 0xFF
    sign, exp, mant = b & 0x80, (b >> 4) & 0x07, b & 0x0F
    x = (((mant << 3) + 0x84) << exp) - 0x84
    return -x if sign else x


ULAW_LOUD_TABLE = bytes(1 if abs(_ulaw_decode_sample(b)) >= LOUD_THRESHOLD else 0 for b in range(256))


def loud_flags_ulaw(audio: bytes) -> bytes:
    """One byte per sample: 1 where the sample is loud."""
    return audio.translate(ULAW_LOUD_TABLE)


def loud_flags_pcm16(audio: bytes) -> bytes:
    import numpy as np

    a = np.frombuffer(audio[: len(audio) & ~1], dtype="<i2").astype(np.int32)
    return (np.abs(a) >= LOUD_THRESHOLD).tobytes()


class OnsetDetector:
    """Finds quiet->loud onsets in a stream of messages, with their sample offsets.

    An onset is a loud sample after at least `gap_ms` of quiet ones (a tone burst
    has quiet samples near its zero crossings, far shorter than the gap). The
    offset matters: a converter that holds samples back delivers the onset later
    in the stream than it was sent, and that delay is latency the listener hears.
    """

    def __init__(self, rate: int, gap_ms: int = 40) -> None:
        self.rate = rate
        self.gap = rate * gap_ms // 1000
        self._zeros = bytes(self.gap)
        self.quiet = self.gap  # quiet samples right before the next message

    def feed(self, flags: bytes) -> list[int]:
        out: list[int] = []
        n = len(flags)
        pos, run = 0, self.quiet
        while True:
            i = flags.find(b"\x01", pos)
            if i < 0:
                self.quiet = run + (n - pos)
                return out
            if run + (i - pos) >= self.gap:
                out.append(i)
            q = flags.find(self._zeros, i)
            if q < 0:
                self.quiet = n - 1 - flags.rfind(b"\x01")
                return out
            pos, run = q + self.gap, self.gap


def _noise(n: int, amplitude: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(-amplitude, amplitude) for _ in range(n)]


def _tone(n: int, rate: int, amplitude: int, hz: float = 1000.0) -> list[int]:
    return [int(amplitude * math.sin(2 * math.pi * hz * i / rate)) for i in range(n)]


def _ulaw_bytes(samples: list[int]) -> bytes:
    body = bytes(_ulaw_encode_sample(s) for s in samples)
    # Quiet noise never contains the tag's magic (its bytes are loud-ish values).
    assert MAGIC not in body
    return body


QUIET_ULAW = _ulaw_bytes(_noise(8000, 120, 1))  # 1 s of low noise to cut bodies from
LOUD_ULAW_FRAME = _ulaw_bytes(_tone(FRAME_BYTES, 8000, 12000))


def ulaw_frame_b64(stream: int, seq: int, body_b64: str) -> str:
    """A tagged 160-byte caller frame as base64: the tag's base64 + the precomputed rest."""
    return base64.b64encode(tag(stream, seq)).decode() + body_b64


def body_b64(total_bytes: int, offset: int = 0) -> str:
    """Base64 of the untagged rest of a tagged payload of `total_bytes` bytes."""
    n = total_bytes - TAG_BYTES
    src = QUIET_ULAW * (1 + (n + offset) // len(QUIET_ULAW))
    return base64.b64encode(src[offset : offset + n]).decode()


def pcm16_bytes(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def pcm16_chunk_b64(chunk_ms: int, rate: int = 16000) -> str:
    """A conversion-mode agent chunk: a loud 20 ms burst, then quiet."""
    n = rate * chunk_ms // 1000
    burst = rate * 20 // 1000
    return base64.b64encode(pcm16_bytes(_tone(burst, rate, 12000) + _noise(n - burst, 120, 2))).decode()


@dataclass
class Schedule:
    """When things happen, in time.monotonic seconds (shared by every process)."""

    calls: int
    t0: float  # first call starts
    ramp_s: float  # calls start evenly over this
    steady_start: float
    steady_end: float
    goodbye_at: float  # agents start their goodbyes
    goodbye_spread_s: float
    hard_end: float  # callers still up hang up themselves (the system never did)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    def call_start(self, i: int) -> float:
        return self.t0 + self.ramp_s * i / max(1, self.calls)

    def goodbye(self, i: int) -> float:
        return self.goodbye_at + self.goodbye_spread_s * (i % max(1, self.calls)) / max(1, self.calls)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def run_loop(main: Coroutine[Any, Any, None], loop: str | None = None) -> None:
    """Run a bench process's `main()` on uvloop when it is installed (as uvicorn's `loop="auto"`
    does for the peers), or on asyncio when `loop` (default: the BENCH_LOOP variable) says so."""
    if (loop or os.environ.get("BENCH_LOOP", "auto")) != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def save_logs(out: Path, summary: dict[str, Any], logs: dict[str, array[Any]]) -> None:
    """A load generator's logs: the arrays as `out`.npz (int64 / float64), the summary as .json."""
    import numpy as np

    dtypes = {"q": np.int64, "d": np.float64}
    arrays = {k: np.frombuffer(v, dtype=dtypes[v.typecode]) for k, v in logs.items()}
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(summary))


def relay_args() -> tuple[int, str]:
    """The bare relays' command line: (port to serve on, the agent's ConvAI WebSocket URL)."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--agent-url", required=True)
    p.add_argument("--rest-url", default="")  # the relays never hang up
    args = p.parse_args()
    base = args.agent_url.replace("http://", "ws://")
    return args.port, base + "/v1/convai/conversation?agent_id=bench-agent"
