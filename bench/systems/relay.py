"""System under test: the bare relay, the floor.

The least code that puts the same messages on both sockets as a bridge does, with
no logic: Twilio `media` -> `{"user_audio_chunk"}`, agent `audio` -> `media` +
`mark`, `ping` -> `pong`; when either socket closes, the other is closed. Same
library (`websockets`, no compression) and the same JSON work per message as any
bridge must do; no validation, no state, no hang-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import relay_args, run_loop


async def handle(twilio: ServerConnection, agent_url: str) -> None:
    start: dict = {}
    async for raw in twilio:
        msg = json.loads(raw)
        if msg.get("event") == "start":
            start = msg["start"]
            break
    if not start:
        return
    sid = start["streamSid"]
    async with connect(agent_url, compression=None, max_size=1 << 20) as agent:
        await agent.send(
            json.dumps(
                {
                    "type": "conversation_initiation_client_data",
                    "dynamic_variables": {"call_sid": start["callSid"]},
                }
            )
        )

        async def up() -> None:
            async for raw in twilio:
                msg = json.loads(raw)
                if msg.get("event") == "media":
                    await agent.send('{"user_audio_chunk":"' + msg["media"]["payload"] + '"}')

        async def down() -> None:
            n = 0
            async for raw in agent:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "audio":
                    n += 1
                    await twilio.send(
                        '{"event":"media","streamSid":"'
                        + sid
                        + '","media":{"payload":"'
                        + msg["audio_event"]["audio_base_64"]
                        + '"}}'
                    )
                    await twilio.send(
                        '{"event":"mark","streamSid":"' + sid + '","mark":{"name":"m' + str(n) + '"}}'
                    )
                elif kind == "ping":
                    await agent.send('{"type":"pong","event_id":' + str(msg["ping_event"]["event_id"]) + "}")

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
    await twilio.close()


async def main() -> None:
    port, url = relay_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            await handle(ws, url)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=1 << 16):
        print("READY", flush=True)
        await stop.wait()


if __name__ == "__main__":
    run_loop(main())
