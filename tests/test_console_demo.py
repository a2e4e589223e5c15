"""`callbridge demo --keep`: the demo prints the web console's URL and, after its call, keeps
serving it (until Ctrl-C here), so the call just heard can be looked at. A real subprocess."""

from __future__ import annotations

import re
import signal

import httpx
import pytest

from tests.serverkit import start_demo

KEPT = "the server stays up until Ctrl-C"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_keep_serves_the_console_with_the_call_until_ctrl_c() -> None:
    proc, seen = start_demo("--keep", until=KEPT, what="keeping its server")
    assert proc.stdout is not None
    try:
        seen += proc.stdout.readline()
        urls = re.findall(r"(http://127\.0\.0\.1:\d+)/ui/#token=([0-9a-f]+)", seen)
        assert len(urls) == 2 and urls[0] == urls[1], seen  # at the start and after the call
        base, token = urls[0]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
            assert http.get("/ui/").status_code == 200
            [call] = http.get("/calls").json()["calls"]
            assert call["end_reason"] == "agent_ended" and call["from"] == "+15550100001"
            assert call["call_sid"] in seen
            record = http.get(f"/calls/{call['call_sid']}").json()
            assert any(e["event"] == "phone.last_mark" for e in record["timeline"])
        proc.send_signal(signal.SIGINT)  # ends the wait, not the demo
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err)
    assert "demo OK" in out and "Traceback" not in out + err
