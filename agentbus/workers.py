"""Several uvicorn worker processes on one port, each with a listening socket of its own.

Why: uvicorn's ``--workers`` share one listening socket, and asyncio accepts every pending
connection at once when it wakes, so a burst of keep-alive clients (agents open their
connections together) lands on whichever worker woke first and stays there. The benchmark
showed it: with two workers one process used a full core and the other idled, in most
cells. Here every worker binds its own socket with ``SO_REUSEPORT``, and the kernel spreads
new connections over the workers by a hash of the client address and port.

The supervisor is deliberately small: start the workers, restart one that dies (a worker
that keeps dying right after starting ends the server with an error instead of looping),
and on SIGINT/SIGTERM stop them all, each finishing its requests as uvicorn does. Only
processes of the same user can join a ``SO_REUSEPORT`` group (Linux enforces it), so no
other account can take over the port. Where ``SO_REUSEPORT`` is missing, or the port is 0,
:func:`serve` is uvicorn's own multi-worker mode.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("agentbus")

# A worker that exits sooner than this after its start counts as failing to start.
QUICK_EXIT_S = 5.0
MAX_QUICK_EXITS = 5
# How long a stopping worker gets to finish its requests before it is killed.
STOP_GRACE_S = 30.0


def reuseport_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket in the port's SO_REUSEPORT group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _worker(kwargs: dict[str, Any], host: str, port: int, parent: int) -> None:
    """One worker process: its own socket, then an ordinary uvicorn server on it."""
    import uvicorn

    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    config = uvicorn.Config(host=host, port=port, **kwargs)
    sock = bind(host, port)
    uvicorn.Server(config).run(sockets=[sock])


def _stop_when_orphaned(parent: int) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers; they notice and stop
    themselves (gracefully), so a killed server really stops serving its port."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, kwargs: dict[str, Any], host: str, port: int, workers: int) -> None:
        self.kwargs = kwargs
        self.host = host
        self.port = port
        self.workers = workers
        self.stop = threading.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[tuple[BaseProcess, float]] = []

    def _start(self) -> tuple[BaseProcess, float]:
        proc = self._ctx.Process(target=_worker, args=(self.kwargs, self.host, self.port, os.getpid()), daemon=False)
        proc.start()
        return proc, time.monotonic()

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; the exit status for the CLI."""
        # Bound, never listening: holds the port for the group (and fails fast if another
        # program has it) while the workers start; a non-listening socket gets no connections.
        try:
            holder = bind(self.host, self.port)
        except OSError as exc:
            log.error("cannot bind %s:%s: %s", self.host, self.port, exc)
            return 1
        previous = {sig: signal.signal(sig, lambda *_: self.stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        status = 0
        quick_exits = 0
        try:
            self._procs = [self._start() for _ in range(self.workers)]
            while not self.stop.wait(0.25):
                for i, (proc, started) in enumerate(self._procs):
                    if proc.is_alive():
                        continue
                    quick = time.monotonic() - started < QUICK_EXIT_S
                    quick_exits = quick_exits + 1 if quick else 0
                    if quick_exits >= MAX_QUICK_EXITS:
                        log.error("workers keep exiting right after starting (last status %s); stopping", proc.exitcode)
                        status = 3  # uvicorn's STARTUP_FAILURE
                        self.stop.set()
                        break
                    log.warning("worker %s exited with status %s; starting another", proc.pid, proc.exitcode)
                    self._procs[i] = self._start()
        finally:
            self._stop_all()
            holder.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _stop_all(self) -> None:
        for proc, _ in self._procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()  # SIGTERM: uvicorn stops accepting and finishes requests
        deadline = time.monotonic() + STOP_GRACE_S
        for proc, _ in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


def serve(kwargs: dict[str, Any], *, host: str, port: int, workers: int) -> int:
    """Run ``uvicorn.Config(**kwargs)`` with ``workers`` processes; the exit status."""
    import uvicorn

    if workers > 1 and port != 0 and reuseport_available():
        return Supervisor(kwargs, host, port, workers).run()
    uvicorn.run(host=host, port=port, workers=workers, **kwargs)
    return 0
