"""Servers under test: agentbus and the baselines as uvicorn subprocesses on fresh stores.

Each run gets its own SQLite file, its own PostgreSQL databases (created and dropped here)
and its own Redis key prefixes (deleted by prefix afterwards; a shared Redis is never
flushed). agentbus is started exactly as an operator would (``agentbus serve``); the
baselines with the same uvicorn settings ``agentbus serve`` passes (workers, loop/http
auto, lifespan on, access log off, log level warning), so only the application differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("AGENTBUS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AGENTBUS_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One uvicorn master process (and its workers) serving one target."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    workers: int = 1
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> Server:
        self.port = free_port()
        cmd = [*self.cmd, "--port", str(self.port)]
        log = open(self.log_path, "ab")  # the child process writes it for its lifetime
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200 and self._all_listening():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout_s}s:\n{self.log_tail()}")

    def _all_listening(self) -> bool:
        """Every worker listens: connections opened earlier would all stay on the early ones."""
        import psutil

        assert self.proc is not None
        if self.workers == 1:
            return True
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return False
        listening = 0
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                conns = child.net_connections(kind="tcp")
                listening += any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns)
        return listening >= self.workers

    def pids(self) -> list[int]:
        """The master and its worker processes, for CPU accounting."""
        import psutil

        if self.proc is None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent.pid, *(c.pid for c in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def agentbus_server(store: str, workers: int, log_dir: Path, extra_env: dict[str, str] | None = None) -> Server:
    cmd = [sys.executable, "-m", "agentbus.cli", "serve", "--workers", str(workers), "--no-migrate"]
    # Dev mode (no bearer tokens): the baselines have no authentication either, so the
    # comparison is of the commit path alone. Loopback-only, which is all the bench binds.
    env = {"AGENTBUS_STORE": store, "AGENTBUS_AUTH": "false", **(extra_env or {})}
    return Server("agentbus", cmd, env, log_dir / "agentbus.log", workers=workers)


def baseline_server(module: str, workers: int, log_dir: Path, env: dict[str, str]) -> Server:
    # The same worker processes and uvicorn options as agentbus.cli serve.
    cmd = [sys.executable, "-m", "bench.baselines.serve", f"bench.baselines.{module}:app", "--workers", str(workers)]
    return Server(f"baseline {module}", cmd, env, log_dir / f"baseline-{module}.log", workers=workers)


def migrate(store: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "agentbus.cli", "migrate", "--store", store],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )


# ---------------------------------------------------------------------- PostgreSQL
async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_create(prefix: str) -> str:
    """A fresh database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def pg_drop(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except Exception as exc:
        return f"PostgreSQL at {PG_ADMIN_URL} unreachable ({type(exc).__name__}: {exc})"
    return None


def pg_connection_headroom() -> int:
    """Connections still free for non-superusers (max_connections - reserved - in use)."""
    import asyncpg

    async def get() -> int:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            total = int(await conn.fetchval("SHOW max_connections"))
            reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
            sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            used = int(await conn.fetchval(sql))
            return total - reserved - used
        finally:
            await conn.close()

    return asyncio.run(get())


def pg_connections_needed(workers: int) -> int:
    """Peak connections of agentbus + baseline: per worker a pool of pool_size plus as much overflow."""
    pool = int(os.environ.get("AGENTBUS_POOL_SIZE", "10"))
    return 2 * workers * 2 * pool


def pg_server_version() -> str:
    import asyncpg

    async def get() -> str:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        return asyncio.run(get())
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


# ---------------------------------------------------------------------- Redis
def redis_available() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} unreachable ({type(exc).__name__})"
    return None


def redis_server_version() -> str:
    import redis

    try:
        return str(redis.Redis.from_url(REDIS_URL, socket_timeout=2).info("server")["redis_version"])
    except redis.RedisError as exc:
        return f"unknown ({type(exc).__name__})"


def redis_delete_prefix(prefix: str) -> int:
    """Delete every key containing ``prefix`` (unique per run; keys may open with a hash tag)."""
    import redis

    r = redis.Redis.from_url(REDIS_URL, socket_timeout=10)
    n = 0
    batch: list[bytes] = []
    for k in r.scan_iter(match=f"*{prefix}*", count=1000):
        batch.append(k)
        if len(batch) >= 1000:
            n += int(r.unlink(*batch))
            batch.clear()
    if batch:
        n += int(r.unlink(*batch))
    return n


def agentbus_redis_missing() -> str | None:
    """None if this checkout has the Redis backend, else why agentbus-on-Redis is skipped."""
    if importlib.util.find_spec("agentbus.store.redis") is None:
        return "agentbus/store/redis.py is not in this checkout"
    return None


# ---------------------------------------------------------------------- targets
@dataclass
class Target:
    """A server under test plus what to undo afterwards."""

    system: str  # "agentbus" or the baseline's name
    backend: str
    server: Server
    modes: tuple[str, ...]
    cleanups: list[tuple[str, str]] = field(default_factory=list)  # ("pg", url) | ("redis", prefix)
    workers: int = 1  # uvicorn worker processes of the server

    @property
    def label(self) -> str:
        return f"{self.system}/{self.backend}"

    def cleanup(self) -> list[str]:
        """Undo what was created; returns problems (never raises: cleanup must finish)."""
        problems: list[str] = []
        self.server.stop()
        for kind, what in self.cleanups:
            try:
                if kind == "pg":
                    pg_drop(what)
                elif kind == "redis":
                    redis_delete_prefix(what)
            except Exception as exc:
                problems.append(f"{self.label}: cleanup of {kind} {what} failed: {exc}")
        return problems


def build_targets(backend: str, workers: int, log_dir: Path, tmp: Path, targets: list[Target]) -> list[str]:
    """Append the targets for one backend (not started) to ``targets`` as soon as each has
    something to clean up, so a failure half-way still drops what was created; returns notes
    on anything skipped."""
    notes: list[str] = []
    tag = uuid.uuid4().hex[:8]
    if backend == "sqlite":
        store = f"sqlite:///{tmp / 'agentbus-bench.db'}"
        migrate(store)
        targets.append(
            Target("agentbus", "sqlite", agentbus_server(store, workers, log_dir), ("ev", "dl"), workers=workers)
        )
        notes.append("sqlite: no hand-written baseline (the issue asks for PostgreSQL and Redis baselines)")
    elif backend == "postgres":
        why = pg_available()
        if why:
            return [f"postgres skipped: {why}"]
        headroom, needed = pg_connection_headroom(), pg_connections_needed(workers)
        if headroom < needed:
            notes.append(
                f"postgres: only {headroom} connections free but the two servers may open {needed}; "
                "expect 'too many clients' errors (raise max_connections or stop other clients)"
            )
        url = pg_create("agentbus_bench")
        srv = agentbus_server(url, workers, log_dir)
        t = Target("agentbus", "postgres", srv, ("ev", "dl"), [("pg", url)], workers=workers)
        targets.append(t)
        migrate(url)
        base_url = pg_create("agentbus_bench_base")
        base = baseline_server("pg_serializable", workers, log_dir, {"BENCH_PG_URL": base_url})
        targets.append(Target("pg-serializable", "postgres", base, ("ev",), [("pg", base_url)], workers=workers))
        from bench.baselines.pg_serializable import create_schema

        asyncio.run(create_schema(base_url))
    elif backend == "redis":
        why = redis_available()
        if why:
            return [f"redis skipped: {why}"]
        missing = agentbus_redis_missing()
        if missing:
            notes.append(f"agentbus on redis skipped: {missing}")
        else:
            prefix = f"abbench{tag}"
            srv = agentbus_server(REDIS_URL, workers, log_dir, {"AGENTBUS_REDIS_PREFIX": prefix})
            targets.append(Target("agentbus", "redis", srv, ("ev", "dl"), [("redis", prefix)], workers=workers))
        bprefix = f"abbase{tag}"
        base = baseline_server(
            "redis_watch", workers, log_dir, {"BENCH_REDIS_URL": REDIS_URL, "BENCH_REDIS_PREFIX": bprefix}
        )
        targets.append(Target("redis-watch", "redis", base, ("ev",), [("redis", bprefix)], workers=workers))
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return notes
