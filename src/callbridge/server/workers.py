"""`callbridge serve --workers N`: N worker processes supervised by gunicorn.

gunicorn's arbiter does the process management: it forks the workers, replaces one that
dies (within about a second), and on SIGTERM asks every worker to stop, waiting up to its
graceful timeout before it kills what is left. Each worker is a uvicorn server
(`uvicorn-worker`'s worker class, with our uvicorn options and our draining
`GracefulServer`) running its own app, so each worker is its own instance in the fleet:
its own instance id, lease and calls. A replaced worker's calls are reconciled by a live
worker at once (its process is gone from this host), not after a lease period.

The listening socket is bound by the CLI before anything starts (a port in use is one
line) and handed to gunicorn as `fd://N`. SIGINT is a graceful stop here, as SIGTERM is
(gunicorn's default would be a quick one): a second SIGINT or SIGQUIT stops at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from callbridge.server.run import UVICORN_OPTIONS, GracefulServer

__all__ = ["CallbridgeWorker", "WorkersApp", "run_workers"]

WORKER_AGE = "CALLBRIDGE_WORKER_AGE"


class CallbridgeWorker(UvicornWorker):  # type: ignore[misc]
    """A gunicorn worker running one callbridge app on uvicorn, draining on SIGTERM/SIGINT."""

    CONFIG_KWARGS: dict[str, Any] = {"http": "auto", **UVICORN_OPTIONS}

    def init_process(self) -> None:
        # Before the app is built (load_wsgi, in super().init_process): name this worker.
        os.environ[WORKER_AGE] = str(self.age)
        super().init_process()

    def _install_sigquit_handler(self) -> None:
        pass  # installed in _serve, where the server exists

    async def _serve(self) -> None:
        app = self.wsgi
        self.config.app = app
        server = GracefulServer(self.config, app.state.callbridge)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, server.stop_now)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class _GracefulArbiter(Arbiter):  # type: ignore[misc]
    def handle_int(self) -> None:
        # Ctrl-C drains like SIGTERM (the workers got the same SIGINT from the terminal).
        raise StopIteration


class WorkersApp(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from callbridge.cli import worker_app

        return worker_app()

    def run(self) -> None:
        _GracefulArbiter(self).run()


def run_workers(fd: int, workers: int, grace_s: float, log_level: str) -> None:
    """Serve on the bound socket `fd` with `workers` processes until stopped."""
    WorkersApp(
        {
            "bind": [f"fd://{fd}"],
            "workers": workers,
            "worker_class": "callbridge.server.workers.CallbridgeWorker",
            # A worker's drain: the grace period, then its calls end `shutdown` and their
            # records are written (bounded), plus margin before gunicorn kills it.
            "graceful_timeout": int(grace_s + 15),
            "timeout": 30,  # a worker that does not check in for this long is replaced
            "loglevel": "warning" if log_level in ("warning", "error", "critical") else "info",
            "accesslog": None,
            "proc_name": "callbridge",
        }
    ).run()
