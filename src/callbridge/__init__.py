"""callbridge: put a voice AI agent on the phone, and never leave a call dangling.

The small public API: a `Bridge` makes one `Call` per Twilio media stream; each
call ends exactly once with an `EndReason`, in a fixed teardown order, and leaves
a `CallRecord`. `create_app` (in `callbridge.server.app`) is the ASGI server.
"""

from callbridge.agents.base import AgentCallContext, AgentSession
from callbridge.agents.elevenlabs.session import ElevenLabsConfig, ElevenLabsSession, session_factory
from callbridge.bridge import Bridge
from callbridge.call import Call, CallHooks, CallOptions, CallRecord, CallState, EndReason
from callbridge.config import ConfigError, Settings
from callbridge.telephony.base import CallControl, Destination, TelephonyLeg
from callbridge.telephony.twilio.control import RetryPolicy, TwilioCallControl

__version__ = "0.1.0"

__all__ = [
    "AgentCallContext",
    "AgentSession",
    "Bridge",
    "Call",
    "CallControl",
    "CallHooks",
    "CallOptions",
    "CallRecord",
    "CallState",
    "ConfigError",
    "Destination",
    "ElevenLabsConfig",
    "ElevenLabsSession",
    "EndReason",
    "RetryPolicy",
    "Settings",
    "TelephonyLeg",
    "TwilioCallControl",
    "session_factory",
]
