"""`make fleet`: two callbridge instances on one PostgreSQL, on this machine, no containers.

Starts a PostgreSQL server (tests/pgserver.py, the tests' own), the Twilio and ElevenLabs
emulators, and two `callbridge serve` processes on one database; places calls on both,
hangs one up through the other instance, kills one instance and watches the survivor close
its calls. Prints what happened; exits 0 only if every invariant held.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from rehearsal import Checks, free_port  # noqa: E402

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say  # noqa: E402
from callbridge.emulators.twilio import TwilioEmulator  # noqa: E402
from tests.pgserver import PostgresServer, find_bindir  # noqa: E402

TOKEN = "fleet-demo-api-token"
LEASE = 5.0
check = Checks()
failures = check.failures


def base_env(twilio: TwilioEmulator, agent: AgentEmulator, url: str, lease: float) -> dict[str, str]:
    """An instance's environment: the emulators, the database, a short lease."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ELEVENLABS_", "CALLBRIDGE_"))
    } | {
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_API_BASE_URL": twilio.base_url,
        "ELEVENLABS_AGENT_ID": "agent_fleet_demo",
        "ELEVENLABS_API_BASE_URL": agent.base_url,
        "CALLBRIDGE_DATABASE_URL": url,
        "CALLBRIDGE_API_TOKEN": TOKEN,
        "CALLBRIDGE_INSTANCE_LEASE_SECONDS": str(lease),
        "CALLBRIDGE_SHUTDOWN_GRACE_SECONDS": "2",
    }


async def serve(
    name: str, env: dict[str, str], port: int, log: Path, quiet: bool = False, args: tuple[str, ...] = ()
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args,
        env=env | {"CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(log, "ab"),  # noqa: ASYNC230 (the child owns it; a demo script)
    )  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(300):
            try:
                ready = await http.get("/readyz")
                if ready.status_code == 200:
                    if not quiet:
                        print(f"  instance {name}: {ready.json()['instance']} on :{port} (pid {proc.pid})")
                    return proc
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"instance {name} did not come up: see {log}")


def api(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )


async def record(port: int, sid: str) -> dict[str, Any]:
    async with api(port) as http:
        resp = await http.get(f"/calls/{sid}")
        return resp.json() if resp.status_code == 200 else {}


async def until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def leases_left(url: str) -> list[str]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [str(r[0]) for r in (await conn.execute(text("SELECT instance_id FROM instances"))).all()]
    finally:
        await engine.dispose()


async def main() -> int:
    bindir = find_bindir()
    if bindir is None:
        print("PostgreSQL binaries not found: run scripts/ensure-postgres.sh (as root)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="callbridge-fleet-"))
    print(f"PostgreSQL: starting (logs and instance logs in {workdir})")
    pg = PostgresServer.create(bindir)
    procs: list[asyncio.subprocess.Process] = []
    try:
        url = pg.create_database()
        talk = AgentScript(steps=[Say("I can talk for a long time.", seconds=120.0)], realtime_factor=1.0)
        async with TwilioEmulator(answer_delay=120.0) as twilio, AgentEmulator(talk) as agent:
            env = base_env(twilio, agent, url, LEASE)
            port_a, port_b = free_port(), free_port()
            print("Two instances on one database:")
            a = await serve("A", env, port_a, workdir / "a.log")
            procs.append(a)
            b = await serve("B", env, port_b, workdir / "b.log")
            procs.append(b)

            print("Calls on both:")
            on_a = await twilio.place_inbound_call(f"http://127.0.0.1:{port_a}/twilio/inbound")
            on_b = await twilio.place_inbound_call(f"http://127.0.0.1:{port_b}/twilio/inbound")
            await agent.wait_for_conversations(2, timeout=15)
            check(True, f"caller 1 talking to the agent through A ({on_a.sid})")
            check(True, f"caller 2 talking to the agent through B ({on_b.sid})")

            print("Hang up A's call through B's API:")
            async with api(port_b) as http:
                resp = await http.post(f"/calls/{on_a.sid}/hangup")
            body = resp.json()
            check(
                resp.status_code == 200 and body.get("ended_by_instance") is not None,
                "B delivered the hang-up to A",
                f"HTTP {resp.status_code}, ended by {body.get('ended_by_instance')}",
            )
            await on_a.wait_ended(10)
            rec = await record(port_a, on_a.sid)
            check(
                rec.get("end_reason") == "hangup_requested",
                "A's record says hangup_requested",
                rec.get("end_reason") or "",
            )
            check(
                twilio.calls[on_a.sid].status == "completed",
                "Twilio was told to end it",
                twilio.calls[on_a.sid].status,
            )

            print("A holds a live call and a ringing outbound call; A is killed (SIGKILL):")
            live_a = await twilio.place_inbound_call(f"http://127.0.0.1:{port_a}/twilio/inbound")
            await agent.wait_for_conversations(3, timeout=15)
            async with api(port_a) as http:
                resp = await http.post("/calls", json={"to": "+15550003333", "from": "+15550004444"})
            ringing = resp.json()["call_sid"]
            a.send_signal(signal.SIGKILL)
            await a.wait()
            killed = time.monotonic()

            async def both_closed() -> bool:
                return all(
                    [(await record(port_b, s)).get("status") == "ended" for s in (live_a.sid, ringing)]
                )

            closed = await until(both_closed, LEASE * 2)
            took = time.monotonic() - killed
            # Same host: B sees A's process gone at its next heartbeat; on another host, B would
            # wait for A's lease to expire (tests/test_fleet.py pauses an instance to show it).
            check(closed, "B closed both of A's calls", f"{took:.2f} s after the kill; lease {LEASE:g} s")
            for sid, what in ((live_a.sid, "the live call"), (ringing, "the ringing call")):
                rec = await record(port_b, sid)
                check(
                    rec.get("end_reason") == "instance_lost",
                    f"{what}: instance_lost",
                    rec.get("end_detail") or "",
                )
            check(
                twilio.calls[ringing].status == "canceled",
                "the ringing call was hung up at Twilio",
                twilio.calls[ringing].status,
            )
            check(
                twilio.calls[on_b.sid].status == "in-progress",
                "B's own call went on",
                twilio.calls[on_b.sid].status,
            )

            print("B stops (SIGTERM): its call ends, its lease is released:")
            b.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(b.wait(), 30)
            check(code == 0, "B exited 0", str(code))
            await on_b.wait_ended(10)
            check(twilio.calls[on_b.sid].status == "completed", "B's call was hung up, not left dangling")
            leases = await leases_left(url)
            check(leases == [], "no lease left in the database", ", ".join(leases))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        pg.close()
    print("fleet OK" if not failures else f"fleet FAILED: {', '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
