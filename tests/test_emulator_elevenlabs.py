"""The ElevenLabs Agents emulator, exercised over real loopback sockets.

The official ``elevenlabs`` SDK is the outside witness that the emulator speaks the real
protocol; plain ``websockets`` clients probe the details and the failure modes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from elevenlabs.client import ElevenLabs
from elevenlabs.conversational_ai.conversation import (
    AsyncAudioInterface,
    AsyncConversation,
    ClientTools,
    ConversationInitiationData,
    DisconnectionDetails,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    ClientToolCall,
    Close,
    Drop,
    EmulatedConversation,
    EndCall,
    Garbage,
    Interrupt,
    Ping,
    RawSend,
    Say,
    Sleep,
    Stall,
    UserTranscript,
    WaitForUser,
    mulaw_decode,
    mulaw_encode,
)

INF = float("inf")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _leftover_tasks() -> list[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()]


async def assert_no_tasks() -> None:
    """Nothing of the emulator (or of our clients) may outlive its ``async with``."""
    await asyncio.sleep(0)  # let tasks that were just cancelled or finished run their last step
    left = _leftover_tasks()
    assert not left, f"tasks left behind: {left}"


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    yield
    await assert_no_tasks()


def ws_connect(url: str, **kwargs: Any) -> connect:
    return connect(url, proxy=None, open_timeout=3, close_timeout=1, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    message = json.loads(frame)
    assert isinstance(message, dict)
    return message


async def initiate(ws: ClientConnection, **extra: Any) -> dict[str, Any]:
    """Send conversation_initiation_client_data; returns the metadata event."""
    await ws.send(json.dumps({"type": "conversation_initiation_client_data", **extra}))
    message = await recv_json(ws)
    assert message["type"] == "conversation_initiation_metadata"
    event = message["conversation_initiation_metadata_event"]
    assert isinstance(event, dict)
    return event


async def drain(ws: ClientConnection, timeout: float = 3.0) -> tuple[list[Any], ConnectionClosed]:
    """Every frame until the server closes; returns the frames (JSON parsed when possible)."""
    frames: list[Any] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as exc:
                return frames, exc
            try:
                frames.append(json.loads(frame))
            except ValueError:
                frames.append(frame)


async def frames_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool], timeout: float = 3.0
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            out.append(message)
            if done(message):
                return out


def audio_of(messages: list[Any], keep: Callable[[int], bool] = lambda _eid: True) -> bytes:
    out = bytearray()
    for m in messages:
        if isinstance(m, dict) and m.get("type") == "audio" and keep(m["audio_event"]["event_id"]):
            out += base64.b64decode(m["audio_event"]["audio_base_64"])
    return bytes(out)


def peak_hz(pcm: np.ndarray[Any, Any], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[int(np.argmax(spectrum))])


def ulaw_tone(seconds: float, hz: float) -> bytes:
    t = np.arange(round(seconds * 8000)) / 8000
    return mulaw_encode(np.rint(8000 * np.sin(2 * np.pi * hz * t)))


# --------------------------------------------------------------------------------------------
# 1. The official SDK talks to the emulator
# --------------------------------------------------------------------------------------------


class FakeAudio(AsyncAudioInterface):
    """Feeds 100 ms of 16 kHz PCM every 20 ms and keeps what the agent says."""

    def __init__(self) -> None:
        self.played = bytearray()
        self.interrupts = 0
        self.started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, input_callback: Callable[[bytes], Awaitable[None]]) -> None:
        self._task = asyncio.create_task(self._feed(input_callback))
        self.started.set()

    async def _feed(self, input_callback: Callable[[bytes], Awaitable[None]]) -> None:
        chunk = np.zeros(1600, dtype="<i2").tobytes()
        while True:
            await input_callback(chunk)
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        if task is not asyncio.current_task():  # the SDK may stop us from inside our own feed
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def output(self, audio: bytes) -> None:
        self.played += audio

    async def interrupt(self) -> None:
        self.interrupts += 1


async def test_official_sdk_full_conversation_via_signed_url() -> None:
    script = AgentScript(
        steps=[
            Say("Hello {{user_name}}, how can I help?", seconds=0.5),
            WaitForUser(0.3, timeout=3),
            UserTranscript("I need an appointment"),
            ClientToolCall("check_slot", {"day": "monday"}, timeout=3),
            Ping(),
            Sleep(0.1),
            Say("Monday works.", seconds=0.3),
            EndCall("Goodbye!", seconds=0.2, close_delay=0.05),
        ],
        output_format="pcm_16000",
        input_format="pcm_16000",
        ping_interval=0.05,
        realtime_factor=INF,
    )
    tool_calls: list[dict[str, Any]] = []
    responses: list[str] = []
    transcripts: list[str] = []
    latencies: list[int] = []
    disconnects: list[DisconnectionDetails] = []

    async def check_slot(params: dict[str, Any]) -> str:
        tool_calls.append(params)
        return "Monday 10:00 is free"

    async def on_response(text: str) -> None:
        responses.append(text)

    async def on_transcript(text: str) -> None:
        transcripts.append(text)

    async def on_latency(ms: int) -> None:
        latencies.append(ms)

    async def on_disconnect(details: DisconnectionDetails) -> None:
        disconnects.append(details)

    # The SDK fetches the signed URL on the loop's default executor; own it so its thread ends.
    executor = ThreadPoolExecutor(max_workers=1)
    asyncio.get_running_loop().set_default_executor(executor)
    async with AgentEmulator(script, api_key="test-key") as agent:
        tools = ClientTools(loop=asyncio.get_running_loop())  # no private event-loop thread
        tools.register("check_slot", check_slot, is_async=True)
        audio = FakeAudio()
        with httpx.Client() as http_client:
            # Pointing the SDK at the emulator is plain configuration: base_url.
            client = ElevenLabs(api_key="test-key", base_url=agent.base_url, httpx_client=http_client)
            conversation = AsyncConversation(
                client,
                "agent_sdk",
                requires_auth=True,  # exercises get-signed-url + conversation_signature
                audio_interface=audio,
                config=ConversationInitiationData(dynamic_variables={"user_name": "John"}),
                client_tools=tools,
                callback_agent_response=on_response,
                callback_user_transcript=on_transcript,
                callback_latency_measurement=on_latency,
                callback_disconnect=on_disconnect,
            )
            await conversation.start_session()
            conversation_id = await asyncio.wait_for(conversation.wait_for_session_end(), 5)

        [conv] = await agent.wait_for_conversations(1)
        await conv.wait_closed()
    executor.shutdown(wait=True)

    assert conversation_id == conv.conversation_id
    assert conv.agent_id == "agent_sdk"
    assert conv.query["source"] == "python_sdk"
    assert "conversation_signature" in conv.query and not agent.signatures  # used up
    assert conv.client_data is not None and conv.client_data["dynamic_variables"] == {"user_name": "John"}
    assert conv.invalid == [] and conv.errors == []

    # Greeting and the rest of the agent audio reached the audio interface, untouched.
    assert bytes(audio.played) == conv.agent_audio()
    assert len(audio.played) == round((0.5 + 0.3 + 0.2) * 16000) * 2
    assert responses == ["Hello John, how can I help?", "Monday works.", "Goodbye!"]
    assert transcripts == ["I need an appointment"]

    # The SDK's audio went in as user audio; enough for WaitForUser to pass.
    assert conv.user_audio_seconds >= 0.3
    assert not any("timeout" in text for _, text in conv.step_log)

    # Pings were answered with matching event ids, and ping_ms reached the SDK.
    assert conv.pongs and set(conv.pongs) <= set(conv.pings_sent)
    assert latencies

    # The client tool ran through the SDK's ClientTools and its result came back.
    [call] = conv.tool_calls
    assert tool_calls == [{"tool_call_id": call["tool_call_id"], "day": "monday"}]
    [result] = conv.tool_results
    assert result == {
        "type": "client_tool_result",
        "tool_call_id": call["tool_call_id"],
        "result": "Monday 10:00 is free",
        "is_error": False,
    }

    # end_call: the agent closed with 1000 and the SDK saw an agent-side end.
    [end] = conv.sent_messages("agent_tool_response")
    assert end["agent_tool_response"]["tool_name"] == "end_call"
    assert (conv.closed_by, conv.close_code) == ("server", 1000)
    [details] = disconnects
    assert (details.reason, details.close_code) == ("agent", 1000)
    await assert_no_tasks()


async def test_official_sdk_drops_stale_audio_after_interruption() -> None:
    script = AgentScript(
        steps=[
            Say("This is a long answer", seconds=0.5),
            Interrupt(stale_chunks=3),
            Say("Sure, go ahead.", seconds=0.25),
            EndCall("", close_delay=0.05),
        ],
        output_format="ulaw_8000",
        input_format="pcm_16000",
        realtime_factor=INF,
    )
    async with AgentEmulator(script) as agent:
        audio = FakeAudio()
        with httpx.Client() as http_client:
            client = ElevenLabs(api_key="unused", base_url=agent.base_url, httpx_client=http_client)
            conversation = AsyncConversation(
                client,
                "agent_public",
                requires_auth=False,
                audio_interface=audio,
                client_tools=ClientTools(loop=asyncio.get_running_loop()),
            )
            await conversation.start_session()
            await asyncio.wait_for(conversation.wait_for_session_end(), 5)
        [conv] = await agent.wait_for_conversations(1)
        await conv.wait_closed()

    assert audio.interrupts == 1
    # The SDK keeps the audio before the interruption and the next response, not the stale chunks.
    assert len(conv.agent_audio()) == round((0.5 + 0.75 + 0.25) * 8000)
    assert len(audio.played) == round((0.5 + 0.25) * 8000)
    assert conv.invalid == []
    await assert_no_tasks()


# --------------------------------------------------------------------------------------------
# 2. Protocol details with a plain websockets client
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_fmt", "in_fmt"), [("ulaw_8000", "ulaw_8000"), ("pcm_16000", "pcm_22050")])
async def test_metadata_announces_formats_and_records_handshake(out_fmt: str, in_fmt: str) -> None:
    script = AgentScript(output_format=out_fmt, input_format=in_fmt)
    async with AgentEmulator(script) as agent:
        assert agent.base_url == f"http://127.0.0.1:{agent.port}"
        url = agent.ws_url("agent_x")
        assert url == f"ws://127.0.0.1:{agent.port}/v1/convai/conversation?agent_id=agent_x"
        async with ws_connect(url, additional_headers={"X-Test": "yes"}) as ws:
            event = await initiate(
                ws,
                conversation_config_override={"agent": {"first_message": "Hi", "language": "en"}},
                dynamic_variables={"caller": "+15550100", "vip": True, "visits": 3},
            )
        [conv] = await agent.wait_for_conversations(1)
        await conv.wait_closed()

    assert event["conversation_id"] == conv.conversation_id
    assert conv.conversation_id.startswith("conv_")
    assert event["agent_output_audio_format"] == out_fmt
    assert event["user_input_audio_format"] == in_fmt
    assert conv.query == {"agent_id": "agent_x"}
    assert conv.request_headers["x-test"] == "yes"
    assert conv.client_data is not None
    assert conv.client_data["dynamic_variables"]["caller"] == "+15550100"
    assert conv.invalid == []
    assert (conv.closed_by, conv.close_code) == ("client", 1000)
    assert conv.ended_at is not None and conv.ended_at >= conv.started_at


@pytest.mark.parametrize("tone_hz", [440.0, 1000.0])
async def test_pcm16000_tone_has_right_duration_chunks_and_frequency(tone_hz: float) -> None:
    script = AgentScript(
        steps=[Say("Hello", seconds=0.5, tone_hz=tone_hz), Close(1000)],
        output_format="pcm_16000",
        chunk_ms=100,
        realtime_factor=INF,
    )
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws)
        frames, _ = await drain(ws)

    [response] = [f for f in frames if f["type"] == "agent_response"]
    event_id = response["agent_response_event"]["event_id"]
    audio_events = [f["audio_event"] for f in frames if f["type"] == "audio"]
    assert frames.index(response) < frames.index(next(f for f in frames if f["type"] == "audio"))
    assert {e["event_id"] for e in audio_events} == {event_id}
    assert [len(base64.b64decode(e["audio_base_64"])) for e in audio_events] == [3200] * 5
    pcm = np.frombuffer(audio_of(frames), dtype="<i2")
    assert pcm.size == 8000  # 0.5 s at 16 kHz, 16-bit
    assert abs(peak_hz(pcm, 16000) - tone_hz) <= 2.0
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 5000  # clearly audible


async def test_ulaw_tone_default_duration_from_text() -> None:
    script = AgentScript(steps=[Say("abcdefghij"), Close(1000)], realtime_factor=INF)
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws)
        frames, _ = await drain(ws)
    audio = audio_of(frames)
    assert len(audio) == round(10 * 0.06 * 8000)  # 0.06 s per character, 1 byte per sample
    assert [
        len(base64.b64decode(f["audio_event"]["audio_base_64"])) for f in frames if f["type"] == "audio"
    ] == [
        2000,
        2000,
        800,
    ]
    assert abs(peak_hz(mulaw_decode(audio), 8000) - 440) <= 2.0


@pytest.mark.parametrize("fmt", ["ulaw_8000", "pcm_8000", "pcm_24000", "pcm_44100"])
async def test_given_mulaw_audio_is_converted_to_output_format(fmt: str) -> None:
    source = ulaw_tone(0.4, 300)
    script = AgentScript(
        steps=[Say("line", audio=source), Close(1000)], output_format=fmt, realtime_factor=INF
    )
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws)
        frames, _ = await drain(ws)
    audio = audio_of(frames)
    if fmt == "ulaw_8000":
        assert audio == source
        return
    rate = int(fmt.split("_")[1])
    pcm = np.frombuffer(audio, dtype="<i2")
    assert pcm.size == round(len(source) * rate / 8000)
    assert abs(peak_hz(pcm, rate) - 300) <= 3.0
    if rate % 8000 == 0:  # integer ratio: the original samples survive exactly
        assert np.array_equal(pcm[:: rate // 8000], mulaw_decode(source))


def test_mulaw_codec_matches_g711() -> None:
    codes = np.arange(256, dtype=np.uint8)
    decoded = mulaw_decode(codes.tobytes())
    assert (decoded[0xFF], decoded[0x7F], decoded[0x00], decoded[0x80]) == (0, 0, -32124, 32124)
    # Every code round-trips, except negative zero which encodes as positive zero.
    expected = codes.copy()
    expected[0x7F] = 0xFF
    assert mulaw_encode(decoded) == expected.tobytes()

    def reference(sample: int) -> int:  # straightforward scalar G.711 encoder
        sign = 0x80 if sample < 0 else 0
        magnitude = min(abs(sample), 32635) + 0x84
        exponent = 7
        while exponent > 0 and not magnitude & (0x4000 >> (7 - exponent)):
            exponent -= 1
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
        return ~(sign | exponent << 4 | mantissa) & 0xFF

    samples = np.arange(-32768, 32768, 37)
    assert mulaw_encode(samples) == bytes(reference(int(s)) for s in samples)


async def test_interruption_then_stale_audio_with_old_event_id() -> None:
    script = AgentScript(
        steps=[
            Say("first answer", seconds=0.5),
            Interrupt(stale_chunks=2, correction="first"),
            Say("second", seconds=0.25),
            Close(1000),
        ],
        realtime_factor=INF,
    )
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws)
        frames, _ = await drain(ws)

    kinds = [(f["type"], next(v for k, v in f.items() if k != "type").get("event_id")) for f in frames]
    assert kinds == [
        ("agent_response", 1),
        ("audio", 1),
        ("audio", 1),
        ("interruption", 1),
        ("audio", 1),  # stale
        ("audio", 1),  # stale
        ("agent_response_correction", 1),
        ("agent_response", 2),
        ("audio", 2),
    ]
    [correction] = [f for f in frames if f["type"] == "agent_response_correction"]
    assert correction["agent_response_correction_event"]["original_agent_response"] == "first answer"
    assert correction["agent_response_correction_event"]["corrected_agent_response"] == "first"

    # A client applying the documented rule keeps exactly the un-interrupted audio.
    kept = bytearray()
    last_interrupt = 0
    for f in frames:
        if f["type"] == "interruption":
            last_interrupt = f["interruption_event"]["event_id"]
        elif f["type"] == "audio" and f["audio_event"]["event_id"] > last_interrupt:
            kept += base64.b64decode(f["audio_event"]["audio_base_64"])
        elif f["type"] == "audio":
            assert last_interrupt == 1
    assert len(kept) == round((0.5 + 0.25) * 8000)  # both answers, none of the stale chunks
    assert len(audio_of(frames, lambda eid: eid == 1)) == round(0.5 * 8000) + 2 * 2000


@pytest.mark.parametrize(
    ("step", "error_type"),
    [
        (Close(1000), None),
        (Close(1000, "max duration", error={}), "max_duration_exceeded"),
        (Close(1002), None),
        (Close(1002, error={}), "llm_error"),
        (Close(1008, "bad input"), None),
        (Close(1008, error={"message": "Missing dynamic variable"}), "invalid_message"),
        (Close(1011), None),
        (Close(1011, error={"error_type": "unknown"}), "unknown"),
    ],
)
async def test_close_codes_reach_the_client(step: Close, error_type: str | None) -> None:
    script = AgentScript(steps=[Say("hi", seconds=0.05), step], realtime_factor=INF)
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            frames, closed = await drain(ws)
        [conv] = agent.conversations
        await conv.wait_closed()

    assert closed.rcvd is not None and closed.rcvd.code == step.code
    errors = [f for f in frames if f["type"] == "error"]
    if error_type is None:
        assert errors == []
        assert closed.rcvd.reason == step.reason
    else:
        [error] = errors
        assert frames[-1] is error  # sent right before the close
        event = error["error_event"]
        assert event["code"] == step.code and event["error_type"] == error_type
        assert isinstance(event["message"], str) and event["message"]
        assert closed.rcvd.reason == (step.reason or event["message"])
    assert (conv.closed_by, conv.close_code) == ("server", step.code)


async def test_drop_closes_without_close_frame() -> None:
    script = AgentScript(steps=[Say("hi", seconds=0.05), Drop(), Say("never")], realtime_factor=INF)
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            frames, closed = await drain(ws)
        [conv] = agent.conversations
        await conv.wait_closed()
    assert isinstance(closed, ConnectionClosedError) and closed.rcvd is None
    assert [f["type"] for f in frames] == ["agent_response", "audio"]
    assert (conv.closed_by, conv.close_code) == ("drop", 1006)


async def test_metadata_never_sent() -> None:
    script = AgentScript(steps=[Say("never")], send_metadata=False, ping_interval=0.02)
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await ws.send(json.dumps({"type": "conversation_initiation_client_data"}))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)
        [conv] = agent.conversations
        await conv.wait_closed()
    assert conv.sent == [] and conv.client_data is not None
    assert (conv.closed_by, conv.close_code) == ("client", 1000)


async def test_metadata_delay() -> None:
    async with AgentEmulator(AgentScript(metadata_delay=0.3)) as agent, ws_connect(agent.ws_url("a")) as ws:
        start = time.monotonic()
        await initiate(ws)
        assert time.monotonic() - start >= 0.28


async def test_metadata_waits_for_client_data_only_so_long() -> None:
    script = AgentScript(client_data_timeout=0.2)
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        start = time.monotonic()
        message = await recv_json(ws)  # without sending anything
        assert message["type"] == "conversation_initiation_metadata"
        assert 0.15 <= time.monotonic() - start < 1.0


@pytest.mark.parametrize("status", [403, 429, 503])
async def test_reject_with_status(status: int) -> None:
    async with AgentEmulator(AgentScript(reject_with_status=status)) as agent:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(agent.ws_url("a")):
                pass
        assert info.value.response.status_code == status
        assert agent.conversations == []
        assert [s for s, _ in agent.rejections] == [status]


async def test_script_factory_per_connection_attempt() -> None:
    def factory(agent_id: str, n: int) -> AgentScript:
        if n == 0:
            return AgentScript(reject_with_status=503)
        return AgentScript(conversation_id=f"conv_{agent_id}_{n}", output_format="pcm_16000")

    async with AgentEmulator(script_factory=factory) as agent:
        with pytest.raises(InvalidStatus):
            async with ws_connect(agent.ws_url("b")):
                pass
        async with ws_connect(agent.ws_url("b")) as ws:
            event = await initiate(ws)
    assert event["conversation_id"] == "conv_b_1"
    assert event["agent_output_audio_format"] == "pcm_16000"


async def test_signed_url_flow() -> None:
    async with AgentEmulator(AgentScript(), api_key="sekret") as agent, httpx.AsyncClient() as http_client:
        endpoint = f"{agent.base_url}/v1/convai/conversation/get-signed-url"

        ok = await http_client.get(endpoint, params={"agent_id": "priv"}, headers={"xi-api-key": "sekret"})
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        signed_url = ok.json()["signed_url"]  # ConversationSignedUrlResponseModel
        assert signed_url.startswith(agent.ws_url("priv") + "&conversation_signature=")

        bad = await http_client.get(endpoint, params={"agent_id": "priv"}, headers={"xi-api-key": "nope"})
        assert bad.status_code == 401 and bad.json()["detail"]["status"] == "invalid_api_key"
        missing_key = await http_client.get(endpoint, params={"agent_id": "priv"})
        assert missing_key.status_code == 401
        missing_agent = await http_client.get(endpoint, headers={"xi-api-key": "sekret"})
        assert missing_agent.status_code == 422
        assert missing_agent.json()["detail"][0]["loc"] == ["query", "agent_id"]
        assert (await http_client.get(f"{agent.base_url}/v1/nothing")).status_code == 404

        with pytest.raises(InvalidStatus) as no_signature:
            async with ws_connect(agent.ws_url("priv")):
                pass
        assert no_signature.value.response.status_code == 403

        async with ws_connect(signed_url) as ws:
            await initiate(ws)

        with pytest.raises(InvalidStatus) as reused:
            async with ws_connect(signed_url):
                pass
        assert reused.value.response.status_code == 403

        async with ws_connect(agent.ws_url("priv"), additional_headers={"xi-api-key": "sekret"}) as ws:
            await initiate(ws)

    assert [c.agent_id for c in agent.conversations] == ["priv", "priv"]
    assert [s for s, _ in agent.rejections] == [401, 401, 422, 404, 403, 403]


async def test_garbage_frames_are_sent_verbatim() -> None:
    script = AgentScript(
        steps=[
            Garbage(),
            Garbage(b"\x00\xffbinary"),
            RawSend('{"type": "mystery"}'),
            RawSend({"x": 1}),
            Close(1000),
        ]
    )
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws)
        received = [await asyncio.wait_for(ws.recv(), 2) for _ in range(4)]
    assert received == ["{not json", b"\x00\xffbinary", '{"type": "mystery"}', '{"x": 1}']


async def test_invalid_json_from_client_strict() -> None:
    script = AgentScript(steps=[Sleep(5)])
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            await ws.send("{oops")
            frames, closed = await drain(ws)
        [conv] = agent.conversations
        await conv.wait_closed()
    [error] = frames
    assert error["error_event"]["code"] == 1008
    assert error["error_event"]["error_type"] == "invalid_message"
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert len(conv.invalid) == 1 and "invalid JSON" in conv.invalid[0]
    assert (conv.closed_by, conv.close_code) == ("server", 1008)


async def test_invalid_messages_recorded_not_fatal() -> None:
    script = AgentScript(
        steps=[Ping(), WaitForUser(0.01, timeout=3), UserTranscript("still here")],
        strict=False,
        input_format="pcm_16000",
    )
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            ping = await recv_json(ws)
            assert ping["type"] == "ping" and ping["ping_event"]["ping_ms"] is None
            for bad in [
                "{oops",
                b"\x01\x02",
                "[1, 2]",
                {"type": "pong", "event_id": 999},
                {"type": "pong", "event_id": "1"},
                {"type": "nonsense"},
                {"no_type": True},
                {"user_audio_chunk": "!!!not base64"},
                {"user_audio_chunk": base64.b64encode(b"\x00\x00\x00").decode()},
                {"type": "client_tool_result", "tool_call_id": "x", "result": {"a": 1}, "is_error": "no"},
                {"type": "contextual_update"},
                {"type": "feedback", "event_id": 1, "score": "meh"},
                {"type": "conversation_initiation_client_data", "dynamic_variables": {"a": None}},
            ]:
                await ws.send(bad if isinstance(bad, str | bytes) else json.dumps(bad))
            # Well-formed traffic still works afterwards.
            await ws.send(json.dumps({"type": "pong", "event_id": ping["ping_event"]["event_id"]}))
            await ws.send(json.dumps({"type": "user_activity"}))
            await ws.send(json.dumps({"user_audio_chunk": base64.b64encode(bytes(640)).decode()}))
            message = await recv_json(ws)
            assert message["user_transcription_event"]["user_transcript"] == "still here"
        [conv] = agent.conversations
        await conv.wait_closed()

    problems = "\n".join(conv.invalid)
    for expected in [
        "invalid JSON",
        "binary frame",
        "JSON list instead of an object",
        "pong for event_id 999",
        "pong.event_id: expected integer",
        "unknown message type 'nonsense'",
        "unknown message type None",
        "not valid base64",
        "splits a 16-bit sample",
        "client_tool_result.result: expected string",
        "client_tool_result.is_error: expected boolean",
        "unknown tool_call_id 'x'",
        "contextual_update: missing required field 'text'",
        "feedback.score: 'meh' is not an allowed value",
        "conversation_initiation_client_data sent again",
        "dynamic_variables.a: None matches none of the allowed shapes",
    ]:
        assert expected in problems, f"{expected!r} not in:\n{problems}"
    assert conv.pongs == [999, 1]
    assert len(conv.user_audio) == 3 + 640
    assert conv.received_messages("user_activity") == [{"type": "user_activity"}]
    assert conv.errors == []


async def test_wait_for_user_counts_audio_by_input_format() -> None:
    script = AgentScript(
        steps=[
            WaitForUser(0.5, timeout=3),
            UserTranscript("heard you"),
            WaitForUser(1.0, timeout=0.1),
            Close(1000),
        ],
        input_format="pcm_16000",
    )
    quarter_second = base64.b64encode(bytes(8000)).decode()  # 0.25 s of 16-bit 16 kHz
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            await ws.send(json.dumps({"user_audio_chunk": quarter_second}))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)
            await ws.send(json.dumps({"user_audio_chunk": quarter_second}))
            message = await recv_json(ws)
            assert message["type"] == "user_transcript"
            assert message["user_transcription_event"]["user_transcript"] == "heard you"
            _, closed = await drain(ws)
        [conv] = agent.conversations
    assert closed.rcvd is not None and closed.rcvd.code == 1000
    assert conv.user_audio_seconds == 0.5
    assert any(text.startswith("timeout: waited 0.1 s") for _, text in conv.step_log)


async def test_client_tool_call_round_trip_and_timeout() -> None:
    script = AgentScript(
        steps=[
            ClientToolCall("lookup", {"id": 7}),
            Say("found it", seconds=0.05),
            ClientToolCall("slow_tool", timeout=0.1),
            Say("gave up", seconds=0.05),
            Close(1000),
        ],
        realtime_factor=INF,
    )
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            call = await recv_json(ws)
            assert call["type"] == "client_tool_call"
            body = call["client_tool_call"]
            assert (body["tool_name"], body["parameters"]) == ("lookup", {"id": 7})
            assert isinstance(body["tool_call_id"], str) and isinstance(body["event_id"], int)
            with pytest.raises(TimeoutError):  # the agent waits for the result
                await asyncio.wait_for(ws.recv(), 0.2)
            result = {
                "type": "client_tool_result",
                "tool_call_id": body["tool_call_id"],
                "result": "ok",
                "is_error": False,
            }
            await ws.send(json.dumps(result))
            frames, _ = await drain(ws)
        [conv] = agent.conversations
    texts = [f["agent_response_event"]["agent_response"] for f in frames if f["type"] == "agent_response"]
    assert texts == ["found it", "gave up"]
    assert conv.tool_results == [result]
    assert [c["tool_name"] for c in conv.tool_calls] == ["lookup", "slow_tool"]
    assert any("timeout: no client_tool_result for slow_tool" in text for _, text in conv.step_log)


async def test_periodic_pings_and_ping_ms() -> None:
    async with AgentEmulator(AgentScript(ping_interval=0.03)) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            seen: list[dict[str, Any]] = []
            for _ in range(3):
                ping = await recv_json(ws)
                assert ping["type"] == "ping"
                seen.append(ping["ping_event"])
                await ws.send(json.dumps({"type": "pong", "event_id": ping["ping_event"]["event_id"]}))
        [conv] = agent.conversations
        await conv.wait_closed()
    assert [p["event_id"] for p in seen] == [1, 2, 3]
    assert seen[0]["ping_ms"] is None
    assert isinstance(seen[1]["ping_ms"], int) and seen[1]["ping_ms"] >= 0
    assert conv.pongs == [1, 2, 3] and conv.invalid == []


async def test_stall_goes_silent_until_client_leaves() -> None:
    script = AgentScript(
        steps=[Say("hi", seconds=0.1), Stall(), Say("never")], ping_interval=0.03, realtime_factor=INF
    )
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.wait_for(ws.recv(), 0.3)
            await ws.send(json.dumps({"type": "user_activity"}))  # still recorded while stalled
            await asyncio.sleep(0.05)
        [conv] = agent.conversations
        await conv.wait_closed()
    stalled_at = next(t for t, text in conv.step_log if text == "stall")
    assert all(t <= stalled_at for t, _ in conv.sent)
    assert "never" not in json.dumps(conv.sent_messages())
    assert conv.received_messages("user_activity")
    assert conv.closed_by == "client"


async def test_audio_pacing_follows_realtime_factor() -> None:
    async def spread(realtime_factor: float) -> float:
        script = AgentScript(steps=[Say("x", seconds=1.0), Close(1000)], realtime_factor=realtime_factor)
        async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
            await initiate(ws)
            await drain(ws)
        times = [t for t, m in agent.conversations[0].sent if isinstance(m, dict) and m["type"] == "audio"]
        assert len(times) == 4
        return times[-1] - times[0]

    assert 0.15 <= await spread(4.0) < 0.45  # 3 chunk intervals of 250 ms / 4
    assert await spread(INF) < 0.05


async def test_end_call_sequence() -> None:
    script = AgentScript(
        steps=[EndCall("Bye {{name}}!", seconds=0.1, close_delay=0.1, tool_request=True)], realtime_factor=INF
    )
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws, dynamic_variables={"name": "Ann"})
        frames, closed = await drain(ws)
    assert [f["type"] for f in frames] == [
        "agent_response",
        "audio",
        "agent_tool_request",
        "agent_tool_response",
    ]
    assert frames[0]["agent_response_event"]["agent_response"] == "Bye Ann!"
    tool = frames[-1]["agent_tool_response"]
    assert tool == {
        "tool_name": "end_call",
        "tool_call_id": frames[-2]["agent_tool_request"]["tool_call_id"],
        "tool_type": "system",
        "is_error": False,
        "is_called": True,
        "event_id": frames[0]["agent_response_event"]["event_id"],
    }
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (
        1000,
        "Agent ended the conversation",
    )


async def test_text_substitution_and_client_events_filter() -> None:
    script = AgentScript(
        steps=[Say("Hi {{user}} on {{system__agent_id}} {{unknown}}", seconds=0.05), Close(1000)],
        client_events=frozenset({"conversation_initiation_metadata", "audio"}),
        realtime_factor=INF,
    )
    async with AgentEmulator(script) as agent:
        async with ws_connect(agent.ws_url("ag1")) as ws:
            await initiate(ws, dynamic_variables={"user": "Bo"})
            frames, _ = await drain(ws)
        [conv] = agent.conversations
    assert [f["type"] for f in frames] == ["audio"]  # agent_response filtered out
    assert any("'Hi Bo on ag1 {{unknown}}'" in text for _, text in conv.step_log)


def test_only_loopback_addresses() -> None:
    for host in ["0.0.0.0", "192.168.1.10", "example.com"]:
        with pytest.raises(ValueError):
            AgentEmulator(AgentScript(), host=host)
    assert AgentEmulator(AgentScript(), host="localhost").host == "127.0.0.1"
    with pytest.raises(ValueError):
        AgentScript(output_format="mp3_44100")


# The server side of the contract, transcribed from agent.asyncapi.yaml: required fields of
# every event the emulator can send, with their JSON types.
SERVER_SHAPES: dict[str, tuple[str, dict[str, tuple[type, ...]]]] = {
    "conversation_initiation_metadata": (
        "conversation_initiation_metadata_event",
        {"conversation_id": (str,), "agent_output_audio_format": (str,), "user_input_audio_format": (str,)},
    ),
    "audio": ("audio_event", {"audio_base_64": (str,), "event_id": (int,)}),
    "agent_response": ("agent_response_event", {"agent_response": (str,), "event_id": (int,)}),
    "agent_response_correction": (
        "agent_response_correction_event",
        {"original_agent_response": (str,), "corrected_agent_response": (str,), "event_id": (int,)},
    ),
    "user_transcript": ("user_transcription_event", {"user_transcript": (str,), "event_id": (int,)}),
    "interruption": ("interruption_event", {"event_id": (int,)}),
    "ping": ("ping_event", {"event_id": (int,), "ping_ms": (int, type(None))}),
    "client_tool_call": (
        "client_tool_call",
        {"tool_name": (str,), "tool_call_id": (str,), "parameters": (dict,), "event_id": (int,)},
    ),
    "agent_tool_request": (
        "agent_tool_request",
        {"tool_name": (str,), "tool_call_id": (str,), "tool_type": (str,), "event_id": (int,)},
    ),
    "agent_tool_response": (
        "agent_tool_response",
        {
            "tool_name": (str,),
            "tool_call_id": (str,),
            "tool_type": (str,),
            "is_error": (bool,),
            "is_called": (bool,),
            "event_id": (int,),
        },
    ),
    "error": ("error_event", {"code": (int,)}),
}


def check_server_message(message: dict[str, Any]) -> None:
    body_key, fields = SERVER_SHAPES[message["type"]]
    body = message[body_key]
    for name, types in fields.items():
        assert isinstance(body[name], types), (message["type"], name, body[name])
    if message["type"] == "error":
        assert body["code"] in (1000, 1002, 1008, 1011)
        assert body.get("error_type") in (None, "max_duration_exceeded", "llm_error", "invalid_message")


async def test_everything_sent_matches_the_contract() -> None:
    script = AgentScript(
        steps=[
            Say("one", seconds=0.1),
            UserTranscript("two"),
            ClientToolCall("t", {"k": [1, 2]}, wait=False),
            Interrupt(stale_chunks=1, correction="on"),
            Ping(),
            EndCall(seconds=0.05, close_delay=0, tool_request=True),
        ],
        output_format="pcm_24000",
        realtime_factor=INF,
    )
    async with AgentEmulator(script) as agent, ws_connect(agent.ws_url("a")) as ws:
        await initiate(ws)
        await drain(ws)
    conv = agent.conversations[0]
    messages = conv.sent_messages()
    assert {m["type"] for m in messages} == set(SERVER_SHAPES) - {"error"}
    for message in messages:
        check_server_message(message)
    # Event ids never go backwards between agent turns (audio may repeat an older one only
    # as stale audio right after an interruption).
    turn_ids = [
        m[SERVER_SHAPES[m["type"]][0]]["event_id"]
        for m in messages
        if m["type"] in ("agent_response", "user_transcript", "client_tool_call")
    ]
    assert turn_ids == sorted(set(turn_ids))


# --------------------------------------------------------------------------------------------
# 3. Nothing is left behind
# --------------------------------------------------------------------------------------------


async def _scenario(
    script: AgentScript, client: Callable[[ClientConnection], Awaitable[None]]
) -> EmulatedConversation:
    async with AgentEmulator(script, close_timeout=0.3) as agent:
        async with ws_connect(agent.ws_url("a"), ping_interval=None) as ws:
            await client(ws)
        [conv] = agent.conversations
    await assert_no_tasks()
    assert conv.closed.is_set() and conv.errors == []
    return conv


async def test_no_task_left_after_each_scenario() -> None:
    async def until_closed(ws: ClientConnection) -> None:
        await initiate(ws)
        await drain(ws)

    async def leave_early(ws: ClientConnection) -> None:
        await initiate(ws)
        await recv_json(ws)

    async def send_garbage(ws: ClientConnection) -> None:
        await initiate(ws)
        await ws.send("{nope")
        await drain(ws)

    pinging = {"ping_interval": 0.02, "realtime_factor": INF}
    conv = await _scenario(
        AgentScript(steps=[Say("a", seconds=0.1), EndCall(close_delay=0)], **pinging), until_closed
    )
    assert conv.closed_by == "server"
    conv = await _scenario(AgentScript(steps=[Say("a", seconds=0.1), Drop()], **pinging), until_closed)
    assert conv.closed_by == "drop"
    conv = await _scenario(AgentScript(steps=[Say("a", seconds=0.1), Stall()], **pinging), leave_early)
    assert conv.closed_by == "client"
    conv = await _scenario(AgentScript(steps=[Say("a", seconds=3.0)], realtime_factor=1.0), leave_early)
    assert conv.closed_by == "client"  # left mid-sentence
    conv = await _scenario(AgentScript(steps=[ClientToolCall("t", timeout=5)], **pinging), leave_early)
    assert conv.closed_by == "client"  # left while the agent waited for a tool result
    conv = await _scenario(AgentScript(steps=[Sleep(5)]), send_garbage)
    assert (conv.closed_by, conv.close_code) == ("server", 1008)
    conv = await _scenario(AgentScript(send_metadata=False), lambda ws: ws.send("{}"))
    assert conv.closed_by == "client"


async def test_stop_with_clients_still_connected() -> None:
    agent = AgentEmulator(AgentScript(ping_interval=0.02), close_timeout=0.3)
    await agent.start()
    # One polite client, which answers the closing handshake ...
    polite = await ws_connect(agent.ws_url("a"), ping_interval=None)
    await initiate(polite)
    # ... and one that completed the upgrade by hand and then never reads again.
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write(
        b"GET /v1/convai/conversation?agent_id=b HTTP/1.1\r\nHost: x\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    await agent.wait_for_conversations(2)

    start = time.monotonic()
    await agent.stop()
    assert time.monotonic() - start < 1.5
    with pytest.raises(ConnectionClosed):
        while True:
            await polite.recv()
    assert polite.close_code == 1001
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()

    first, second = agent.conversations
    assert (first.closed_by, first.close_code) == ("server", 1001)
    assert second.closed.is_set()
    await assert_no_tasks()


async def test_a_connection_task_cancelled_before_it_ran_leaves_no_unawaited_coroutine() -> None:
    # The connection closed in the same turn of the loop as a task (the pinger, the script) was
    # spawned: no "coroutine ... was never awaited" warning (it reached the demo's stderr).
    from callbridge.emulators.elevenlabs.connection import Connection

    script = AgentScript(steps=[], ping_interval=0.01)
    conv = EmulatedConversation(0, "agent", "conv_x", {}, {}, script)
    conn = Connection(None, conv)  # type: ignore[arg-type]  # the socket is never touched here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn._spawn(conn._ping_loop(0.01), "ping")
        await conn._tasks.cancel_all()
        gc.collect()
    assert [str(w.message) for w in caught] == []
