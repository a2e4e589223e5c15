"""The `callbridge` command: settings errors, reading records, and `serve` as a real process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from callbridge.call import CallRecord
from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say
from callbridge.emulators.twilio import TwilioEmulator
from callbridge.store import CallStore
from tests.serverkit import clean_env, free_port, wait_until_async

CLI = [sys.executable, "-m", "callbridge.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=clean_env() | (env or {}), capture_output=True, text=True, timeout=60
    )


async def run_cli_async(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, env=clean_env() | env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


def test_serve_without_settings_says_what_is_missing_in_one_line() -> None:
    result = run_cli("serve", env={"TWILIO_AUTH_TOKEN": "do-not-print-me"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TWILIO_ACCOUNT_SID is required" in lines[0]
    assert "ELEVENLABS_AGENT_ID is required" in lines[0]
    assert "CALLBRIDGE_PUBLIC_URL is required" in lines[0]
    assert "do-not-print-me" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_help_for_each_command() -> None:
    calls = (["calls"], ["calls", "list"], ["calls", "show"])
    for cmd in ([], ["serve"], ["call"], *calls, ["db"], ["db", "upgrade"], ["demo"]):
        result = run_cli(*cmd, "--help")
        assert result.returncode == 0, cmd
        assert "usage: callbridge" in result.stdout


@pytest.mark.slow
@pytest.mark.database
async def test_calls_list_and_show_read_the_database(db_url: str) -> None:
    url = db_url
    store = CallStore(url)
    await store.init()
    started = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
    for i, reason in enumerate(("agent_ended", "caller_hung_up")):
        await store.save(
            CallRecord(
                call_sid=f"CA{i:032d}",
                from_number="+15550001111",
                to_number="+15550002222",
                status="ended",
                end_reason=reason,
                started_at=started,
                ended_at=started,
                duration_s=12.5 + i,
                transcript=[{"role": "agent", "text": "Hello there", "t": 0.4}],
                metrics={"agent_connect_ms": 120.0, "hangup_latency_ms": 3.2},
            )
        )
    await store.close()
    env = {"CALLBRIDGE_DATABASE_URL": url}
    listed = await run_cli_async("calls", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["CALL", "SID", "STARTED"]
    assert any(f"CA{0:032d}" in line and "agent_ended" in line and "12.5s" in line for line in lines)
    only = await run_cli_async("calls", "list", "--end-reason", "caller_hung_up", env=env)
    assert f"CA{1:032d}" in only.stdout and f"CA{0:032d}" not in only.stdout
    shown = await run_cli_async("calls", "show", f"CA{0:032d}", env=env)
    assert shown.returncode == 0
    assert "agent_ended" in shown.stdout and "Hello there" in shown.stdout and "3.2 ms" in shown.stdout
    missing = await run_cli_async("calls", "show", "CA" + "9" * 32, env=env)
    assert missing.returncode == 2 and "no call" in missing.stderr


@pytest.mark.database
async def test_serve_process_drains_on_sigterm(twilio: TwilioEmulator, db_url: str) -> None:
    """A real `callbridge serve` process, a live call, a real SIGTERM: the call is ended
    with `shutdown` after the grace period, both legs are hung up, the record is saved."""
    port = free_port()
    script = AgentScript(steps=[Say("I will keep talking.", seconds=60.0)], realtime_factor=1.0)
    async with AgentEmulator(script) as agent:
        env = clean_env() | {
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_API_BASE_URL": twilio.base_url,
            "ELEVENLABS_AGENT_ID": "agent_proc",
            "ELEVENLABS_API_BASE_URL": agent.base_url,
            "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "CALLBRIDGE_DATABASE_URL": db_url,
            "CALLBRIDGE_API_TOKEN": "proc-token",
            "CALLBRIDGE_SHUTDOWN_GRACE_SECONDS": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--json-logs",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                for _ in range(200):
                    try:
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.05)
                call = await twilio.place_inbound_call(f"http://127.0.0.1:{port}/twilio/inbound")
                await agent.wait_for_conversations(1, timeout=10)
                auth = {"Authorization": "Bearer proc-token"}

                async def live() -> bool:
                    resp = await http.get(f"/calls/{call.sid}", headers=auth)
                    return resp.status_code == 200 and resp.json()["status"] == "active"

                await wait_until_async(live, 10, "the call's record is active")
                proc.send_signal(signal.SIGTERM)
                await call.wait_ended(10)
                _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        conv = agent.conversations[0]
        await asyncio.wait_for(conv.closed.wait(), 5)
    log = stderr.decode()
    assert '"event": "server.draining"' in log
    assert '"event": "call.ended"' in log and '"reason": "shutdown"' in log
    assert "test-auth-token" not in log and twilio.auth_token not in log
    assert call.status == "completed" and call.end_cause == "rest_completed"
    assert conv.closed_by == "client"
    store = CallStore(db_url)
    try:
        record = await store.get(call.sid)
    finally:
        await store.close()
    assert record is not None and record["end_reason"] == "shutdown" and record["status"] == "ended"
