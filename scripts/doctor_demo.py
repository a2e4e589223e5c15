"""`make doctor-demo`: rehearse the README's first real call against the emulators.

The walk-through is: a public URL (here the loopback address stands in for the tunnel),
`callbridge serve`, `callbridge doctor`, `callbridge numbers connect`, then a phone call. This
script starts the emulated Twilio (an account with one number, pointed at an old server) and
the emulated ElevenLabs agent with one deliberate problem (no End call tool), runs the real
`callbridge` commands as a user would, fixes the problem as the ✗ line says, connects the
number, and calls it. It prints every command and what it answered; exits 0 only if each step
held.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from callbridge.emulators.elevenlabs import AgentEmulator, AgentScript, EndCall, Say, WaitForUser
from callbridge.emulators.speech import SPEECH_LINES, load_speech
from callbridge.emulators.twilio import TwilioEmulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rehearsal import Checks, free_port

ACCOUNT_SID = "AC" + "e" * 32
AUTH_TOKEN = "doctor-demo-auth-token"
XI_KEY = "xi-doctor-demo-key"
AGENT_ID = "agent_doctordemo01"
NUMBER = "+15550109999"
check = Checks()
failures = check.failures


async def callbridge(env: dict[str, str], cwd: Path, *args: str, show: bool = True) -> tuple[int, str]:
    if show:
        print(f"\n$ callbridge {' '.join(args)}", flush=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbridge.cli",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    if show:
        print("  " + text.rstrip().replace("\n", "\n  "), flush=True)
    assert proc.returncode is not None
    return proc.returncode, text


def log_file(path: Path) -> Any:
    return open(path, "ab")  # the server writes it until the end


def agent_script() -> AgentScript:
    return AgentScript(
        steps=[
            Say(SPEECH_LINES["agent_greeting"], audio=load_speech("agent_greeting")),
            WaitForUser(2.0),
            EndCall(SPEECH_LINES["agent_goodbye"], audio=load_speech("agent_goodbye")),
        ],
        realtime_factor=4.0,
    )


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="callbridge-doctor-demo-"))
    port = free_port()
    public = f"http://127.0.0.1:{port}"  # a tunnel's https URL in real life
    async with (
        TwilioEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN) as twilio,
        AgentEmulator(agent_script(), api_key=XI_KEY) as agent,
    ):
        number = twilio.phone_numbers.add(NUMBER, voice_url="https://old-server.example.com/voice")
        agent.agents.add(AGENT_ID, end_call=False)  # the deliberate problem
        # The .env a user writes (README, step 2): credentials and the public URL.
        (work / ".env").write_text(
            "\n".join(
                [
                    f"TWILIO_ACCOUNT_SID={ACCOUNT_SID}",
                    f"TWILIO_AUTH_TOKEN={AUTH_TOKEN}",
                    f"TWILIO_API_BASE_URL={twilio.base_url}",
                    f"ELEVENLABS_AGENT_ID={AGENT_ID}",
                    f"ELEVENLABS_API_KEY={XI_KEY}",
                    f"ELEVENLABS_API_BASE_URL={agent.base_url}",
                    f"CALLBRIDGE_PUBLIC_URL={public}",
                    "CALLBRIDGE_API_TOKEN=doctor-demo-api-token",
                ]
            )
            + "\n"
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ELEVENLABS_", "CALLBRIDGE_"))
        }
        print(f"working folder {work} (its .env holds the settings)", flush=True)
        print(f"\n$ callbridge serve --port {port}   (in the background)", flush=True)
        log = log_file(work / "serve.log")
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "callbridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            cwd=work,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(300):
                    try:
                        if (await http.get(f"{public}/healthz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
            check(server.returncode is None, "the server is up")

            code, out = await callbridge(env, work, "doctor")
            check(code == 1, "doctor exits 1 on a problem")
            check("✗ the agent has no End call system tool" in out, "doctor names the missing End call tool")
            check(
                f"no number of the account sends its calls to {public}/twilio/inbound" in out,
                "doctor says no number reaches this server",
            )

            print("\n(fixing the agent as the ✗ line says: Tools, System tools, End call)", flush=True)
            agent.agents.add(AGENT_ID)
            code, out = await callbridge(env, work, "numbers", "connect", NUMBER)
            check(
                code == 0 and f"after:  POST {public}/twilio/inbound" in out,
                "numbers connect shows the webhook before and after",
            )
            check(number.voice_url == f"{public}/twilio/inbound", "Twilio was told the new voice webhook")

            code, out = await callbridge(env, work, "doctor")
            check(code == 0 and f"✓ {NUMBER}: voice webhook is this server" in out, "doctor: all good now")
            code, out = await callbridge(env, work, "doctor", "--json", show=False)
            report = json.loads(out) if code in (0, 1) else {}
            failed = [c["message"] for c in report.get("checks", []) if c["status"] == "fail"]
            check(code == 0 and report.get("ok") is True and failed == [], "doctor --json: no failure left")

            print(f"\n(calling {NUMBER}: Twilio POSTs the voice webhook it was given)", flush=True)
            call = await twilio.place_inbound_call(
                number.voice_url or "",
                to=NUMBER,
                audio=load_speech("caller_hello"),
                status_callback=number.status_callback,
            )
            check(call.stream is not None, "the call's media stream reached the server")
            await call.wait_ended(60)
            check(call.status == "completed", f"the call completed ({call.status})")

            db = f"sqlite:///{work / 'callbridge.db'}"
            for _ in range(50):  # the record is written in the background
                code, out = await callbridge(
                    env, work, "calls", "list", "--json", "--database-url", db, show=False
                )
                records = json.loads(out) if code == 0 else []
                if records and records[0]["status"] == "ended":
                    break
                await asyncio.sleep(0.2)
            await callbridge(env, work, "calls", "show", call.sid, "--database-url", db)
            check(
                bool(records) and records[0]["end_reason"] == "agent_ended",
                "the record says the agent ended the call (goodbye heard, then hung up)",
            )
        finally:
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)
                await asyncio.wait_for(server.wait(), 30)
            log.close()
    if failures:
        print(f"\ndoctor-demo FAILED: {'; '.join(failures)} (server log: {work / 'serve.log'})")
        return 1
    print(
        "\ndoctor-demo OK: doctor found the problem, the fix cleared it, the number was connected, "
        "the call went through"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
