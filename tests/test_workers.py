"""``agentbus serve --workers N``: one SO_REUSEPORT socket per worker (agentbus.workers).

Checked on a real server: every worker listens on the port; keep-alive connections opened
together are spread over the workers (with uvicorn's shared socket they mostly landed on
one); a worker killed with SIGKILL is replaced; SIGTERM stops everything; a supervisor
killed with SIGKILL takes its workers with it; workers that cannot start end the server
with an error instead of a restart loop; a taken port is a clear error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from agentbus import workers
from agentbus.migrate import upgrade
from tests.conftest import ROOT, free_port, listening_children


def _wait(cond: object, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _spawn(store: str, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTBUS_STORE": store, "AGENTBUS_AUTH": "false"}
    cmd = [sys.executable, "-m", "agentbus.cli", "serve", "--port", str(port), "--workers", str(workers)]
    with open(log, "ab") as out:
        return subprocess.Popen([*cmd, "--no-migrate"], env=env, stdout=out, stderr=out, cwd=ROOT)


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[psutil.Process]:
        return [c for c in psutil.Process(self.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]

    def listening(self) -> list[int]:
        return listening_children(self.proc.pid, self.port)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    store = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(store)
    port = free_port()
    proc = _spawn(store, port, 2, tmp_path / "server.log")
    srv = Running(proc, port, tmp_path / "server.log")
    try:
        _wait(lambda: proc.poll() is not None or len(srv.listening()) == 2, what="two listening workers")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        if proc.poll() is None:
            proc.kill()


def test_each_worker_listens_and_connections_spread(server: Running) -> None:
    workers = server.workers()
    assert len(workers) == 2 and len(set(server.listening())) == 2
    clients = [httpx.Client(base_url=server.url, timeout=10) for _ in range(16)]
    try:
        for c in clients:
            assert c.get("/healthz").status_code == 200
        per_worker = {}
        for w in workers:
            conns = w.net_connections("tcp")
            per_worker[w.pid] = sum(
                1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port
            )
        # 16 connections hashed over 2 sockets: all on one worker has probability 2**-15.
        assert sum(per_worker.values()) == 16 and min(per_worker.values()) >= 1, per_worker
        # Both workers answer commits on the shared store.
        for i, c in enumerate(clients):
            r = c.post("/v1/spaces/w/commit", json={"writes": [{"key": f"k{i}", "value": i}]})
            assert r.status_code == 200, r.text
    finally:
        for c in clients:
            c.close()


def test_a_killed_worker_is_replaced(server: Running) -> None:
    victim = server.workers()[0]
    victim.kill()
    victim.wait(10)
    _wait(
        lambda: len(server.listening()) == 2 and victim.pid not in {w.pid for w in server.workers()},
        what="a replacement worker",
    )
    for _ in range(20):
        with httpx.Client(base_url=server.url, timeout=10) as c:  # new connections: both sockets
            assert c.get("/readyz").status_code == 200
    assert "starting another" in server.log.read_text()


def test_sigterm_stops_all_workers(server: Running) -> None:
    workers = server.workers()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    for w in workers:
        assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE


def test_workers_stop_when_the_supervisor_is_killed(server: Running) -> None:
    workers = server.workers()
    server.proc.kill()
    server.proc.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [p.pid for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_workers_that_cannot_start_end_the_server(caplog: pytest.LogCaptureFixture) -> None:
    # An app that cannot be imported: every worker exits at once; no endless restarts.
    kwargs = {"app": "tests.no_such_module:app", "log_level": "critical", "lifespan": "on"}
    t0 = time.monotonic()
    with caplog.at_level("ERROR", logger="agentbus"):
        assert workers.serve(kwargs, host="127.0.0.1", port=free_port(), workers=2) == 3
    assert time.monotonic() - t0 < 120
    assert "keep exiting right after starting" in caplog.text


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 't.db'}"
    upgrade(store)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = _spawn(store, port, 2, tmp_path / "taken.log")
        assert proc.wait(60) != 0
    assert "cannot bind" in (tmp_path / "taken.log").read_text()
