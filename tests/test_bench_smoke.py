"""The benchmark harness's smoke run (bench/run.py --smoke): 5 calls through callbridge
and the bare relay, a few seconds each. Checks that the harness works end to end and
that its numbers are plausible, never how fast anything is (CI machines vary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    runs = {r["system"]: r for r in report["runs"]}
    assert set(runs) == {"callbridge", "relay"}
    for name, r in runs.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["connected"] == 5 and r["agent_conversations"] == 5, name
        for way in ("up", "down"):
            stats = r[way]
            assert stats["expected"] > 0 and stats["n"] > 0, (name, way, stats)
            assert stats["lost"] == 0, (name, way, stats)
            assert stats["p50"] is not None and 0 < stats["p50"] < 5000, (name, way, stats)
        assert r["sut_cpu_s"] > 0 and r["rss_peak_mb"] > 0, name
    # callbridge hangs up through the REST API after the goodbye; the bare relay never does.
    assert runs["callbridge"]["hangup"]["ended_by"] == {"rest": 5}
    assert runs["callbridge"]["hangup"]["goodbye_cut_calls"] == 0
    assert runs["relay"]["rest_requests"] == 0


def test_bench_smoke_writes_only_ignored_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench-smoke` (bench/run.py --smoke, no --out) never rewrites a tracked file."""
    import importlib.util
    import shutil

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # run.py imports its siblings
    spec = importlib.util.spec_from_file_location("bench_run_under_test", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    for path in (module.SMOKE_OUT, module.SMOKE_OUT.with_suffix(".md")):
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], check=False)
        assert ignored.returncode == 0, f"{path} is not ignored by git"
        tracked = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "--error-unmatch", str(path)],
            capture_output=True,
            check=False,
        )
        assert tracked.returncode != 0, f"{path} is tracked"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_floor_smoke_continuous(tmp_path: Path) -> None:
    """The aiohttp floor (issue 17) on the continuous-speech load: every frame relayed both ways,
    the agent heard speaking without pause, and each call hung up over REST after its goodbye
    played (as callbridge does), none cut off."""
    pytest.importorskip("orjson", reason="the project's bench extra is not installed (make bench)")
    out = tmp_path / "floor.json"
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--systems", "relay-aiohttp", "--calls", "5"]
    argv += ["--steady", "2", "--retries", "0", "--profile", "continuous", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["load_profile"] == "continuous"
    (r,) = report["runs"]
    assert "error" not in r, r.get("error")
    assert r["system"] == "relay-aiohttp" and r["load_profile"] == "continuous"
    assert r["connected"] == 5 and r["agent_conversations"] == 5
    for way in ("up", "down"):
        assert r[way]["n"] > 0 and r[way]["lost"] == 0, (way, r[way])
    # Continuous speech: a 100 ms chunk per call every 100 ms of the window (the default
    # profile, 2 s on and 2 s off, sends about half of that).
    assert r["down"]["expected"] >= 0.9 * 5 * r["window_s"] / 0.1, r["down"]
    assert r["hangup"]["ended_by"] == {"rest": 5}
    assert r["hangup"]["goodbye_cut_calls"] == 0
    assert r["rest_requests"] == 5
    assert r["hangup"]["rest_hangup_after_last_mark_ms"]["n"] == 5
