"""Side-by-side load benchmark of Twilio <-> ElevenLabs bridges (issue 5).

For each number of concurrent calls N (ascending) and each system, one run:

1. the emulated agent (loadgen_agent.py) starts, pinned to core 0;
2. the system under test starts pinned to core 1 (`os.sched_setaffinity`);
   its idle RSS is read;
3. the emulated callers + Twilio REST stub (loadgen_caller.py) start, pinned to
   core 0, and open N calls evenly over the ramp;
4. over the steady window the SUT's CPU (utime+stime from /proc/<pid>/stat) and
   peak RSS are measured; frame send/arrival times are logged by both sides;
5. the agents say goodbye (spread over a few seconds), end_call, close 1000; the
   callers record when the goodbye finished playing, the marks, and the REST
   hang-up (or the stream close, or nothing);
6. everything is stopped and joined: latency per frame each way (tags) or per
   onset marker (conversion), lost and late frames, CPU per call-minute, memory
   per call, hang-up timing.

Systems are interleaved at each N (same minute, same noise) and a system stops
stepping after its first failure (p99 >= 20 ms either way, or a lost frame, or a
call not established). Results: bench/results/bench.json and bench.md; the plot
is drawn by plot.py (matplotlib lives in the peers venv).

    python bench/run.py                 # full run (make bench)
    python bench/run.py --smoke         # 5 calls, callbridge + relay, a few seconds
                                        # (report in bench/results/smoke/, ignored by git)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import Schedule  # noqa: E402

PROJECT_PY = sys.executable
PEERS_PY = str(BENCH / ".venv-peers" / "bin" / "python")
CALLBRIDGE_CLI = str(Path(sys.executable).parent / "callbridge")
# The load generator runs in the peers venv when it exists (it has uvloop); see loadgen_*.py.
LOADGEN_PY = PEERS_PY if Path(PEERS_PY).exists() else PROJECT_PY
TICK = os.sysconf("SC_CLK_TCK")
THRESHOLD_MS = 20.0
# The load profiles the generators know (loadgen_agent.py --profile): the agent's speech pattern.
LOAD_PROFILES = ("default", "continuous")
# py-spy (for --py-spy) from the peers venv, else from PATH.
PY_SPY = str(BENCH / ".venv-peers" / "bin" / "py-spy")
if not Path(PY_SPY).exists():
    PY_SPY = shutil.which("py-spy") or PY_SPY
# A smoke run checks the harness, it is no result: its report goes to a folder git ignores.
SMOKE_OUT = BENCH / "results" / "smoke" / "smoke.json"


@dataclass
class System:
    name: str
    label: str
    argv: list[str]
    fmt: str = "ulaw_8000"
    path: str = "/twilio/media-stream"
    signed: bool = False
    env: dict[str, str] = field(default_factory=dict)
    peers: bool = False
    note: str = ""
    # An HTTP path that answers 200 once the system is ready (its port may open before).
    ready: str | None = None


def systems() -> dict[str, System]:
    s = BENCH / "systems"
    app_env = {"CALLBRIDGE_LOG_LEVEL": "warning"}  # the rest is filled per run (run_one)
    return {
        "callbridge": System(
            "callbridge",
            "callbridge (ulaw passthrough)",
            [PROJECT_PY, str(s / "callbridge_ws.py")],
            note="Bridge.serve_websockets (bare websockets server)",
        ),
        "callbridge-pcm16": System(
            "callbridge-pcm16",
            "callbridge (pcm_16000 conversion)",
            [PROJECT_PY, str(s / "callbridge_ws.py")],
            fmt="pcm_16000",
            note="Bridge.serve_websockets; agent audio pcm_16000 both ways (soxr)",
        ),
        "callbridge-app": System(
            "callbridge-app",
            "callbridge server (uvicorn, ulaw)",
            [CALLBRIDGE_CLI, "serve"],
            signed=True,
            env=app_env,
            # `serve` binds its port before it loads the app and runs the migrations: the idle
            # RSS is taken once it answers, so that start-up is not counted as per-call memory.
            ready="/readyz",
            note="`callbridge serve`: Starlette/uvicorn, signatures, stream tokens, SQLite records",
        ),
        "relay": System("relay", "bare relay, websockets", [PROJECT_PY, str(s / "relay.py")]),
        "relay-aiohttp": System(
            "relay-aiohttp",
            "bare relay, aiohttp + uvloop + orjson (floor)",
            [PROJECT_PY, str(s / "relay_aiohttp.py")],
            note="aiohttp's server and client (C HTTP parser and frame reader), orjson; REST hang-up",
        ),
        "relay-lean": System(
            "relay-lean",
            "bare relay, minimal WebSocket layer",
            [PROJECT_PY, str(s / "relay_lean.py")],
            note="bench/leanws.py: frames parsed in data_received, no task or queue per message",
        ),
        "callbridge-asyncio": System(
            "callbridge-asyncio",
            "callbridge (ulaw, asyncio loop)",
            [PROJECT_PY, str(s / "callbridge_ws.py")],
            env={"BENCH_LOOP": "asyncio"},
            note="as `callbridge`, on the standard asyncio event loop instead of uvloop",
        ),
        "relay-asyncio": System(
            "relay-asyncio",
            "bare relay (asyncio loop)",
            [PROJECT_PY, str(s / "relay.py")],
            env={"BENCH_LOOP": "asyncio"},
        ),
        "sdk": System(
            "sdk",
            "ElevenLabs SDK pattern (FastAPI)",
            [PEERS_PY, str(s / "sdk_pattern.py")],
            path="/media-stream",
            peers=True,
        ),
        "pipecat": System(
            "pipecat",
            "Pipecat (Twilio serializer)",
            [PEERS_PY, str(s / "pipecat_bot.py")],
            path="/ws",
            peers=True,
            note="pipeline at 8 kHz PCM; the relay processor speaks mu-law to the agent",
        ),
        "pipecat-pcm16": System(
            "pipecat-pcm16",
            "Pipecat (pcm_16000)",
            [PEERS_PY, str(s / "pipecat_bot.py"), "--format", "pcm_16000"],
            fmt="pcm_16000",
            path="/ws",
            peers=True,
            note="pipeline at 16 kHz; agent audio pcm_16000",
        ),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


NICE = int(os.environ.get("BENCH_NICE", "-10"))
RT = os.environ.get("BENCH_RT", "1") != "0"


def pin(core: int) -> Any:
    """Pin to one core and raise priority, best effort. The machine is shared: another
    job on the same core would otherwise both take CPU and, worse for latency, delay
    every wake-up by its time slice. SCHED_FIFO (priority 1; the kernel still leaves
    5% to others) makes the core behave like a dedicated one; without the right to
    use it, nice -10."""

    def apply() -> None:
        with contextlib.suppress(OSError):
            if (os.cpu_count() or 1) > core:
                os.sched_setaffinity(0, {core})
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
        if RT:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))

    return apply


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(x) for x in fields[:8]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK


def cpu_seconds(pid: int) -> float:
    user, system = cpu_split(pid)
    return user + system


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1.0) as resp:
                if resp.status == 200:
                    return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


# -- analysis ---------------------------------------------------------------------------


def lat_summary(lat_ms: np.ndarray, lost: int, expected: int) -> dict[str, Any]:
    if lat_ms.size == 0:
        return {"n": 0, "expected": expected, "lost": lost, "late": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": int(lat_ms.size),
        "expected": expected,
        "lost": int(lost),
        "late": int((lat_ms > THRESHOLD_MS).sum()),
        "p50": round(float(np.percentile(lat_ms, 50)), 2),
        "p99": round(float(np.percentile(lat_ms, 99)), 2),
        "max": round(float(lat_ms.max()), 2),
    }


def join_tags(
    sent_key: np.ndarray, sent_t: np.ndarray, recv_key: np.ndarray, recv_t: np.ndarray, w0: float, w1: float
) -> dict[str, Any]:
    m = (sent_t >= w0) & (sent_t < w1)
    sk, st = sent_key[m], sent_t[m]
    if recv_key.size:
        order = np.lexsort((recv_t, recv_key))
        rk, rt = recv_key[order], recv_t[order]
        first = np.ones(rk.size, dtype=bool)
        first[1:] = rk[1:] != rk[:-1]
        rk, rt = rk[first], rt[first]
        idx = np.searchsorted(rk, sk)
        idx_c = np.minimum(idx, rk.size - 1)
        found = (idx < rk.size) & (rk[idx_c] == sk)
        lat = (rt[idx_c[found]] - st[found]) * 1000
    else:
        found = np.zeros(sk.size, dtype=bool)
        lat = np.array([])
    return lat_summary(lat, int((~found).sum()), int(sk.size))


def join_onsets(
    marker_call: np.ndarray,
    marker_t: np.ndarray,
    onset_call: np.ndarray,
    onset_t: np.ndarray,
    w0: float,
    w1: float,
) -> dict[str, Any]:
    """Onset markers, matched first-in first-out per call (audio keeps its order; a
    converter may release two markers in one block): the k-th onset is the k-th
    marker's arrival. Markers sent in the window with no onset are lost."""
    lats: list[float] = []
    lost = expected = 0
    for call in np.unique(marker_call[(marker_t >= w0) & (marker_t < w1)]):
        mt = np.sort(marker_t[marker_call == call])
        ot = np.sort(onset_t[onset_call == call])
        j = 0
        for t in mt:
            while j < ot.size and ot[j] < t:
                j += 1  # an onset before this marker was sent cannot be it
            # An onset far later than this marker belongs to a later one: this marker was lost
            # (and must not shift every later match).
            hit = j < ot.size and ot[j] - t <= 0.5
            if w0 <= t < w1:
                expected += 1
                if hit:
                    lats.append((ot[j] - t) * 1000)
                else:
                    lost += 1
            if hit:
                j += 1
    return lat_summary(np.array(lats), lost, expected)


def pct(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "min": None}
    a = np.array(values)
    return {
        "n": int(a.size),
        "p50": round(float(np.percentile(a, 50)), 1),
        "p99": round(float(np.percentile(a, 99)), 1),
        "max": round(float(a.max()), 1),
        "min": round(float(a.min()), 1),
    }


def hangup_summary(calls: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, int] = {}
    after_mark: list[float] = []
    after_audio: list[float] = []
    cut_ms: list[float] = []
    silence_s: list[float] = []
    stub_lag: list[float] = []
    for c in calls:
        if c["ended_by"] == "caller" and c["audio_end_at"] is not None and c["ended_at"] is not None:
            silence_s.append(c["ended_at"] - c["audio_end_at"])
        by[str(c["ended_by"])] = by.get(str(c["ended_by"]), 0) + 1
        if c["unplayed_ms_at_end"] is not None and c["ended_by"] in ("rest", "sut_close"):
            cut_ms.append(c["unplayed_ms_at_end"])
        if c["rest_hangup_at"] is not None:
            if c.get("rest_seen_after_sent_ms") is not None:
                stub_lag.append(c["rest_seen_after_sent_ms"])
            if c["last_mark_at"] is not None:
                after_mark.append((c["rest_hangup_at"] - c["last_mark_at"]) * 1000)
            if c["audio_end_at"] is not None:
                after_audio.append((c["rest_hangup_at"] - c["audio_end_at"]) * 1000)
    return {
        "ended_by": by,
        "rest_hangup_after_last_mark_ms": pct(after_mark),
        "rest_hangup_after_audio_end_ms": pct(after_audio),
        # How long the REST stub's process took to read a hang-up after the kernel had it: not
        # counted above (the stub shares its core with the callers), shown to size it.
        "rest_stub_read_lag_ms": pct(stub_lag),
        "goodbye_cut_ms": pct(cut_ms),
        "goodbye_cut_calls": sum(1 for x in cut_ms if x > 1.0),
        # Calls the system never ended: the caller sat in silence until hanging up itself.
        "left_in_silence_calls": len(silence_s),
        "silence_until_caller_hung_up_s": pct(silence_s),
    }


# -- one run ------------------------------------------------------------------------------


@dataclass
class Timing:
    steady_s: float
    settle_s: float = 2.0
    goodbye_spread_s: float = 2.0
    hard_after_s: float = 4.0

    def schedule(self, n: int, now: float) -> Schedule:
        ramp = max(0.5, n / 100)
        t0 = now + 1.0
        ss = t0 + ramp + self.settle_s
        se = ss + self.steady_s
        ga = se + 0.3
        return Schedule(
            n,
            t0,
            ramp,
            ss,
            se,
            ga,
            self.goodbye_spread_s,
            ga + self.goodbye_spread_s + 1.2 + self.hard_after_s,
        )


def run_one(
    system: System,
    n: int,
    timing: Timing,
    work: Path,
    pyspy: str | None = None,
    baseline: dict[str, Any] | None = None,
    load: str = "default",
    trace: bool = False,
) -> dict[str, Any]:
    agent_port, sut_port, rest_port = free_port(), free_port(), free_port()
    tag = f"{system.name}-{n}"
    agent_out, caller_out = work / f"{tag}-agent", work / f"{tag}-caller"
    logs = {k: open(work / f"{tag}-{k}.log", "wb") for k in ("agent", "sut", "caller")}
    agent_url = f"http://127.0.0.1:{agent_port}"
    rest_url = f"http://127.0.0.1:{rest_port}"
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    sut_env = dict(env)
    scratch = os.environ.get("BENCH_CALLBRIDGE_SRC")
    if scratch and system.name.startswith("callbridge"):
        # Measure a proposed change to src/ on a scratch copy: it shadows the installed package.
        sut_env["PYTHONPATH"] = scratch
    sut_env.update(system.env)
    trace_out = work / f"{tag}-trace.json"
    if trace and system.name.startswith("callbridge-app"):
        # bench/trace/sitecustomize.py times each hang-up, the loop's lateness and full GCs.
        sut_env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(BENCH / "trace"), sut_env.get("PYTHONPATH")) if x
        )
        sut_env["BENCH_TRACE_OUT"] = str(trace_out)
    argv = list(system.argv)
    if system.name.startswith("callbridge-app"):
        from common import ACCOUNT_SID, AUTH_TOKEN

        sut_env.update(
            {
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_API_BASE_URL": rest_url,
                "ELEVENLABS_AGENT_ID": "bench-agent",
                "ELEVENLABS_API_BASE_URL": agent_url,
                "CALLBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{sut_port}",
                "CALLBRIDGE_DATABASE_URL": f"sqlite+aiosqlite:///{work / (tag + '.db')}",
                "CALLBRIDGE_MAX_CONCURRENT_CALLS": "5000",
            }
        )
        argv += ["--host", "127.0.0.1", "--port", str(sut_port), "--log-level", "warning"]
    else:
        argv += ["--port", str(sut_port), "--agent-url", agent_url, "--rest-url", rest_url]
    result: dict[str, Any] = {"system": system.name, "label": system.label, "calls": n, "format": system.fmt}
    procs: list[subprocess.Popen[bytes]] = []
    caller_calls: list[dict[str, Any]] = []
    try:
        now = time.monotonic()
        # Placeholder schedule for the agent: replaced once the SUT is up (same shape, later t0).
        sut = subprocess.Popen(
            argv, stdout=logs["sut"], stderr=subprocess.STDOUT, env=sut_env, preexec_fn=pin(1), cwd=str(work)
        )
        procs.append(sut)
        if not wait_port(sut_port, sut, 60) or (
            system.ready is not None and not wait_ready(sut_port, system.ready, sut, 60)
        ):
            result["error"] = f"system did not start (see {tag}-sut.log)"
            return result
        time.sleep(0.5)
        rss0 = rss_mb(sut.pid)
        now = time.monotonic()
        sched = timing.schedule(n, now + 1.0)
        agent = subprocess.Popen(
            [
                LOADGEN_PY,
                str(BENCH / "loadgen_agent.py"),
                "--port",
                str(agent_port),
                "--schedule",
                sched.to_json(),
                "--format",
                system.fmt,
                "--profile",
                load,
                "--out",
                str(agent_out),
            ],
            stdout=logs["agent"],
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=pin(0),
        )
        procs.append(agent)
        caller_argv = [
            LOADGEN_PY,
            str(BENCH / "loadgen_caller.py"),
            "--url",
            f"ws://127.0.0.1:{sut_port}{system.path}",
            "--rest-port",
            str(rest_port),
            "--schedule",
            sched.to_json(),
            "--format",
            system.fmt,
            "--profile",
            load,
            "--out",
            str(caller_out),
        ]
        if system.signed:
            caller_argv.append("--signed")
        if not wait_port(agent_port, agent, 20):
            result["error"] = "agent emulator did not start"
            return result
        caller = subprocess.Popen(
            caller_argv, stdout=logs["caller"], stderr=subprocess.STDOUT, env=env, preexec_fn=pin(0)
        )
        procs.append(caller)
        prof: subprocess.Popen[bytes] | None = None
        # Steady window: CPU of the SUT and of the load generator, peak RSS.
        time.sleep(max(0.0, sched.steady_start - time.monotonic()))
        c0 = {p.pid: cpu_seconds(p.pid) for p in (sut, agent, caller)}
        split0 = {p.pid: cpu_split(p.pid) for p in (sut, agent, caller)}
        busy0 = machine_busy()
        t_c0 = time.monotonic()
        if pyspy:
            prof = subprocess.Popen(
                [
                    PY_SPY,
                    "record",
                    "-p",
                    str(sut.pid),
                    "-d",
                    str(int(timing.steady_s)),
                    "-f",
                    {".json": "speedscope", ".txt": "raw"}.get(Path(pyspy).suffix, "flamegraph"),
                    "-o",
                    pyspy,
                    "-r",
                    "200",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        peak = rss0
        while time.monotonic() < sched.steady_end:
            time.sleep(min(1.0, max(0.0, sched.steady_end - time.monotonic())))
            peak = max(peak, rss_mb(sut.pid))
        c1 = {p.pid: cpu_seconds(p.pid) for p in (sut, agent, caller)}
        split1 = {p.pid: cpu_split(p.pid) for p in (sut, agent, caller)}
        busy1 = machine_busy()
        window = time.monotonic() - t_c0
        rss_n = rss_mb(sut.pid)
        if prof is not None:
            prof.wait(60)
        # Teardown phase: goodbyes, hang-ups; the load generators exit by themselves.
        for p in (caller, agent):
            try:
                p.wait(max(5.0, sched.hard_end + 15 - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop(p)
        cs = json.loads(caller_out.with_suffix(".json").read_text())
        caller_calls = cs["calls"]
        ag = json.loads(agent_out.with_suffix(".json").read_text())
        if {cs.get("profile"), ag.get("profile")} != {load}:
            result["error"] = (
                f"load generators ran profiles {cs.get('profile')}/{ag.get('profile')}, not {load}"
            )
            return result
        result["load_profile"] = load
        cz = np.load(caller_out.with_suffix(".npz"))
        az = np.load(agent_out.with_suffix(".npz"))
        w0, w1 = sched.steady_start, sched.steady_end
        if system.fmt == "ulaw_8000":
            up = join_tags(cz["sent_key"], cz["sent_t"], az["recv_key"], az["recv_t"], w0, w1)
            down = join_tags(az["sent_key"], az["sent_t"], cz["recv_key"], cz["recv_t"], w0, w1)
            method = "tags"
        else:
            up = join_onsets(cz["marker_call"], cz["marker_t"], az["onset_call"], az["onset_t"], w0, w1)
            down = join_onsets(az["marker_call"], az["marker_t"], cz["onset_call"], cz["onset_t"], w0, w1)
            method = "onset markers"
        sut_cpu = c1[sut.pid] - c0[sut.pid]
        connected = sum(1 for c in cs["calls"] if c["connected"])
        late_gen = cz["late_ms"]
        result.update(
            {
                "method": method,
                "window_s": round(window, 2),
                "connected": connected,
                "agent_conversations": ag["ready"],
                "up": up,
                "down": down,
                "sut_cpu_s": round(sut_cpu, 3),
                "sut_core_util": round(sut_cpu / window, 3),
                "cpu_ms_per_call_minute": round(sut_cpu * 1000 / (n * window / 60), 1),
                "rss_idle_mb": round(rss0, 1),
                "rss_peak_mb": round(peak, 1),
                "rss_end_mb": round(rss_n, 1),
                "mem_per_call_kb": round((peak - rss0) * 1024 / n, 1),
                "loadgen_core0_util": round(
                    ((c1[agent.pid] - c0[agent.pid]) + (c1[caller.pid] - c0[caller.pid])) / window, 3
                ),
                # Everything else the (shared) machine ran meanwhile, in cores.
                "background_cores": round(((busy1 - busy0) - sum(c1[k] - c0[k] for k in c0)) / window, 2),
                "loadgen_send_late_p99_ms": round(float(np.percentile(late_gen, 99)), 2)
                if late_gen.size
                else None,
                "cpu_user_sys_per_s": {
                    name: [round((split1[p.pid][k] - split0[p.pid][k]) / window, 3) for k in (0, 1)]
                    for name, p in (("sut", sut), ("agent", agent), ("caller", caller))
                },
                "pongs": ag["pongs"],
                "pings": ag["pings"],
                "hangup": hangup_summary(cs["calls"]),
                "rest_requests": cs["rest_requests"],
            }
        )
        limit_up, limit_down = THRESHOLD_MS, THRESHOLD_MS
        if baseline is not None:
            # A converter holds audio back by design (soxr releases blocks): its own delay at
            # the lightest load is the baseline, and the load may add at most 20 ms to it.
            limit_up = (baseline["up"]["p99"] or 0) + THRESHOLD_MS
            limit_down = (baseline["down"]["p99"] or 0) + THRESHOLD_MS
        result["p99_limit_ms"] = [round(limit_up, 1), round(limit_down, 1)]
        result["pass"] = bool(
            connected == n
            and ag["ready"] == n
            and up["lost"] == 0
            and down["lost"] == 0
            and up["p99"] is not None
            and down["p99"] is not None
            and up["p99"] < limit_up
            and down["p99"] < limit_down
        )
        return result
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs.values():
            f.close()
        if trace_out.exists() and caller_calls:
            result["trace"] = trace_summary(json.loads(trace_out.read_text()), caller_calls)


def trace_summary(trace: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Where each hang-up's time went (`--trace`): caller's last mark sent -> the server read
    it -> the REST hang-up started -> the request reached the REST stub (kernel stamp)."""
    from common import call_sid_of

    parts: dict[str, list[float]] = {k: [] for k in ("read", "wake", "send", "total", "new_conn", "lead")}
    rows = []
    for c in calls:
        t = trace["calls"].get(call_sid_of(c["index"]), {})
        sent, wire = c["last_mark_at"], c["rest_hangup_at"]
        if sent is None or wire is None or "last_mark_read" not in t or "hangup_start" not in t:
            continue
        row = {
            "call": c["index"],
            "read": (t["last_mark_read"] - sent) * 1000,
            "wake": (t["hangup_start"] - t["last_mark_read"]) * 1000,
            "send": (wire - t["hangup_start"]) * 1000,
            "total": (wire - sent) * 1000,
            "new_conn": (t["conn_end"] - t["conn_start"]) * 1000 if "conn_end" in t else None,
            # How long before the hang-up started it was announced (None: it was not).
            "lead": (t["hangup_start"] - t["expected"]) * 1000 if "expected" in t else None,
            "at": wire,
        }
        rows.append(row)
        for k in parts:
            if row[k] is not None:
                parts[k].append(row[k])
    out: dict[str, Any] = {k: pct(v) for k, v in parts.items()}
    if rows:
        first = min(r["at"] for r in rows) - 1.0
        last = max(r["at"] for r in rows)
        late = [ms for at, ms in trace["lag"] if first <= at <= last]
        out["goodbye_loop_late_over_5ms"] = len(late)
        out["goodbye_loop_late_max_ms"] = max(late, default=0.0)
        out["goodbye_full_gcs_ms"] = [round(ms, 1) for at, ms in trace["full_gcs"] if first <= at <= last]
    out["slowest"] = [
        {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "at"}
        for r in sorted(rows, key=lambda r: -r["total"])[:8]
    ]
    return out


# -- reporting ------------------------------------------------------------------------------


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v}{unit}"


def _triple(x: dict[str, Any]) -> str:
    return f"{fmt(x['p50'])} / {fmt(x['p99'])} / {fmt(x['max'])}"


def _ended(h: dict[str, Any]) -> str:
    names = {"rest": "REST hang-up", "sut_close": "stream closed", "caller": "never (caller hung up)"}
    return ", ".join(f"{names.get(k, k)}: {v}" for k, v in sorted(h["ended_by"].items()))


def floor_of(rows: list[dict[str, Any]]) -> str:
    """The system every other is compared with: the aiohttp relay when it ran (issue 17), else
    the websockets relay (runs before it existed)."""
    return "relay-aiohttp" if any(r["system"] == "relay-aiohttp" for r in rows) else "relay"


def vs_floor(r: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """CPU per call-minute of a point over the floor's at the same N: the floor's point of that
    N nearest to it in the run (the same interleaved round, the same minute), before or after."""
    floor = floor_of(rows)
    at = next((i for i, x in enumerate(rows) if x is r), len(rows))
    mine = [
        (i, x) for i, x in enumerate(rows) if x["system"] == floor and x["calls"] == r["calls"] and "up" in x
    ]
    ref = min(mine, key=lambda ix: (abs(ix[0] - at), ix[0]))[1] if mine else None
    if ref is None or not ref["cpu_ms_per_call_minute"] or "cpu_ms_per_call_minute" not in r:
        return None
    return round(r["cpu_ms_per_call_minute"] / ref["cpu_ms_per_call_minute"], 2)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per system: capacity, and the numbers at the largest N every system ran."""
    rows = [r for r in report["runs"] if "up" in r]
    systems_ = list(dict.fromkeys(r["system"] for r in rows))
    common = [
        n
        for n in sorted({r["calls"] for r in rows})
        if all(any(r["system"] == s and r["calls"] == n for r in rows) for s in systems_)
    ]
    at = common[-1] if common else None
    relay = next((r for r in rows if r["system"] == floor_of(rows) and r["calls"] == at), None)
    out = []
    for s in systems_:
        mine = [r for r in rows if r["system"] == s]
        top = max(mine, key=lambda r: r["calls"])
        ref = next((r for r in mine if r["calls"] == at), top)
        passed = [r["calls"] for r in mine if r.get("pass")]
        # Hang-up and memory at the largest N held (a saturated point measures the backlog).
        held = max((r for r in mine if r.get("pass")), key=lambda r: r["calls"], default=top)
        out.append(
            {
                "system": s,
                "label": top["label"],
                "capacity": max(passed) if passed else None,
                "failed_at": min((r["calls"] for r in mine if not r.get("pass")), default=None),
                "cpu_calls_per_core": int(60000 / top["cpu_ms_per_call_minute"])
                if top["cpu_ms_per_call_minute"]
                else None,
                "at": ref["calls"],
                "ref": ref,
                "cpu_vs_relay": (
                    round(ref["cpu_ms_per_call_minute"] / relay["cpu_ms_per_call_minute"], 2)
                    if relay and relay["cpu_ms_per_call_minute"]
                    else None
                ),
                "top": top,
                "held": held,
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    rows = report["runs"]
    summ = summary_rows(report)
    at = summ[0]["at"] if summ else None
    floor = floor_of(rows)
    out = [
        f"Run {report['started']} on {report['machine']} ({report['cores']} cores, shared), Python "
        f"{report.get('python', '?')}; steady window {report['steady_s']} s per point; "
        "system under test pinned "
        f"to core 1, load generator to core 0; load profile {report.get('load_profile', 'default')}. "
        f"Command: `{report.get('command', '')}`.",
        "",
        f"### Summary (latency, CPU and memory at N = {at}, the largest N every system ran)",
        "",
        "| system | calls held (p99 within limit, nothing lost) | first failed N | calls/core by CPU "
        f"| up p50 / p99 / max ms | down p50 / p99 / max ms | CPU ms per call-minute | vs {floor} "
        "| memory per call (KB, at its largest N held) | phone leg after the agent's goodbye |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for x in summ:
        ref, top = x["ref"], x["held"]
        out.append(
            f"| {x['label']} | {fmt(x['capacity'])} | {fmt(x['failed_at'])} | {fmt(x['cpu_calls_per_core'])} "
            f"| {_triple(ref['up'])} | {_triple(ref['down'])} | {ref['cpu_ms_per_call_minute']} "
            f"| {fmt(x['cpu_vs_relay'], 'x')} | {top['mem_per_call_kb']} | {_ended(top['hangup'])} |"
        )
    out += [
        "",
        "### Every point",
        "",
        "| system | N | up p50 / p99 / max ms | down p50 / p99 / max ms | lost up/down "
        "| late (>20 ms) up/down "
        f"| SUT core | CPU ms per call-min | vs {floor} | RSS idle/peak MB | KB per call "
        "| hang-up after last mark p99 ms | REST stub's own read delay p99 ms (not counted) | load gen core "
        "| load gen late p99 ms | other jobs (cores) "
        "| pass |",
        "|---|---:|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['label']} | {r['calls']} | {r['error']} | | | | | | | | | | | | | | no |")
            continue
        u, d = r["up"], r["down"]
        out.append(
            f"| {r['label']} | {r['calls']} | {_triple(u)} | {_triple(d)} | {u['lost']}/{d['lost']} "
            f"| {u['late']}/{d['late']} | {r['sut_core_util']:.2f} | {r['cpu_ms_per_call_minute']} "
            f"| {fmt(vs_floor(r, rows), 'x')} "
            f"| {r['rss_idle_mb']}/{r['rss_peak_mb']} | {r['mem_per_call_kb']} "
            f"| {fmt(r['hangup']['rest_hangup_after_last_mark_ms']['p99'])} "
            f"| {fmt(r['hangup'].get('rest_stub_read_lag_ms', {}).get('p99'))} "
            f"| {r['loadgen_core0_util']:.2f} | {fmt(r['loadgen_send_late_p99_ms'])} "
            f"| {r['background_cores']:.2f} | {'yes' if r['pass'] else 'no'} |"
        )
    out += [
        "",
        "### Hang-up (at each system's largest N held)",
        "",
        "| system | N | how calls ended | REST hang-up after last mark p50 / p99 / max ms "
        "| REST hang-up after the goodbye's audio ended p50 / p99 / max ms "
        "| goodbye cut off (calls; p50 / max ms) "
        "| left in silence (calls) |",
        "|---|---:|---|---|---|---|---:|",
    ]
    for x in summ:
        r = x["held"]
        h = r["hangup"]
        c = h["goodbye_cut_ms"]
        out.append(
            f"| {r['label']} | {r['calls']} | {_ended(h)} | {_triple(h['rest_hangup_after_last_mark_ms'])} "
            f"| {_triple(h['rest_hangup_after_audio_end_ms'])} | {h['goodbye_cut_calls']}; {fmt(c['p50'])} / "
            f"{fmt(c['max'])} | {h.get('left_in_silence_calls', 0)} |"
        )
    traced = [r for r in rows if "trace" in r]
    if traced:
        out += [
            "",
            "### Where the hang-ups' time went (`--trace`), p50 / p99 / max ms",
            "",
            "read: the caller's last mark sent -> the server read it; wake: -> the REST hang-up "
            "started; send: -> the request reached the REST stub (kernel stamp); new connections: "
            "how many requests opened one, and how long that took.",
            "",
            "| system | N | total | read | wake | send | new connections | loop late > 5 ms in the "
            "goodbye phase (times; max ms) | full GCs then (ms) |",
            "|---|---:|---|---|---|---|---|---|---|",
        ]
        for r in traced:
            t = r["trace"]
            out.append(
                f"| {r['label']} | {r['calls']} | {_triple(t['total'])} | {_triple(t['read'])} "
                f"| {_triple(t['wake'])} | {_triple(t['send'])} | {t['new_conn']['n']}: "
                f"{_triple(t['new_conn'])} | {t.get('goodbye_loop_late_over_5ms', '-')}; "
                f"{fmt(t.get('goodbye_loop_late_max_ms'))} | {t.get('goodbye_full_gcs_ms') or '-'} |"
            )
    return "\n".join(out) + "\n"


def cpu_capacity(rows: list[dict[str, Any]]) -> dict[str, int | None]:
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "cpu_ms_per_call_minute" in r and r["cpu_ms_per_call_minute"] > 0:
            last[r["label"]] = r
    return {k: int(60000 / r["cpu_ms_per_call_minute"]) for k, r in last.items()}


def capacity(rows: list[dict[str, Any]]) -> dict[str, int | None]:
    cap: dict[str, int | None] = {}
    for r in rows:
        cap.setdefault(r["label"], None)
        if r.get("pass"):
            cap[r["label"]] = max(cap[r["label"]] or 0, r["calls"])
    return cap


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="5 calls, callbridge and the bare relay, a few seconds"
    )
    p.add_argument(
        "--systems",
        default="callbridge,callbridge-pcm16,callbridge-app,callbridge-asyncio,relay-aiohttp,relay,relay-lean,"
        "sdk,pipecat,pipecat-pcm16",
    )
    p.add_argument("--calls", default="25,35,50,75,100,125,150,175,200,250,300")
    p.add_argument("--steady", type=float, default=12.0)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "bench.json")
    p.add_argument("--keep-going", action="store_true", help="do not stop a system at its first failure")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="re-run a failed point this many times before a system stops (shared machine)",
    )
    p.add_argument("--keep", action="store_true", help="keep the raw logs (.npz) of every run")
    p.add_argument(
        "--trace",
        action="store_true",
        help="time each hang-up's parts, the loop's lateness and full GCs inside callbridge serve "
        "(bench/trace/sitecustomize.py); reported per run",
    )
    p.add_argument(
        "--render", type=Path, default=None, help="only re-render the .md (and plot) of a bench.json"
    )
    p.add_argument(
        "--profile",
        choices=LOAD_PROFILES,
        default="default",
        help="the load: default (the agent talks 2 s, listens 2 s) or continuous (a 100 ms chunk every "
        "100 ms, each followed by a mark); callers send 20 ms frames in both",
    )
    p.add_argument(
        "--goodbye-spread",
        type=float,
        default=2.0,
        help="seconds over which the N agents start their goodbyes (calls end at N/spread a second; "
        "2 s by default, the burst issue 17's hang-up target is measured on)",
    )
    p.add_argument("--py-spy", default=None, help="py-spy the SUT during the window (one system, one N)")
    p.add_argument(
        "--base",
        default=None,
        metavar="REF",
        help="A/B: also run `callbridge-app-base`, `callbridge serve` with src/ as of this git commit "
        "(a scratch copy shadows the installed package), interleaved with the others",
    )
    args = p.parse_args()
    if args.render is not None:
        rendered: dict[str, Any] = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(rendered))
        if Path(PEERS_PY).exists():
            subprocess.run([PEERS_PY, str(BENCH / "plot.py"), str(args.render)], check=False)
        return 0
    if args.smoke:
        names, counts, steady = ["callbridge", "relay"], [5], 2.0
        if args.out == BENCH / "results" / "bench.json":
            args.out = SMOKE_OUT
    else:
        names, counts, steady = args.systems.split(","), [int(x) for x in args.calls.split(",")], args.steady
    table = systems()
    if args.base is not None:
        (BENCH / "results" / "tmp").mkdir(parents=True, exist_ok=True)
        base_src = Path(tempfile.mkdtemp(prefix="cb-base-", dir=str(BENCH / "results" / "tmp")))
        archive = subprocess.run(
            ["git", "-C", str(BENCH.parent), "archive", args.base, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive, check=True)
        app = table["callbridge-app"]
        table["callbridge-app-base"] = dataclasses.replace(
            app,
            name="callbridge-app-base",
            label=f"callbridge server at {args.base}",
            env={**app.env, "PYTHONPATH": str(base_src / "src")},
            note=f"as callbridge-app, with src/ of {args.base}",
        )
        if "callbridge-app-base" not in names:
            at = names.index("callbridge-app") + 1 if "callbridge-app" in names else 0
            names.insert(at, "callbridge-app-base")
    chosen = [table[n] for n in names]
    missing = [s.name for s in chosen if s.peers and not Path(PEERS_PY).exists()]
    if missing:
        print(
            f"peer venv missing ({PEERS_PY}); run `make bench-peers` first; skipping {missing}",
            file=sys.stderr,
        )
        chosen = [s for s in chosen if s.name not in missing]
    timing = (
        Timing(steady_s=steady, goodbye_spread_s=args.goodbye_spread)
        if not args.smoke
        # An agent in its 2 s listening pause at its goodbye time says the goodbye (1 s) after the
        # pause: the callers must wait that long before hanging up themselves (1.5 s cut off the
        # goodbye of one smoke call in five, and counted it as never hung up).
        else Timing(steady_s=steady, settle_s=1.0, goodbye_spread_s=0.5, hard_after_s=3.0)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = BENCH / "results" / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cb-bench-", dir=str(tmp_root)))
    report: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {cpu_model()}".strip(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "steady_s": steady,
        "load_profile": args.profile,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runs": [],
    }
    failed: set[str] = set()
    baselines: dict[str, dict[str, Any]] = {}
    for n in counts:
        for s in chosen:
            if s.name in failed:
                continue
            for attempt in range(args.retries + 1):
                t = time.monotonic()
                base = baselines.get(s.name) if s.fmt != "ulaw_8000" else None
                r = run_one(
                    s, n, timing, work, pyspy=args.py_spy, baseline=base, load=args.profile, trace=args.trace
                )
                if s.fmt != "ulaw_8000" and s.name not in baselines and "up" in r:
                    baselines[s.name] = r
                    limits = [round((r[w]["p99"] or 0) + THRESHOLD_MS, 1) for w in ("up", "down")]
                    r["p99_limit_ms"] = limits
                    r["pass"] = bool(
                        r["pass"] or (r["connected"] == n and r["up"]["lost"] == 0 and r["down"]["lost"] == 0)
                    )
                r["wall_s"] = round(time.monotonic() - t, 1)
                r["attempt"] = attempt + 1
                if r.get("pass") or attempt == args.retries:
                    break
                report.setdefault("retried", []).append(r)
                why = r.get("error") or (
                    f"up p99 {r['up']['p99']} lost {r['up']['lost']}, down p99 "
                    f"{r['down']['p99']} lost {r['down']['lost']}, {r['connected']} up"
                )
                print(f"{s.name:18s} N={n:4d} failed ({why}), re-running once", flush=True)
            report["runs"].append(r)
            line = f"{s.name:18s} N={n:4d} " + (
                f"up p99 {r['up']['p99']} lost {r['up']['lost']} | down p99 {r['down']['p99']} lost "
                f"{r['down']['lost']} | core {r['sut_core_util']:.2f} "
                f"| cpu/call-min {r['cpu_ms_per_call_minute']} ms"
                f" | {r['mem_per_call_kb']} KB/call | gen {r['loadgen_core0_util']:.2f} | "
                f"{'PASS' if r['pass'] else 'FAIL'}"
                if "error" not in r
                else r["error"]
            )
            print(line, flush=True)
            if not r.get("pass") and not args.keep_going:
                failed.add(s.name)
            report["capacity"] = capacity(report["runs"])
            report["cpu_capacity"] = cpu_capacity(report["runs"])
            args.out.write_text(json.dumps(report, indent=1))
            args.out.with_suffix(".md").write_text(markdown(report))
    report["capacity"] = capacity(report["runs"])
    report["cpu_capacity"] = cpu_capacity(report["runs"])
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    if not args.keep:
        for f in work.glob("*.npz"):
            f.unlink()
    print(f"logs of the run: {work}", file=sys.stderr)
    if not args.smoke and Path(PEERS_PY).exists():
        subprocess.run([PEERS_PY, str(BENCH / "plot.py"), str(args.out)], check=False)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
