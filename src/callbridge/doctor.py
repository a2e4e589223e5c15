"""`callbridge doctor`: check a deployment before the first real call, one line per check.

Reads the settings, then asks the real APIs (the emulators in tests, which implement the same
endpoints): the ElevenLabs agent's configuration (`GET /v1/convai/agents/{agent_id}`, key in
`xi-api-key`): its audio formats, the `end_call` system tool, the client events callbridge
relies on, the overrides and dynamic variables it sends; the Twilio account and each of its
numbers (official SDK); the public URL. Each check is ✓ (fine), ! (works, or cannot be
told, with what to know) or ✗ (a call will fail or misbehave; the fix in words). Any ✗ makes
the command exit 1. Field names and their sources: specs/first-call-preflight.md.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx

from callbridge.config import Settings
from callbridge.numbers import (
    INBOUND_PATH,
    STATUS_PATH,
    NumbersError,
    describe_route,
    fetch_account_status,
    list_numbers,
)

__all__ = ["CALLBRIDGE_VARIABLES", "Check", "main_doctor", "render", "run_doctor", "to_json"]

Status = Literal["ok", "warn", "fail"]
MARKS: dict[str, str] = {"ok": "✓", "warn": "!", "fail": "✗"}

# Dynamic variables callbridge sends with every conversation (agents/elevenlabs/session.py).
CALLBRIDGE_VARIABLES = frozenset({"call_sid", "stream_sid", "caller_id", "called_number", "call_direction"})
# Client events the bridge cannot work without, and those it uses when they are on.
REQUIRED_EVENTS = {
    "audio": "the agent's speech: without it the caller hears nothing",
    "interruption": "barge-in: without it the agent's queued audio keeps playing over the caller",
}
USEFUL_EVENTS = {
    "agent_tool_response": "end_call is seen the moment it fires (without it the agent's close still "
    "ends the call, a little later)",
    "user_transcript": "the caller's words in the call records",
    "agent_response": "the agent's words in the call records",
}
_VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
AGENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str

    @property
    def mark(self) -> str:
        return MARKS[self.status]


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


# -- ElevenLabs ------------------------------------------------------------------------------


async def _fetch_agent(settings: Settings, http: httpx.AsyncClient) -> tuple[Check, dict[str, Any] | None]:
    agent_id = settings.elevenlabs_agent_id
    if not settings.elevenlabs_api_key:
        return Check(
            "elevenlabs.agent",
            "warn",
            f"agent {agent_id}: not read (reading an agent's settings takes ELEVENLABS_API_KEY): "
            "set it to let doctor check the agent; a private agent needs it for calls too",
        ), None
    url = f"{settings.elevenlabs_api_base_url.rstrip('/')}/v1/convai/agents/{agent_id}"
    try:
        resp = await http.get(url, headers={"xi-api-key": settings.elevenlabs_api_key}, timeout=AGENT_TIMEOUT)
    except httpx.HTTPError as exc:
        return Check(
            "elevenlabs.agent",
            "fail",
            f"cannot reach the ElevenLabs API at {settings.elevenlabs_api_base_url} ({type(exc).__name__}): "
            "check ELEVENLABS_API_BASE_URL and this machine's outbound HTTPS",
        ), None
    if resp.status_code == 401:
        return Check(
            "elevenlabs.agent",
            "fail",
            "ElevenLabs refused ELEVENLABS_API_KEY (HTTP 401): create a key in the ElevenLabs "
            "dashboard (Developers, API keys) with access to the Agents Platform",
        ), None
    if resp.status_code in (403, 404, 422):
        return Check(
            "elevenlabs.agent",
            "fail",
            f"no agent {agent_id} for this key (HTTP {resp.status_code}): copy the agent ID from the "
            "agent's page (agent_...) into ELEVENLABS_AGENT_ID, and use a key of the same workspace",
        ), None
    try:
        config = resp.json() if resp.status_code == 200 else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        return Check(
            "elevenlabs.agent",
            "fail",
            f"the ElevenLabs API answered HTTP {resp.status_code} without an agent: try again later",
        ), None
    name = config.get("name") or "(no name)"
    return Check(
        "elevenlabs.agent", "ok", f"agent {agent_id} ({name}) is readable with the key given"
    ), config


def _format_check(name: str, value: Any, where: str, setting: str) -> Check:
    if value == "ulaw_8000":
        return Check(name, "ok", f"{where} is ulaw_8000: passed through untouched")
    if isinstance(value, str) and re.fullmatch(r"pcm_(8000|16000|22050|24000|44100|48000)", value):
        cost = (
            "G.711 to and from PCM on every frame: a little CPU per call"
            if value == "pcm_8000"
            else "G.711 and resampling on every frame: CPU per call, and the resampler delays the "
            "audio by tens of ms (BENCHMARKS.md)"
        )
        return Check(
            name,
            "warn",
            f"{where} is {value}: works, converted ({cost}); set {setting} to μ-law 8000 Hz to pass "
            "audio through untouched",
        )
    shown = value if value is not None else "not set (the API's default is pcm_16000)"
    return Check(
        name, "warn" if value is None else "fail", f"{where} is {shown}: set {setting} to μ-law 8000 Hz"
    )


def _end_call_check(config: Mapping[str, Any]) -> Check:
    prompt = _get(config, "conversation_config", "agent", "prompt") or {}
    built_in = _get(prompt, "built_in_tools", "end_call")
    legacy = [
        t
        for t in (prompt.get("tools") or [])
        if isinstance(t, Mapping)
        and t.get("type") == "system"
        and (t.get("name") == "end_call" or _get(t, "params", "system_tool_type") == "end_call")
    ]
    if built_in or legacy:
        return Check("elevenlabs.end_call", "ok", "the End call system tool is on: the agent can hang up")
    return Check(
        "elevenlabs.end_call",
        "fail",
        "the agent has no End call system tool, so it can never hang up (calls end only when the "
        "caller does, or on a timeout): add it in the agent's Tools, System tools, End call",
    )


def _events_check(config: Mapping[str, Any], tools: Iterable[str]) -> list[Check]:
    events = _get(config, "conversation_config", "conversation", "client_events")
    if not isinstance(events, list):
        return [
            Check("elevenlabs.client_events", "warn", "the agent's client events are not listed: cannot tell")
        ]
    have = set(events)
    checks = []
    missing = [e for e in REQUIRED_EVENTS if e not in have]
    if missing:
        why = "; ".join(f"{e}: {REQUIRED_EVENTS[e]}" for e in missing)
        checks.append(
            Check(
                "elevenlabs.client_events",
                "fail",
                f"client events {', '.join(missing)} are off ({why}): turn them on in the agent's "
                "Advanced settings, Client events",
            )
        )
    else:
        checks.append(Check("elevenlabs.client_events", "ok", "client events audio and interruption are on"))
    off = [e for e in USEFUL_EVENTS if e not in have]
    if tools and "client_tool_call" not in have:
        checks.append(
            Check(
                "elevenlabs.client_tool_call",
                "fail",
                "client tools are registered but the client_tool_call event is off: the agent's tool "
                "calls never reach callbridge; turn it on in Advanced settings, Client events",
            )
        )
    for event in off:
        checks.append(
            Check(
                f"elevenlabs.{event}",
                "warn",
                f"client event {event} is off: {USEFUL_EVENTS[event]}; turn it on in Advanced settings, "
                "Client events",
            )
        )
    return checks


def _paths(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_paths(value, path + "."))
        else:
            out.append(path)
    return out


def _overrides_check(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Check:
    sent = _paths(overrides)
    if not sent:
        return Check("elevenlabs.overrides", "ok", "callbridge sends no overrides (none to allow)")
    allowed = _get(config, "platform_settings", "overrides", "conversation_config_override") or {}
    refused = [p for p in sent if _get(allowed, *p.split(".")) is not True]
    if refused:
        return Check(
            "elevenlabs.overrides",
            "fail",
            f"callbridge overrides {', '.join(refused)} but the agent does not allow it (the "
            "conversation is refused): allow them in the agent's Security settings, Overrides, or "
            "stop sending them",
        )
    return Check(
        "elevenlabs.overrides", "ok", f"the overrides callbridge sends are allowed: {', '.join(sent)}"
    )


def _variables_check(config: Mapping[str, Any], sent: Iterable[str]) -> Check:
    agent = _get(config, "conversation_config", "agent") or {}
    texts = [agent.get("first_message") or "", _get(agent, "prompt", "prompt") or ""]
    used = {m for text in texts if isinstance(text, str) for m in _VARIABLE.findall(text)}
    defaults = _get(agent, "dynamic_variables", "dynamic_variable_placeholders") or {}
    given = set(sent) | set(defaults)
    missing = sorted(v for v in used if v not in given and not v.startswith("system__"))
    if missing:
        return Check(
            "elevenlabs.dynamic_variables",
            "warn",
            f"the agent's prompt or first message uses {', '.join(missing)}, which callbridge does not "
            f"send and which have no default: pass them per call (--var / dynamic_variables) or give "
            f"them a default in the agent (callbridge sends {', '.join(sorted(sent))})",
        )
    return Check(
        "elevenlabs.dynamic_variables",
        "ok",
        "every dynamic variable the prompt and first message use is sent by callbridge or has a default",
    )


async def check_agent(
    settings: Settings,
    http: httpx.AsyncClient,
    overrides: Mapping[str, Any] | None = None,
    variables: Iterable[str] = (),
    tools: Iterable[str] = (),
) -> list[Check]:
    first, config = await _fetch_agent(settings, http)
    if config is None:
        return [first]
    convai = config.get("conversation_config") or {}
    return [
        first,
        _format_check(
            "elevenlabs.input_format",
            _get(convai, "asr", "user_input_audio_format"),
            "the agent's input (user audio) format",
            "Advanced, User input audio format",
        ),
        _format_check(
            "elevenlabs.output_format",
            _get(convai, "tts", "agent_output_audio_format"),
            "the agent's output (TTS) format",
            "Voice, TTS output format",
        ),
        _end_call_check(config),
        *_events_check(config, tools),
        _overrides_check(config, overrides or {}),
        _variables_check(config, CALLBRIDGE_VARIABLES | set(variables)),
    ]


# -- Twilio ----------------------------------------------------------------------------------


async def check_twilio(settings: Settings) -> list[Check]:
    try:
        status = await fetch_account_status(settings)
    except NumbersError as exc:
        return [Check("twilio.credentials", "fail", str(exc))]
    checks = []
    if status == "active":
        checks.append(Check("twilio.credentials", "ok", f"account {settings.twilio_account_sid} is active"))
    else:
        checks.append(
            Check(
                "twilio.credentials",
                "fail",
                f"account {settings.twilio_account_sid} is {status or 'in an unknown state'}: "
                "calls cannot be made or answered; see the Twilio console",
            )
        )
    if not settings.public_url:
        checks.append(
            Check(
                "twilio.numbers",
                "warn",
                "numbers not checked: set CALLBRIDGE_PUBLIC_URL to this server's URL",
            )
        )
        return checks
    try:
        numbers = await list_numbers(settings)
    except NumbersError as exc:
        return [*checks, Check("twilio.numbers", "fail", str(exc))]
    inbound = settings.public(INBOUND_PATH)
    ours = 0
    for number in numbers:
        status_, meaning = describe_route(number, settings)
        if status_ == "ok":
            ours += 1
            if number.status_callback != settings.public(STATUS_PATH):
                status_, meaning = (
                    "warn",
                    (
                        f"{meaning}; its status callback is {number.status_callback or 'not set'}, not "
                        f"{settings.public(STATUS_PATH)}: calls work, but a call whose stream never connects "
                        f"is noticed later (`callbridge numbers connect {number.phone_number}` sets both)"
                    ),
                )
        checks.append(
            Check(f"twilio.number {number.phone_number}", status_, f"{number.phone_number}: {meaning}")
        )
    if ours == 0:
        checks.append(
            Check(
                "twilio.numbers",
                "fail",
                f"no number of the account sends its calls to {inbound}: "
                "`callbridge numbers connect +1...` points one here",
            )
        )
    return checks


# -- the public URL --------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


async def check_public_url(settings: Settings, http: httpx.AsyncClient) -> list[Check]:
    url = settings.public_url
    if not url:
        return [
            Check(
                "public_url",
                "fail",
                "CALLBRIDGE_PUBLIC_URL is not set: the https URL Twilio reaches this server at "
                "(a tunnel such as cloudflared or ngrok, or your reverse proxy)",
            )
        ]
    host = httpx.URL(url).host
    checks = []
    if _is_loopback(host):
        checks.append(
            Check(
                "public_url",
                "warn",
                f"{url} is a loopback address: Twilio cannot reach it (fine with the emulators); "
                "start a tunnel and use its https URL",
            )
        )
    elif not url.startswith("https://"):
        checks.append(
            Check("public_url", "fail", f"{url} is not https: Twilio needs https:// (and wss:// streams)")
        )
    try:
        resp = await http.get(url.rstrip("/") + "/healthz", timeout=5.0)
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    except (httpx.HTTPError, ValueError) as exc:
        checks.append(
            Check(
                "public_url.reachable",
                "fail",
                f"{url}/healthz does not answer from here ({type(exc).__name__}): start "
                "`callbridge serve` and the tunnel, then run doctor again",
            )
        )
        return checks
    if isinstance(body, dict) and body.get("status") in ("ok", "draining"):
        where = "from here" if _is_loopback(host) else "through the public URL (from this machine)"
        checks.append(Check("public_url.reachable", "ok", f"a callbridge server answers {where}"))
    else:
        checks.append(
            Check(
                "public_url.reachable",
                "fail",
                f"{url}/healthz answered HTTP {resp.status_code}, not callbridge: the tunnel or proxy "
                "must forward to the port `callbridge serve` listens on",
            )
        )
    return checks


# -- all of it -------------------------------------------------------------------------------


async def run_doctor(
    settings: Settings,
    *,
    overrides: Mapping[str, Any] | None = None,
    variables: Iterable[str] = (),
    tools: Iterable[str] = (),
) -> list[Check]:
    """Every check, in a fixed order. `overrides`, `variables` and `tools` are what this
    deployment sends beyond callbridge's own (the server sends no overrides)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        checks = await check_agent(settings, http, overrides, variables, tools)
        checks += await check_twilio(settings)
        checks += await check_public_url(settings, http)
    return checks


def render(checks: Sequence[Check]) -> str:
    lines = [f"{c.mark} {c.message}" for c in checks]
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(
        f"{failed} problem{'s' if failed != 1 else ''} to fix, {warned} to know about"
        if failed or warned
        else "all good: call your number"
    )
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        {"ok": not any(c.status == "fail" for c in checks), "checks": [asdict(c) for c in checks]}, indent=2
    )


def main_doctor(settings: Settings, as_json: bool = False) -> int:
    """Run every check and print them; exit status 1 when any failed."""
    checks = asyncio.run(run_doctor(settings))
    print(to_json(checks) if as_json else render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
