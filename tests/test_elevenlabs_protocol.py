"""ElevenLabs Agents protocol, checked with message shapes from the AsyncAPI spec."""

from __future__ import annotations

import base64
import json

from callbridge.agents.base import (
    AgentAudio,
    AgentInterrupted,
    AgentReady,
    AgentToolUsed,
    AgentTranscript,
    AgentWarning,
    ToolCallRequest,
)
from callbridge.agents.elevenlabs.protocol import ElevenLabsProtocol, close_outcome
from callbridge.formats import parse_format


def msg(kind: str, key: str, **body: object) -> str:
    return json.dumps({"type": kind, key: body})


def audio(event_id: int, data: bytes = b"\x01\x02") -> str:
    return msg("audio", "audio_event", audio_base_64=base64.b64encode(data).decode(), event_id=event_id)


def test_metadata_gives_formats() -> None:
    p = ElevenLabsProtocol()
    ev = p.receive(
        msg(
            "conversation_initiation_metadata",
            "conversation_initiation_metadata_event",
            conversation_id="conv_123456789",
            agent_output_audio_format="pcm_16000",
            user_input_audio_format="ulaw_8000",
        )
    )
    assert ev == AgentReady("conv_123456789", parse_format("ulaw_8000"), parse_format("pcm_16000"))


def test_metadata_with_unknown_format_is_rejected() -> None:
    ev = ElevenLabsProtocol().receive(
        msg(
            "conversation_initiation_metadata",
            "conversation_initiation_metadata_event",
            conversation_id="c",
            agent_output_audio_format="mp3_44100",
            user_input_audio_format="ulaw_8000",
        )
    )
    assert isinstance(ev, AgentWarning)


def test_ping_queues_pong_with_same_event_id() -> None:
    p = ElevenLabsProtocol()
    assert p.receive(msg("ping", "ping_event", event_id=42, ping_ms=None)) is None
    assert [json.loads(f) for f in p.outbox] == [{"type": "pong", "event_id": 42}]


def test_interruption_drops_audio_at_or_below_its_event_id() -> None:
    p = ElevenLabsProtocol()
    assert isinstance(p.receive(audio(3)), AgentAudio)
    assert p.receive(msg("interruption", "interruption_event", event_id=3)) == AgentInterrupted()
    assert p.receive(audio(3)) is None
    assert p.receive(audio(2)) is None
    assert p.stale_audio_dropped == 2
    ev = p.receive(audio(4, b"\x09"))
    assert isinstance(ev, AgentAudio) and ev.payload == b"\x09"


def test_transcripts_tools_and_end_call() -> None:
    p = ElevenLabsProtocol()
    assert p.receive(msg("agent_response", "agent_response_event", agent_response="Hi", event_id=1)) == (
        AgentTranscript("agent", "Hi")
    )
    assert p.receive(
        msg("user_transcript", "user_transcription_event", user_transcript="Hello", event_id=2)
    ) == AgentTranscript("user", "Hello")
    corr = p.receive(
        msg(
            "agent_response_correction",
            "agent_response_correction_event",
            original_agent_response="Monday at ten is",
            corrected_agent_response="Monday at",
            event_id=3,
        )
    )
    assert corr == AgentTranscript("agent", "Monday at", corrects="Monday at ten is")
    call = p.receive(
        msg(
            "client_tool_call",
            "client_tool_call",
            tool_name="t",
            tool_call_id="id1",
            parameters={"a": 1},
            event_id=4,
        )
    )
    assert call == ToolCallRequest("id1", "t", {"a": 1})
    end = p.receive(
        msg(
            "agent_tool_response",
            "agent_tool_response",
            tool_name="end_call",
            tool_call_id="x",
            tool_type="system",
            is_error=False,
            is_called=True,
            event_id=5,
        )
    )
    assert isinstance(end, AgentToolUsed) and end.ends_call and p.end_call_seen


def test_client_messages_match_spec_shapes() -> None:
    init = json.loads(
        ElevenLabsProtocol.initiation({"caller_id": "+1555"}, {"agent": {"first_message": "Hi"}})
    )
    assert init["type"] == "conversation_initiation_client_data"
    assert init["dynamic_variables"] == {"caller_id": "+1555"}
    assert init["conversation_config_override"] == {"agent": {"first_message": "Hi"}}
    assert json.loads(ElevenLabsProtocol.user_audio("AAEC")) == {"user_audio_chunk": "AAEC"}
    assert json.loads(ElevenLabsProtocol.tool_result("id", "ok", False)) == {
        "type": "client_tool_result",
        "tool_call_id": "id",
        "result": "ok",
        "is_error": False,
    }


def test_error_event_explains_the_close() -> None:
    p = ElevenLabsProtocol()
    ev = p.receive(
        msg("error", "error_event", code=1002, error_type="llm_timeout", reason="LLM took too long")
    )
    assert isinstance(ev, AgentWarning)
    closed = close_outcome(1002, "", p.last_error)
    assert not closed.by_agent and "llm_timeout" in closed.detail
    assert close_outcome(1000, "", None).by_agent
    dropped = close_outcome(None, "", None)
    assert not dropped.by_agent and dropped.code is None


def test_bad_input_becomes_warnings() -> None:
    p = ElevenLabsProtocol()
    for frame in [
        "{nope",
        "7",
        b"\x00",
        '{"type": "audio"}',
        '{"type": "audio", "audio_event": {"audio_base_64": "%%%", "event_id": 1}}',
        '{"type": "ping", "ping_event": {}}',
        '{"type": "client_tool_call", "client_tool_call": {"tool_name": 3}}',
        '{"type": "from_the_future"}',
    ]:
        assert isinstance(p.receive(frame), AgentWarning), frame
    assert p.receive('{"type": "vad_score", "vad_score_event": {"vad_score": 0.5}}') is None
