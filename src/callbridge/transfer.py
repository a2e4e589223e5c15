"""Where a live call may be handed to a person: destinations and the allow-list.

A destination is an E.164 number (`+15551234567`) or a SIP URI
(`sip:desk@pbx.example.com`, `sips:` too). The allow-list
(`CALLBRIDGE_TRANSFER_ALLOW`) is comma-separated entries, each one of:

- a number, allowed exactly: `+15550001111`;
- a number prefix ending in `*`: `+1555*` allows every number that starts `+1555`;
- a SIP domain: `pbx.example.com` (or `sip:pbx.example.com`, `@pbx.example.com`)
  allows SIP URIs whose host is exactly that domain, any user.

An empty list allows nothing: transfers are off. A language model can be talked
into dialling anything, so everything the agent asks for is checked here first.
No vendor, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "TRANSFER_TOOL",
    "AllowList",
    "TransferRefused",
    "check_destination",
    "is_number",
    "parse_allow_list",
    "sip_host",
]

# The client tool an agent calls to hand the caller to a person.
TRANSFER_TOOL = "transfer_call"

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_PREFIX = re.compile(r"^\+[0-9]{1,15}\*$")
# user@host[:port][;params]: conservative characters (it ends up in the carrier's dial
# instructions); Twilio takes SIP URIs under 255 characters.
_SIP = re.compile(
    r"^sips?:(?P<user>[A-Za-z0-9._~+!$&'()*,=%-]{1,64})@(?P<host>[A-Za-z0-9.-]{1,253})"
    r"(?::[0-9]{1,5})?(?P<params>;[A-Za-z0-9._=;-]{0,120})?$"
)
_DOMAIN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+$")


class TransferRefused(ValueError):
    """A destination that is malformed or not on the allow-list (the reason is the message)."""


@dataclass(frozen=True)
class AllowList:
    numbers: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    sip_domains: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.numbers or self.prefixes or self.sip_domains)

    def allows(self, destination: str) -> bool:
        if _E164.fullmatch(destination):
            return destination in self.numbers or any(destination.startswith(p) for p in self.prefixes)
        host = sip_host(destination)
        return host is not None and host in self.sip_domains

    def describe(self) -> str:
        entries = [*sorted(self.numbers), *(p + "*" for p in self.prefixes), *sorted(self.sip_domains)]
        return ", ".join(entries) or "(empty: transfers are off)"


def is_number(value: str | None) -> bool:
    """An E.164 number (what a carrier accepts as a caller ID for a phone destination)."""
    return value is not None and _E164.fullmatch(value) is not None


def sip_host(uri: str) -> str | None:
    """The host of a well-formed `sip:`/`sips:` URI, lower-cased; None otherwise."""
    match = _SIP.fullmatch(uri) if len(uri) < 255 else None
    return match.group("host").lower().rstrip(".") if match else None


def parse_allow_list(text: str) -> AllowList:
    """`CALLBRIDGE_TRANSFER_ALLOW` as an `AllowList`; ValueError names a bad entry."""
    numbers: set[str] = set()
    prefixes: list[str] = []
    domains: set[str] = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if _E164.fullmatch(entry):
            numbers.add(entry)
        elif _PREFIX.fullmatch(entry):
            prefixes.append(entry[:-1])
        else:
            domain = entry
            for lead in ("sips:", "sip:", "@"):
                domain = domain.removeprefix(lead)
            if not _DOMAIN.fullmatch(domain):
                raise ValueError(
                    f"{entry!r} is not a number (+15551234567), a number prefix (+1555*) "
                    "or a SIP domain (pbx.example.com)"
                )
            domains.add(domain.lower().rstrip("."))
    return AllowList(frozenset(numbers), tuple(prefixes), frozenset(domains))


def check_destination(to: object, allow: AllowList) -> str:
    """The destination if it is well formed and allowed; else `TransferRefused` saying why."""
    if not isinstance(to, str) or not to.strip():
        raise TransferRefused("no destination: 'to' must be an E.164 number or a sip: URI")
    to = to.strip()
    if not _E164.fullmatch(to) and sip_host(to) is None:
        shown = to if len(to) <= 60 else to[:57] + "..."
        raise TransferRefused(f"{shown!r} is not an E.164 number (+15551234567) or a sip: URI")
    if allow.empty:
        raise TransferRefused("transfers are off (CALLBRIDGE_TRANSFER_ALLOW is empty)")
    if not allow.allows(to):
        raise TransferRefused(f"{to} is not an allowed transfer destination")
    return to
