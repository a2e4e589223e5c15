"""`callbridge demo`: one offline phone call, end to end, on the built-in emulators.

The emulated Twilio places an inbound call to the real callbridge server (uvicorn
on 127.0.0.1): it POSTs the signed voice webhook, gets `<Connect><Stream>` TwiML,
opens the media stream and plays recorded caller speech in real time. The
emulated ElevenLabs agent greets, listens, calls a client tool, answers, and ends
the call with `end_call`. The bridge lets the goodbye play, hangs up through the
(emulated) Twilio REST API, and saves the record, which is printed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from callbridge.call import Call, CallHooks, CallRecord, Tool
from callbridge.config import Settings
from callbridge.emulators.elevenlabs import (
    AgentEmulator,
    AgentScript,
    ClientToolCall,
    EndCall,
    Say,
    UserTranscript,
    WaitForUser,
)
from callbridge.emulators.speech import SPEECH_LINES, load_speech
from callbridge.emulators.twilio import EmulatedCall, MediaStreamCaller, TwilioEmulator
from callbridge.server.app import create_app
from callbridge.server.run import GracefulServer, make_config
from callbridge.store import CallStore

__all__ = ["EXIT_INTERRUPTED", "Keep", "run_demo", "run_demo_interruptible"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

ACCOUNT_SID = "AC" + "d" * 32
CALLER, CLINIC = "+15550100001", "+15550100002"


def _seconds(name: str) -> float:
    return len(load_speech(name)) / 8000


def demo_script() -> AgentScript:
    return AgentScript(
        steps=[
            Say(SPEECH_LINES["agent_greeting"], audio=load_speech("agent_greeting")),
            WaitForUser(_seconds("caller_hello") + 1.0),
            UserTranscript(SPEECH_LINES["caller_hello"]),
            ClientToolCall("check_availability", {"day": "monday"}),
            Say(SPEECH_LINES["agent_slot"], audio=load_speech("agent_slot")),
            WaitForUser(_seconds("caller_confirm") + 1.0),
            UserTranscript(SPEECH_LINES["caller_confirm"]),
            EndCall(SPEECH_LINES["agent_goodbye"], audio=load_speech("agent_goodbye"), close_delay=0.1),
        ],
        output_format="ulaw_8000",
        input_format="ulaw_8000",
        realtime_factor=1.0,
        ping_interval=2.0,
    )


def check_availability(params: dict[str, Any]) -> dict[str, Any]:
    return {"day": params.get("day", "monday"), "free_slots": ["10:00", "11:30"]}


class _Printer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def line(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    def transcript(self, call: Call, entry: dict[str, Any]) -> None:
        who = "agent " if entry["role"] == "agent" else "caller"
        unheard = "  (not played: the caller is being transferred)" if entry.get("unheard") else ""
        self.line(f"{who}: {entry['text']}{unheard}")


class _DemoServer(GracefulServer):
    """The demo's server leaves SIGINT alone: the demo's own handler stops everything."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Keep:
    """`demo --keep`: how long the server stays up after the call, for the web console (0: not
    at all; infinity: until Ctrl-C). A Ctrl-C while it is kept ends the wait, not the demo."""

    seconds: float = 0.0
    waiting: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve_on(self, console_url: str) -> None:
        if self.seconds <= 0:
            return
        endless = math.isinf(self.seconds)
        how_long = "until Ctrl-C" if endless else f"for {self.seconds:g} s (or until Ctrl-C)"
        print(f"\n  the server stays up {how_long}; the call is in the web console:\n  {console_url}\n")
        self.waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if endless else self.seconds):
                    await self.stop.wait()
        finally:
            self.waiting = False


async def run_demo_interruptible(verbose: bool = False, transfer: bool = False, keep: float = 0.0) -> int:
    """`run_demo` (with `transfer`: the keypad-and-transfer demo), stopped at once by the
    first Ctrl-C (one line, exit status 130, no traceback); further presses while it
    stops are ignored. With `keep` (seconds), the server stays up after the call for the web
    console; a Ctrl-C then only ends that wait."""
    loop = asyncio.get_running_loop()
    kept = Keep(keep)
    if transfer:
        from callbridge.demo_transfer import run_transfer_demo  # it imports this module

        demo = asyncio.ensure_future(run_transfer_demo(verbose))
    else:
        demo = asyncio.ensure_future(run_demo(verbose, kept))
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        if kept.waiting:
            kept.stop.set()
            return
        if not interrupted:
            interrupted = True
            demo.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # no loop signal handlers (Windows)
        pass
    try:
        try:
            code = await demo
        except asyncio.CancelledError:
            if not interrupted:
                raise
            code = EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    if interrupted:
        print("callbridge demo: interrupted (Ctrl-C): the call was stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return code


class DemoFailed(Exception):
    """A demo could not run (one line for the user)."""


@dataclass
class DemoRun:
    """One demo's emulators, real server and what it recorded."""

    twilio: TwilioEmulator
    agent: AgentEmulator
    public: str
    settings: Settings
    out: _Printer
    records: list[CallRecord] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    saved: dict[str, Any] | None = None  # the call's record as read back from the database

    async def place_call(self) -> tuple[EmulatedCall, MediaStreamCaller]:
        """The caller dials the clinic; Twilio posts the signed webhook; the stream connects."""
        self.out.line(f"{CALLER} calls {CLINIC}; Twilio posts the signed webhook")
        public = self.public
        call = await self.twilio.place_inbound_call(
            f"{public}/twilio/inbound", from_=CALLER, to=CLINIC, status_callback=f"{public}/twilio/status"
        )
        if call.stream is None:
            raise DemoFailed(f"the call did not connect: {call.twiml_errors}")
        self.out.line(f"media stream connected: call {call.sid}")
        return call, call.stream


@contextlib.asynccontextmanager
async def demo_server(
    out: _Printer,
    script: AgentScript,
    tools: dict[str, Tool] | None = None,
    twilio_options: dict[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[DemoRun]:
    """The emulators and the real server on a fresh SQLite database in a temporary folder;
    after the block, the call's record is read back from that database (`DemoRun.saved`)."""
    with tempfile.TemporaryDirectory(prefix="callbridge-demo-") as tmp:
        db_url = f"sqlite+aiosqlite:///{os.path.join(tmp, 'calls.db')}"
        auth_token = secrets.token_hex(16)
        options = twilio_options or {}
        emulated_twilio = TwilioEmulator(account_sid=ACCOUNT_SID, auth_token=auth_token, **options)
        async with emulated_twilio as twilio, AgentEmulator(script) as agent:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            public = f"http://127.0.0.1:{port}"
            run = DemoRun(
                twilio,
                agent,
                public,
                Settings(
                    twilio_account_sid=ACCOUNT_SID,
                    twilio_auth_token=auth_token,
                    twilio_api_base_url=twilio.base_url,
                    elevenlabs_agent_id="demo_dental_receptionist",
                    elevenlabs_api_base_url=agent.base_url,
                    public_url=public,
                    database_url=db_url,
                    api_token=secrets.token_hex(16),
                    max_call_seconds=120,
                    **settings,
                ),
                out,
            )

            def on_end(record: CallRecord) -> None:
                run.records.append(record)
                run.ended.set()

            hooks = CallHooks(on_transcript=[out.transcript], on_call_end=[on_end])
            app = create_app(run.settings, hooks=hooks, tools=tools)
            server = _DemoServer(make_config(app, "127.0.0.1", port), app.state.callbridge)
            serving = asyncio.ensure_future(server.serve(sockets=[sock]))
            try:
                while not server.started:
                    if serving.done():
                        raise DemoFailed("the server did not start")
                    await asyncio.sleep(0.02)
                print(f"  emulated Twilio REST API   {twilio.base_url}")
                print(f"  emulated ElevenLabs agent  {agent.base_url}")
                yield run
            finally:
                server.should_exit = True  # at once, no drain: also on Ctrl-C (cancelled)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(10):
                        await serving
                sock.close()
        store = CallStore(db_url)
        try:
            await store.init()
            run.saved = await store.get(run.records[0].call_sid or "") if run.records else None
        finally:
            await store.close()


async def run_demo(verbose: bool = False, keep: Keep | None = None) -> int:
    out = _Printer()
    print("callbridge demo: one offline phone call on the built-in emulators of Twilio and ElevenLabs\n")
    try:
        async with demo_server(out, demo_script(), tools={"check_availability": check_availability}) as run:
            public = run.public
            print(f"  callbridge server          {public}  (webhook /twilio/inbound)")
            console_url = f"{public}/ui/#token={run.settings.api_token}"
            print(f"  web console                {console_url}\n")
            call, stream = await run.place_call()
            heard = 0
            for agent_line, caller_line in (
                ("agent_greeting", "caller_hello"),
                ("agent_slot", "caller_confirm"),
            ):
                heard += len(load_speech(agent_line))

                def line_played(target: int = heard) -> bool:
                    return len(stream.played_audio) >= target and stream.buffered_audio_bytes == 0

                # The caller answers once the agent's line has played to the end.
                await stream.wait_until(line_played, timeout=30)
                stream.say(load_speech(caller_line))
            async with asyncio.timeout(60):
                await run.ended.wait()
            await call.wait_ended(10)
            out.line(f"Twilio call status: {call.status} ({call.end_cause})")
            if keep is not None:
                await keep.serve_on(console_url)
    except DemoFailed as exc:
        print(f"callbridge demo: {exc}", file=sys.stderr)
        return 1
    saved = run.saved
    if saved is None:
        print("\ncallbridge demo: FAILED: no call record was saved", file=sys.stderr)
        return 1
    goodbye = load_speech("agent_goodbye")
    played_goodbye = bytes(stream.played_audio).endswith(goodbye)
    m = saved["metrics"]
    print("\nCall record (as saved in the database):")
    print(f"  call            {saved['call_sid']}  {saved['from']} -> {saved['to']} ({saved['direction']})")
    print(f"  conversation    {saved['conversation_id']}")
    print(f"  end reason      {saved['end_reason']}  ({saved['end_detail']})")
    print(f"  duration        {saved['duration_s']:.1f} s")
    print(f"  agent connect   {m.get('agent_connect_ms')} ms")
    print(f"  goodbye         {'played in full' if played_goodbye else 'CUT OFF'} before the hang-up")
    print(f"  hang-up         {m.get('hangup_latency_ms')} ms after the last goodbye mark")
    print(
        f"  frames          {m.get('frames_to_agent')} to the agent, "
        f"{m.get('chunks_to_caller')} chunks to the caller"
    )
    print(f"  transcript      {len(saved['transcript'])} lines")
    ok = saved["end_reason"] == "agent_ended" and call.status == "completed" and played_goodbye
    print("\ndemo " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1
