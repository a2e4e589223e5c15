"""System under test: callbridge on its bare `websockets` server (`Bridge.serve_websockets`).

The library path: one `Bridge`, the ElevenLabs session factory pointed at the agent
emulator, `TwilioCallControl` (official SDK, aiohttp) pointed at the load
generator's REST stub. No database, logging at WARNING. On `callbridge.eventloop` as the
README tells library users (uvloop, IP literals resolved in place), or on asyncio's own loop
when BENCH_LOOP=asyncio (the `callbridge-asyncio` system).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from callbridge import Bridge, ElevenLabsConfig, TwilioCallControl, session_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ACCOUNT_SID, AUTH_TOKEN


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--agent-url", required=True, help="http://127.0.0.1:PORT of the agent emulator")
    p.add_argument("--rest-url", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    control = TwilioCallControl(ACCOUNT_SID, AUTH_TOKEN, api_base_url=args.rest_url)
    bridge = Bridge(
        agent_factory=session_factory(ElevenLabsConfig(agent_id="bench-agent", api_base_url=args.agent_url)),
        control=control,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with bridge.serve_websockets("127.0.0.1", args.port) as url:
        print("READY", url, flush=True)
        await stop.wait()
    await control.aclose()


if __name__ == "__main__":
    import os

    from callbridge.eventloop import new_event_loop

    factory = asyncio.new_event_loop if os.environ.get("BENCH_LOOP") == "asyncio" else new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
