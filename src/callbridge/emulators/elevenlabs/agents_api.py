"""``GET /v1/convai/agents/{agent_id}``: an agent's configuration, as the Agents API returns it.

Shaped after the API reference's ``GetAgentResponseModel`` (shared/specs/elevenlabs/
rest-and-webhooks.md; the repo's specs/first-call-preflight.md lists the sources): the audio
formats at ``conversation_config.asr.user_input_audio_format`` and
``conversation_config.tts.agent_output_audio_format``; the client events at
``conversation_config.conversation.client_events``; system tools at
``conversation_config.agent.prompt.built_in_tools`` (``end_call``: a tool config or null);
dynamic-variable defaults at ``conversation_config.agent.dynamic_variables
.dynamic_variable_placeholders``; what a client may override at
``platform_settings.overrides.conversation_config_override`` (booleans per field). The key goes
in ``xi-api-key``; a missing or wrong key is 401, an unknown agent 404.

Knobs for tests are the arguments of :meth:`AgentsApi.add`: formats, the end-call tool, the
client events, the fields that may be overridden, prompt and first message.
"""

from __future__ import annotations

import http
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["AGENTS_PATH", "DEFAULT_CLIENT_EVENTS", "AgentsApi"]

AGENTS_PATH: Final = "/v1/convai/agents/"

# What a new agent sends by default in the dashboard (agent_tool_response must be switched on).
DEFAULT_CLIENT_EVENTS: Final = (
    "conversation_initiation_metadata",
    "audio",
    "interruption",
    "user_transcript",
    "agent_response",
    "agent_response_correction",
    "ping",
)


def _system_tool(name: str) -> dict[str, Any]:
    return {
        "type": "system",
        "name": name,
        "description": "",
        "response_timeout_secs": 20,
        "params": {"system_tool_type": name},
    }


class AgentsApi:
    """Agent configurations by ID, and the answer to a GET of one."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        #: (agent_id, key given or None) of every GET, in order.
        self.requests: list[tuple[str, str | None]] = []

    def add(
        self,
        agent_id: str,
        *,
        input_format: str = "ulaw_8000",
        output_format: str = "ulaw_8000",
        end_call: bool = True,
        client_events: Iterable[str] = (*DEFAULT_CLIENT_EVENTS, "agent_tool_response"),
        overridable: Iterable[str] = (),
        prompt: str = "You are a helpful phone agent.",
        first_message: str = "Hello! How can I help?",
        placeholders: Mapping[str, str] | None = None,
        name: str = "Emulated agent",
    ) -> dict[str, Any]:
        """An agent; ``overridable`` names the fields a client may override, as
        ``section.field`` (``agent.first_message``, ``agent.prompt.prompt``, ``tts.voice_id``)."""
        override: dict[str, Any] = {
            "turn": {"soft_timeout_config": {"message": False}},
            "tts": {"voice_id": False, "stability": False, "speed": False, "similarity_boost": False},
            "conversation": {"text_only": False},
            "agent": {"first_message": False, "language": False, "prompt": {"prompt": False}},
        }
        for path in overridable:
            *parents, leaf = path.split(".")
            node = override
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = True
        config = {
            "agent_id": agent_id,
            "name": name,
            "conversation_config": {
                "asr": {"quality": "high", "provider": "elevenlabs", "user_input_audio_format": input_format},
                "turn": {"turn_timeout": 7.0},
                "tts": {"model_id": "eleven_flash_v2", "agent_output_audio_format": output_format},
                "conversation": {
                    "text_only": False,
                    "max_duration_seconds": 600,
                    "client_events": list(client_events),
                },
                "agent": {
                    "first_message": first_message,
                    "language": "en",
                    "dynamic_variables": {"dynamic_variable_placeholders": dict(placeholders or {})},
                    "prompt": {
                        "prompt": prompt,
                        "llm": "gemini-2.0-flash",
                        "tools": [],
                        "built_in_tools": {
                            "end_call": _system_tool("end_call") if end_call else None,
                            "language_detection": None,
                            "transfer_to_agent": None,
                            "transfer_to_number": None,
                            "skip_turn": None,
                            "play_keypad_touch_tone": None,
                            "voicemail_detection": None,
                        },
                    },
                },
            },
            "metadata": {"created_at_unix_secs": 1764000000},
            "platform_settings": {
                "overrides": {
                    "conversation_config_override": override,
                    "custom_llm_extra_body": False,
                    "enable_conversation_initiation_client_data_from_webhook": False,
                },
                "auth": {"enable_auth": False},
            },
            "phone_numbers": [],
            "access_info": {
                "is_creator": True,
                "creator_name": "emulator",
                "role": "admin",
                "creator_email": "emulator@example.invalid",
            },
            "tags": [],
            "version_id": "agtvrsn_" + secrets.token_hex(8),
        }
        self.agents[agent_id] = config
        return config

    def get(
        self, path: str, api_key_given: str | None, api_key_expected: str | None
    ) -> tuple[http.HTTPStatus, Any]:
        """The status and JSON body of ``GET path`` (a path under :data:`AGENTS_PATH`)."""
        agent_id = path[len(AGENTS_PATH) :].strip("/")
        self.requests.append((agent_id, api_key_given))
        if api_key_given is None:
            return http.HTTPStatus.UNAUTHORIZED, {
                "detail": {"status": "needs_authorization", "message": "Missing xi-api-key header"}
            }
        if api_key_expected is not None and api_key_given != api_key_expected:
            return http.HTTPStatus.UNAUTHORIZED, {
                "detail": {"status": "invalid_api_key", "message": "Invalid API key"}
            }
        config = self.agents.get(agent_id)
        if config is None or "/" in agent_id:
            return http.HTTPStatus.NOT_FOUND, {
                "detail": {"status": "agent_not_found", "message": f"Agent {agent_id} not found"}
            }
        return http.HTTPStatus.OK, config
