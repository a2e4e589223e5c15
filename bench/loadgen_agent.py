"""The emulated ElevenLabs agent side of the load: a lean ConvAI WebSocket server.

Per conversation, as the real server does (shared/specs/elevenlabs): wait for
`conversation_initiation_client_data`, answer `conversation_initiation_metadata`
with the audio formats, ping every few seconds (pongs are counted), then talk
back: turns of `agent_response` + `audio` events in chunks paced in real time,
alternating with listening; at its goodbye time the agent says a last line,
sends `agent_tool_response` for `end_call` and closes 1000.

Load profiles (`--profile`): `default` speaks `--speak-s` then listens `--listen-s`;
`continuous` speaks without pause, one chunk every `--chunk-ms` from the first
response to the goodbye (each call on its own phase within one chunk period).

It logs, per conversation, when each of its chunks was sent and when each caller
frame arrived (see common.py for tags and onset markers), and writes them to
`--out` (.npz + .json) when the run is over.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import json
import signal
import sys
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import base64

from common import (
    MAGIC,
    OnsetDetector,
    Schedule,
    body_b64,
    call_index_of,
    find_tags,
    json_loads,
    loud_flags_pcm16,
    pcm16_chunk_b64,
    run_loop,
    save_logs,
    tag,
)
from leanws import WsServer


class Agent:
    def __init__(
        self,
        sched: Schedule,
        fmt: str,
        chunk_ms: int,
        speak_s: float,
        listen_s: float,
        goodbye_s: float,
        ping_s: float,
        continuous: bool = False,
    ) -> None:
        self.sched = sched
        self.fmt = fmt
        self.chunk_ms = chunk_ms
        self.continuous = continuous
        # Continuous speech: one response that only the goodbye cuts short.
        self.speak_chunks = 1 << 40 if continuous else max(1, round(speak_s * 1000 / chunk_ms))
        self.listen_s = 0.0 if continuous else listen_s
        self.goodbye_chunks = max(1, round(goodbye_s * 1000 / chunk_ms))
        self.ping_s = ping_s
        self.conns: list[AgentConn] = []
        # Logs: keys are stream << 32 | seq.
        self.recv_key = array("q")
        self.recv_t = array("d")
        self.sent_key = array("q")
        self.sent_t = array("d")
        self.onset_call = array("q")
        self.onset_t = array("d")
        self.marker_call = array("q")
        self.marker_t = array("d")
        self.chunk_bytes = 8000 * chunk_ms // 1000
        self._bodies = [body_b64(self.chunk_bytes, off) for off in range(0, 4000, 397)]
        self._pcm_chunk = pcm16_chunk_b64(chunk_ms) if fmt == "pcm_16000" else ""
        self.passthrough = fmt == "ulaw_8000"

    def chunk_message(self, conn: AgentConn, event_id: int) -> str:
        loop_t = time.monotonic()
        if self.passthrough:
            seq = conn.chunk_seq
            conn.chunk_seq += 1
            b64 = base64.b64encode(tag(conn.index, seq)).decode() + self._bodies[seq % len(self._bodies)]
            self.sent_key.append(conn.index << 32 | seq)
            self.sent_t.append(loop_t)
        else:
            b64 = self._pcm_chunk
            self.marker_call.append(conn.call_index if conn.call_index is not None else -1)
            self.marker_t.append(loop_t)
        return (
            '{"type":"audio","audio_event":{"audio_base_64":"' + b64 + '","event_id":' + str(event_id) + "}}"
        )


class AgentConn(WsServer):
    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self.index = len(agent.conns)
        agent.conns.append(self)
        self.loop = asyncio.get_running_loop()
        self.call_index: int | None = None
        self.ready = False
        self.chunk_seq = 0
        self.event_id = 0
        self.ping_id = 0
        self.pongs = 0
        self.frames = 0
        self.onsets = OnsetDetector(16000)
        self.goodbye_started = False
        self.goodbye_last_chunk_at: float | None = None
        self.closed_by_agent_at: float | None = None
        self.client_data: dict[str, Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._init_timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------

    def on_open(self) -> None:
        self._init_timer = self.loop.call_later(2.0, self._announce)

    def on_text(self, text: str, now: float) -> None:
        try:
            msg = json_loads(text)
        except ValueError:
            return
        b64 = msg.get("user_audio_chunk")
        if b64 is not None:
            self._on_audio(b64, now)
            return
        kind = msg.get("type")
        if kind == "pong":
            self.pongs += 1
        elif kind == "conversation_initiation_client_data" and not self.ready:
            self.client_data = msg
            dv = msg.get("dynamic_variables") or {}
            sid = dv.get("call_sid") if isinstance(dv, dict) else None
            if isinstance(sid, str):
                self.call_index = call_index_of(sid)
            self._announce()

    def _on_audio(self, b64: str, now: float) -> None:
        self.frames += 1
        a = self.agent
        try:
            if a.passthrough:
                head = binascii.a2b_base64(b64[:12])
                if head[:3] == MAGIC:
                    tags = find_tags(head)
                else:
                    tags = find_tags(binascii.a2b_base64(b64))
                for stream, seq in tags:
                    a.recv_key.append(stream << 32 | seq)
                    a.recv_t.append(now)
            else:
                for _ in self.onsets.feed(loud_flags_pcm16(binascii.a2b_base64(b64))):
                    a.onset_call.append(self.call_index if self.call_index is not None else -1)
                    a.onset_t.append(now)
        except binascii.Error:
            pass

    def on_closed(self) -> None:
        for t in (self._timer, self._ping_timer, self._init_timer):
            if t is not None:
                t.cancel()

    # -- the conversation -----------------------------------------------------

    def _announce(self) -> None:
        if self.ready or not self.open:
            return
        self.ready = True
        if self._init_timer is not None:
            self._init_timer.cancel()
        a = self.agent
        self.send_text(
            json.dumps(
                {
                    "type": "conversation_initiation_metadata",
                    "conversation_initiation_metadata_event": {
                        "conversation_id": f"conv_bench{self.index:06d}",
                        "agent_output_audio_format": a.fmt,
                        "user_input_audio_format": a.fmt,
                    },
                }
            )
        )
        self._ping_timer = self.loop.call_later(a.ping_s, self._ping)
        # Calls are not in step: each conversation's first turn starts at its own phase of the
        # speak/listen cycle (spread by a golden-ratio sequence).
        cycle = a.chunk_ms / 1000 if a.continuous else a.speak_chunks * a.chunk_ms / 1000 + a.listen_s
        first = time.monotonic() + (self.index * 0.618034 % 1.0) * cycle
        self._timer = self.loop.call_at(self._loop_time(first), self._turn, first)

    def _ping(self) -> None:
        if not self.open:
            return
        self.ping_id += 1
        self.send_text(
            json.dumps({"type": "ping", "ping_event": {"event_id": self.ping_id, "ping_ms": None}})
        )
        self._ping_timer = self.loop.call_later(self.agent.ping_s, self._ping)

    def _turn(self, start: float) -> None:
        """One agent response: its transcript, then its chunks at real-time pace."""
        if not self.open:
            return
        goodbye = time.monotonic() >= self.agent.sched.goodbye(self.index)
        if goodbye:
            self.goodbye_started = True
        self.event_id += 1
        text = "Thank you for calling, goodbye!" if goodbye else "Sure, let me check that for you."
        self.send_text(
            json.dumps(
                {
                    "type": "agent_response",
                    "agent_response_event": {"agent_response": text, "event_id": self.event_id},
                }
            )
        )
        n = self.agent.goodbye_chunks if goodbye else self.agent.speak_chunks
        self._chunk(start, 0, n, goodbye)

    def _chunk(self, start: float, i: int, n: int, goodbye: bool) -> None:
        if not self.open:
            return
        a = self.agent
        if not goodbye and time.monotonic() >= a.sched.goodbye(self.index):
            # Goodbye time: the current response is cut short and the goodbye follows.
            self._turn(time.monotonic())
            return
        self.send_text(a.chunk_message(self, self.event_id))
        i += 1
        step = a.chunk_ms / 1000
        if i < n:
            self._timer = self.loop.call_at(
                self._loop_time(start + i * step), self._chunk, start, i, n, goodbye
            )
        elif goodbye:
            self.goodbye_last_chunk_at = time.monotonic()
            self._end_call()
        else:
            nxt = start + n * step + a.listen_s
            self._timer = self.loop.call_at(self._loop_time(nxt), self._turn, nxt)

    def _end_call(self) -> None:
        self.send_text(
            json.dumps(
                {
                    "type": "agent_tool_response",
                    "agent_tool_response": {
                        "tool_name": "end_call",
                        "tool_call_id": f"toolu_bench{self.index}",
                        "tool_type": "system",
                        "is_error": False,
                        "event_id": self.event_id,
                    },
                }
            )
        )
        self.closed_by_agent_at = time.monotonic()
        self.close(1000, "end_call")

    def _loop_time(self, mono: float) -> float:
        return self.loop.time() + (mono - time.monotonic())


def summary(agent: Agent) -> dict[str, Any]:
    conns = agent.conns
    return {
        "profile": "continuous" if agent.continuous else "default",
        "conversations": len(conns),
        "ready": sum(c.ready for c in conns),
        "goodbyes": sum(c.goodbye_started for c in conns),
        "closed_by_agent": sum(c.closed_by_agent_at is not None for c in conns),
        "pongs": sum(c.pongs for c in conns),
        "pings": sum(c.ping_id for c in conns),
        "frames_received": sum(c.frames for c in conns),
        "chunks_sent": len(agent.sent_key) + len(agent.marker_t),
        "client_data_with_call_sid": sum(c.call_index is not None for c in conns),
        "goodbye_last_chunk_at": {c.index: c.goodbye_last_chunk_at for c in conns},
    }


def save(agent: Agent, out: Path) -> None:
    names = ("recv_key", "recv_t", "sent_key", "sent_t", "onset_call", "onset_t", "marker_call", "marker_t")
    save_logs(out, summary(agent), {name: getattr(agent, name) for name in names})


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--schedule", required=True)
    p.add_argument("--format", default="ulaw_8000", choices=["ulaw_8000", "pcm_16000"])
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--speak-s", type=float, default=2.0)
    p.add_argument("--listen-s", type=float, default=2.0)
    p.add_argument("--goodbye-s", type=float, default=1.0)
    p.add_argument("--ping-s", type=float, default=5.0)
    p.add_argument("--profile", choices=["default", "continuous"], default="default")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    sched = Schedule.from_json(args.schedule)
    agent = Agent(
        sched,
        args.format,
        args.chunk_ms,
        args.speak_s,
        args.listen_s,
        args.goodbye_s,
        args.ping_s,
        continuous=args.profile == "continuous",
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AgentConn(agent), "127.0.0.1", args.port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    deadline = sched.hard_end + 4.0
    all_closed_at: float | None = None
    while not stop.is_set() and time.monotonic() < deadline:
        if time.monotonic() > sched.goodbye_at and agent.conns and all(not c.open for c in agent.conns):
            # Saving the logs takes this core for ~0.1 s: wait until the callers, on the same core,
            # have played the last goodbye and echoed its mark (it would be echoed late otherwise).
            all_closed_at = all_closed_at or time.monotonic()
            if time.monotonic() - all_closed_at >= 1.5:
                break
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    server.close()
    for c in agent.conns:
        c.abort()
    save(agent, args.out)


if __name__ == "__main__":
    run_loop(main(), loop="uvloop")  # the load generator must stay cheaper than what it measures
