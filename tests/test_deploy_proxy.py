"""deploy/Caddyfile, run by Debian's caddy in front of two instances on one PostgreSQL, as
deploy/compose.yaml runs it: webhooks, media streams (WebSockets) and the /calls API all go
through the proxy, which picks an instance per request, so a call is often answered by one
instance and streamed by the other; a hang-up lands on either. Every call is bridged and
every hang-up is recorded by the instance holding the call."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say
from callbridge.emulators.twilio import TwilioEmulator
from tests.serverkit import API_TOKEN, clean_env, free_port, serve_cli, wait_until_async
from tests.test_fleet import LEASE, query, stop_process

ROOT = Path(__file__).resolve().parent.parent
CADDYFILE = ROOT / "deploy" / "Caddyfile"


@pytest.fixture
def caddy_binary() -> str:
    found = shutil.which("caddy")
    if found is None:
        message = "caddy not found: run scripts/ensure-caddy.sh (as root it installs the Debian package)"
        if os.environ.get("CI"):
            pytest.fail(message + " [CI: required]", pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture
def proxy(
    caddy_binary: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[int, list[int]]]:
    """Caddy on 127.0.0.1:<port> with deploy/Caddyfile, in front of two upstream ports."""
    port, upstreams = free_port(), [free_port(), free_port()]
    env = clean_env() | {
        "CALLBRIDGE_SITE": f":{port}",
        "CALLBRIDGE_PROXY_BIND": "127.0.0.1",
        "CALLBRIDGE_UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in upstreams),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HOME": str(tmp_path),
    }
    log = open(tmp_path / "caddy.log", "wb")
    proc = subprocess.Popen(
        [caddy_binary, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port, upstreams
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_calls_through_the_reverse_proxy_reach_both_instances(
    proxy: tuple[int, list[int]], pg_url: str
) -> None:
    port, upstreams = proxy
    public = f"http://127.0.0.1:{port}"
    talk = AgentScript(steps=[Say("I can talk for a long time.", seconds=60.0)], realtime_factor=1.0)
    async with TwilioEmulator() as twilio, AgentEmulator(talk) as agent:
        env = clean_env() | {
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_API_BASE_URL": twilio.base_url,
            "ELEVENLABS_AGENT_ID": "agent_proxy",
            "ELEVENLABS_API_BASE_URL": agent.base_url,
            "CALLBRIDGE_PUBLIC_URL": public,  # what Twilio signs: the proxy's address
            "CALLBRIDGE_DATABASE_URL": pg_url,
            "CALLBRIDGE_API_TOKEN": API_TOKEN,
            "CALLBRIDGE_INSTANCE_LEASE_SECONDS": str(LEASE),
            "CALLBRIDGE_SHUTDOWN_GRACE_SECONDS": "1",
        }
        procs = await asyncio.gather(*(serve_cli(env, p) for p in upstreams))
        try:
            async with httpx.AsyncClient(
                base_url=public, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
            ) as api:
                seen: set[str] = set()

                async def proxy_up() -> bool:
                    # Until Caddy has sent a request to each instance: an instance its health
                    # check has not passed yet gets none, and every call would go to the other.
                    try:
                        resp = await api.get("/readyz")
                    except httpx.HTTPError:
                        return False
                    if resp.status_code == 200:
                        seen.add(resp.json()["instance"])
                    return len(seen) == 2

                await wait_until_async(proxy_up, 15, "caddy proxying to both instances")
                calls = []
                for n in range(4):
                    # Round robin alternates webhook and stream between the instances (each call
                    # is answered by one and streamed by the other); one request between the
                    # second and third calls shifts the turn, so both instances hold calls.
                    if n == 2:
                        await api.get("/healthz")
                    calls.append(await twilio.place_inbound_call(f"{public}/twilio/inbound"))
                    await agent.wait_for_conversations(n + 1, timeout=10)
                sids = [c.sid for c in calls]
                live = "SELECT call_sid, instance FROM fleet_calls WHERE state = 'live'"
                holders = {r[0]: r[1] for r in await query(pg_url, live)}
                assert set(holders) == set(sids)
                assert len(set(holders.values())) == 2  # round robin: both instances hold calls
                for sid in sids:
                    resp = await api.post(f"/calls/{sid}/hangup")
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["end_reason"] == "hangup_requested"
                for call in calls:
                    await call.wait_ended(10)

                async def all_recorded() -> bool:
                    rows = await query(pg_url, "SELECT call_sid, end_reason, instance FROM calls")
                    return len(rows) == 4 and all(r[1] == "hangup_requested" for r in rows)

                await wait_until_async(all_recorded, 10, "four records, each hangup_requested")
                rows = await query(pg_url, "SELECT call_sid, instance FROM calls")
                assert {r[0]: r[1] for r in rows} == holders  # recorded by the instance holding it
        finally:
            await asyncio.gather(*(stop_process(p) for p in procs))
    assert all(twilio.calls[s].status == "completed" for s in sids)
    assert len(agent.conversations) == 4
