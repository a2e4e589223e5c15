"""A real PostgreSQL server for the test session: started, stopped, crashed and hung on demand.

The server runs from the distribution's binaries (`/usr/lib/postgresql/<ver>/bin`, the Debian
package `postgresql`; `scripts/ensure-postgres.sh` installs it) in a temporary directory, on
127.0.0.1 and a free port, with its unix socket in that directory. `initdb`, `pg_ctl` and
`postgres` refuse to run as root, so under root every one of them runs as the `postgres` OS user
(which the package creates) and the directory belongs to that user.

The role `callbridge` is the bootstrap superuser. Over TCP it authenticates with scram-sha-256
and a random password (so a wrong password is refused); over the unix socket (reachable only by
the directory's owner and root) it is trusted, which is how databases are created: through `psql`
in a child process, so the test process itself never holds a connection of its own.

Durability is traded for speed (`fsync=off`): a `kill()` is a crash of the server process, not of
the machine, so nothing committed is lost by it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

ROLE = "callbridge"
OS_USER = "postgres"
BINARY_GLOB = "/usr/lib/postgresql/*/bin/postgres"
ENSURE_SCRIPT = "scripts/ensure-postgres.sh"
MAIN_THREAD = threading.main_thread()

# Settings for a throwaway server: fast, small, loud about nothing.
SERVER_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "autovacuum": "off",
    "jit": "off",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
    "password_encryption": "scram-sha-256",
    "timezone": "UTC",
}


def find_bindir() -> Path | None:
    """The bin directory of the newest installed server (`CALLBRIDGE_PG_BINDIR` overrides)."""
    override = os.environ.get("CALLBRIDGE_PG_BINDIR")
    if override:
        path = Path(override)
        return path if (path / "postgres").is_file() else None
    found = []
    for binary in Path("/").glob(BINARY_GLOB.lstrip("/")):
        version = binary.parent.parent.name
        key = tuple(int(p) for p in re.findall(r"\d+", version))
        found.append((key, binary.parent))
    return max(found)[1] if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc; no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is not None and stat[1] == pid and stat[0] != "Z":
            out.append(int(entry))
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _stopped(pid: int) -> bool:
    """Stopped by a signal (or gone, which is as good for a caller waiting on it)."""
    stat = _stat(pid)
    return stat is None or stat[0] in ("T", "Z", "X")


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _poll(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class PostgresServer:
    """One PostgreSQL server in a temporary directory. Not thread-safe: drive it from one thread."""

    host = "127.0.0.1"

    def __init__(self, bindir: Path, *, startup_timeout: float = 60.0) -> None:
        self.bindir = bindir
        self.startup_timeout = startup_timeout
        self.password = secrets.token_hex(16)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused: list[int] = []
        self._orphans: list[int] = []  # backends of a killed postmaster, until they have exited
        self._dropped: list[str] = []  # databases to drop at the next create_database()
        self._spare: str | None = None  # a database created, or being created, in the background
        self._spare_proc: subprocess.Popen[bytes] | None = None  # the psql creating it
        self._names = itertools.count(1)
        self._as_owner: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(OS_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, PostgreSQL must run as the OS user {OS_USER!r}, which does not "
                    f"exist (the Debian package `postgresql` creates it: {ENSURE_SCRIPT})"
                ) from None
            self._as_owner = {"user": OS_USER, "group": OS_USER, "extra_groups": []}
        self.dir = Path(tempfile.mkdtemp(prefix="callbridge-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        if self._as_owner:
            shutil.chown(self.dir, OS_USER, OS_USER)
        atexit.register(self.close)

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, bindir: Path) -> PostgresServer:
        """A new server, initialised and running."""
        server = cls(bindir)
        try:
            server.initdb()
            server.start()
            server._make_spare()
        except BaseException:
            server.close()
            raise
        return server

    def initdb(self) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_owner:
            shutil.chown(pwfile, OS_USER, OS_USER)
        pwfile.chmod(0o600)
        try:
            self._run(
                "initdb",
                "--pgdata",
                str(self.data),
                "--username",
                ROLE,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
                timeout=self.startup_timeout,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        """Start the postmaster (same port and data as before, if it ran before) and wait until it
        accepts connections."""
        if self.running:
            return
        self._wait_orphans()
        fixed = self.port != 0
        for _attempt in range(1 if fixed else 5):
            if not fixed:
                self.port = _free_port()
            try:
                self._spawn()
                return
            except _PortTaken:
                continue
        raise RuntimeError(f"PostgreSQL could not bind a port:\n{self._log_tail()}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are ended, the server exits, the port closes."""
        self._settle_spare()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        self.resume()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL of the postmaster, as a crash. Its backends notice and exit by themselves;
        `start()` waits for them, then the server recovers from its WAL."""
        self._settle_spare()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        self.resume()  # stopped backends would never notice the postmaster's death
        self._orphans = _children(proc.pid)
        proc.kill()
        proc.wait()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP the postmaster and every process it started: the kernel still completes TCP
        handshakes on the listening socket, but nothing is ever answered (a hung database)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError("pause(): the server is not running")
        if self._paused:
            return
        self._settle_spare()
        os.kill(proc.pid, signal.SIGSTOP)
        self._paused = [proc.pid]
        _poll(lambda: _stopped(proc.pid), 5, "postmaster stop")
        # Stopped, the postmaster forks nothing more: its children now are all there will be.
        for pid in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self._paused.append(pid)
        _poll(lambda: all(_stopped(pid) for pid in self._paused), 5, "backends stop")

    def resume(self) -> None:
        """SIGCONT everything `pause()` stopped."""
        paused, self._paused = self._paused, []
        for pid in reversed(paused):  # backends first, the postmaster last
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def ensure_running(self) -> None:
        """Leave the server as a test found it: resumed if paused, started if stopped or killed."""
        self.resume()
        if not self.running:
            self._proc = None
            self.start()

    def close(self) -> None:
        """Stop the server and remove its directory (idempotent; also run at exit)."""
        atexit.unregister(self.close)
        if self._spare_proc is not None:
            self.resume()
            with contextlib.suppress(Exception):
                self._settle_spare()
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self._wait_orphans()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases -------------------------------------------------------------------------

    def url(self, dbname: str, password: str | None = None) -> str:
        """SQLAlchemy URL of a database of this server, as the role `callbridge`, over TCP."""
        pw = self.password if password is None else password
        return f"postgresql+asyncpg://{ROLE}:{pw}@{self.host}:{self.port}/{dbname}"

    def dsn(self, dbname: str, password: str | None = None) -> str:
        """libpq-style DSN of a database (for asyncpg.connect)."""
        pw = self.password if password is None else password
        return f"postgresql://{ROLE}:{pw}@{self.host}:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new, empty, uniquely named database; returns its URL.

        CREATE DATABASE copies the template (70-800 ms on a 2-core VM), so the next database is always
        being created in the background while a test runs: this call usually only takes it.
        Databases handed back with `drop_database()` are dropped by that same background run."""
        name = self._take_spare()
        if name is None:  # none ready (first call, or the server was down): make one now
            name = self._new_name()
            self.psql([*self._drops(), f'CREATE DATABASE "{name}"'])
        self._make_spare()
        return self.url(name)

    def drop_database(self, name_or_url: str) -> None:
        """Mark a database for dropping (done with the next background creation; cheap)."""
        self._dropped.append(name_or_url.rsplit("/", 1)[-1])

    def _settle_spare(self) -> None:
        """Wait for a background creation (keeping its database if it worked). Done before the
        server is stopped, killed or paused: psql would otherwise wait on a paused server."""
        proc, self._spare_proc = self._spare_proc, None
        if proc is None:
            return
        try:
            ok = proc.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ok = False
        if not ok:
            self._spare = None

    def _take_spare(self) -> str | None:
        self._settle_spare()
        name, self._spare = self._spare, None
        return name

    def _new_name(self) -> str:
        return f"cb_{os.getpid()}_{next(self._names)}"

    def _drops(self) -> list[str]:
        drops, self._dropped = self._dropped, []
        return [f'DROP DATABASE IF EXISTS "{d}" WITH (FORCE)' for d in drops]

    def _make_spare(self) -> None:
        if not self.running or self._paused or self._spare is not None:
            return
        self._spare = self._new_name()
        self._spare_proc = subprocess.Popen(
            self._psql_args([*self._drops(), f'CREATE DATABASE "{self._spare}"']),
            cwd=self.dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **self._as_owner,
        )

    def psql(self, commands: Iterable[str], dbname: str = "postgres") -> str:
        """Run SQL statements (each in its own transaction) through psql over the unix socket."""
        args = self._psql_args(commands, dbname)
        return self._run(args[0], *args[1:], timeout=30)

    def _psql_args(self, commands: Iterable[str], dbname: str = "postgres") -> list[str]:
        args = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", str(self.dir), "-p", str(self.port), "-U", ROLE, "-d", dbname]
        for command in commands:
            args += ["-c", command]
        return args

    # -- internals -------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=str(self.dir), LC_ALL="C", LANG="C")
        return env

    def _run(self, program: str, *args: str, timeout: float) -> str:
        result = subprocess.run(
            [program if "/" in program else str(self.bindir / program), *args],
            cwd=self.dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._as_owner,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}")
        out: str = result.stdout
        return out

    def _spawn(self) -> None:
        args = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        args += ["-k", str(self.dir)]
        for key, value in SERVER_SETTINGS.items():
            args += ["-c", f"{key}={value}"]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                cwd=self.dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal is for pytest, not for it
                preexec_fn=_die_with_parent() if threading.current_thread() is MAIN_THREAD else None,
                **self._as_owner,
            )
        proc = self._proc
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready(proc.pid):
            if proc.poll() is not None:
                self._proc = None
                tail = self._log_tail(offset)
                if "could not bind" in tail or "Address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"PostgreSQL exited with {proc.returncode} at start:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"PostgreSQL not ready within {self.startup_timeout} s:\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def _ready(self, pid: int) -> bool:
        """postmaster.pid names this process and says `ready` (line 8, PostgreSQL 10+)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"

    def _wait_orphans(self) -> None:
        """Backends of a killed postmaster hold its shared memory: a new postmaster refuses to
        start until they are gone. They exit within milliseconds of noticing; past 10 s, SIGKILL."""
        orphans, self._orphans = self._orphans, []
        try:
            _poll(lambda: not any(_alive(p) for p in orphans), 10, "backends of the killed server")
        except TimeoutError:
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _poll(lambda: not any(_alive(p) for p in orphans), 10, "backends of the killed server")

    def _log_tail(self, offset: int = 0, limit: int = 4000) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")[-limit:]
        except OSError:
            return "(no log)"


class _PortTaken(RuntimeError):
    pass


def _die_with_parent() -> Callable[[], None]:
    """preexec_fn: the server gets SIGQUIT (immediate shutdown) if the test process dies without
    stopping it. Runs in the child after it took the postgres user's identity (which would have
    cleared the setting); tied to the forking thread, hence only used from the main thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGQUIT, 0, 0, 0)

    return preexec
