"""TwiML we answer with, built with the official SDK's `VoiceResponse`."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from callbridge.telephony.base import Destination

__all__ = ["connect_twiml", "dial_twiml"]


def connect_twiml(stream_url: str, params: Mapping[str, str]) -> str:
    """`<Connect><Stream>` to the bridge, with the stream's `<Parameter>`s."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in params.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def dial_twiml(destination: Destination) -> str:
    """`<Dial>` a number or a SIP URI (a `sip:` address), with the caller ID given."""
    if not destination.to:
        raise ValueError("nothing to dial: the destination has no number or SIP URI")
    response = VoiceResponse()
    dial = Dial(caller_id=destination.caller_id) if destination.caller_id else Dial()
    if destination.to.startswith("sip:"):
        dial.sip(destination.to)
    else:
        dial.number(destination.to)
    response.append(dial)
    return str(response)
