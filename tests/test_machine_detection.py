"""Answering machines on outbound calls (issue 14, part 3): `POST /calls` with
`machine_detection`, Twilio's asynchronous detection in the emulator, the signed
`POST /twilio/amd` callback, and what each verdict does to the call and its record."""

from __future__ import annotations

import asyncio
import logging
import sys
from asyncio.subprocess import PIPE
from typing import Any

import pytest

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, EndCall, Say, WaitForContextualUpdate
from callbridge.emulators.twilio import TwilioEmulator, twilio_signature
from callbridge.server.amd import VOICEMAIL_UPDATE
from tests.serverkit import (
    API_TOKEN,
    RunningServer,
    clean_env,
    running_server,
    settings_for,
    short_script,
    wait_until,
    wait_until_async,
)

FROM, TO = "+15550100001", "+15550100002"


def talkative() -> AgentScript:
    return AgentScript(steps=[Say("Hello, this is a long announcement.", seconds=20.0)], realtime_factor=1.0)


async def place(srv: RunningServer, mode: str | None) -> str:
    body: dict[str, Any] = {"to": TO, "from": FROM}
    if mode is not None:
        body["machine_detection"] = mode
    resp = await srv.api.post("/calls", json=body)
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["call_sid"]
    return sid


async def ended_record(srv: RunningServer, sid: str) -> dict[str, Any]:
    async def ended() -> bool:
        return (await srv.call_record(sid))["status"] == "ended"

    await wait_until_async(ended, 15, "the call's record is ended")
    return await srv.call_record(sid)


def create_form(twilio: TwilioEmulator) -> dict[str, str]:
    return next(r.form for r in twilio.requests if r.method == "POST" and r.path.endswith("/Calls.json"))


@pytest.mark.database
async def test_machine_with_hangup_ends_the_call_voicemail(twilio: TwilioEmulator, db_url: str) -> None:
    twilio.machine_detection.answered_by = "machine_end_beep"
    async with AgentEmulator(talkative()) as agent:
        async with running_server(settings_for(twilio, agent, db_url)) as srv:
            sid = await place(srv, "hangup")
            record = await ended_record(srv, sid)
            call = twilio.calls[sid]
            await call.wait_ended(5)
            conv = agent.conversations[0]
            await conv.wait_closed()
    form = create_form(twilio)
    # What Twilio was asked: asynchronous detection waiting for the end of the greeting.
    assert form["MachineDetection"] == "DetectMessageEnd" and form["AsyncAmd"] == "true"
    assert form["AsyncAmdStatusCallback"] == f"{srv.url}/twilio/amd?mode=hangup"
    assert form["AsyncAmdStatusCallbackMethod"] == "POST"
    # The verdict went to the bridge, signed, and was taken; the call was hung up through REST.
    [verdict] = twilio.machine_detection.callbacks
    assert verdict.params["AnsweredBy"] == "machine_end_beep" and verdict.status_code == 204
    assert call.end_cause == "rest_completed" and call.answered_by == "machine_end_beep"
    assert record["end_reason"] == "voicemail" and "machine_end_beep" in record["end_detail"]
    assert record["answered_by"] == "machine_end_beep"
    assert conv.contextual_updates() == []  # the agent was not asked to leave a message


@pytest.mark.database
@pytest.mark.parametrize(
    ("verdict_after", "agent_connects_after"),
    [(0.3, 0.0), (0.05, 1.5)],  # the second: the verdict comes before the agent is connected
)
async def test_machine_with_agent_gets_a_contextual_update_and_the_agent_ends(
    twilio: TwilioEmulator, db_url: str, verdict_after: float, agent_connects_after: float
) -> None:
    twilio.machine_detection.answered_by = "machine_end_silence"
    twilio.machine_detection.seconds = verdict_after
    script = AgentScript(
        metadata_delay=agent_connects_after,
        steps=[
            Say("Hello!", seconds=0.3),
            WaitForContextualUpdate(contains="voicemail", timeout=10),
            EndCall("Hi, this is the clinic: please call us back.", seconds=0.4, close_delay=0.05),
        ],
        realtime_factor=float("inf"),
    )
    async with AgentEmulator(script) as agent:
        async with running_server(settings_for(twilio, agent, db_url)) as srv:
            sid = await place(srv, "agent")
            record = await ended_record(srv, sid)
            conv = agent.conversations[0]
            await conv.wait_closed()
    assert create_form(twilio)["AsyncAmdStatusCallback"].endswith("/twilio/amd?mode=agent")
    # The agent was told, once, and only then left its message and ended the call itself.
    assert conv.contextual_updates() == [VOICEMAIL_UPDATE]
    assert any("contextual_update received" in line for _, line in conv.step_log)
    told_at = next(t for t, m in conv.received if m.get("type") == "contextual_update")
    message_at = next(
        t
        for t, m in conv.sent
        if isinstance(m, dict) and m.get("type") == "agent_response" and "clinic" in str(m)
    )
    assert told_at < message_at
    assert record["end_reason"] == "agent_ended" and record["answered_by"] == "machine_end_silence"
    assert [e["text"] for e in record["timeline"] if e["event"] == "agent.contextual_update"] == [
        VOICEMAIL_UPDATE[:200]
    ]
    assert [e["text"] for e in record["transcript"]][-1].startswith("Hi, this is the clinic")


@pytest.mark.database
async def test_human_changes_nothing_and_off_asks_for_no_detection(
    twilio: TwilioEmulator, db_url: str
) -> None:
    async with AgentEmulator(script_factory=lambda _a, _n: short_script(1.0)) as agent:
        async with running_server(settings_for(twilio, agent, db_url)) as srv:
            human = await place(srv, "hangup")
            record = await ended_record(srv, human)
            plain = await place(srv, None)
            plain_record = await ended_record(srv, plain)
    assert [c.params["AnsweredBy"] for c in twilio.machine_detection.callbacks] == ["human"]
    assert record["end_reason"] == "agent_ended" and record["answered_by"] == "human"
    creates = [r.form for r in twilio.requests if r.method == "POST" and r.path.endswith("/Calls.json")]
    assert "MachineDetection" not in creates[1] and "AsyncAmdStatusCallback" not in creates[1]
    assert plain_record["end_reason"] == "agent_ended" and plain_record["answered_by"] is None


@pytest.mark.database
async def test_amd_callbacks_bad_signature_unknown_call_and_bad_values(
    twilio: TwilioEmulator, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callbridge")
    async with AgentEmulator(talkative()) as agent:
        async with running_server(settings_for(twilio, agent, db_url)) as srv:
            sid = await place(srv, "hangup")  # detection says human (the default): stays up
            await wait_until(lambda: bool(twilio.machine_detection.callbacks), 10, "the verdict was sent")
            url = f"{srv.url}/twilio/amd?mode=hangup"
            machine = {"AccountSid": twilio.account_sid, "CallSid": sid, "AnsweredBy": "machine_end_beep"}

            def signed(form: dict[str, str], at: str = url) -> dict[str, str]:
                return {"X-Twilio-Signature": twilio_signature(twilio.auth_token, at, form)}

            # A forged verdict for a live call: refused, the call goes on.
            forged = await srv.api.post(url, data=machine, headers={"X-Twilio-Signature": "Zm9yZ2Vk"})
            # Signed for another mode's URL (the mode is part of what Twilio signs): refused.
            other = await srv.api.post(
                url, data=machine, headers=signed(machine, url.replace("hangup", "agent"))
            )
            # A well-signed verdict for a call nobody here knows: 404, nothing hung up.
            unknown = {**machine, "CallSid": "CA" + "e" * 32}
            stranger = await srv.api.post(url, data=unknown, headers=signed(unknown))
            odd = {**machine, "AnsweredBy": "robot"}
            bad_value = await srv.api.post(url, data=odd, headers=signed(odd))
            no_mode = f"{srv.url}/twilio/amd"
            bad_mode = await srv.api.post(no_mode, data=machine, headers=signed(machine, no_mode))
            bad_body = await srv.api.post(
                "/calls", json={"to": TO, "from": FROM, "machine_detection": "maybe"}
            )
            live = await srv.call_record(sid)
            updates = [r for r in twilio.requests if r.method == "POST" and "/Calls/" in r.path]
            metrics = (await srv.api.get("/metrics")).text
            await srv.api.post(f"/calls/{sid}/hangup")
    assert forged.status_code == 403 and other.status_code == 403
    assert stranger.status_code == 404 and bad_value.status_code == 400 and bad_mode.status_code == 400
    assert bad_body.status_code == 422 and "machine_detection" in bad_body.json()["error"]
    assert live["status"] == "active" and live["answered_by"] == "human"
    assert updates == []  # no REST hang-up or redirect of anyone's call
    events = [r.getMessage() for r in caplog.records]
    assert any("amd.unknown_call" in e and "CA" + "e" * 32 in e for e in events)
    assert any("twilio.bad_signature" in e and "/twilio/amd" in e for e in events)
    assert 'callbridge_bad_signatures_total{route="/twilio/amd"} 2.0' in metrics


async def test_emulator_refuses_synchronous_detection_and_unknown_modes(twilio: TwilioEmulator) -> None:
    import httpx

    url = f"{twilio.base_url}/2010-04-01/Accounts/{twilio.account_sid}/Calls.json"
    base = {"To": TO, "From": FROM, "Twiml": "<Response><Hangup/></Response>"}
    async with httpx.AsyncClient(auth=(twilio.account_sid, twilio.auth_token)) as http:
        sync = await http.post(url, data={**base, "MachineDetection": "DetectMessageEnd"})
        odd = await http.post(url, data={**base, "MachineDetection": "Maybe", "AsyncAmd": "true"})
    assert sync.status_code == 400 and "AsyncAmd" in sync.json()["message"]
    assert odd.status_code == 400 and "Enable or DetectMessageEnd" in odd.json()["message"]


@pytest.mark.database
async def test_machine_on_a_call_whose_stream_never_connected_is_closed_then_hung_up(
    twilio: TwilioEmulator, db_url: str
) -> None:
    twilio.machine_detection.answered_by = "machine_end_other"
    twilio.stream_upgrade_fault = "hang"  # the stream never reaches the bridge
    async with AgentEmulator(talkative()) as agent:
        settings = settings_for(twilio, agent, db_url, stream_connect_timeout=30.0)
        async with running_server(settings) as srv:
            sid = await place(srv, "hangup")
            record = await ended_record(srv, sid)
            call = twilio.calls[sid]
            await call.wait_ended(5)
    assert record["end_reason"] == "voicemail" and record["answered_by"] == "machine_end_other"
    assert call.end_cause == "rest_completed" and agent.conversations == []


@pytest.mark.parametrize("mode", ["hangup", "agent"])
async def test_a_verdict_reaching_another_instance_is_acted_on_by_the_holder(
    twilio: TwilioEmulator, pg_url: str, mode: str
) -> None:
    # Behind a load balancer the verdict may reach an instance that does not hold the call.
    script = AgentScript(
        steps=[
            Say("Hello!", seconds=0.3),
            WaitForContextualUpdate(contains="voicemail", timeout=20),
            EndCall("Please call the clinic back.", seconds=0.3, close_delay=0.05),
        ],
        realtime_factor=float("inf"),
    )
    async with (
        AgentEmulator(script) as agent,
        running_server(settings_for(twilio, agent, pg_url, instance_id="a")) as a,
        running_server(settings_for(twilio, agent, pg_url, instance_id="b")) as b,
    ):
        sid = await place(a, mode)  # the emulator's own verdict (human) goes to a

        async def human_recorded() -> bool:
            resp = await b.api.get(f"/calls/{sid}")  # b reads the database: a's write is in
            return resp.status_code == 200 and resp.json()["answered_by"] == "human"

        await wait_until_async(human_recorded, 10, "the emulator's verdict is written")
        url = f"{b.url}/twilio/amd?mode={mode}"
        form = {"AccountSid": twilio.account_sid, "CallSid": sid, "AnsweredBy": "machine_end_beep"}
        resp = await b.api.post(
            url, data=form, headers={"X-Twilio-Signature": twilio_signature(twilio.auth_token, url, form)}
        )
        await a.wait_records(1)
        record = await ended_record(b, sid)
        await twilio.calls[sid].wait_ended(5)
        conv = agent.conversations[0]
    assert resp.status_code == 204 and b.records == []
    expected = "voicemail" if mode == "hangup" else "agent_ended"
    assert a.records[0].end_reason == expected and record["end_reason"] == expected
    assert conv.contextual_updates() == ([VOICEMAIL_UPDATE] if mode == "agent" else [])
    assert record["answered_by"] == "machine_end_beep" and twilio.calls[sid].status == "completed"


@pytest.mark.database
async def test_callbridge_call_asks_for_detection(twilio: TwilioEmulator, db_url: str) -> None:
    async with AgentEmulator(talkative()) as agent:
        async with running_server(settings_for(twilio, agent, db_url)) as srv:
            env = {**clean_env(), "CALLBRIDGE_API_TOKEN": API_TOKEN}
            argv = ["call", TO, "--from", FROM, "--machine-detection", "agent", "--server", srv.url]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "callbridge.cli", *argv, env=env, stdout=PIPE, stderr=PIPE
            )
            out, err = await proc.communicate()
            bad = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "callbridge.cli", *argv[:-3], "maybe", env=env, stdout=PIPE, stderr=PIPE
            )
            _, bad_err = await bad.communicate()
            sid = out.decode().rsplit(" ", 1)[-1].strip()
            await srv.api.post(f"/calls/{sid}/hangup")
    assert proc.returncode == 0, err.decode()
    assert create_form(twilio)["AsyncAmdStatusCallback"] == f"{srv.url}/twilio/amd?mode=agent"
    assert bad.returncode == 2 and b"invalid choice: 'maybe'" in bad_err
