"""Plot bench.json: p99 added latency (worse direction) and SUT CPU against concurrent calls.

Runs in the peers venv (matplotlib is not a project dependency):
    bench/.venv-peers/bin/python bench/plot.py bench/results/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {
    "callbridge": ("tab:blue", "o", "-"),
    "callbridge-pcm16": ("tab:blue", "s", "--"),
    "callbridge-app": ("tab:cyan", "D", "-"),
    "callbridge-asyncio": ("tab:purple", "o", "-."),
    "relay": ("black", "x", ":"),
    "relay-lean": ("gray", "+", ":"),
    "sdk": ("tab:orange", "^", "-"),
    "pipecat": ("tab:green", "v", "-"),
    "pipecat-pcm16": ("tab:green", "P", "--"),
}


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/bench.json")
    report: dict[str, Any] = json.loads(src.read_text())
    series: dict[str, list[dict[str, Any]]] = {}
    for r in report["runs"]:
        if "up" in r:
            series.setdefault(r["system"], []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    for name, rows in series.items():
        rows.sort(key=lambda r: r["calls"])
        color, marker, line = STYLE.get(name, ("gray", ".", "-"))
        label = rows[0]["label"]
        n = [r["calls"] for r in rows]
        p99 = [max(r["up"]["p99"] or 0, r["down"]["p99"] or 0) for r in rows]
        ax1.plot(n, p99, color=color, marker=marker, linestyle=line, label=label)
        for r, y in zip(rows, p99, strict=True):
            if not r["pass"]:
                ax1.plot([r["calls"]], [y], marker="o", markersize=13, markerfacecolor="none", color="red")
        ax2.plot(
            n,
            [r["sut_core_util"] * 100 for r in rows],
            color=color,
            marker=marker,
            linestyle=line,
            label=label,
        )
    ax1.axhline(20, color="red", linewidth=0.8, linestyle="--")
    ax1.text(ax1.get_xlim()[0], 21, " 20 ms target", color="red", fontsize=8, va="bottom")
    ax1.set_yscale("log")
    ax1.set_xlabel("concurrent calls")
    ax1.set_ylabel("p99 added latency, worse direction (ms, log)")
    ax1.set_title("Latency through the system (red ring: point failed)")
    ax1.grid(True, which="both", alpha=0.3)
    ax2.axhline(100, color="gray", linewidth=0.8, linestyle="--")
    ax2.set_xlabel("concurrent calls")
    ax2.set_ylabel("CPU of the system under test (% of one core)")
    ax2.set_title("CPU (system pinned to one core)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Twilio <-> agent bridges, one run on {report['machine']} ({report['started']})", fontsize=10
    )
    fig.tight_layout()
    out = src.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
