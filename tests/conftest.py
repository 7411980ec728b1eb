"""Fixtures: real agentbus servers (uvicorn subprocesses) on each real backend.

Backend tests need PostgreSQL and Redis on 127.0.0.1. Outside CI a missing server skips
its tests with a loud reason; with CI=true it fails them, so CI can never go green by
testing less.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("AGENTBUS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AGENTBUS_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ("sqlite", "postgres", "redis")


def unavailable(what: str) -> None:
    msg = f"{what} is not reachable on 127.0.0.1 - start it (see DEVELOPERS.md / .ci/run)"
    if IN_CI:
        pytest.fail(f"CI=true and {msg}")
    pytest.skip(f"SKIPPING: {msg}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_children(pid: int, port: int) -> list[int]:
    """The child processes of ``pid`` listening on ``port``: with ``serve --workers N`` each
    worker has its own socket, so all N are ready only once N children listen."""
    import psutil

    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                out.append(child.pid)
    return out


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def fresh_pg_database(prefix: str = "agentbus_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped afterwards; unavailable() if the
    server does not answer."""
    import asyncio

    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(run(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL ({exc.__class__.__name__})")
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        try:
            asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except Exception:
            pass


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis ({exc.__class__.__name__})")
    return REDIS_URL


@dataclass
class Server:
    """One or more agentbus processes sharing a store."""

    store: str
    env: dict[str, str]
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def start(self, n: int = 1, *, workers: int = 1, ports: list[int] | None = None) -> Server:
        ports = ports or [free_port() for _ in range(n)]
        for port in ports:
            self._spawn(port, workers)
        return self

    def _spawn(self, port: int, workers: int) -> None:
        env = {**os.environ, **self.env, "AGENTBUS_STORE": self.store}
        log = open(self.log_dir / f"server-{port}.log", "ab") if self.log_dir else subprocess.DEVNULL
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentbus.cli",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--no-migrate",
            ],
            env=env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 90  # generous: CI machines can be heavily loaded
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"agentbus exited with {proc.returncode}; see {self.log_dir}")
            try:
                # Every worker listening: a client connecting earlier would stay on the first.
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
                if ready and (workers == 1 or len(listening_children(proc.pid, port)) >= workers):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            proc.kill()
            raise RuntimeError(f"agentbus on port {port} did not become ready")
        self.ports.append(port)
        self.procs.append(proc)

    def kill9(self, index: int = 0) -> int:
        """SIGKILL a server (and its uvicorn worker children); returns its port."""
        import psutil

        proc = self.procs[index]
        parent = psutil.Process(proc.pid)
        children = parent.children(recursive=True)
        parent.kill()  # first, so the supervisor cannot start a replacement worker
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait(10)
        port = self.ports[index]
        while _port_open(port):
            time.sleep(0.05)
        return port

    def restart(self, index: int = 0, workers: int = 1) -> None:
        port = self.ports.pop(index)
        self.procs.pop(index)
        self._spawn(port, workers)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        self.ports.clear()


def migrate(store: str) -> None:
    subprocess.run([sys.executable, "-m", "agentbus.cli", "migrate", "--store", store], check=True, cwd=ROOT)


@pytest.fixture(scope="session")
def store_urls(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Store URL per backend, created lazily so a sqlite-only run needs no servers."""
    return {}


def make_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'agentbus.db'}"
    elif backend == "postgres":
        url = request.getfixturevalue("pg_database")
    else:
        # Every test gets its own key prefix, so tests never see each other's spaces.
        url = request.getfixturevalue("redis_url")
    migrate(url)
    return url


def dev_env() -> dict[str, str]:
    """Environment of a test server: dev mode (X-Agent-Id names the caller), own Redis prefix."""
    return {"AGENTBUS_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}", "AGENTBUS_AUTH": "false"}


def module_server(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    env: dict[str, str] | None = None,
    n: int = 1,
) -> Iterator[Server]:
    """Body of a module-scoped server fixture parametrized by backend: ``n`` processes per
    backend sharing one store for a whole module, which keeps suites fast (tests use unique
    spaces). ``env`` adds settings such as small limits."""
    tmp = tmp_path_factory.mktemp(f"{name}-{request.param}")
    srv = Server(store=make_store(request.param, request, tmp), env={**dev_env(), **(env or {})}, log_dir=tmp)
    try:
        srv.start(n)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server_factory(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """Build servers on ``backend``: ``server_factory(n=1, workers=1, **env)``."""
    started: list[Server] = []
    store = make_store(backend, request, tmp_path)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def factory(n: int = 1, *, workers: int = 1, **env: str) -> Server:
        # Dev mode (no tokens) unless a test asks for auth=true: most tests are about the bus.
        full_env = {
            **dev_env(),
            "AGENTBUS_REDIS_PREFIX": prefix,
            **{f"AGENTBUS_{k.upper()}": str(v) for k, v in env.items()},
        }
        srv = Server(store=store, env=full_env, log_dir=tmp_path)
        started.append(srv)
        return srv.start(n, workers=workers)

    yield factory
    for srv in started:
        srv.stop()


@pytest.fixture
def server(server_factory: object) -> Server:
    return server_factory()  # type: ignore[operator,no-any-return]


@pytest.fixture
def space() -> str:
    return f"sp-{uuid.uuid4().hex[:12]}"
