"""The emulated Twilio side of the load: many media-stream callers and a REST stub.

Each caller is Twilio's client side of one bidirectional `<Connect><Stream>`
(shared/specs/twilio): `connected`, `start`, then a `media` frame of 160 mu-law
bytes every 20 ms in real time (each call on its own phase), all numbered with
`sequenceNumber`. Audio from the system is "played" at 8000 bytes/s; a `mark` is
echoed when the audio sent before it has played; `clear` drops buffered audio
and echoes the pending marks at once. A REST hang-up of the call
(`POST .../Calls/{sid}.json Status=completed`, to the stub served here) ends it
as Twilio does: `stop`, then close. A call the system never hangs up is ended by
the caller at the schedule's hard end (`stop`, close), as a person would.

Callers send the same 20 ms frames under every load profile (`--profile`, which
only the agent side's speech follows); the profile is written to the summary so
that a run can check that both sides ran the same one.

It logs when each frame was sent and when each agent chunk arrived (tags or onset
markers, see common.py) and, per call, the goodbye timings, and writes them to
`--out` (.npz + .json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import signal
import socket
import struct
import sys
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    FRAME_BYTES,
    FRAME_S,
    LOUD_ULAW_FRAME,
    MARKER_EVERY,
    QUIET_ULAW,
    OnsetDetector,
    Schedule,
    body_b64,
    call_index_of,
    call_sid_of,
    find_tags,
    json_loads,
    loud_flags_ulaw,
    run_loop,
    save_logs,
    ulaw_frame_b64,
)
from leanws import WsClient


class Load:
    def __init__(self, sched: Schedule, url: str, passthrough: bool, token_key: bytes | None) -> None:
        self.sched = sched
        self.url = url
        self.passthrough = passthrough
        self.token_key = token_key
        self.callers: list[Caller] = []
        self.by_sid: dict[str, Caller] = {}
        self.sent_key = array("q")
        self.sent_t = array("d")
        self.late_ms = array("d")  # how late the load generator itself sent each frame
        self.recv_key = array("q")
        self.recv_t = array("d")
        self.onset_call = array("q")
        self.onset_t = array("d")
        self.marker_call = array("q")
        self.marker_t = array("d")
        # (call sid, when the request was sent (kernel stamp), when this process read it)
        self.hangups: list[tuple[str, float, float]] = []
        self.profile = "default"
        self.rest_requests = 0
        self._bodies = [body_b64(FRAME_BYTES, off) for off in range(0, 4000, 173)]
        self._quiet = [
            base64.b64encode(QUIET_ULAW[o : o + FRAME_BYTES]).decode() for o in range(0, 4000, 173)
        ]
        self._loud = base64.b64encode(LOUD_ULAW_FRAME).decode()

    def payload(self, caller: Caller, seq: int, now: float) -> str:
        if self.passthrough:
            self.sent_key.append(caller.index << 32 | seq)
            self.sent_t.append(now)
            return ulaw_frame_b64(caller.index, seq, self._bodies[seq % len(self._bodies)])
        if seq % MARKER_EVERY == 0:
            self.marker_call.append(caller.index)
            self.marker_t.append(now)
            return self._loud
        return self._quiet[seq % len(self._quiet)]


class Caller(WsClient):
    def __init__(self, load: Load, index: int) -> None:
        params: dict[str, str] = {"from": "+15550001111", "to": "+15550002222"}
        self.call_sid = call_sid_of(index)
        headers: dict[str, str] = {}
        if load.token_key is not None:
            # The production server checks the upgrade signature and a per-call token that
            # its own TwiML would have put in the stream parameters.
            headers["X-Twilio-Signature"] = base64.b64encode(
                hmac.new(AUTH_TOKEN.encode(), load.url.encode(), hashlib.sha1).digest()
            ).decode()
            params["cb_ref"] = self.call_sid
            params["cb_token"] = hmac.new(load.token_key, self.call_sid.encode(), hashlib.sha256).hexdigest()[
                :40
            ]
        super().__init__(load.url, headers, user_agent="Twilio.TmeWs/1.0")
        self.load = load
        self.index = index
        self.stream_sid = f"MZ{index:032x}"
        self.params = params
        self.loop = asyncio.get_running_loop()
        self.seq = 0  # Twilio's sequenceNumber
        self.chunk = 0
        self.t_first: float = 0.0
        self._media_tpl = (
            '{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d",'
            '"timestamp":"%d","payload":"%s"},"streamSid":"' + self.stream_sid + '"}'
        )
        self.play_end = 0.0
        self.content_end = 0.0
        self.marks: deque[tuple[float, str]] = deque()
        self.mark_timer: asyncio.TimerHandle | None = None
        self.media_timer: asyncio.TimerHandle | None = None
        self.marks_echoed = 0
        self.last_mark_at: float | None = None
        self.media_received = 0
        self.clears = 0
        self.onsets = OnsetDetector(8000)
        self.ended_by: str | None = None  # "rest" | "sut_close" | "caller" | "connect_failed"
        self.ended_at: float | None = None
        self.unplayed_ms_at_end: float | None = None
        self.audio_end_at: float | None = None
        self.stopping = False
        self.connected_at: float | None = None
        self.agent_seen = False

    def _send(self, event: str, body: str) -> None:
        self.seq += 1
        self.send_text('{"event":"' + event + '","sequenceNumber":"' + str(self.seq) + '",' + body + "}")

    def on_open(self) -> None:
        self.connected_at = time.monotonic()
        self.send_text('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        start = {
            "accountSid": ACCOUNT_SID,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": self.params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        self._send("start", '"start":' + json.dumps(start) + ',"streamSid":"' + self.stream_sid + '"')
        self.t_first = time.monotonic() + FRAME_S
        self.media_timer = self.loop.call_at(self.t_first, self._media)

    def _media(self) -> None:
        if not self.open or self.stopping:
            return
        now = time.monotonic()
        k = self.chunk
        due = self.t_first + k * FRAME_S
        self.load.late_ms.append((now - due) * 1000)
        payload = self.load.payload(self, k, now)
        self.chunk += 1
        self.seq += 1
        self.send_text(self._media_tpl % (self.seq, k + 1, k * 20, payload))
        self.media_timer = self.loop.call_at(due + FRAME_S, self._media)

    def on_text(self, text: str, now: float) -> None:
        try:
            msg = json_loads(text)
        except ValueError:
            return
        event = msg.get("event")
        if event == "media":
            b64 = (msg.get("media") or {}).get("payload")
            if not isinstance(b64, str):
                return
            try:
                audio = binascii.a2b_base64(b64)
            except binascii.Error:
                return
            self.media_received += 1
            start = max(self.play_end, now)
            self.play_end = start + len(audio) / 8000
            # Where the agent's audio ends, as opposed to silence a system pads with: mu-law
            # +-0, or +-8 (a resampler's dither turns digital silence into +-1 LSB).
            content = len(audio.rstrip(b"\xff\x7f\xfe\x7e"))
            if content:
                self.content_end = start + content / 8000
            load = self.load
            if load.passthrough:
                for stream, seq in find_tags(audio):
                    load.recv_key.append(stream << 32 | seq)
                    load.recv_t.append(now)
            else:
                for _ in self.onsets.feed(loud_flags_ulaw(audio)):
                    load.onset_call.append(self.index)
                    load.onset_t.append(now)
        elif event == "mark":
            name = (msg.get("mark") or {}).get("name")
            if isinstance(name, str):
                self.marks.append((self.play_end, name))
                self._arm_marks()
        elif event == "clear":
            self.clears += 1
            self.play_end = now
            self._echo_due(float("inf"))

    def _arm_marks(self) -> None:
        if self.mark_timer is not None or not self.marks:
            return
        due = self.marks[0][0]
        if due <= time.monotonic():
            self._echo_due(time.monotonic())
        else:
            self.mark_timer = self.loop.call_at(due, self._on_mark_timer)

    def _on_mark_timer(self) -> None:
        self.mark_timer = None
        self._echo_due(time.monotonic())

    def _echo_due(self, now: float) -> None:
        if self.mark_timer is not None and now == float("inf"):
            self.mark_timer.cancel()
            self.mark_timer = None
        while self.marks and self.marks[0][0] <= now:
            _, name = self.marks.popleft()
            if self.open and not self.stopping:
                self._send(
                    "mark", '"streamSid":"' + self.stream_sid + '","mark":{"name":' + json.dumps(name) + "}"
                )
                self.marks_echoed += 1
                self.last_mark_at = time.monotonic()
        self._arm_marks()

    def end_call(self, by: str) -> None:
        """Twilio ends the call: no more media, `stop`, close."""
        if self.ended_by is not None:
            return
        now = time.monotonic()
        self._finish(by, now)
        if self.open:
            self.stopping = True
            self.seq += 1
            self.send_text(
                '{"event":"stop","sequenceNumber":"'
                + str(self.seq)
                + '","streamSid":"'
                + self.stream_sid
                + '","stop":{"accountSid":"'
                + ACCOUNT_SID
                + '","callSid":"'
                + self.call_sid
                + '"}}'
            )
            self.close(1000)

    def _finish(self, by: str, now: float) -> None:
        self.ended_by = by
        self.ended_at = now
        self.audio_end_at = self.content_end if self.media_received else None
        self.unplayed_ms_at_end = max(0.0, self.content_end - now) * 1000 if self.media_received else None
        for t in (self.media_timer, self.mark_timer):
            if t is not None:
                t.cancel()

    def on_closed(self) -> None:
        if self.ended_by is None:
            self._finish("sut_close", self.closed_at or time.monotonic())


# Linux's SO_TIMESTAMPNS (asm-generic/socket.h; Python's socket module does not name it): the
# kernel stamps each segment as it reaches the socket, which on loopback is as it is sent.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")


class RestStub:
    """Twilio's REST Calls API, the one operation a bridge uses: update Status=completed.

    A hang-up is timed when the kernel took its first byte (SO_TIMESTAMPNS), not when this
    process got round to reading it: the stub shares its process (and core) with the
    callers, whose own work must not count as the system's delay. The difference is kept
    (`rest_seen_after_sent_ms` per call) to show how large it is.
    """

    def __init__(self, load: Load, port: int) -> None:
        self.load = load
        self.loop = asyncio.get_running_loop()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(1024)
        self.server.setblocking(False)
        self.conns: dict[int, tuple[socket.socket, bytearray, float | None]] = {}
        self.loop.add_reader(self.server.fileno(), self._accept)

    def close(self) -> None:
        for fd, (sock, _, _) in list(self.conns.items()):
            self.loop.remove_reader(fd)
            sock.close()
        self.conns.clear()
        self.loop.remove_reader(self.server.fileno())
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = sock.fileno()
            self.conns[fd] = (sock, bytearray(), None)
            self.loop.add_reader(fd, self._readable, fd)

    def _drop(self, fd: int) -> None:
        sock, _, _ = self.conns.pop(fd)
        self.loop.remove_reader(fd)
        sock.close()

    def _readable(self, fd: int) -> None:
        sock, buf, first_at = self.conns[fd]
        try:
            data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(_TIMESPEC.size))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        now = time.monotonic()
        if first_at is None:  # the first byte of a request: when was it sent?
            first_at = now
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                    first_at = now - (time.time() - (sec + nsec / 1e9))
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if len(buf) < end + 4 + length:
                break
            body = bytes(buf[end + 4 : end + 4 + length]).decode("latin-1")
            del buf[: end + 4 + length]
            answer = self._handle(head.split("\r\n", 1)[0], body, first_at, now)
            if sock.send(answer) != len(answer):  # a few hundred bytes to a reading client
                raise RuntimeError("the REST stub's answer did not fit the socket's buffer")
            first_at = None if not buf else now  # a pipelined next request: no stamp of its own
        self.conns[fd] = (sock, buf, first_at)

    def _handle(self, request_line: str, body: str, sent_at: float, now: float) -> bytes:
        self.load.rest_requests += 1
        parts = request_line.split(" ")
        path = parts[1] if len(parts) > 1 else ""
        sid = path.rsplit("/", 1)[-1].removesuffix(".json")
        caller = self.load.by_sid.get(sid)
        if caller is None or "Status=completed" not in body:
            status, payload = "404 Not Found", {"code": 20404, "message": "not found", "status": 404}
        else:
            self.load.hangups.append((sid, sent_at, now))
            status = "200 OK"
            payload = {
                "sid": sid,
                "account_sid": ACCOUNT_SID,
                "status": "completed",
                "direction": "inbound",
                "from": "+15550001111",
                "to": "+15550002222",
                "api_version": "2010-04-01",
                "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json",
            }
            caller.end_call("rest")
        data = json.dumps(payload).encode()
        return (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: keep-alive\r\n\r\n".encode()
            + data
        )


async def run_call(load: Load, index: int, host: str, port: int) -> None:
    sched = load.sched
    delay = sched.call_start(index) - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    caller: Caller | None = None

    def factory() -> Caller:
        nonlocal caller
        caller = Caller(load, index)
        load.callers.append(caller)
        load.by_sid[caller.call_sid] = caller
        return caller

    try:
        await asyncio.wait_for(loop.create_connection(factory, host, port), 10)
    except (OSError, TimeoutError):
        if caller is None:
            caller = Caller(load, index)
            load.callers.append(caller)
        caller.ended_by, caller.ended_at = "connect_failed", time.monotonic()
        return
    assert caller is not None
    remaining = sched.hard_end - time.monotonic()
    try:
        await asyncio.wait_for(asyncio.shield(caller.closed), max(0.0, remaining))
    except TimeoutError:
        caller.end_call("caller")  # the system never hung up: the person does
        try:
            await asyncio.wait_for(asyncio.shield(caller.closed), 3)
        except TimeoutError:
            caller.abort()


def summary(load: Load) -> dict[str, Any]:
    calls = []
    hang: dict[str, tuple[float, float]] = {sid: (sent, seen) for sid, sent, seen in load.hangups}
    for c in sorted(load.callers, key=lambda c: c.index):
        sent, seen = hang.get(c.call_sid, (None, None))
        calls.append(
            {
                "index": c.index,
                "connected": c.connected_at is not None,
                "frames_sent": c.chunk,
                "media_received": c.media_received,
                "marks_echoed": c.marks_echoed,
                "clears": c.clears,
                "last_mark_at": c.last_mark_at,
                "audio_end_at": c.audio_end_at,
                "ended_by": c.ended_by,
                "ended_at": c.ended_at,
                "unplayed_ms_at_end": c.unplayed_ms_at_end,
                "rest_hangup_at": sent,
                "rest_seen_after_sent_ms": None if seen is None else round((seen - sent) * 1000, 2),
                "handshake_failed": c.handshake_failed,
            }
        )
    return {"calls": calls, "rest_requests": load.rest_requests, "profile": load.profile}


def save(load: Load, out: Path) -> None:
    names = (
        "sent_key",
        "sent_t",
        "late_ms",
        "recv_key",
        "recv_t",
        "onset_call",
        "onset_t",
        "marker_call",
        "marker_t",
    )
    save_logs(out, summary(load), {name: getattr(load, name) for name in names})


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="the system's media-stream ws:// URL")
    p.add_argument("--rest-port", type=int, required=True)
    p.add_argument("--schedule", required=True)
    p.add_argument("--format", default="ulaw_8000", choices=["ulaw_8000", "pcm_16000"])
    p.add_argument(
        "--signed", action="store_true", help="sign upgrades and add stream tokens (production app)"
    )
    p.add_argument("--profile", choices=["default", "continuous"], default="default")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    sched = Schedule.from_json(args.schedule)
    token_key = (
        hmac.new(AUTH_TOKEN.encode(), b"callbridge-stream-token", hashlib.sha256).digest()
        if args.signed
        else None
    )
    load = Load(sched, args.url, args.format == "ulaw_8000", token_key)
    load.profile = args.profile
    loop = asyncio.get_running_loop()
    rest = RestStub(load, args.rest_port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    host = args.url.split("//", 1)[1].split("/", 1)[0]
    h, _, prt = host.rpartition(":")
    tasks = [asyncio.create_task(run_call(load, i, h, int(prt))) for i in range(sched.calls)]
    done = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        {done, stopper},
        timeout=max(1.0, sched.hard_end + 6 - time.monotonic()),
        return_when=asyncio.FIRST_COMPLETED,
    )
    for t in tasks:
        t.cancel()
    stopper.cancel()
    rest.close()
    for c in load.callers:
        c.abort()
    save(load, args.out)
    _ = call_index_of


if __name__ == "__main__":
    run_loop(main(), loop="uvloop")  # the load generator must stay cheaper than what it measures
