"""System under test: the pattern of the ElevenLabs docs' custom Twilio server.

Written here from the documented example (elevenlabs-examples,
conversational-ai/twilio/python-sdk: main.py + twilio_audio_interface.py): a
FastAPI app whose `/media-stream` WebSocket builds a `TwilioAudioInterface` and
starts the official SDK's (thread-based) `Conversation`, then feeds it every
Twilio message. Differences from the docs, all for the benchmark only:

* `ElevenLabs(base_url=...)` points the SDK at the agent emulator, and
  `requires_auth=False` (public agent, as for every system here) instead of a
  signed URL;
* the `print` of the docs' callbacks goes to the log file like everything else;
* uvicorn on 127.0.0.1:PORT with its defaults (the docs run `uvicorn.run(app)`).

What the pattern does not do (measured, not changed): it sends no marks, and
when the agent ends the conversation nothing hangs up the phone call or closes
the stream: the SDK's session ends and the caller is left in silence.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import traceback

import uvicorn
from elevenlabs import ElevenLabs
from elevenlabs.conversational_ai.conversation import AudioInterface, Conversation
from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

AGENT_BASE_URL = ""
ELEVEN_LABS_AGENT_ID = "bench-agent"


class TwilioAudioInterface(AudioInterface):
    """As in the docs' twilio_audio_interface.py."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.input_callback = None
        self.stream_sid: str | None = None
        self.loop = asyncio.get_event_loop()

    def start(self, input_callback):  # type: ignore[no-untyped-def]
        self.input_callback = input_callback

    def stop(self) -> None:
        self.input_callback = None
        self.stream_sid = None

    def output(self, audio: bytes) -> None:
        """This method should return quickly and not block the calling thread."""
        asyncio.run_coroutine_threadsafe(self.send_audio_to_twilio(audio), self.loop)

    def interrupt(self) -> None:
        asyncio.run_coroutine_threadsafe(self.send_clear_message_to_twilio(), self.loop)

    async def send_audio_to_twilio(self, audio: bytes) -> None:
        if self.stream_sid:
            audio_payload = base64.b64encode(audio).decode("utf-8")
            audio_delta = {
                "event": "media",
                "streamSid": self.stream_sid,
                "media": {"payload": audio_payload},
            }
            try:
                if self.websocket.application_state == WebSocketState.CONNECTED:
                    await self.websocket.send_text(json.dumps(audio_delta))
            except (WebSocketDisconnect, RuntimeError):
                pass

    async def send_clear_message_to_twilio(self) -> None:
        if self.stream_sid:
            clear_message = {"event": "clear", "streamSid": self.stream_sid}
            try:
                if self.websocket.application_state == WebSocketState.CONNECTED:
                    await self.websocket.send_text(json.dumps(clear_message))
            except (WebSocketDisconnect, RuntimeError):
                pass

    async def handle_twilio_message(self, data: dict) -> None:  # type: ignore[type-arg]
        event_type = data.get("event")
        if event_type == "start":
            print("Received start event from Twilio:", data["start"])
            self.stream_sid = data["start"]["streamSid"]
        elif event_type == "media" and self.input_callback:
            audio_data = base64.b64decode(data["media"]["payload"])
            self.input_callback(audio_data)


app = FastAPI()


@app.websocket("/media-stream")
async def handle_media_stream(websocket: WebSocket) -> None:
    """As in the docs' main.py."""
    await websocket.accept()
    print("WebSocket connection opened")

    audio_interface = TwilioAudioInterface(websocket)
    eleven_labs_client = ElevenLabs(api_key="unused", base_url=AGENT_BASE_URL)

    try:
        conversation = Conversation(
            client=eleven_labs_client,
            agent_id=ELEVEN_LABS_AGENT_ID,
            requires_auth=False,
            audio_interface=audio_interface,
            callback_agent_response=lambda text: print(f"Agent: {text}"),
            callback_user_transcript=lambda text: print(f"User: {text}"),
        )

        conversation.start_session()
        print("Conversation started")

        async for message in websocket.iter_text():
            if not message:
                continue
            await audio_interface.handle_twilio_message(json.loads(message))

    except WebSocketDisconnect:
        print("WebSocket disconnected")
    except Exception:
        print("Error occurred in WebSocket handler:")
        traceback.print_exc()
    finally:
        try:
            conversation.end_session()
            conversation.wait_for_session_end()
            print("Conversation ended")
        except Exception:
            print("Error ending conversation session:")
            traceback.print_exc()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--agent-url", required=True)
    p.add_argument("--rest-url", default="")
    args = p.parse_args()
    AGENT_BASE_URL = args.agent_url
    # loop="asyncio": every system here runs on the stdlib event loop (uvicorn would pick
    # uvloop when installed, and the project's server does not have it).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop="asyncio")
