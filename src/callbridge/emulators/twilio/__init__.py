"""A local stand-in for Twilio: the REST Calls API and Twilio's side of Media Streams.

Built from Twilio's public documentation (``/work/shared/specs/twilio``) and the shapes of the
public REST resources, never from callbridge's own Twilio code: an emulator that shared the
bridge's parser would share its misunderstandings, and the tests would not see them.  For the
same reason it does not use the ``twilio`` SDK; signatures are computed here with hmac/hashlib.

What it does:

* a real ASGI server (Starlette on an in-process uvicorn, loopback only) serving
  ``/2010-04-01/Accounts/{AccountSid}/Calls.json`` and ``.../Calls/{CallSid}.json`` with HTTP
  Basic auth, form-encoded requests and JSON Call resources that the official SDK parses, and
  scripted faults (status codes, Twilio error codes, Retry-After, late answers);
* calls with Twilio's lifecycle (queued, ringing, in-progress, completed, ...), a small TwiML
  interpreter (``<Connect><Stream>``, ``<Say>``, ``<Play>``, ``<Pause>``, ``<Dial>``,
  ``<Hangup>``, ``<Reject>``, ``<Redirect>``), signed voice webhooks and status callbacks;
* :class:`MediaStreamCaller`, Twilio as the WebSocket client of a bidirectional stream: it sends
  ``connected``/``start``/real-time paced ``media``, plays the server's audio at 8000 bytes/s,
  echoes ``mark`` when the audio before it has played, honours ``clear``, and ends the stream the
  way Twilio does (``stop`` then close) when the call ends;
* a media stream that never connects (``stream_upgrade_fault``): the WebSocket upgrade goes
  through a loopback "proxy" that drops it (``"drop"``: the connection is closed as soon as
  the upgrade request arrives) or never answers it (``"hang"``: held open until Twilio's
  ``stream_open_timeout``, or until the call ends).  The application never sees the stream.
  Twilio then goes on with the TwiML after ``<Connect>`` ("Twilio executes the remaining TwiML
  instructions only after your server closes the WebSocket connection"); with none left, the
  call completes.  How long real Twilio waits for an unanswered upgrade is not in the specs.

All times recorded for assertions are the event loop's clock (``loop.time()``).

The package, by responsibility (at run time each module imports only those above it):

* :mod:`.signing` — the X-Twilio-Signature and how a signed webhook request looks;
* :mod:`.wire` — the Media Streams messages Twilio sends, and its checks on what it receives;
* :mod:`.calls` — the Call resource (:class:`EmulatedCall`), statuses, SIDs, records;
* :mod:`.caller_audio` — the caller's speech out, and real-time playback of what comes in;
* :mod:`.media_stream` — :class:`MediaStreamCaller`, one stream's WebSocket client;
* :mod:`.upgrade_fault` — the loopback proxy that drops or never answers a stream's upgrade;
* :mod:`.core` — settings, records, call status changes and status callbacks;
* :mod:`.twiml` — the TwiML interpreter (on :mod:`.core`);
* :mod:`.rest` — the REST Calls API and its scripted faults (on :mod:`.twiml`);
* :mod:`.emulator` — :class:`TwilioEmulator`: the uvicorn server and calls started by tests.

Shared plumbing (loopback checks, task sets, waiters) is in :mod:`callbridge.emulators._common`.
"""

from __future__ import annotations

from callbridge.emulators.twilio.calls import (
    API_VERSION,
    DEFAULT_ACCOUNT_SID,
    TERMINAL_STATUSES,
    DialedParty,
    EmulatedCall,
    RecordedRequest,
    WebhookRecord,
    new_sid,
)
from callbridge.emulators.twilio.emulator import TwilioEmulator
from callbridge.emulators.twilio.media_stream import MediaStreamCaller
from callbridge.emulators.twilio.signing import twilio_signature
from callbridge.emulators.twilio.wire import BYTES_PER_SECOND, FRAME_BYTES, FRAME_SECONDS, MULAW_SILENCE

__all__ = [
    "API_VERSION",
    "BYTES_PER_SECOND",
    "DEFAULT_ACCOUNT_SID",
    "FRAME_BYTES",
    "FRAME_SECONDS",
    "MULAW_SILENCE",
    "TERMINAL_STATUSES",
    "DialedParty",
    "EmulatedCall",
    "MediaStreamCaller",
    "RecordedRequest",
    "TwilioEmulator",
    "WebhookRecord",
    "new_sid",
    "twilio_signature",
]
