"""System under test: Pipecat with its Twilio serializer and FastAPI WebSocket transport.

Pipecat has no ElevenLabs *Agents* service (its ElevenLabs services are TTS and
STT, with the LLM in the pipeline), so the closest configuration is the
documented Twilio setup -- `parse_telephony_websocket`, `TwilioFrameSerializer`
(auto hang-up on, its REST base URL pointed at the load generator's stub),
`FastAPIWebsocketTransport`, `PipelineTask` + `PipelineRunner` per call -- whose
"agent" is one custom processor that relays audio to the agent over the ConvAI
WebSocket (written here, ~60 lines): caller PCM -> mu-law -> `user_audio_chunk`;
agent `audio` -> PCM -> `OutputAudioRawFrame`; `ping` -> `pong`; agent close ->
`EndWorkerFrame` upstream (Pipecat's way for a processor to end the call: the
EndFrame follows the queued audio and the serializer then hangs up over REST).

What differs from the others, by Pipecat's design: audio inside the pipeline is
always PCM (the serializer decodes mu-law and re-encodes it; at 8 kHz with no
resampling this is lossless, so tags survive), output audio is re-chunked into
40 ms pieces paced at twice real time by the transport, and no marks are sent.
Pipeline at 8 kHz (`--format ulaw_8000`, the agent leg carries mu-law like
everyone's) or 16 kHz (`--format pcm_16000`: the serializer resamples, the agent
leg carries PCM 16 kHz). No VAD, no RTVI, no metrics, loguru at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys

import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.audio.utils import create_stream_resampler, pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import (
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
CONFIG: dict[str, str] = {}


class ElevenLabsAgentRelay(FrameProcessor):
    """The pipeline's "agent": relays audio to an ElevenLabs Agents conversation."""

    def __init__(self, url: str, call_sid: str, fmt: str) -> None:
        super().__init__()
        self._url = url
        self._call_sid = call_sid
        self._ulaw = fmt == "ulaw_8000"
        self._rate = 8000 if self._ulaw else 16000
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._in_resampler = create_stream_resampler()
        self._out_resampler = create_stream_resampler()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._ws = await connect(self._url, compression=None, max_size=1 << 20)
            await self._ws.send(
                json.dumps(
                    {
                        "type": "conversation_initiation_client_data",
                        "dynamic_variables": {"call_sid": self._call_sid},
                    }
                )
            )
            self._reader = self.create_task(self._read())
        elif isinstance(frame, InputAudioRawFrame):
            if self._ws is None:
                return
            audio = frame.audio
            if self._ulaw:
                audio = await pcm_to_ulaw(audio, frame.sample_rate, 8000, self._in_resampler)
            try:
                await self._ws.send('{"user_audio_chunk":"' + base64.b64encode(audio).decode() + '"}')
            except ConnectionClosed:
                pass
        else:
            await self.push_frame(frame, direction)

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "audio":
                    audio = base64.b64decode(msg["audio_event"]["audio_base_64"])
                    if self._ulaw:
                        audio = await ulaw_to_pcm(audio, 8000, 8000, self._out_resampler)
                    await self.push_frame(
                        OutputAudioRawFrame(audio=audio, sample_rate=self._rate, num_channels=1)
                    )
                elif kind == "interruption":
                    await self.push_frame(InterruptionFrame())
                elif kind == "ping":
                    await self._ws.send(
                        json.dumps({"type": "pong", "event_id": msg["ping_event"]["event_id"]})
                    )
        except ConnectionClosed:
            pass
        # The agent ended the conversation: end the call after the queued audio.
        await self.push_frame(EndWorkerFrame(), FrameDirection.UPSTREAM)

    async def cleanup(self) -> None:
        await super().cleanup()
        if self._reader is not None:
            await self.cancel_task(self._reader)
        if self._ws is not None:
            await self._ws.close()


app = FastAPI()


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    _, call_data = await parse_telephony_websocket(websocket)
    fmt = CONFIG["format"]
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        base_url=CONFIG["rest_url"],
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
        ),
    )
    relay = ElevenLabsAgentRelay(CONFIG["agent_ws"], call_data["call_id"], fmt)
    rate = 8000 if fmt == "ulaw_8000" else 16000
    task = PipelineTask(
        Pipeline([transport.input(), relay, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    await PipelineRunner(handle_sigint=False).run(task)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--agent-url", required=True)
    p.add_argument("--rest-url", required=True)
    p.add_argument("--format", default="ulaw_8000", choices=["ulaw_8000", "pcm_16000"])
    args = p.parse_args()
    CONFIG.update(
        format=args.format,
        rest_url=args.rest_url,
        agent_ws=args.agent_url.replace("http://", "ws://") + "/v1/convai/conversation?agent_id=bench-agent",
    )
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    # loop="asyncio": every system here runs on the stdlib event loop (uvicorn would pick
    # uvloop when installed, and the project's server does not have it).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop="asyncio")
