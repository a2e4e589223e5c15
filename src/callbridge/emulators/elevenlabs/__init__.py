"""A local stand-in for the ElevenLabs Agents ("ConvAI") WebSocket server.

Built from the AsyncAPI contract (``agent.asyncapi.yaml``), the public AsyncAPI docs and the
``get-signed-url`` OpenAPI operation, *not* from our bridge's code: nothing here imports from
``callbridge`` outside ``callbridge.emulators``, so a misunderstanding of the protocol in the
bridge cannot be mirrored (and thereby hidden) by the emulator.

A test describes what the agent does as an :class:`AgentScript` (a list of steps such as
:class:`Say`, :class:`WaitForUser`, :class:`ClientToolCall`, :class:`Interrupt`,
:class:`EndCall`, or failure modes like :class:`Drop` and :class:`Stall`), serves it with
:class:`AgentEmulator` on a loopback port, and afterwards asserts on the
:class:`EmulatedConversation` records of what crossed each socket.

Deliberate choices where the contract is silent:

* Every agent turn (``Say``, ``EndCall``, ``UserTranscript``, ``ClientToolCall``) takes the
  next value of one per-connection ``event_id`` counter; all audio of one response shares
  its ``event_id``. Server pings count on a separate counter.
* The server waits (up to ``AgentScript.client_data_timeout``) for the client's first message
  before announcing ``conversation_initiation_metadata``, because the real server applies the
  ``conversation_initiation_client_data`` overrides to the session it announces.
* ``{{name}}`` placeholders in spoken text are filled from the client's
  ``dynamic_variables`` (plus ``system__agent_id`` / ``system__conversation_id``), as the
  real agent does with its prompt and first message.

The package, by responsibility (at run time each module imports only those above it):

* :mod:`.audio` — the contract's audio formats, mu-law, resampling, tones, chunking;
* :mod:`.script` — :class:`AgentScript` and its steps, fault injection included;
* :mod:`.schema` — the client messages' schemas and their checker;
* :mod:`.conversation` — :class:`EmulatedConversation`, what crossed one connection;
* :mod:`.connection` — one accepted socket: sending, pings, reading and checking client frames;
* :mod:`.session` — the script played on a connection, step by step;
* :mod:`.rest` — conversation details (``processing`` then ``done``) and signed post-call webhooks;
* :mod:`.server` — :class:`AgentEmulator`: the loopback server, signed URLs, admission.

Shared plumbing (loopback checks, task sets) is in :mod:`callbridge.emulators._common`.
"""

from __future__ import annotations

from callbridge.emulators.elevenlabs.audio import (
    AUDIO_FORMATS,
    bytes_per_second,
    convert_mulaw8k,
    mulaw_decode,
    mulaw_encode,
    resample_linear,
    sample_rate,
    synth_tone,
)
from callbridge.emulators.elevenlabs.conversation import ClosedBy, EmulatedConversation, Sent
from callbridge.emulators.elevenlabs.rest import CONVERSATIONS_PATH as CONVERSATION_DETAILS_PATH
from callbridge.emulators.elevenlabs.rest import ConversationDetails, SentWebhook, sign_webhook
from callbridge.emulators.elevenlabs.schema import CLIENT_SCHEMAS, SERVER_EVENT_TYPES, Schema, schema_problems
from callbridge.emulators.elevenlabs.script import (
    AgentScript,
    ClientToolCall,
    Close,
    Drop,
    EndCall,
    Garbage,
    Interrupt,
    Ping,
    RawSend,
    Say,
    Sleep,
    Stall,
    Step,
    UserTranscript,
    WaitForContextualUpdate,
    WaitForUser,
    WaitForUserMessage,
)
from callbridge.emulators.elevenlabs.server import (
    CONVERSATION_PATH,
    SIGNED_URL_PATH,
    AgentEmulator,
    ScriptFactory,
)
from callbridge.emulators.elevenlabs.session import DEFAULT_ERROR_TYPES

__all__ = [
    "AUDIO_FORMATS",
    "CLIENT_SCHEMAS",
    "CONVERSATION_DETAILS_PATH",
    "CONVERSATION_PATH",
    "DEFAULT_ERROR_TYPES",
    "SERVER_EVENT_TYPES",
    "SIGNED_URL_PATH",
    "AgentEmulator",
    "AgentScript",
    "ClientToolCall",
    "Close",
    "ClosedBy",
    "ConversationDetails",
    "Drop",
    "EmulatedConversation",
    "EndCall",
    "Garbage",
    "Interrupt",
    "Ping",
    "RawSend",
    "Say",
    "Schema",
    "ScriptFactory",
    "Sent",
    "SentWebhook",
    "Sleep",
    "Stall",
    "Step",
    "UserTranscript",
    "WaitForContextualUpdate",
    "WaitForUser",
    "WaitForUserMessage",
    "bytes_per_second",
    "convert_mulaw8k",
    "mulaw_decode",
    "mulaw_encode",
    "resample_linear",
    "sample_rate",
    "schema_problems",
    "sign_webhook",
    "synth_tone",
]
