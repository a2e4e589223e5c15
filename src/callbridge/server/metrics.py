"""`/metrics` (Prometheus text format) and `/healthz`.

The numbers are read when scraped, from the bridge's process-wide counters
(`BridgeStats`) and the signature refusals counted by the Twilio routes; nothing is
counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from callbridge.call import EndReason
from callbridge.server.state import AppState

__all__ = ["BridgeCollector", "healthz", "metrics", "readyz"]

SIGNED_ROUTES = ("/twilio/inbound", "/twilio/status", "/twilio/amd", "/twilio/media-stream")


class BridgeCollector(Collector):
    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state.bridge.stats
        yield GaugeMetricFamily(
            "callbridge_active_calls", "Calls live in this process", value=self.state.bridge.live_calls
        )
        started = CounterMetricFamily("callbridge_calls_started", "Media streams accepted")
        started.add_metric([], s.calls_started)
        yield started
        ended = CounterMetricFamily("callbridge_calls_ended", "Calls ended, by end reason", labels=["reason"])
        for reason in EndReason:
            ended.add_metric([reason.value], s.calls_ended.get(reason.value, 0))
        yield ended
        rejected = CounterMetricFamily("callbridge_calls_rejected", "Calls turned away at capacity")
        rejected.add_metric([], s.calls_rejected)
        yield rejected
        frames = CounterMetricFamily("callbridge_frames", "Audio frames forwarded", labels=["direction"])
        frames.add_metric(["caller_to_agent"], s.frames_to_agent)
        frames.add_metric(["agent_to_caller"], s.chunks_to_caller)
        yield frames
        errors = CounterMetricFamily("callbridge_errors", "Bad input and failures, all calls")
        errors.add_metric([], s.errors)
        yield errors
        refused = CounterMetricFamily(
            "callbridge_streams_refused", "Media streams refused (bad token, broken start)"
        )
        refused.add_metric([], s.streams_refused)
        yield refused
        signatures = CounterMetricFamily(
            "callbridge_bad_signatures", "Requests refused for a bad X-Twilio-Signature", labels=["route"]
        )
        for route in SIGNED_ROUTES:
            signatures.add_metric([route], self.state.signatures.rejected.get(route, 0))
        yield signatures
        yield histogram(
            "callbridge_hangup_latency_seconds",
            "From the last goodbye mark to the hang-up request",
            [v / 1000 for v in s.hangup_latency_ms],
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        yield histogram(
            "callbridge_agent_connect_seconds",
            "From stream start to the agent's conversation metadata",
            [v / 1000 for v in s.agent_connect_ms],
            (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
        )


def histogram(name: str, doc: str, values: list[float], bounds: tuple[float, ...]) -> HistogramMetricFamily:
    buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=sum(values))


async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.callbridge
    return Response(generate_latest(state.registry), media_type="text/plain; version=0.0.4; charset=utf-8")


async def healthz(request: Request) -> Response:
    state: AppState = request.app.state.callbridge
    bridge = state.bridge
    body = {"status": "ok" if bridge.accepting else "draining", "live_calls": bridge.live_calls}
    return JSONResponse(body, status_code=200 if bridge.accepting else 503)


async def readyz(request: Request) -> Response:
    """Whether a load balancer should send this instance new calls: 503 while it drains
    or while its database lease is not held (another instance may be reconciling its calls)."""
    state: AppState = request.app.state.callbridge
    fleet = state.fleet
    lease = fleet is None or fleet.lease_ok
    ready = state.bridge.accepting and lease
    body = {
        "status": "ready" if ready else ("draining" if not state.bridge.accepting else "no_lease"),
        "instance": state.settings.instance_id,
        "lease": "held" if lease else "not held",
        "live_calls": state.bridge.live_calls,
    }
    return JSONResponse(body, status_code=200 if ready else 503)
