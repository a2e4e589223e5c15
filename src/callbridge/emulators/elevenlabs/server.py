"""The server: :class:`AgentEmulator`, an ElevenLabs Agents endpoint on a loopback port.

The WebSocket ``/v1/convai/conversation`` (each accepted connection runs a :class:`~.session.Session`)
and the ``get-signed-url`` HTTP operation, with API-key and single-use signature checks.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from callbridge.emulators._common import AsyncService, loopback_ip, netloc
from callbridge.emulators.elevenlabs.agents_api import AGENTS_PATH, AgentsApi
from callbridge.emulators.elevenlabs.conversation import EmulatedConversation
from callbridge.emulators.elevenlabs.rest import CONVERSATIONS_PATH, ConversationDetails, SentWebhook
from callbridge.emulators.elevenlabs.script import AgentScript
from callbridge.emulators.elevenlabs.session import Session

__all__ = ["CONVERSATION_PATH", "SIGNED_URL_PATH", "AgentEmulator", "ScriptFactory"]

logger = logging.getLogger(__name__)

CONVERSATION_PATH: Final = "/v1/convai/conversation"
SIGNED_URL_PATH: Final = "/v1/convai/conversation/get-signed-url"

ScriptFactory: TypeAlias = Callable[[str, int], AgentScript]


@dataclass
class _Admission:
    script: AgentScript
    agent_id: str
    query: dict[str, str]
    headers: dict[str, str]


class AgentEmulator(AsyncService):
    """An ElevenLabs Agents server on a loopback port.

    ``script_factory(agent_id, n)`` picks a script per WebSocket connection attempt, ``n``
    counting attempts from 0 (rejected ones included, so "refuse the first, accept the retry"
    is expressible). With ``api_key``, conversations need a fresh ``conversation_signature``
    from the signed-URL endpoint or an ``xi-api-key`` header, as with a private agent.
    """

    def __init__(
        self,
        script: AgentScript | None = None,
        *,
        script_factory: ScriptFactory | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        close_timeout: float = 2.0,
    ) -> None:
        if script is not None and script_factory is not None:
            raise ValueError("pass either script or script_factory, not both")
        self._script_factory: ScriptFactory = script_factory or (lambda _agent, _n: script or AgentScript())
        self.host = loopback_ip(host)
        self._requested_port = port
        self.api_key = api_key
        self.close_timeout = close_timeout
        self.conversations: list[EmulatedConversation] = []
        #: ``(status, request path)`` of every refused WebSocket handshake or HTTP request.
        self.rejections: list[tuple[int, str]] = []
        #: Signatures issued by the signed-URL endpoint and not yet used.
        self.signatures: set[str] = set()
        #: Agent configurations served at GET /v1/convai/agents/{id} (tests add them).
        self.agents = AgentsApi()
        self._attempts = 0
        self._admissions: dict[int, _Admission] = {}
        self._server: Server | None = None
        self._new_conversation = asyncio.Condition()
        #: The conversation details endpoint and post-call webhooks (:mod:`.rest`).
        self.details = ConversationDetails()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            ping_interval=None,  # the agent protocol pings at application level
            close_timeout=self.close_timeout,
            max_size=16 * 1024 * 1024,
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        try:
            async with asyncio.timeout(self.close_timeout + 1.0):
                await server.wait_closed()
        except TimeoutError:
            # A peer that ignores the closing handshake must not hold the emulator open.
            for connection in list(server.connections):
                connection.transport.abort()
            await server.wait_closed()
        if server.close_task is not None:
            await server.close_task

    async def _open(self) -> None:
        await self.start()

    async def aclose(self) -> None:
        """The same as :meth:`stop`."""
        await self.stop()

    # ---- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def _netloc(self) -> str:
        return netloc(self.host, self.port)

    @property
    def base_url(self) -> str:
        return f"http://{self._netloc}"

    def ws_url(self, agent_id: str, **params: str) -> str:
        query = urlencode({"agent_id": agent_id, **params}, quote_via=quote)
        return f"ws://{self._netloc}{CONVERSATION_PATH}?{query}"

    async def wait_for_conversations(
        self,
        n: int,
        timeout: float = 5.0,
    ) -> list[EmulatedConversation]:
        """Wait until ``n`` connections have been accepted; returns the first ``n``."""
        async with self._new_conversation:
            async with asyncio.timeout(timeout):
                await self._new_conversation.wait_for(lambda: len(self.conversations) >= n)
        return self.conversations[:n]

    # ---- HTTP side -----------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path = url.path.rstrip("/") or "/"
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        if path == SIGNED_URL_PATH:
            return self._signed_url(connection, request, query)
        if path.startswith(CONVERSATIONS_PATH + "/"):
            return self._conversation_details(connection, request, path[len(CONVERSATIONS_PATH) + 1 :])
        if path.startswith(AGENTS_PATH):  # an agent's configuration (agents_api.py)
            status, body = self.agents.get(path, request.headers.get("xi-api-key"), self.api_key)
            if status != http.HTTPStatus.OK:
                return self._reject(connection, request, status, body)
            return _json_response(connection, status, body)
        if path != CONVERSATION_PATH:
            return self._reject(connection, request, http.HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
        if not self._authorised(request, query):
            return self._reject(
                connection,
                request,
                http.HTTPStatus.FORBIDDEN,
                {"detail": "Missing or invalid conversation authorization"},
            )
        agent_id = query.get("agent_id")
        if agent_id is None:
            # The real server validates the query before accepting, which surfaces as a 403.
            return self._reject(
                connection, request, http.HTTPStatus.FORBIDDEN, {"detail": "agent_id is required"}
            )
        n, self._attempts = self._attempts, self._attempts + 1
        script = self._script_factory(agent_id, n)
        if script.reject_with_status is not None:
            status = http.HTTPStatus(script.reject_with_status)
            return self._reject(connection, request, status, {"detail": status.phrase})
        headers: dict[str, str] = {}
        for name, value in request.headers.raw_items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self._admissions[id(connection)] = _Admission(script, agent_id, query, headers)
        return None

    def _authorised(self, request: Request, query: Mapping[str, str]) -> bool:
        if self.api_key is None:
            return True
        if request.headers.get("xi-api-key") == self.api_key:
            return True
        signature = query.get("conversation_signature")
        if signature is not None and signature in self.signatures:
            self.signatures.discard(signature)  # single use
            return True
        return False

    def _signed_url(
        self, connection: ServerConnection, request: Request, query: Mapping[str, str]
    ) -> Response:
        if self.api_key is not None:
            given = request.headers.get("xi-api-key")
            if given != self.api_key:
                status = "needs_authorization" if given is None else "invalid_api_key"
                message = "Missing xi-api-key header" if given is None else "Invalid API key"
                return self._reject(
                    connection,
                    request,
                    http.HTTPStatus.UNAUTHORIZED,
                    {"detail": {"status": status, "message": message}},
                )
        agent_id = query.get("agent_id")
        if agent_id is None:
            detail = [{"loc": ["query", "agent_id"], "msg": "Field required", "type": "missing"}]
            return self._reject(connection, request, http.HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": detail})
        signature = secrets.token_urlsafe(24)
        self.signatures.add(signature)
        # ConversationSignedUrlResponseModel
        return _json_response(
            connection,
            http.HTTPStatus.OK,
            {"signed_url": self.ws_url(agent_id, conversation_signature=signature)},
        )

    def _conversation_details(
        self, connection: ServerConnection, request: Request, conversation_id: str
    ) -> Response:
        given = request.headers.get("xi-api-key")
        if self.api_key is not None and given != self.api_key:
            status = "needs_authorization" if given is None else "invalid_api_key"
            message = "Missing xi-api-key header" if given is None else "Invalid API key"
            return self._reject(
                connection,
                request,
                http.HTTPStatus.UNAUTHORIZED,
                {"detail": {"status": status, "message": message}},
            )
        code, body = self.details.answer(self.conversations, conversation_id, given)
        return _json_response(connection, http.HTTPStatus(code), body)

    async def send_post_call_webhook(
        self,
        conversation_id: str,
        url: str,
        secret: str,
        *,
        timestamp: int | None = None,
        event_type: str = "post_call_transcription",
        signature: str | None = None,
    ) -> SentWebhook:
        """POST a signed ``post_call_transcription`` webhook of a conversation to ``url``."""
        conv = next(c for c in self.conversations if c.conversation_id == conversation_id)
        return await self.details.send_webhook(
            conv, url, secret, timestamp=timestamp, event_type=event_type, signature=signature
        )

    def _reject(
        self, connection: ServerConnection, request: Request, status: http.HTTPStatus, body: Any
    ) -> Response:
        self.rejections.append((status.value, request.path))
        return _json_response(connection, status, body)

    # ---- WebSocket side ------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        admission = self._admissions.pop(id(ws))
        script = admission.script
        conv = EmulatedConversation(
            index=len(self.conversations),
            agent_id=admission.agent_id,
            conversation_id=script.conversation_id or f"conv_{secrets.token_hex(13)}",
            query=admission.query,
            request_headers=admission.headers,
            script=script,
        )
        async with self._new_conversation:
            self.conversations.append(conv)
            self._new_conversation.notify_all()
        session = Session(ws, conv)
        try:
            await session.run()
        except Exception as exc:
            logger.exception("ElevenLabs emulator connection handler failed")
            conv.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conv.closed.set()


def _json_response(connection: ServerConnection, status: http.HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
