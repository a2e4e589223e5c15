"""System under test: the bare relay on a minimal WebSocket layer (bench/leanws.py).

The same messages as relay.py, with no logic, but each frame parsed inside the
protocol's `data_received` callback and forwarded with one `transport.write`: no
task, queue or await per message. Not a product (no validation, no limits beyond
the frame size, no keepalive): it is the floor of the floor, which tells how much
of a bridge's cost is the WebSocket library rather than the kernel's socket work.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import relay_args, run_loop
from leanws import WsClient, WsServer


class AgentLeg(WsClient):
    def __init__(self, url: str, twilio: TwilioLeg, first: str) -> None:
        super().__init__(url)
        self.twilio = twilio
        self.first = first
        self.n = 0

    def on_open(self) -> None:
        self.send_text(self.first)

    def on_text(self, text: str, now: float) -> None:
        msg = json.loads(text)
        kind = msg.get("type")
        if kind == "audio":
            self.n += 1
            sid = self.twilio.sid
            self.twilio.send_text(
                '{"event":"media","streamSid":"'
                + sid
                + '","media":{"payload":"'
                + msg["audio_event"]["audio_base_64"]
                + '"}}'
            )
            self.twilio.send_text(
                '{"event":"mark","streamSid":"' + sid + '","mark":{"name":"m' + str(self.n) + '"}}'
            )
        elif kind == "ping":
            self.send_text('{"type":"pong","event_id":' + str(msg["ping_event"]["event_id"]) + "}")

    def on_closed(self) -> None:
        self.twilio.close()


class TwilioLeg(WsServer):
    agent_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.sid = ""
        self.agent: AgentLeg | None = None
        self.dialing: asyncio.Future[None] | None = None

    def on_text(self, text: str, now: float) -> None:
        msg = json.loads(text)
        event = msg.get("event")
        if event == "media":
            if self.agent is not None and self.agent.open:
                self.agent.send_text('{"user_audio_chunk":"' + msg["media"]["payload"] + '"}')
        elif event == "start":
            start = msg["start"]
            self.sid = start["streamSid"]
            first = json.dumps(
                {
                    "type": "conversation_initiation_client_data",
                    "dynamic_variables": {"call_sid": start["callSid"]},
                }
            )
            self.dialing = asyncio.ensure_future(self._dial(first))

    async def _dial(self, first: str) -> None:
        agent = AgentLeg(self.agent_url, self, first)
        self.agent = agent
        try:
            await asyncio.get_running_loop().create_connection(lambda: agent, agent.host, agent.port)
        except OSError:
            self.close()

    def on_closed(self) -> None:
        if self.agent is not None:
            self.agent.close()


async def main() -> None:
    port, TwilioLeg.agent_url = relay_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(TwilioLeg, "127.0.0.1", port, backlog=1024)
    print("READY", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    run_loop(main())
