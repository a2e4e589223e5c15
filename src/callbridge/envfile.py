"""Settings from a `.env` file: the lowest layer (flags > environment > `.env`).

The file is `.env` in the working directory, or the one `CALLBRIDGE_ENV_FILE` names. Its
variables are put in the process environment only where the environment has none, so an
exported variable always wins, and a flag wins over both (it is applied on top of the
environment by `Settings.from_env`). Parsed by python-dotenv (`KEY=value`, quotes,
`export KEY=...`, comments); values are never printed.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from dotenv import dotenv_values

__all__ = ["ENV_FILE_VAR", "EnvFileError", "load_env_file"]

ENV_FILE_VAR = "CALLBRIDGE_ENV_FILE"


class EnvFileError(Exception):
    """The file named by CALLBRIDGE_ENV_FILE cannot be read (one line, no values)."""


def load_env_file(environ: MutableMapping[str, str] | None = None) -> tuple[str | None, list[str]]:
    """Fill `environ` (the process environment) from the `.env` file, never over a value it
    has. Returns the file read (None if there was none) and the names it set."""
    env = os.environ if environ is None else environ
    named = env.get(ENV_FILE_VAR, "").strip()
    path = os.path.abspath(named or ".env")
    if not os.path.isfile(path):
        if named:
            raise EnvFileError(f"{ENV_FILE_VAR} names {path}, which is not a readable file")
        return None, []
    try:
        values = dotenv_values(path, interpolate=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvFileError(f"cannot read {path}: {type(exc).__name__}") from None
    applied = []
    for name, value in values.items():
        if value is None or name in env:
            continue
        env[name] = value
        applied.append(name)
    return path, applied
