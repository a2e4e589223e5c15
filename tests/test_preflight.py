"""The first ten minutes: `callbridge doctor` against a misconfigured emulated agent, account or
number (each ✗ produced by the emulator, through the same endpoints the real APIs have),
`callbridge numbers connect` (what Twilio was told, before and after, and a call then reaching
the server), and the signature failure that says which URL was validated."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from callbridge.config import Settings
from callbridge.doctor import Check, run_doctor
from callbridge.emulators.elevenlabs import AgentEmulator
from callbridge.emulators.elevenlabs.agents_api import DEFAULT_CLIENT_EVENTS
from callbridge.emulators.twilio import TwilioEmulator, twilio_signature
from tests.serverkit import clean_env, running_server, settings_for, short_script

XI_KEY = "xi-test-key-0123456789"
AGENT_ID = "agent_doctor01"
NUMBER = "+15550002222"


@pytest.fixture
async def agent() -> AsyncIterator[AgentEmulator]:
    async with AgentEmulator(short_script(), api_key=XI_KEY) as emulator:
        yield emulator


def doctor_settings(twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path) -> Settings:
    return settings_for(
        twilio, agent, tmp_path / "calls.db", elevenlabs_agent_id=AGENT_ID, elevenlabs_api_key=XI_KEY
    )


def connect_here(twilio: TwilioEmulator, settings: Settings) -> None:
    twilio.phone_numbers.add(
        NUMBER,
        voice_url=settings.public("/twilio/inbound"),
        status_callback=settings.public("/twilio/status"),
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def failed(checks: list[Check]) -> list[str]:
    return [c.name for c in checks if c.status == "fail"]


async def doctor_on_a_connected_server(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path, **change: Any
) -> list[Check]:
    """`doctor` against a running server whose number points at it; `change`: the settings
    doctor is run with instead of the server's."""
    async with running_server(doctor_settings(twilio, agent, tmp_path)) as srv:
        connect_here(twilio, srv.settings)
        return await run_doctor(replace(srv.settings, **change))


async def test_a_well_configured_deployment_has_no_failure(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    agent.agents.add(AGENT_ID)
    checks = await doctor_on_a_connected_server(twilio, agent, tmp_path)
    assert failed(checks) == [], checks
    named = by_name(checks)
    for name in (
        "elevenlabs.agent",
        "elevenlabs.input_format",
        "elevenlabs.output_format",
        "elevenlabs.end_call",
        "elevenlabs.client_events",
        "elevenlabs.overrides",
        "elevenlabs.dynamic_variables",
        "twilio.credentials",
        f"twilio.number {NUMBER}",
        "public_url.reachable",
    ):
        assert named[name].status == "ok", named[name]
    assert named["public_url"].status == "warn" and "loopback" in named["public_url"].message
    # What crossed: the agent read once with the key; the account and its numbers listed.
    assert agent.agents.requests == [(AGENT_ID, XI_KEY)]
    paths = [(r.method, r.path) for r in twilio.requests]
    base = f"/2010-04-01/Accounts/{twilio.account_sid}"
    assert ("GET", f"{base}.json") in paths and ("GET", f"{base}/IncomingPhoneNumbers.json") in paths


AgentKnobs = dict[str, Any]


@pytest.mark.parametrize(
    ("knobs", "check", "status", "words"),
    [
        ({"end_call": False}, "elevenlabs.end_call", "fail", "End call"),
        (
            {"client_events": [e for e in DEFAULT_CLIENT_EVENTS if e != "interruption"]},
            "elevenlabs.client_events",
            "fail",
            "interruption",
        ),
        (
            {"client_events": [e for e in DEFAULT_CLIENT_EVENTS if e != "audio"]},
            "elevenlabs.client_events",
            "fail",
            "audio",
        ),
        ({"client_events": DEFAULT_CLIENT_EVENTS}, "elevenlabs.agent_tool_response", "warn", "end_call"),
        ({"output_format": "pcm_16000"}, "elevenlabs.output_format", "warn", "CPU"),
        ({"input_format": "pcm_44100"}, "elevenlabs.input_format", "warn", "μ-law 8000"),
        ({"first_message": "Hi {{customer}}!"}, "elevenlabs.dynamic_variables", "warn", "customer"),
    ],
)
async def test_each_agent_misconfiguration_is_named_with_its_fix(
    twilio: TwilioEmulator,
    agent: AgentEmulator,
    tmp_path: Path,
    knobs: AgentKnobs,
    check: str,
    status: str,
    words: str,
) -> None:
    agent.agents.add(AGENT_ID, **knobs)
    checks = await doctor_on_a_connected_server(twilio, agent, tmp_path)
    found = by_name(checks)[check]
    assert found.status == status and words in found.message, found
    assert failed(checks) == ([check] if status == "fail" else []), checks


async def test_overrides_the_agent_does_not_allow(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    agent.agents.add(AGENT_ID, overridable=["tts.voice_id"])
    sent = {"agent": {"first_message": "Hello from the bridge"}, "tts": {"voice_id": "v1"}}
    async with running_server(doctor_settings(twilio, agent, tmp_path)) as srv:
        connect_here(twilio, srv.settings)
        refused = by_name(await run_doctor(srv.settings, overrides=sent))["elevenlabs.overrides"]
        agent.agents.add(AGENT_ID, overridable=["tts.voice_id", "agent.first_message"])
        allowed = by_name(await run_doctor(srv.settings, overrides=sent))["elevenlabs.overrides"]
    assert refused.status == "fail" and "agent.first_message" in refused.message
    assert "tts.voice_id" not in refused.message.split("but")[0]
    assert allowed.status == "ok"


@pytest.mark.parametrize(
    ("change", "check", "words"),
    [
        ({"elevenlabs_api_key": "xi-wrong"}, "elevenlabs.agent", "HTTP 401"),
        ({"elevenlabs_agent_id": "agent_nosuch"}, "elevenlabs.agent", "no agent agent_nosuch"),
        ({"twilio_auth_token": "wrong-token"}, "twilio.credentials", "TWILIO_AUTH_TOKEN"),
        ({"elevenlabs_api_base_url": "http://127.0.0.1:9"}, "elevenlabs.agent", "cannot reach"),
        ({"twilio_api_base_url": "http://127.0.0.1:9"}, "twilio.credentials", "cannot reach"),
    ],
)
async def test_wrong_credentials_and_ids(
    twilio: TwilioEmulator,
    agent: AgentEmulator,
    tmp_path: Path,
    change: dict[str, str],
    check: str,
    words: str,
) -> None:
    agent.agents.add(AGENT_ID)
    checks = await doctor_on_a_connected_server(twilio, agent, tmp_path, **change)
    found = by_name(checks)[check]
    assert found.status == "fail" and words in found.message, found
    assert "wrong-token" not in json.dumps([c.message for c in checks])


async def test_numbers_pointed_elsewhere_or_almost_here(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    agent.agents.add(AGENT_ID)
    async with running_server(doctor_settings(twilio, agent, tmp_path)) as srv:
        twilio.phone_numbers.add("+15550003333", voice_url="https://elsewhere.example.com/voice")
        # This host, but a path the server does not validate: every signature would fail.
        twilio.phone_numbers.add("+15550004444", voice_url=srv.settings.public("/twilio/inbound/"))
        checks = by_name(await run_doctor(srv.settings))
        twilio.phone_numbers.account_status = "suspended"
        suspended = by_name(await run_doctor(srv.settings))["twilio.credentials"]
    assert checks["twilio.number +15550003333"].status == "warn"
    assert "elsewhere.example.com" in checks["twilio.number +15550003333"].message
    almost = checks["twilio.number +15550004444"]
    assert almost.status == "fail" and "not exactly" in almost.message, almost
    assert checks["twilio.numbers"].status == "fail" and "numbers connect" in checks["twilio.numbers"].message
    assert suspended.status == "fail" and "suspended" in suspended.message


async def test_a_public_url_nothing_answers(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    agent.agents.add(AGENT_ID)
    settings = replace(doctor_settings(twilio, agent, tmp_path), public_url="http://127.0.0.1:9")
    found = by_name(await run_doctor(settings))["public_url.reachable"]
    assert found.status == "fail" and "callbridge serve" in found.message


# -- the command line: doctor --json, numbers connect -------------------------------------------


def cli_env(settings: Settings) -> dict[str, str]:
    return clean_env() | {
        "TWILIO_ACCOUNT_SID": settings.twilio_account_sid,
        "TWILIO_AUTH_TOKEN": settings.twilio_auth_token,
        "TWILIO_API_BASE_URL": settings.twilio_api_base_url,
        "ELEVENLABS_AGENT_ID": settings.elevenlabs_agent_id,
        "ELEVENLABS_API_KEY": settings.elevenlabs_api_key or "",
        "ELEVENLABS_API_BASE_URL": settings.elevenlabs_api_base_url,
        "CALLBRIDGE_PUBLIC_URL": settings.public_url or "",
    }


async def run_cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbridge.cli",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_doctor_json_then_numbers_connect_then_a_call_reaches_the_server(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    agent.agents.add(AGENT_ID)
    number = twilio.phone_numbers.add(
        NUMBER, voice_url="https://old-host.example.com/voice", voice_method="GET"
    )
    async with running_server(doctor_settings(twilio, agent, tmp_path)) as srv:
        env = cli_env(srv.settings)
        code, out, _ = await run_cli(env, "doctor", "--json")
        report = json.loads(out)
        assert code == 1 and report["ok"] is False
        assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == ["twilio.numbers"]

        code, out, err = await run_cli(env, "numbers", "connect", NUMBER)
        assert code == 0, err
        inbound, status = srv.settings.public("/twilio/inbound"), srv.settings.public("/twilio/status")
        assert "before: GET https://old-host.example.com/voice" in out
        assert f"after:  POST {inbound}" in out and f"after:  POST {status}" in out
        # What Twilio was told.
        assert number.updates == [
            {
                "VoiceUrl": inbound,
                "VoiceMethod": "POST",
                "StatusCallback": status,
                "StatusCallbackMethod": "POST",
            }
        ]
        code, out, err = await run_cli(env, "doctor")
        assert code == 0, out + err
        assert f"✓ {NUMBER}: voice webhook is this server" in out

        code, out, _ = await run_cli(env, "numbers", "list")
        assert code == 0 and f"✓ {NUMBER}" in out and f"POST {inbound}" in out

        # A call to the number now reaches the server and the agent.
        call = await twilio.place_inbound_call(number.voice_url or "", to=NUMBER)
        assert call.stream is not None
        await call.wait_ended(20)
        records = await srv.wait_records(1)
    assert records[0].to_number == NUMBER and records[0].end_reason == "agent_ended"


async def test_numbers_connect_an_unknown_number_is_one_line(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    settings = replace(doctor_settings(twilio, agent, tmp_path), public_url="https://bridge.example.com")
    code, out, err = await run_cli(cli_env(settings), "numbers", "connect", "+15559999999")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no number +15559999999" in err and "numbers list" in err
    assert settings.twilio_auth_token not in err


# -- a signature failure that explains itself --------------------------------------------------


async def test_a_bad_signature_names_the_url_validated_rate_limited_never_the_token(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callbridge")
    async with running_server(doctor_settings(twilio, agent, tmp_path)) as srv:
        url = srv.settings.public("/twilio/inbound")
        form = {"CallSid": "CA" + "b" * 32, "From": "+15550001111", "To": NUMBER}
        # Signed for the URL the number points at, behind a proxy that adds a port: not what we check.
        signed_for = url.replace("http://127.0.0.1", "http://127.0.0.1:443")
        header = {"X-Twilio-Signature": twilio_signature(twilio.auth_token, signed_for, form)}
        for _ in range(3):
            resp = await srv.api.post(url, data=form, headers=header)
            assert resp.status_code == 403
        metrics = (await srv.api.get("/metrics")).text
    lines = [r for r in caplog.records if getattr(r, "cb_event", None) == "twilio.bad_signature"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # rate-limited: 3 refusals, one line
    fields = lines[0].cb_fields  # type: ignore[attr-defined]
    assert fields["route"] == "/twilio/inbound" and fields["validated_url"] == url
    assert "CALLBRIDGE_PUBLIC_URL" in fields["hint"] and "no port" in fields["hint"]
    assert twilio.auth_token not in caplog.text
    assert 'callbridge_bad_signatures_total{route="/twilio/inbound"} 3.0' in metrics


# -- settings from .env: flags > environment > .env ---------------------------------------------


async def test_dotenv_precedence_flag_over_environment_over_file(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    number = twilio.phone_numbers.add(NUMBER)
    settings = doctor_settings(twilio, agent, tmp_path)
    everything = cli_env(replace(settings, public_url="https://from-dotenv.example.com"))
    # Credentials and the URL only in the file (quoted, with `export` and a comment, as people write it).
    lines = [f'export {k}="{v}"' for k, v in everything.items() if k.startswith(("TWILIO_", "CALLBRIDGE_"))]
    (tmp_path / ".env").write_text("# callbridge settings\n" + "\n".join(lines) + "\n")
    env = clean_env()

    async def connect(*extra: str, environ: dict[str, str] = env) -> str:
        code, _, err = await run_cli(environ, "numbers", "connect", NUMBER, *extra, cwd=tmp_path)
        assert code == 0, err
        return number.voice_url or ""

    assert await connect() == "https://from-dotenv.example.com/twilio/inbound"
    from_env = env | {"CALLBRIDGE_PUBLIC_URL": "https://from-env.example.com"}
    assert await connect(environ=from_env) == "https://from-env.example.com/twilio/inbound"
    flagged = await connect("--public-url", "https://from-flag.example.com", environ=from_env)
    assert flagged == "https://from-flag.example.com/twilio/inbound"
    # Another file by name; a name that is not a file is one line.
    (tmp_path / ".env").rename(tmp_path / "prod.env")
    named = env | {"CALLBRIDGE_ENV_FILE": str(tmp_path / "prod.env")}
    assert await connect(environ=named) == "https://from-dotenv.example.com/twilio/inbound"
    code, _, err = await run_cli(env | {"CALLBRIDGE_ENV_FILE": str(tmp_path / "nope.env")}, "numbers", "list")
    assert code == 2 and err.count("\n") == 1 and "nope.env" in err


def test_since_takes_iso_times_and_durations() -> None:
    from datetime import UTC, datetime, timedelta

    from callbridge.since import SinceError, parse_since

    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("1d", now) == now - timedelta(days=1)
    assert parse_since("2026-11-25", now) == datetime(2026, 11, 25, tzinfo=UTC)
    assert parse_since("2026-11-25T09:30:00+01:00", now) == datetime(2026, 11, 25, 8, 30, tzinfo=UTC)
    for bad in ("yesterday", "2x", "-1h", ""):
        with pytest.raises(SinceError, match="duration back from now"):
            parse_since(bad, now)


async def test_calls_list_since_a_duration_lists_only_recent_calls(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from callbridge.record import CallRecord
    from callbridge.store import CallStore

    url = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    store = CallStore(url)
    await store.init()
    now = datetime.now(UTC)
    for sid, age in (("CA" + "1" * 32, timedelta(hours=3)), ("CA" + "2" * 32, timedelta(minutes=5))):
        await store.save(
            CallRecord(call_sid=sid, started_at=now - age, status="ended", end_reason="agent_ended")
        )
    await store.close()
    code, out, err = await run_cli(
        clean_env(), "calls", "list", "--since", "2h", "--json", "--database-url", url
    )
    assert code == 0, err
    assert [r["call_sid"] for r in json.loads(out)] == ["CA" + "2" * 32]
    code, out, err = await run_cli(
        clean_env(), "calls", "list", "--since", "1d", "--json", "--database-url", url
    )
    assert len(json.loads(out)) == 2


@pytest.mark.slow
@pytest.mark.timeout(400)  # about 30 s alone; it passed 120 s under a load average of 13 in CI
def test_make_doctor_demo_rehearses_the_first_real_call() -> None:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "doctor_demo.py"
    result = subprocess.run(
        [sys.executable, str(script)], env=clean_env(), capture_output=True, text=True, timeout=360
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "✗ the agent has no End call system tool" in result.stdout  # the deliberate problem, found
    assert "✓ doctor: all good now" in result.stdout and "doctor-demo OK" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


async def test_without_an_api_key_the_agent_is_not_read_and_doctor_says_why(
    twilio: TwilioEmulator, agent: AgentEmulator, tmp_path: Path
) -> None:
    agent.agents.add(AGENT_ID)
    checks = await doctor_on_a_connected_server(twilio, agent, tmp_path, elevenlabs_api_key=None)
    elevenlabs = [c for c in checks if c.name.startswith("elevenlabs.")]
    assert [(c.name, c.status) for c in elevenlabs] == [("elevenlabs.agent", "warn")]
    assert "ELEVENLABS_API_KEY" in elevenlabs[0].message
    assert agent.agents.requests == []  # nothing asked without a key
    assert failed(checks) == []


async def test_the_emulated_agents_api_is_what_the_official_sdk_reads(agent: AgentEmulator) -> None:
    """The emulator's GET /v1/convai/agents/{id} parsed by the official `elevenlabs` SDK
    (its GetAgentResponseModel), fields where doctor reads them; a wrong key and an unknown
    agent are the SDK's errors with the documented status."""
    from elevenlabs.client import AsyncElevenLabs
    from elevenlabs.core.api_error import ApiError

    agent.agents.add(
        AGENT_ID,
        output_format="pcm_16000",
        end_call=True,
        overridable=["agent.first_message"],
        placeholders={"customer": "friend"},
    )
    client = AsyncElevenLabs(api_key=XI_KEY, base_url=agent.base_url)
    got = await client.conversational_ai.agents.get(agent_id=AGENT_ID)
    assert type(got).__name__ == "GetAgentResponseModel"
    convai = got.conversation_config
    assert convai.asr is not None and convai.asr.user_input_audio_format == "ulaw_8000"
    assert convai.tts is not None and convai.tts.agent_output_audio_format == "pcm_16000"
    assert convai.conversation is not None and "agent_tool_response" in (
        convai.conversation.client_events or []
    )
    prompt = convai.agent.prompt if convai.agent else None
    end_call = prompt.built_in_tools.end_call if prompt and prompt.built_in_tools else None
    assert end_call is not None and end_call.params.system_tool_type == "end_call"
    assert got.platform_settings is not None and got.platform_settings.overrides is not None
    overrides = got.platform_settings.overrides.conversation_config_override
    assert overrides is not None and overrides.agent is not None and overrides.agent.first_message is True
    assert overrides.agent.language is False
    for key, agent_id, status in ((XI_KEY, "agent_nosuch", 404), ("xi-wrong", AGENT_ID, 401)):
        with pytest.raises(ApiError) as refused:
            await AsyncElevenLabs(api_key=key, base_url=agent.base_url).conversational_ai.agents.get(
                agent_id=agent_id
            )
        assert refused.value.status_code == status
