"""How long the fleet takes to act (RELIABILITY.md "The fleet"), measured on this machine:

- an instance SIGKILLed with a call ringing: until another instance has closed its record
  (same host: the survivor sees the process gone at its next heartbeat);
- an instance that hangs (SIGSTOP), lease L: until its call is closed (at least L);
- `POST /calls/{sid}/hangup` on the instance holding the call vs on another one (the
  command goes over LISTEN/NOTIFY and the reply comes back);
- a gunicorn worker SIGKILLed: until its replacement holds a lease.

    .venv/bin/python bench/fleet_times.py [--trials 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fleet_demo import api, base_env, free_port, record, serve, until  # noqa: E402

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, Say  # noqa: E402
from callbridge.emulators.twilio import TwilioEmulator  # noqa: E402
from tests.pgserver import PostgresServer, find_bindir  # noqa: E402

LEASE = 3.0  # heartbeat every 0.5 s, expiry 2 s after a renewal


def summary(name: str, values: list[float], unit: str = "s") -> None:
    shown = ", ".join(f"{v:.3f}" if unit == "s" else f"{v:.1f}" for v in values)
    mid, top = statistics.median(values), max(values)
    print(f"{name}: median {mid:.3f} {unit}, max {top:.3f} {unit} (n={len(values)}: {shown})")


async def ringing_call(port: int) -> str:
    async with api(port) as http:
        resp = await http.post("/calls", json={"to": "+15550003333", "from": "+15550004444"})
        sid: str = resp.json()["call_sid"]
        return sid


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def main(trials: int) -> None:
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found: run scripts/ensure-postgres.sh (as root)")
    logs = Path(tempfile.mkdtemp(prefix="callbridge-fleet-times-"))
    pg = PostgresServer.create(bindir)
    talk = AgentScript(steps=[Say("I can talk for a long time.", seconds=120.0)], realtime_factor=1.0)
    killed, paused, local_ms, remote_ms, replaced = [], [], [], [], []
    try:
        async with TwilioEmulator(answer_delay=120.0) as twilio, AgentEmulator(talk) as agent:
            for trial in range(trials):
                url = pg.create_database()
                env = base_env(twilio, agent, url, LEASE)
                pa, pb = free_port(), free_port()
                a = await serve("A", env, pa, logs / f"a{trial}.log", quiet=True)
                b = await serve("B", env, pb, logs / f"b{trial}.log", quiet=True)
                try:
                    # hang-ups: on the holder, then through the other instance
                    for _ in range(4):
                        for via, out in ((pa, local_ms), (pb, remote_ms)):
                            call = await twilio.place_inbound_call(f"http://127.0.0.1:{pa}/twilio/inbound")
                            await agent.wait_for_conversations(len(agent.conversations) + 1, timeout=10)
                            async with api(via) as http:
                                t0 = time.perf_counter()
                                resp = await http.post(f"/calls/{call.sid}/hangup")
                                out.append((time.perf_counter() - t0) * 1000)
                            assert resp.status_code == 200, resp.text
                            await call.wait_ended(10)
                    # SIGKILL with a call ringing
                    sid = await ringing_call(pa)
                    a.send_signal(signal.SIGKILL)
                    await a.wait()
                    t0 = time.monotonic()
                    assert await until(lambda sid=sid, pb=pb: _ended(pb, sid), LEASE * 3), (
                        "A's call was not closed"
                    )
                    killed.append(time.monotonic() - t0)
                    # SIGSTOP with a call ringing (a third instance, so B stays the judge)
                    pc = free_port()
                    c = await serve("C", env, pc, logs / f"c{trial}.log", quiet=True)
                    sid = await ringing_call(pc)
                    c.send_signal(signal.SIGSTOP)
                    t0 = time.monotonic()
                    assert await until(lambda sid=sid, pb=pb: _ended(pb, sid), LEASE * 4), (
                        "C's call was not closed"
                    )
                    paused.append(time.monotonic() - t0)
                    c.send_signal(signal.SIGKILL)
                    await c.wait()
                finally:
                    for proc in (a, b):
                        await stop(proc)
            # workers
            for trial in range(trials):
                url = pg.create_database()
                env = base_env(twilio, agent, url, LEASE)
                port = free_port()
                proc = await serve(
                    "W", env, port, logs / f"w{trial}.log", quiet=True, args=("--workers", "2")
                )
                try:
                    assert await until(lambda url=url: _lease_count(url, 2), 20)
                    pids = await _lease_pids(url)
                    os.kill(pids[0], signal.SIGKILL)
                    t0 = time.monotonic()
                    assert await until(lambda url=url, dead=pids[0]: _replaced(url, dead), 20), (
                        "worker not replaced"
                    )
                    replaced.append(time.monotonic() - t0)
                finally:
                    await stop(proc)
    finally:
        pg.close()
    print(
        f"lease {LEASE:g} s (heartbeat {LEASE / 6:g} s, expiry {LEASE * 2 / 3:g} s); "
        f"{trials} trials; logs in {logs}"
    )
    summary("killed instance -> its call closed by another (same host)", killed)
    summary("hung instance (SIGSTOP) -> its call closed", paused)
    summary("hang-up on the holder (HTTP round trip)", local_ms, "ms")
    summary("hang-up through another instance (HTTP round trip)", remote_ms, "ms")
    summary("gunicorn worker killed -> replacement holds a lease", replaced)


async def _ended(port: int, sid: str) -> bool:
    return (await record(port, sid)).get("status") == "ended"


async def _lease_pids(url: str) -> list[int]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [int(r[0]) for r in (await conn.execute(text("SELECT pid FROM instances"))).all()]
    finally:
        await engine.dispose()


async def _lease_count(url: str, n: int) -> bool:
    return len(await _lease_pids(url)) == n


async def _replaced(url: str, dead: int) -> bool:
    pids = await _lease_pids(url)
    return len(pids) == 2 and dead not in pids


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    asyncio.run(main(parser.parse_args().trials))
