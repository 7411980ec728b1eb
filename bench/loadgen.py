"""The load generator: simulated agents in several client processes, one raw HTTP/1.1
keep-alive connection per agent.

Why not httpx: on a 2-core machine the client competes with the server for CPU, and httpx
spends several times more CPU per request than this minimal client, which would make the
benchmark measure the client. Why several processes: one Python process saturates one core
long before a 2-worker server does; the agents are split round-robin over ``procs``
processes (uvloop when installed), and each process reports the CPU it used in the measured
window so the report can show how much of the machine the load generator took.

Every workload speaks only the agentbus v1 HTTP shape, so the same code drives agentbus and
the hand-written baselines.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import orjson

Mode = Literal["ev", "dl", "rmw-ev", "rmw-dl", "ping"]
Contention = Literal["low", "high"]

REQUEST_TIMEOUT_S = 60.0
PAD = "x" * 64  # makes a stored value ~100 bytes of JSON, like a small shard of agent state


@dataclass(frozen=True)
class CellSpec:
    """One measured cell: a workload against one server for a fixed time.

    ``mode``: ``ev`` blind writes with expected_version (retry with the current_version the
    409 reports); ``dl`` GET then commit without expected_version, so the server validates the
    read set it reconstructs from its delivery log (retry = GET again); ``rmw-ev``/``rmw-dl``
    read-modify-write of a counter, used by the correctness self-check; ``ping`` GET /healthz,
    the HTTP ceiling of this machine with this client.
    """

    host: str
    port: int
    space: str
    mode: Mode
    contention: Contention
    concurrency: int
    hot_keys: int
    warmup_s: float
    duration_s: float
    procs: int

    def key_of(self, agent: int) -> str:
        if self.contention == "low":
            return f"k{agent}"
        return f"hot{agent % self.hot_keys}"

    def keys(self) -> list[str]:
        return sorted({self.key_of(a) for a in range(self.concurrency)})


@dataclass
class ProcResult:
    """What one client process measured. Latencies are seconds, for requests that completed
    inside the measured window; ``ok_by_key`` counts every 200 commit, window or not, so the
    final versions on the server can be checked against it."""

    commit_ok: list[float] = field(default_factory=list)
    commit_conflict: list[float] = field(default_factory=list)
    op: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    other: Counter[str] = field(default_factory=Counter)
    ok_by_key: Counter[str] = field(default_factory=Counter)
    cpu_s: float = 0.0


class HttpConn:
    """A keep-alive HTTP/1.1 connection with just enough parsing for uvicorn's responses."""

    def __init__(self, host: str, port: int, agent: str) -> None:
        self.host = host
        self.port = port
        self.agent = agent.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: bytes, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Return (status, body); status 0 means the connection failed (it is reopened next time)."""
        try:
            return await asyncio.wait_for(self._request(method, path, body), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            self.close()
            return 0, b""

    async def _request(self, method: bytes, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Agent-Id: %s\r\n" % (method, path.encode(), self.agent)
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.writer.write(head + body)
        else:
            self.writer.write(head + b"\r\n")
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        lower = raw.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            n = int(lower[i + 17 : lower.index(b"\r\n", i + 2)])
            data = await self.reader.readexactly(n) if n else b""
        elif b"\r\ntransfer-encoding: chunked" in lower:
            data = await self._chunked()
        else:
            data = b""
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, data

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            parts.append(chunk[:-2])


class Agent:
    """One simulated agent: its own identity (X-Agent-Id), connection and key."""

    def __init__(self, spec: CellSpec, index: int, res: ProcResult, window: tuple[float, float]) -> None:
        self.spec = spec
        self.index = index
        self.key = spec.key_of(index)
        self.conn = HttpConn(spec.host, spec.port, f"agent{index}")
        self.res = res
        self.start, self.end = window
        self.commit_path = f"/v1/spaces/{spec.space}/commit"
        self.shard_path = f"/v1/spaces/{spec.space}/shards/{self.key}"
        self.known = 0  # ev mode: the version this agent believes is current
        self.n = 0

    def in_window(self, t: float) -> bool:
        return self.start <= t <= self.end

    async def run(self) -> None:
        mode = self.spec.mode
        try:
            while time.monotonic() < self.end:
                if mode == "ping":
                    await self.ping()
                else:
                    await self.operation()
        finally:
            self.conn.close()

    async def ping(self) -> None:
        t0 = time.monotonic()
        status, _ = await self.conn.request(b"GET", "/healthz")
        t1 = time.monotonic()
        if status == 200:
            if self.in_window(t1):
                self.res.commit_ok.append(t1 - t0)
                self.res.op.append(t1 - t0)
        else:
            self.res.other[str(status)] += 1

    async def operation(self) -> None:
        """Retry until one commit is applied (or the window ends): one agent "operation"."""
        mode = self.spec.mode
        op_start = time.monotonic()
        while time.monotonic() < self.end:
            value: dict[str, Any]
            write: dict[str, Any]
            if mode == "ev":
                value = {"a": self.index, "n": self.n, "pad": PAD}
                write = {"key": self.key, "value": value, "expected_version": self.known}
            else:
                got = await self.read()
                if got is None:
                    continue
                version, current = got
                if mode == "dl":
                    write = {"key": self.key, "value": {"a": self.index, "n": self.n, "pad": PAD}}
                else:
                    n = int(current.get("n", 0)) if isinstance(current, dict) else 0
                    write = {"key": self.key, "value": {"n": n + 1, "a": self.index}}
                    if mode == "rmw-ev":
                        write["expected_version"] = version
            body = orjson.dumps({"writes": [write]})
            t0 = time.monotonic()
            status, data = await self.conn.request(b"POST", self.commit_path, body)
            t1 = time.monotonic()
            if status == 200:
                self.res.ok_by_key[self.key] += 1
                self.n += 1
                try:
                    self.known = int(orjson.loads(data)["versions"][self.key])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.res.other["200 without versions"] += 1
                if self.in_window(t1):
                    self.res.commit_ok.append(t1 - t0)
                    self.res.op.append(t1 - op_start)
                return
            if status == 409:
                if self.in_window(t1):
                    self.res.commit_conflict.append(t1 - t0)
                if mode == "ev":
                    current = self._current_version(data)
                    if current is None:
                        self.res.other["409 without current_version"] += 1
                        got = await self.read()
                        current = got[0] if got else self.known
                    self.known = current
                continue
            self.res.other[f"commit {status}"] += 1
            await asyncio.sleep(0.01)  # 5xx or a broken connection: retry, but do not spin

    async def read(self) -> tuple[int, Any] | None:
        t0 = time.monotonic()
        status, data = await self.conn.request(b"GET", self.shard_path)
        t1 = time.monotonic()
        if self.in_window(t1):
            self.res.get.append(t1 - t0)
        if status == 200:
            try:
                doc = orjson.loads(data)
                return int(doc["version"]), doc.get("value")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self.res.other["get 200 without version"] += 1
                return None
        if status == 404:
            return 0, None
        self.res.other[f"get {status}"] += 1
        await asyncio.sleep(0.01)
        return None

    def _current_version(self, data: bytes) -> int | None:
        try:
            for c in orjson.loads(data)["error"].get("conflicts", []):
                if c["key"] == self.key:
                    return int(c["current_version"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
        return None


class _Timed(Protocol):
    cpu_s: float


R = TypeVar("R", bound=_Timed)
Conn = TypeVar("Conn", bound=HttpConn)


async def drive_window(
    spec: Any,
    clients: list[int],
    barrier: Any,
    res: R,
    connect: Callable[[int], Conn],
    client: Callable[[int, Conn, tuple[float, float]], Awaitable[None]],
) -> R:
    """The body of one load-generator process, shared by every benchmark: open one
    connection per client (before the clock starts, so the window measures steady state),
    meet the other processes at ``barrier``, run ``client(index, conn, window)`` for each,
    and record the CPU this process used inside the measured window in ``res.cpu_s``.
    ``spec`` needs ``warmup_s`` and ``duration_s``."""
    conns = []
    for c in clients:
        conn = connect(c)
        await conn.open()
        conns.append(conn)
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120)
    t0 = time.monotonic()
    window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s)

    async def cpu_probe() -> None:
        await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
        c0 = time.process_time()
        await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
        res.cpu_s = time.process_time() - c0

    probe = asyncio.create_task(cpu_probe())
    await asyncio.gather(*(client(c, conn, window) for c, conn in zip(clients, conns, strict=True)))
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    return res


async def _drive(spec: CellSpec, agents: list[int], barrier: Any) -> ProcResult:
    res = ProcResult()

    async def client(a: int, conn: HttpConn, window: tuple[float, float]) -> None:
        agent = Agent(spec, a, res, window)
        agent.conn = conn
        await agent.run()

    return await drive_window(spec, agents, barrier, res, lambda a: HttpConn(spec.host, spec.port, f"agent{a}"), client)


def run_child(
    drive: Callable[[Any, list[int], Any], Awaitable[Any]], spec: Any, clients: list[int], barrier: Any, out: Any
) -> None:
    """Entry point of a forked load-generator process: ``drive(spec, clients, barrier)``
    on uvloop; the result (or the error) goes to ``out``."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.run
    try:
        out.put(("ok", runner(drive(spec, clients, barrier))))
    except BaseException as exc:  # report, never hang the coordinator
        with contextlib.suppress(Exception):
            barrier.abort()
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def run_processes(
    drive: Callable[[Any, list[int], Any], Awaitable[R]], spec: Any, probe: WindowProbe | None = None
) -> tuple[list[R], tuple[float, float]]:
    """Run ``spec.concurrency`` clients split round-robin over ``min(spec.procs,
    spec.concurrency)`` fresh forked processes, each running ``drive``; sample ``probe`` at the
    start and end of the measured window. Bounded in time; returns (per-process results,
    the window on this process's monotonic clock). Used by every benchmark's cells."""
    ctx = mp.get_context("fork")
    nprocs = max(1, min(spec.procs, spec.concurrency))
    split = [list(range(p, spec.concurrency, nprocs)) for p in range(nprocs)]
    barrier = ctx.Barrier(nprocs + 1)
    out = ctx.Queue()
    children = [ctx.Process(target=run_child, args=(drive, spec, part, barrier, out), daemon=True) for part in split]
    for c in children:
        c.start()
    try:
        barrier.wait(120)
        t0 = time.monotonic()
        window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s)
        if probe is not None:
            time.sleep(max(0.0, window[0] - time.monotonic()))
            probe.begin()
            time.sleep(max(0.0, window[1] - time.monotonic()))
            probe.end()
        results: list[R] = []
        errors: list[str] = []
        deadline = window[1] + REQUEST_TIMEOUT_S + 30
        for _ in children:
            kind, payload = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "ok":
                results.append(payload)
            else:
                errors.append(payload)
        if errors:
            raise RuntimeError("load generator failed: " + "; ".join(errors))
        return results, window
    finally:
        for c in children:
            c.join(5)
            if c.is_alive():
                c.terminate()
                c.join(5)


@dataclass
class CellResult:
    """Merged measurements of every client process for one cell."""

    spec: CellSpec
    procs: list[ProcResult]
    wall_window: tuple[float, float]  # coordinator's monotonic clock

    def merged(self, name: str) -> list[float]:
        return sorted(x for p in self.procs for x in getattr(p, name))

    @property
    def ok_by_key(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for p in self.procs:
            total.update(p.ok_by_key)
        return total

    @property
    def other(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for p in self.procs:
            total.update(p.other)
        return total

    @property
    def client_cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.procs)


class WindowProbe:
    """Sampled by the coordinator at the start and end of the measured window (server and
    machine CPU over the same interval the clients measure)."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


def run_cell(spec: CellSpec, probe: WindowProbe | None = None) -> CellResult:
    """Run one commit-benchmark cell in fresh client processes; bounded in time."""
    results, window = run_processes(_drive, spec, probe)
    return CellResult(spec, results, window)


def proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


class ProcessCpu(WindowProbe):
    """CPU cores of each named server process tree, and of the whole machine, over the
    measured window. ``restarted`` names the servers whose set of processes changed in the
    window (a worker uvicorn replaced loses its CPU: flagged rather than guessed)."""

    def __init__(self, servers: dict[str, Any]) -> None:
        self.servers = servers  # name -> anything with .pids() (bench.servers.Server)
        self.cores: dict[str, float] = {}
        self.machine = 0.0
        self.restarted: list[str] = []

    def _sample(self) -> dict[str, dict[int, float]]:
        import psutil

        out: dict[str, dict[int, float]] = {}
        for name, srv in self.servers.items():
            per: dict[int, float] = {}
            for pid in srv.pids():
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = psutil.Process(pid).cpu_times()
                    per[pid] = t.user + t.system
            out[name] = per
        return out

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.s0 = self._sample()
        self.m0 = proc_stat()

    def end(self) -> None:
        wall = time.monotonic() - self.t0
        s1 = self._sample()
        self.cores = {
            k: sum(cpu - self.s0.get(k, {}).get(pid, 0.0) for pid, cpu in per.items()) / wall for k, per in s1.items()
        }
        self.restarted = [k for k, per in s1.items() if set(per) != set(self.s0.get(k, {}))]
        busy, total = proc_stat()
        self.machine = (busy - self.m0[0]) / max(1, total - self.m0[1]) * (os.cpu_count() or 1)
