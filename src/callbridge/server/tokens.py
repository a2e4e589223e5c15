"""Per-call stream tokens, and the streams answered but not connected yet.

The TwiML that opens a media stream carries `cb_ref` and `cb_token =
HMAC-SHA256(key, cb_ref)` (the key derived from the auth token, so every instance
agrees). Inbound, `cb_ref` is the CallSid, so a token cannot be presented by another
call; outbound, it is a random nonce bound to the CallSid once Twilio has answered
the create. Each ref is accepted once per process (a replay is refused).

A call answered with stream TwiML holds a place against the capacity until its
stream connects, for 30 s at most (`reserve`, `reserved`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict

from callbridge.telephony.base import StreamInfo
from callbridge.telephony.twilio.params import TOKEN, TOKEN_REF

__all__ = ["StreamTokens"]

USED_KEPT_S = 6 * 3600  # how long a used ref is remembered (a call lasts less)
RESERVED_S = 30.0  # an answered call's stream connects within this, or is no longer counted


class StreamTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key  # never shown: not in repr, not in logs
        self._used: OrderedDict[str, float] = OrderedDict()
        self._outbound: dict[str, str] = {}  # ref -> CallSid, once Twilio answered the create
        self._pending: OrderedDict[str, float] = OrderedDict()  # CallSid -> when it was answered

    def __repr__(self) -> str:
        return f"StreamTokens(used={len(self._used)}, pending={len(self._pending)})"

    def token(self, ref: str) -> str:
        # surrogatepass: a ref from a stream's JSON may hold a lone surrogate.
        return hmac.new(self._key, ref.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:40]

    @staticmethod
    def outbound_ref() -> str:
        """A fresh ref for a call not placed yet (its CallSid is not known)."""
        return "out-" + secrets.token_hex(12)

    def bind(self, ref: str, call_sid: str) -> None:
        """The outbound call placed with `ref` is `call_sid`: only its stream may use the ref."""
        self._outbound[ref] = call_sid

    def check(self, info: StreamInfo) -> str | None:
        """Why a stream is refused (token missing, forged, for another call, used before),
        or None: the ref is used up and the stream's reservation released."""
        params = info.custom_parameters
        ref, token = params.get(TOKEN_REF, ""), params.get(TOKEN, "")
        if not ref or not token:
            return "no stream token"
        # As bytes: compare_digest raises TypeError on str with non-ASCII characters.
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.token(ref).encode()):
            return "bad stream token"
        bound = info.call_sid if ref.startswith("CA") else self._outbound.get(ref)
        if ref.startswith("CA") and ref != info.call_sid:
            return "stream token belongs to another call"
        if bound is not None and bound != info.call_sid:
            return "stream token belongs to another call"
        if ref in self._used:
            return "stream token already used"
        self._use(ref)
        self._pending.pop(info.call_sid, None)
        return None

    def _use(self, ref: str) -> None:
        now = time.monotonic()
        self._used[ref] = now
        while self._used:
            oldest, t = next(iter(self._used.items()))
            if now - t < USED_KEPT_S:
                break
            del self._used[oldest]

    # -- streams answered, not connected yet --------------------------------------------

    def reserve(self, call_sid: str) -> None:
        """`call_sid` was answered with stream TwiML: count it until its stream connects
        (`check`), for `RESERVED_S` at most."""
        self._pending[call_sid] = time.monotonic()

    def reserved(self) -> int:
        """Calls answered with stream TwiML whose stream has not connected yet."""
        now = time.monotonic()
        while self._pending:
            oldest, t = next(iter(self._pending.items()))
            if now - t < RESERVED_S:
                break
            del self._pending[oldest]
        return len(self._pending)
