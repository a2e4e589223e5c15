"""The ASGI app a Twilio number points at (Starlette, served by uvicorn): the composition.

`create_app` builds the pieces, puts one `AppState` on `app.state.callbridge` and
lists the routes; each handler reads its state from there:

- Twilio's voice webhook, status callbacks and media stream:
  `callbridge.telephony.twilio.webhooks` (TwiML, signatures);
- the `/calls` API (bearer token): `server/api.py`;
- `/healthz` and `/metrics` (Prometheus): `server/metrics.py`;
- per-call stream tokens and capacity reservations: `server/tokens.py`;
- streams that never connect: `server/streamwatch.py`.

The lifespan opens the records, joins the fleet (lease, heartbeat, reconciliation of dead
instances' calls: `server/fleet.py`), and at the
end closes everything in order.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from callbridge.agents.base import AgentCallContext, AgentSession
from callbridge.agents.elevenlabs.conversations import ConversationsClient, FetchPolicy
from callbridge.agents.elevenlabs.session import ElevenLabsConfig, session_factory
from callbridge.bridge import Bridge
from callbridge.call import CallHooks, Tool
from callbridge.config import Settings
from callbridge.logs import log_event, set_instance
from callbridge.server import amd, api, console, metrics, transfers
from callbridge.server.accesslog import AccessLog
from callbridge.server.api import validate_call_request
from callbridge.server.fleet import Fleet, join
from callbridge.server.postcall import PostCall, post_call_webhook
from callbridge.server.state import AppState, stream_settled
from callbridge.server.streamwatch import StreamWatch
from callbridge.server.tokens import StreamTokens
from callbridge.store import CallStore, StoreUnavailable
from callbridge.telephony.base import CallControl
from callbridge.telephony.twilio import webhooks
from callbridge.telephony.twilio.control import TwilioCallControl
from callbridge.telephony.twilio.webhooks import (
    MAX_BODY_BYTES,
    StarletteSocket,
    TwilioSignatures,
    read_body,
    read_form,
)

# Re-exported: where tests, the CLI and users have always found them.
__all__ = [
    "MAX_BODY_BYTES",
    "AppState",
    "StarletteSocket",
    "create_app",
    "read_body",
    "read_form",
    "validate_call_request",
]

log = logging.getLogger("callbridge.server")


def create_app(
    settings: Settings,
    *,
    agent_factory: Callable[[AgentCallContext], AgentSession] | None = None,
    control: CallControl | None = None,
    store: CallStore | None = None,
    hooks: CallHooks | None = None,
    tools: Mapping[str, Tool] | None = None,
) -> Starlette:
    set_instance(settings.instance_id)  # every log line of this process names its instance
    control = control or TwilioCallControl(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )
    store = store or CallStore(
        settings.database_url, instance=settings.instance_id, spool_path=settings.spool_path()
    )
    agent_factory = agent_factory or session_factory(
        ElevenLabsConfig(
            agent_id=settings.elevenlabs_agent_id,
            api_key=settings.elevenlabs_api_key,
            api_base_url=settings.elevenlabs_api_base_url,
        )
    )
    bridge = Bridge(agent_factory, control, settings.call_options(), hooks, tools, sink=store)
    # Derived from the auth token, so every instance makes and accepts the same tokens.
    token_key = hmac.new(
        settings.twilio_auth_token.encode(), b"callbridge-stream-token", hashlib.sha256
    ).digest()
    fleet = Fleet(
        settings.instance_id,
        store,
        bridge,
        control,
        lease_seconds=settings.instance_lease_seconds,
        fleet_cap=settings.fleet_max_concurrent_calls,
    )
    state = AppState(
        settings=settings,
        bridge=bridge,
        store=store,
        control=control,
        tokens=StreamTokens(token_key),
        signatures=TwilioSignatures(settings.twilio_auth_token),
        streamwatch=StreamWatch(
            control,
            store,
            settings.stream_connect_timeout,
            functools.partial(stream_settled, store, fleet),
            counts=bridge.stats.calls_ended,
        ),
        fleet=fleet,
    )
    bridge.stream_validator = state.check_stream
    fleet.handlers["transfer"] = functools.partial(transfers.fleet_transfer, state)
    fleet.handlers["amd"] = functools.partial(amd.fleet_amd, state)  # a verdict another instance got
    state.postcall = postcall_of(settings, store)
    bridge.hooks.on_call_end.append(state.postcall.call_ended)  # after the record is saved
    state.registry.register(metrics.BridgeCollector(state))

    token = api.require_token
    routes = [
        Route("/twilio/inbound", webhooks.inbound, methods=["POST"]),
        Route("/twilio/status", webhooks.status_callback, methods=["POST"]),
        Route(amd.AMD_PATH, amd.amd_callback, methods=["POST"]),
        Route("/elevenlabs/post-call", post_call_webhook, methods=["POST"]),
        WebSocketRoute("/twilio/media-stream", webhooks.media_stream),
        Route("/calls", token(api.create_call), methods=["POST"]),
        Route("/calls", token(api.list_calls), methods=["GET"]),
        Route("/calls/{call_sid}", token(api.get_call), methods=["GET"]),
        Route("/calls/{call_sid}/hangup", token(api.hangup_call), methods=["POST"]),
        Route("/calls/{call_sid}/transfer", token(transfers.transfer_call), methods=["POST"]),
        Route("/healthz", metrics.healthz, methods=["GET"]),
        Route("/readyz", metrics.readyz, methods=["GET"]),
        Route("/metrics", metrics.metrics, methods=["GET"]),
        *console.routes(),  # the web console under /ui/ (server/console.py)
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={StoreUnavailable: api.store_unavailable}
    )
    app.add_middleware(AccessLog)  # method, path, status, duration (server/accesslog.py)
    app.state.callbridge = state
    app.state.console_feed = console.LiveFeed(bridge)
    _host: webhooks.TwilioHost = state  # for mypy: the state is what the Twilio routes expect
    return app


def postcall_of(settings: Settings, store: CallStore) -> PostCall:
    """Post-call analysis: fetched with the API key (unless turned off), and the webhook."""
    client = None
    if settings.elevenlabs_api_key and settings.post_call_fetch_seconds > 0:
        policy = FetchPolicy(deadline=settings.post_call_fetch_seconds)
        client = ConversationsClient(settings.elevenlabs_api_base_url, settings.elevenlabs_api_key, policy)
    return PostCall(store, client, settings.elevenlabs_webhook_secret, settings.elevenlabs_webhook_tolerance)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state: AppState = app.state.callbridge
    settings, store, fleet = state.settings, state.store, state.fleet
    await store.init()
    if fleet is not None:
        # The lease (a named instance's previous run is closed first), the command listener,
        # the heartbeat that reconciles dead instances' calls (server/fleet.py).
        await join(fleet, settings.instance_lease_seconds * 2 + 15)
    log_event(
        log,
        "server.started",
        instance=settings.instance_id,
        public_url=settings.public_url,
        max_calls=settings.max_concurrent_calls,
    )
    # What is loaded by now (the app, the SDKs, SQLAlchemy: over 100,000 objects) lives as
    # long as the process. Frozen, it is out of the cyclic collector's reach, so a full
    # collection walks only what the calls made: over it, one took 78 ms, and every live
    # call's audio waited (BENCHMARKS.md, issue 17).
    gc.freeze()
    try:
        yield
    finally:
        await state.streamwatch.close()
        await state.bridge.shutdown(0)
        if state.postcall is not None:
            await state.postcall.close()  # post-call fetches still asking are cancelled
        if fleet is not None:
            await fleet.stop()
        aclose = getattr(state.control, "aclose", None)
        if aclose is not None:
            await aclose()
        # Bounded: a hung database never holds the process past the grace period.
        budget = min(store.timeout, max(settings.shutdown_grace_seconds, 1.0))
        if fleet is not None:
            await fleet.release(await store.wait_written(budget / 2))
        state.unwritten = await store.close(budget / 2 if fleet is not None else budget)
