"""System under test: the bare relay on aiohttp's server + uvloop + orjson, the floor (issue 17).

The least code that does a bridge's work, on the fastest stock parts we have:
aiohttp's server (its C HTTP parser and C WebSocket frame reader), its client for
the agent leg, uvloop, and orjson for every message parsed:

- `POST /twilio/voice` (the voice webhook) answers TwiML `<Connect><Stream>` to the
  media-stream route;
- Twilio `start` opens the agent leg with `conversation_initiation_client_data`;
- Twilio `media` -> the agent's `user_audio_chunk`, the base64 passed through untouched;
- agent `audio` -> Twilio `media` + `mark` (counted until Twilio echoes them);
  agent `ping` -> `pong`;
- Twilio `stop` closes the agent leg;
- the agent closing after its `end_call` tool response: audio is no longer forwarded,
  the marks already sent are waited for (the goodbye heard to its end, at most 15 s),
  then the call is hung up over Twilio's REST API (`Status=completed`), as callbridge and
  Pipecat do; an agent that closes without `end_call` has the stream closed instead.

No validation, no signatures, no records, no limits beyond the frame sizes: a floor,
not a product.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import AUTH_TOKEN, run_loop

MEDIA_PATH = "/twilio/media-stream"
FINAL_AUDIO_TIMEOUT_S = 15.0


class Relay:
    def __init__(self, agent_url: str, rest_url: str) -> None:
        self.agent_url = agent_url
        self.rest_url = rest_url
        self.session: aiohttp.ClientSession | None = None

    async def start(self, _app: web.Application) -> None:
        # One client session for both the agent legs and the REST hang-ups (pooled connections).
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def voice(self, request: web.Request) -> web.Response:
        url = f"ws://{request.host}{MEDIA_PATH}"
        twiml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<Response><Connect><Stream url="{url}"/></Connect></Response>'
        )
        return web.Response(text=twiml, content_type="text/xml")

    async def media_stream(self, request: web.Request) -> web.WebSocketResponse:
        twilio = web.WebSocketResponse(compress=False, max_msg_size=1 << 16, decode_text=False)
        await twilio.prepare(request)
        start: dict[str, str] = {}
        async for msg in twilio:
            if msg.type is not WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            if data.get("event") == "start":
                start = data["start"]
                break
        if start:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.bridge(twilio, start)
        await twilio.close()
        return twilio

    async def bridge(self, twilio: web.WebSocketResponse, start: dict[str, str]) -> None:
        assert self.session is not None
        sid, call_sid = start["streamSid"], start["callSid"]
        agent = await self.session.ws_connect(
            self.agent_url, compress=0, max_msg_size=1 << 20, decode_text=False
        )
        await agent.send_str(
            orjson.dumps(
                {"type": "conversation_initiation_client_data", "dynamic_variables": {"call_sid": call_sid}}
            ).decode()
        )
        pending = 0  # marks sent to Twilio and not echoed yet
        heard = asyncio.Event()  # the goodbye's last mark echoed, or the phone leg gone
        goodbye = phone_gone = False

        async def down() -> None:
            nonlocal pending, goodbye
            n = 0
            async for msg in agent:
                if msg.type is not WSMsgType.TEXT:
                    break
                data = orjson.loads(msg.data)
                kind = data.get("type")
                if kind == "audio":
                    n += 1
                    pending += 1
                    await twilio.send_str(
                        '{"event":"media","streamSid":"'
                        + sid
                        + '","media":{"payload":"'
                        + data["audio_event"]["audio_base_64"]
                        + '"}}'
                    )
                    await twilio.send_str(
                        '{"event":"mark","streamSid":"' + sid + '","mark":{"name":"m' + str(n) + '"}}'
                    )
                elif kind == "ping":
                    await agent.send_str(
                        '{"type":"pong","event_id":' + str(data["ping_event"]["event_id"]) + "}"
                    )
                elif (
                    kind == "agent_tool_response"
                    and data["agent_tool_response"].get("tool_name") == "end_call"
                ):
                    goodbye = True
            if phone_gone:
                return
            if not goodbye:
                await twilio.close()
                return
            # The agent said goodbye and closed: let the caller hear the goodbye, then hang up.
            if pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(heard.wait(), FINAL_AUDIO_TIMEOUT_S)
            if not phone_gone:
                await self.hang_up(start["accountSid"], call_sid)

        task = asyncio.ensure_future(down())
        try:
            async for msg in twilio:
                if msg.type is not WSMsgType.TEXT:
                    break
                data = orjson.loads(msg.data)
                event = data.get("event")
                if event == "media":
                    if not agent.closed:
                        await agent.send_str('{"user_audio_chunk":"' + data["media"]["payload"] + '"}')
                elif event == "mark":
                    pending -= 1
                    if pending == 0 and agent.closed:
                        heard.set()
                elif event == "stop":
                    break
        finally:
            phone_gone = True
            heard.set()
            await agent.close()
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.CancelledError):
                await task

    async def hang_up(self, account_sid: str, call_sid: str) -> None:
        assert self.session is not None
        url = f"{self.rest_url}/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        auth = aiohttp.BasicAuth(account_sid, AUTH_TOKEN)
        async with self.session.post(url, data={"Status": "completed"}, auth=auth) as response:
            await response.read()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--agent-url", required=True, help="http://127.0.0.1:PORT of the agent emulator")
    p.add_argument("--rest-url", required=True, help="Twilio's REST API base URL (the load generator's stub)")
    args = p.parse_args()
    agent_url = args.agent_url.replace("http://", "ws://") + "/v1/convai/conversation?agent_id=bench-agent"
    relay = Relay(agent_url, args.rest_url.rstrip("/"))
    app = web.Application()
    app.on_startup.append(relay.start)
    app.on_cleanup.append(relay.stop)
    app.router.add_post("/twilio/voice", relay.voice)
    app.router.add_get(MEDIA_PATH, relay.media_stream)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    run_loop(main())
