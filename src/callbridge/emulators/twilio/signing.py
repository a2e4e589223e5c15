"""Request signing: the X-Twilio-Signature, computed here with hmac/hashlib, not the ``twilio`` SDK."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode

__all__ = ["twilio_signature", "webhook_request"]


def twilio_signature(
    auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]] | None = None
) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(auth token, url + sorted params as key+value))."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params or ())
    payload = url + "".join(key + value for key, value in sorted(items))
    digest = hmac.new(auth_token.encode("utf-8"), payload.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def webhook_request(
    auth_token: str,
    url: str,
    method: str,
    params: Mapping[str, str],
    *,
    sign: bool,
    signature: str | None = None,
) -> tuple[str, dict[str, str], str | None]:
    """How Twilio requests ``url`` (``method`` in upper case) with ``params``.

    Returns the URL to request, the headers and the X-Twilio-Signature sent (``signature`` if
    given, else the right one when ``sign``, else none).
    """
    if method == "GET":
        # With GET the parameters are in the URL, and the signature covers that full URL.
        target = url + ("&" if "?" in url else "?") + urlencode(params)
        signed = twilio_signature(auth_token, target)
    else:
        target = url
        signed = twilio_signature(auth_token, url, params)
    if signature is None and sign:
        signature = signed
    headers = {
        "User-Agent": "TwilioProxy/1.1",
        "Accept": "*/*",
        "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
    }
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    return target, headers, signature
