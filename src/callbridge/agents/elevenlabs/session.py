"""ElevenLabs Agents session: an `AgentSession` over the ConvAI WebSocket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from callbridge.agents.base import (
    AgentCallContext,
    AgentClosed,
    AgentEvent,
    AgentReady,
    AgentUnreachable,
)
from callbridge.agents.elevenlabs.protocol import ElevenLabsProtocol, close_outcome
from callbridge.wsclient import AgentSocket, connect

__all__ = ["ElevenLabsConfig", "ElevenLabsSession", "session_factory", "websocket_base"]

log = logging.getLogger("callbridge.elevenlabs")

CONVERSATION_PATH = "/v1/convai/conversation"
SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"


def websocket_base(api_base_url: str) -> str:
    """`https://host` -> `wss://host`, `http://host` -> `ws://host` (the emulator's case)."""
    parts = urlsplit(api_base_url.rstrip("/"))
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"ELEVENLABS_API_BASE_URL must be an http(s) URL, got {api_base_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class ElevenLabsConfig:
    agent_id: str
    api_key: str | None = None
    api_base_url: str = "https://api.elevenlabs.io"
    # Agent audio at pcm_48000 in 250 ms chunks is ~32 KB of base64; 1 MiB leaves room
    # without letting a runaway peer balloon memory.
    max_message_bytes: int = 1 << 20
    close_timeout: float = 2.0
    signed_url_timeout: float = 5.0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    dynamic_variables: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the key
        key = "set" if self.api_key else "unset"
        return (
            f"ElevenLabsConfig(agent_id={self.agent_id!r}, api_key={key}, api_base_url={self.api_base_url!r})"
        )


class ElevenLabsSession:
    """One ElevenLabs Agents conversation for one phone call."""

    def __init__(self, config: ElevenLabsConfig, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.protocol = ElevenLabsProtocol()
        self._http = http
        self._ws: AgentSocket | None = None
        self._early: list[AgentEvent] = []
        self._closing = False
        self._open = False
        self._last_received = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def last_received(self) -> float:
        return self._last_received

    def stats(self) -> dict[str, int]:
        return {"stale_audio_dropped": self.protocol.stale_audio_dropped}

    @property
    def conversation_id(self) -> str | None:
        return self.protocol.ready.conversation_id if self.protocol.ready else None

    async def _url(self) -> str:
        cfg = self.config
        if not cfg.api_key:
            query = urlencode({"agent_id": cfg.agent_id})
            return f"{websocket_base(cfg.api_base_url)}{CONVERSATION_PATH}?{query}"
        url = cfg.api_base_url.rstrip("/") + SIGNED_URL_PATH
        try:
            if self._http is not None:
                resp = await self._http.get(
                    url,
                    params={"agent_id": cfg.agent_id},
                    headers={"xi-api-key": cfg.api_key},
                    timeout=cfg.signed_url_timeout,
                )
            else:
                async with httpx.AsyncClient(timeout=cfg.signed_url_timeout) as http:
                    resp = await http.get(
                        url, params={"agent_id": cfg.agent_id}, headers={"xi-api-key": cfg.api_key}
                    )
        except httpx.HTTPError as exc:
            raise AgentUnreachable(f"signed URL request failed: {type(exc).__name__}") from None
        if resp.status_code != 200:
            raise AgentUnreachable(f"signed URL request answered HTTP {resp.status_code}")
        try:
            signed = resp.json()["signed_url"]
        except (ValueError, KeyError, TypeError):
            raise AgentUnreachable("signed URL response has no signed_url") from None
        if not isinstance(signed, str) or not signed.startswith(("ws://", "wss://")):
            raise AgentUnreachable("signed URL response is not a WebSocket URL")
        return signed

    def _dynamic_variables(self, ctx: AgentCallContext) -> dict[str, Any]:
        values: dict[str, Any] = {"call_sid": ctx.call_sid, "stream_sid": ctx.stream_sid}
        if ctx.from_number:
            values["caller_id"] = ctx.from_number
        if ctx.to_number:
            values["called_number"] = ctx.to_number
        values["call_direction"] = ctx.direction
        values.update(self.config.dynamic_variables)
        values.update(ctx.dynamic_variables)
        return values

    async def connect(self, context: AgentCallContext) -> AgentReady:
        url = await self._url()
        try:
            # No compression offered: base64 audio hardly compresses; deflate would cost CPU per
            # frame. The Call bounds the whole connect.
            self._ws = await connect(
                url,
                max_size=self.config.max_message_bytes,
                close_timeout=self.config.close_timeout,
                user_agent="callbridge",
            )
        except InvalidStatus as exc:
            raise AgentUnreachable(f"agent refused the connection: HTTP {exc.response.status_code}") from None
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise AgentUnreachable(f"agent connection failed: {type(exc).__name__}: {exc}") from None
        self._open = True
        self._last_received = asyncio.get_running_loop().time()
        try:
            await self._ws.send(
                self.protocol.initiation(
                    self._dynamic_variables(context), self.config.overrides or None, source="callbridge"
                )
            )
            while self.protocol.ready is None:
                frame = await self._ws.recv()
                event = self.protocol.receive(frame)
                await self._flush_outbox()
                if isinstance(event, AgentReady):
                    return event
                if event is not None:
                    self._early.append(event)
        except ConnectionClosed as exc:
            self._open = False
            code = exc.rcvd.code if exc.rcvd else None
            outcome = close_outcome(code, exc.rcvd.reason if exc.rcvd else "", self.protocol.last_error)
            raise AgentUnreachable(f"agent closed before metadata: {outcome.detail}") from None
        except BaseException:
            # Cancelled (connect timeout) or anything else: leave no socket behind.
            self._abort()
            raise
        raise AssertionError("unreachable")

    async def _flush_outbox(self) -> None:
        outbox = self.protocol.outbox
        if not outbox or self._ws is None:
            return
        frames = outbox[:]
        outbox.clear()
        for frame in frames:
            await self._ws.send(frame)

    async def events(self) -> AsyncIterator[AgentEvent]:
        ws = self._ws
        if ws is None:
            yield AgentClosed(by_agent=False, code=None, detail="never connected")
            return
        for early in self._early:
            yield early
        self._early.clear()
        parse = self.protocol.receive
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await ws.recv()
                self._last_received = loop.time()
                event = parse(frame)
                if self.protocol.outbox:
                    await self._flush_outbox()
            except ConnectionClosed as exc:
                self._open = False
                if self._closing:
                    yield AgentClosed(by_agent=False, code=1000, detail="closed by the bridge")
                elif exc.rcvd is None and exc.sent is not None:
                    # Our client failed the connection: e.g. 1009, a frame over max_message_bytes.
                    detail = f"the bridge closed the agent connection: {exc.sent.code} {exc.sent.reason}"
                    yield AgentClosed(by_agent=False, code=exc.sent.code, detail=detail.strip())
                else:
                    code = exc.rcvd.code if exc.rcvd else None
                    reason = exc.rcvd.reason if exc.rcvd else ""
                    yield close_outcome(code, reason, self.protocol.last_error)
                return
            if event is not None and not isinstance(event, AgentReady):
                yield event

    @staticmethod
    def _user_audio(payload: bytes, b64: str | None) -> str:
        return ElevenLabsProtocol.user_audio(
            b64 if b64 is not None else base64.b64encode(payload).decode("ascii")
        )

    def try_send_audio(self, payload: bytes, b64: str | None = None) -> bool:
        """`send_audio` when it needs no wait (open, writes not paused); False otherwise."""
        ws = self._ws
        if ws is None or not self._open:
            return False
        return ws.send_now(self._user_audio(payload, b64))

    async def send_audio(self, payload: bytes, b64: str | None = None) -> None:
        ws = self._ws
        if ws is None or not self._open:
            return
        try:
            await ws.send(self._user_audio(payload, b64))
        except ConnectionClosed:
            self._open = False  # the reader reports how it closed

    async def send_tool_result(self, call_id: str, result: str, is_error: bool) -> None:
        await self._send_text(ElevenLabsProtocol.tool_result(call_id, result, is_error))

    async def send_user_message(self, text: str) -> None:
        await self._send_text(ElevenLabsProtocol.user_message(text))

    async def send_contextual_update(self, text: str) -> None:
        await self._send_text(ElevenLabsProtocol.contextual_update(text))

    async def _send_text(self, frame: str) -> None:
        ws = self._ws
        if ws is None or not self._open:
            return
        try:
            await ws.send(frame)
        except ConnectionClosed:
            self._open = False  # the reader reports how it closed

    async def close(self, code: int = 1000) -> None:
        ws = self._ws
        if ws is None:
            return
        self._closing = True
        self._open = False
        try:
            async with asyncio.timeout(self.config.close_timeout + 0.5):
                await ws.close(code, "call ended")
        except (TimeoutError, OSError):
            pass
        finally:
            self._abort()

    def _abort(self) -> None:
        self._open = False
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.transport.abort()


def session_factory(
    config: ElevenLabsConfig, http: httpx.AsyncClient | None = None
) -> Callable[[AgentCallContext], ElevenLabsSession]:
    """A session per call; the call's `agent_id`, if it carries one, picks another agent."""

    def make(context: AgentCallContext) -> ElevenLabsSession:
        agent_id = context.agent_id or config.agent_id
        cfg = config if agent_id == config.agent_id else replace(config, agent_id=agent_id)
        return ElevenLabsSession(cfg, http)

    return make
