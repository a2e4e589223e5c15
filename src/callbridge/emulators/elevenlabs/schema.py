"""Client message validation: schemas transcribed from ``agent.asyncapi.yaml``, and their checker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

__all__ = ["CLIENT_SCHEMAS", "SERVER_EVENT_TYPES", "Schema", "schema_problems", "short"]

Schema: TypeAlias = dict[str, Any]

_LANGUAGES: Final = (
    "en ja zh de hi fr ko pt pt-br it es id nl tr pl sv bg ro ar cs el fi ms da ta uk ru hu hr sk "
    "no vi tl af hy as az be bn bs ca et gl ka gu ha he is ga jv kn kk ky lv lt lb mk ml mr ne ps "
    "fa pa sr sd sl so sw te th ur cy"
).split()

#: ``ClientEvent``: event types a client may ask the server for.
SERVER_EVENT_TYPES: Final = frozenset(
    (
        "audio agent_response agent_response_correction agent_chat_response_part "
        "agent_reasoning_response_part interruption user_transcript tentative_user_transcript "
        "conversation_initiation_metadata client_tool_call rich_content agent_tool_request "
        "agent_tool_response agent_tool_response_full_payload mcp_tool_call mcp_connection_status "
        "vad_score ping context_usage asr_initiation_metadata guardrail_triggered "
        "internal_turn_probability internal_tentative_agent_response agent_typing "
        "external_agent_connected external_agent_disconnected"
    ).split()
)

_STR: Final[Schema] = {"type": "string"}
_NULLABLE_STR: Final[Schema] = {"type": "string", "nullable": True}
_OBJECT: Final[Schema] = {"type": "object"}


def _typed(type_: str, required: Sequence[str] = (), **properties: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["type", *required],
        "properties": {"type": {"const": type_}, **properties},
    }


_USER_MESSAGE: Final = _typed("user_message", text=_NULLABLE_STR, rich_content_id=_STR)

_CONFIG_OVERRIDE: Final[Schema] = {
    "type": "object",
    "properties": {
        "agent": {
            "type": "object",
            "properties": {
                "first_message": _NULLABLE_STR,
                "language": {"type": "string", "enum": _LANGUAGES, "nullable": True},
                "prompt": {
                    "type": "object",
                    "nullable": True,
                    "properties": {"prompt": _NULLABLE_STR, "llm": _NULLABLE_STR},
                },
                "native_mcp_server_ids": {
                    "type": "array",
                    "nullable": True,
                    "maxItems": 10,
                    "items": _STR,
                },
            },
        },
        "asr": {
            "type": "object",
            "properties": {"keywords": {"type": "array", "nullable": True, "items": _STR}},
        },
        "tts": {
            "type": "object",
            "properties": {
                "voice_id": _NULLABLE_STR,
                "stability": {"type": "number", "nullable": True, "minimum": 0, "maximum": 1},
                "speed": {"type": "number", "nullable": True, "minimum": 0.7, "maximum": 5},
                "similarity_boost": {"type": "number", "nullable": True, "minimum": 0, "maximum": 1},
            },
        },
        "conversation": {
            "type": "object",
            "properties": {
                "text_only": {"type": "boolean", "nullable": True},
                "client_events": {
                    "type": "array",
                    "nullable": True,
                    "minItems": 1,
                    "items": {"type": "string", "enum": sorted(SERVER_EVENT_TYPES)},
                },
            },
        },
    },
}

CLIENT_SCHEMAS: Final[Mapping[str, Schema]] = {
    "pong": _typed("pong", ["event_id"], event_id={"type": "integer"}),
    "user_message": _USER_MESSAGE,
    "user_activity": _typed("user_activity"),
    "feedback": _typed(
        "feedback",
        ["event_id", "score"],
        event_id={"type": "integer"},
        score={"type": "string", "enum": ["like", "dislike"], "nullable": True},
    ),
    "client_tool_result": _typed(
        "client_tool_result",
        ["tool_call_id", "result", "is_error"],
        tool_call_id=_STR,
        result=_STR,
        is_error={"type": "boolean"},
    ),
    "mcp_tool_approval_result": _typed(
        "mcp_tool_approval_result",
        ["tool_call_id", "is_approved"],
        tool_call_id=_STR,
        is_approved={"type": "boolean"},
    ),
    "contextual_update": _typed("contextual_update", ["text"], text=_STR, context_id=_STR),
    "conversation_initiation_client_data": _typed(
        "conversation_initiation_client_data",
        conversation_config_override=_CONFIG_OVERRIDE,
        custom_llm_extra_body=_OBJECT,
        # The public docs narrow the values: strings, numbers or booleans.
        dynamic_variables={
            "type": "object",
            "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
        },
        user_id=_NULLABLE_STR,
        source_info={"type": "object", "properties": {"source": _NULLABLE_STR, "version": _NULLABLE_STR}},
        tool_mock_config={
            "type": "object",
            "properties": {
                "mocking_strategy": {"type": "string", "enum": ["none", "all", "selected"]},
                "mocked_tool_names": {"type": "array", "items": _STR},
                "fallback_strategy": {"type": "string", "enum": ["raise_error", "call_real_tool"]},
            },
        },
    ),
    "multimodal_message": _typed(
        "multimodal_message",
        text={**_USER_MESSAGE, "nullable": True},
        file={
            "type": "object",
            "nullable": True,
            "required": ["type", "file_id"],
            "properties": {"type": {"const": "file_input"}, "file_id": _STR},
        },
    ),
}

_JSON_TYPES: Final[Mapping[str, Callable[[Any], bool]]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_problems(value: Any, schema: Schema, path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON-Schema subset the contract uses)."""
    if value is None and schema.get("nullable"):
        return []
    if "anyOf" in schema:
        if any(not schema_problems(value, s, path) for s in schema["anyOf"]):
            return []
        return [f"{path}: {short(value)} matches none of the allowed shapes"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: expected {schema['const']!r}, got {short(value)}"]
    type_ = schema.get("type")
    if type_ is not None and not _JSON_TYPES[type_](value):
        return [f"{path}: expected {type_}, got {short(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {short(value)} is not an allowed value"]
    problems: list[str] = []
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                problems.append(f"{path}: missing required field {name!r}")
        extra: Schema | None = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                problems += schema_problems(item, properties[name], f"{path}.{name}")
            elif extra is not None:
                problems += schema_problems(item, extra, f"{path}.{name}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += schema_problems(item, schema["items"], f"{path}[{i}]")
    return problems


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
