"""Settings from the environment (and `callbridge serve` flags), validated once at start.

The variable names are public API: deployments depend on them. Every problem is
reported at once, one clear line each, and no secret is ever echoed back.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from callbridge.call import CallOptions
from callbridge.telephony.base import Destination
from callbridge.transfer import AllowList, TransferRefused, check_destination, parse_allow_list

__all__ = [
    "AGENT_ID_RE",
    "ConfigError",
    "Settings",
    "absolute_sqlite_url",
    "async_database_url",
    "redact_url",
    "sqlite_path",
]

# A relative SQLite path (this one included) is resolved against the working directory
# once, when the settings are read, and shown absolute in every message and log line.
SPOOL_FILE = "callbridge-unsaved-records.jsonl"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///callbridge.db"
SECRET_FIELDS = frozenset(
    {"twilio_auth_token", "elevenlabs_api_key", "api_token", "elevenlabs_webhook_secret"}
)
# An ElevenLabs agent ID as the bridge accepts it (here and in the /calls API).
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ConfigError(Exception):
    """Bad or missing settings; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def redact_url(url: str) -> str:
    """The URL with its password, if any, shown as `***` (for logs and messages)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "<unparsable URL>" if "@" in url else url
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def async_database_url(url: str) -> str:
    """Give a plain SQLAlchemy URL its async driver: users write `postgresql://...`."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    for plain in ("postgresql:", "postgres:"):
        if url.startswith(plain):
            return "postgresql+asyncpg:" + url[len(plain) :]
    return url


def sqlite_path(url: str) -> str | None:
    """The absolute path of the file a SQLite URL names; None for another database,
    an in-memory one or a `file:` URI."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] != "sqlite" or not rest.startswith("/"):
        return None
    database = rest[1:].split("?", 1)[0]
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def absolute_sqlite_url(url: str) -> str:
    """A SQLite URL with a relative path made absolute (against the working directory now)."""
    path = sqlite_path(url)
    if path is None:
        return url
    scheme, _, rest = url.partition("://")
    database, sep, query = rest[1:].partition("?")
    if database == path:
        return url
    return f"{scheme}:///{path}{sep}{query}"


# env var -> (field, kind, required_for)
_VARS: dict[str, tuple[str, str]] = {
    "TWILIO_ACCOUNT_SID": ("twilio_account_sid", "str"),
    "TWILIO_AUTH_TOKEN": ("twilio_auth_token", "str"),
    "TWILIO_API_BASE_URL": ("twilio_api_base_url", "url"),
    "ELEVENLABS_AGENT_ID": ("elevenlabs_agent_id", "agent_id"),
    "ELEVENLABS_API_KEY": ("elevenlabs_api_key", "str"),
    "ELEVENLABS_API_BASE_URL": ("elevenlabs_api_base_url", "url"),
    "CALLBRIDGE_PUBLIC_URL": ("public_url", "url"),
    "CALLBRIDGE_DATABASE_URL": ("database_url", "str"),
    "CALLBRIDGE_API_TOKEN": ("api_token", "str"),
    "CALLBRIDGE_MAX_CALL_SECONDS": ("max_call_seconds", "pos_float"),
    "CALLBRIDGE_MAX_CONCURRENT_CALLS": ("max_concurrent_calls", "pos_int"),
    "CALLBRIDGE_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", "nonneg_float"),
    "CALLBRIDGE_AGENT_CONNECT_TIMEOUT_SECONDS": ("agent_connect_timeout", "pos_float"),
    "CALLBRIDGE_FINAL_AUDIO_TIMEOUT_SECONDS": ("final_audio_timeout", "pos_float"),
    "CALLBRIDGE_SILENCE_TIMEOUT_SECONDS": ("silence_timeout", "pos_float"),
    "CALLBRIDGE_AGENT_IDLE_TIMEOUT_SECONDS": ("agent_idle_timeout", "pos_float"),
    "CALLBRIDGE_HOOK_TIMEOUT_SECONDS": ("hook_timeout", "pos_float"),
    "CALLBRIDGE_TOOL_TIMEOUT_SECONDS": ("tool_timeout", "pos_float"),
    "CALLBRIDGE_STREAM_CONNECT_TIMEOUT_SECONDS": ("stream_connect_timeout", "pos_float"),
    "CALLBRIDGE_INSTANCE_ID": ("instance_id", "str"),
    "CALLBRIDGE_INSTANCE_LEASE_SECONDS": ("instance_lease_seconds", "pos_float"),
    "CALLBRIDGE_FLEET_MAX_CONCURRENT_CALLS": ("fleet_max_concurrent_calls", "pos_int"),
    "CALLBRIDGE_SPOOL_DIR": ("spool_dir", "str"),
    "CALLBRIDGE_FALLBACK_TWIML": ("fallback_twiml", "twiml"),
    "CALLBRIDGE_FALLBACK_TRANSFER_TO": ("fallback_transfer_to", "str"),
    "CALLBRIDGE_TRANSFER_ALLOW": ("transfer_allow", "allow_list"),
    "CALLBRIDGE_TRANSFER_CALLER_ID": ("transfer_caller_id", "str"),
    "CALLBRIDGE_DTMF_TO_AGENT": ("dtmf_to_agent", "bool"),
    "CALLBRIDGE_DTMF_GAP_SECONDS": ("dtmf_gap_seconds", "pos_float"),
    "CALLBRIDGE_DTMF_MESSAGE": ("dtmf_message", "dtmf_message"),
    "CALLBRIDGE_ELEVENLABS_WEBHOOK_SECRET": ("elevenlabs_webhook_secret", "str"),
    "CALLBRIDGE_ELEVENLABS_WEBHOOK_TOLERANCE_SECONDS": ("elevenlabs_webhook_tolerance", "pos_float"),
    "CALLBRIDGE_POST_CALL_FETCH_SECONDS": ("post_call_fetch_seconds", "nonneg_float"),
}
ENV_VARS: dict[str, str] = {field: var for var, (field, _kind) in _VARS.items()}


def default_instance_id() -> str:
    """This process's own name in the fleet: host, PID and a few random hex digits."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Settings:
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_api_base_url: str = "https://api.twilio.com"
    elevenlabs_agent_id: str = ""
    elevenlabs_api_key: str | None = None
    elevenlabs_api_base_url: str = "https://api.elevenlabs.io"
    public_url: str | None = None
    database_url: str = DEFAULT_DATABASE_URL
    api_token: str | None = None
    max_call_seconds: float = 3600.0
    # Sized from bench/: one process holds this many live calls with headroom.
    max_concurrent_calls: int = 200
    shutdown_grace_seconds: float = 20.0
    agent_connect_timeout: float = 10.0
    final_audio_timeout: float = 15.0
    silence_timeout: float | None = None
    agent_idle_timeout: float = 60.0
    hook_timeout: float = 10.0
    tool_timeout: float = 20.0
    # A call answered with stream TwiML whose stream has not connected by then is checked
    # with Twilio, hung up and closed `no_media_stream`.
    stream_connect_timeout: float = 15.0
    fallback_twiml: str | None = None
    # After an agent failure, hand the caller to this number or SIP URI (on the allow-list).
    fallback_transfer_to: str | None = None
    # Where transfers may go (numbers, +prefix*, SIP domains); empty: transfers are off.
    transfer_allow: AllowList = field(default_factory=AllowList)
    transfer_caller_id: str | None = None  # None: the call's own number
    dtmf_to_agent: bool = True
    dtmf_gap_seconds: float = 2.0
    dtmf_message: str = "The caller pressed {digits}"
    # Names this process in the records and in the fleet's leases: unique per process
    # unless the operator names it (then one process at a time may hold the name).
    instance_id: str = field(default_factory=default_instance_id)
    # An instance whose lease is not renewed for this long is dead: another reconciles its calls.
    instance_lease_seconds: float = 30.0
    # Live calls of all instances on one PostgreSQL database together (None: no fleet cap).
    fleet_max_concurrent_calls: int | None = None
    # Where records that cannot be written yet wait (fsync'd), and refused ones are kept.
    spool_dir: str | None = None
    # Post-call webhooks (POST /elevenlabs/post-call): the HMAC secret, and how old a
    # signed timestamp may be (the docs' example: 30 minutes).
    elevenlabs_webhook_secret: str | None = None
    elevenlabs_webhook_tolerance: float = 1800.0
    # How long to keep asking ElevenLabs for a finished call's analysis (0: never ask).
    post_call_fetch_seconds: float = 600.0

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "<set>" if value else None
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)  # e.g. the database password
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        require: tuple[str, ...] = ("twilio", "agent"),
    ) -> Settings:
        """Read and check settings. `require` names what this command needs:
        "twilio", "agent", "public_url", "api_token"."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        # Given but refused: one line each, and never also "is required but not set".
        invalid: dict[str, str] = {}
        for var, (name, kind) in _VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            parsed, problem = _parse(var, raw.strip(), kind)
            if problem:
                invalid[name] = problem
            else:
                values[name] = parsed
        kinds = {name: kind for name, kind in _VARS.values()}
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if isinstance(value, str) and kinds.get(name, "str") != "str":
                flag = f"--{name.replace('_', '-')} ({ENV_VARS[name]})"
                value, problem = _parse(flag, value.strip(), kinds[name])
                if problem:
                    invalid[name] = problem
                    continue
            invalid.pop(name, None)  # a valid flag wins over a bad environment value
            values[name] = value
        problems.extend(invalid.values())
        needed = {
            "twilio": ("twilio_account_sid", "twilio_auth_token"),
            "agent": ("elevenlabs_agent_id",),
            "public_url": ("public_url",),
            "api_token": ("api_token",),
        }
        for group in require:
            for name in needed[group]:
                if not values.get(name) and name not in invalid:
                    problems.append(f"{ENV_VARS[name]} is required but not set")
        problems.extend(_transfer_problems(values))
        sid = values.get("twilio_account_sid")
        if sid and not (sid.startswith("AC") and len(sid) == 34 and sid[2:].isalnum()):
            problems.append("TWILIO_ACCOUNT_SID must look like AC followed by 32 hex digits")
        public = values.get("public_url")
        if public and "public_url" in require and not public.startswith("https://"):
            # Twilio only connects to wss:// streams; http is only for local tests.
            if not _is_loopback_url(public):
                problems.append("CALLBRIDGE_PUBLIC_URL must be an https:// URL that Twilio can reach")
        if problems:
            raise ConfigError(problems)
        values["database_url"] = absolute_sqlite_url(
            async_database_url(values.get("database_url") or DEFAULT_DATABASE_URL)
        )
        return cls(**values)

    def call_options(self) -> CallOptions:
        return CallOptions(
            agent_connect_timeout=self.agent_connect_timeout,
            max_call_seconds=self.max_call_seconds,
            silence_timeout=self.silence_timeout,
            final_audio_timeout=self.final_audio_timeout,
            fallback=Destination(instructions=self.fallback_twiml)
            if self.fallback_twiml
            else Destination(to=self.fallback_transfer_to)
            if self.fallback_transfer_to
            else None,
            agent_idle_timeout=self.agent_idle_timeout,
            hook_timeout=self.hook_timeout,
            tool_timeout=self.tool_timeout,
            dtmf_to_agent=self.dtmf_to_agent,
            dtmf_gap=self.dtmf_gap_seconds,
            dtmf_message=self.dtmf_message,
            transfer_allow=self.transfer_allow,
            transfer_caller_id=self.transfer_caller_id,
        )

    def spool_path(self) -> str:
        """The spool file: in `spool_dir`, else beside a SQLite file, else in the working
        directory (made absolute now)."""
        folder = self.spool_dir
        if folder is None:
            database = sqlite_path(self.database_url)
            folder = os.path.dirname(database) if database is not None else os.getcwd()
        return os.path.join(os.path.abspath(folder), SPOOL_FILE)

    def stream_url(self) -> str:
        """The `wss://` form of the public URL for `<Stream url>`."""
        if not self.public_url:
            raise ConfigError(["CALLBRIDGE_PUBLIC_URL is required but not set"])
        parts = urlsplit(self.public_url.rstrip("/"))
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/twilio/media-stream"

    def public(self, path: str) -> str:
        if not self.public_url:
            raise ConfigError(["CALLBRIDGE_PUBLIC_URL is required but not set"])
        return self.public_url.rstrip("/") + path


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _parse_agent_id(var: str, raw: str) -> tuple[str | None, str | None]:
    if AGENT_ID_RE.fullmatch(raw):
        return raw, None
    if "://" in raw or "/" in raw:
        # e.g. the dashboard URL https://elevenlabs.io/app/agents/agents/agent_...
        parts = urlsplit(raw).path.split("/")
        found = [p for p in parts if p.startswith("agent_") and AGENT_ID_RE.fullmatch(p)]
        hint = f": did you mean {found[-1]}?" if found else ""
        return None, (
            f"{var} is a URL, not an agent ID: use the agent ID, e.g. agent_..., "
            f"as shown in the agent's settings{hint}"
        )
    return None, (
        f"{var} must be an agent ID of letters, digits, '_' and '-' only (at most 128): "
        "use the agent ID, e.g. agent_..."
    )


def _parse_twiml(var: str, raw: str) -> tuple[str | None, str | None]:
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        return None, f"{var} must be well-formed XML TwiML such as <Response><Hangup/></Response>: {exc}"
    if root.tag != "Response":
        return None, f"{var} must be TwiML whose root element is <Response>, got <{root.tag}>"
    return raw, None


def _transfer_problems(values: Mapping[str, Any]) -> list[str]:
    """The fallback transfer destination: well formed, on the allow-list, not with fallback TwiML."""
    to = values.get("fallback_transfer_to")
    if not to:
        return []
    if values.get("fallback_twiml"):
        return ["set CALLBRIDGE_FALLBACK_TRANSFER_TO or CALLBRIDGE_FALLBACK_TWIML, not both"]
    try:
        check_destination(to, values.get("transfer_allow") or AllowList())
    except TransferRefused as exc:
        return [f"CALLBRIDGE_FALLBACK_TRANSFER_TO: {exc} (add it to CALLBRIDGE_TRANSFER_ALLOW)"]
    return []


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(var: str, raw: str, kind: str) -> tuple[Any, str | None]:
    if kind == "str":
        return raw, None
    if kind == "bool":
        if raw.lower() in _TRUE:
            return True, None
        if raw.lower() in _FALSE:
            return False, None
        return None, f"{var} must be 1 or 0 (true/false, on/off), got {raw!r}"
    if kind == "allow_list":
        try:
            return parse_allow_list(raw), None
        except ValueError as exc:
            return None, f"{var}: {exc}"
    if kind == "dtmf_message":
        if "{digits}" not in raw:
            return (
                None,
                f"{var} must contain {{digits}} where the digits go, e.g. 'The caller pressed {{digits}}'",
            )
        return raw, None
    if kind == "url":
        if "://" not in raw and " " not in raw and not raw.startswith("/"):
            return None, f"{var} must be an http(s) URL: did you mean https://{raw}?"
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return None, f"{var} must be an http(s) URL such as https://bridge.example.com"
        return raw.rstrip("/"), None
    if kind == "agent_id":
        return _parse_agent_id(var, raw)
    if kind == "twiml":
        return _parse_twiml(var, raw)
    try:
        number = float(raw) if kind.endswith("float") else int(raw)
    except ValueError:
        return None, f"{var} must be a number, got {raw!r}"
    if kind.startswith("pos") and number <= 0:
        return None, f"{var} must be greater than 0, got {raw}"
    if kind.startswith("nonneg") and number < 0:
        return None, f"{var} must be 0 or more, got {raw}"
    return number, None
