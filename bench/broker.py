"""Broker overhead: model calls through agentbus versus straight to the same local upstream.

Usage (from the repository root; see bench/README.md, "Broker overhead"):

    .venv/bin/python -m bench.broker               # full run (~6 min), writes bench/BROKER_RESULTS.md
    .venv/bin/python -m bench.broker --quick       # ~1.5 min smoke, results in /tmp
    .venv/bin/python -m bench.broker --profile /tmp/prof   # also cProfile every agentbus server
    .venv/bin/python -m bench.broker --report bench/results/broker-X.json   # re-render the Markdown

One no-op OpenAI-compatible upstream (bench/upstream_server.py) answers at once, so what a
call through agentbus adds over a direct call is the broker's own cost: HTTP in and out,
routing, budget reserve/settle in the storage backend, the usage record. agentbus runs as
``agentbus serve --workers 1`` on SQLite and on Redis, each without budgets (the default:
unlimited) and with a per-principal budget, all started before the first cell.

Each agentbus cell is immediately preceded by a direct cell with the same workload, so the
"added" latency compares two measurements taken seconds apart and a drift of the shared
machine hits both alike. Workloads: ``json`` (non-streaming chat completion, latency of the
whole call) and ``stream`` (``stream: true``; time to the first content chunk and to the end
of the stream), at 1, 16 and 64 closed-loop clients, each with one keep-alive connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson

from bench.loadgen import REQUEST_TIMEOUT_S, HttpConn, ProcessCpu, drive_window, run_processes
from bench.run import background_busy, loadavg, machine_info, percentiles
from bench.run import versions as commit_bench_versions
from bench.servers import (
    REDIS_URL,
    ROOT,
    Server,
    agentbus_server,
    migrate,
    redis_available,
    redis_delete_prefix,
)
from bench.upstream_server import MODEL, STREAM_CHUNKS, USAGE, delay_factor

Mode = Literal["json", "stream", "healthz"]
BACKENDS = ("sqlite", "redis")
RESULTS_MD = ROOT / "bench" / "BROKER_RESULTS.md"
CHAT_PATH = "/v1/chat/completions"
# The target, at 16 clients.
TARGET_CLIENTS = 16
TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0
# 8 content chunks + the usage chunk + [DONE]: what a complete stream holds, direct or brokered.
STREAM_EVENTS = STREAM_CHUNKS + 2
TOKENS_PER_CALL = USAGE["total_tokens"]
# A per-principal budget that is never reached: it makes the broker check and count tokens
# and requests-per-minute, which is what the "+budget" variants price.
BUDGET = {"max_tokens": 10**12, "rpm": 10**9}

_MESSAGES = [{"role": "user", "content": "Say hello in eight tokens, then stop."}]
JSON_REQUEST = {"model": MODEL, "messages": _MESSAGES, "max_tokens": 16}
JSON_BODY = orjson.dumps(JSON_REQUEST)
# include_usage is asked for by the client, so the broker passes the usage chunk through
# instead of stripping it and both paths deliver the same events.
STREAM_REQUEST = {
    "model": MODEL,
    "messages": _MESSAGES,
    "max_tokens": 16,
    "stream": True,
    "stream_options": {"include_usage": True},
}
STREAM_BODY = orjson.dumps(STREAM_REQUEST)


# ---------------------------------------------------------------------- load generator
@dataclass(frozen=True)
class BrokerCell:
    """One measured cell: ``concurrency`` clients calling one server for a fixed time."""

    target: str
    port: int
    mode: Mode
    concurrency: int
    warmup_s: float
    duration_s: float
    procs: int
    upstream_delay_ms: float = 0.0


@dataclass
class ClientResult:
    """What one client process measured (seconds, requests completed inside the window) and
    ``ok_total``: every complete 200 answer, window or not, to check budget accounting."""

    total: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    # Latency and time to first token minus the upstream's own delay for this call (calls
    # with a seeded delay; the upstream holds back the whole answer, first chunk included).
    excess: list[float] = field(default_factory=list)
    ttft_excess: list[float] = field(default_factory=list)
    other: Counter[str] = field(default_factory=Counter)
    ok_total: int = 0
    cpu_s: float = 0.0


class StreamConn(HttpConn):
    """HttpConn plus an SSE reader that notes when the first content chunk arrives."""

    async def stream(self, path: str, body: bytes) -> tuple[int, float | None, int, bool]:
        """Return (status, monotonic time of the first content chunk, SSE events, saw [DONE]);
        status 0 means the connection failed (reopened next time)."""
        try:
            return await asyncio.wait_for(self._stream(path, body), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            self.close()
            return 0, None, 0, False

    async def _stream(self, path: str, body: bytes) -> tuple[int, float | None, int, bool]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Agent-Id: %s\r\n" % (path.encode(), self.agent)
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        lower = raw.lower()
        if b"\r\ntransfer-encoding: chunked" not in lower:
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                await self.reader.readexactly(int(lower[i + 17 : lower.index(b"\r\n", i + 2)]))
            return status, None, 0, False
        first: float | None = None
        events = 0
        done = False
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None and b'"content"' in chunk:
                first = time.monotonic()
            events += chunk.count(b"data:")
            done = done or b"data: [DONE]" in chunk
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, first, events, done


async def _client(spec: BrokerCell, conn: StreamConn, res: ClientResult, window: tuple[float, float]) -> None:
    """One closed-loop client: the next call as soon as the previous one has fully answered."""
    start, end = window
    delay_s = spec.upstream_delay_ms / 1000.0
    rng = random.Random()
    try:
        while time.monotonic() < end:
            body, upstream_s = (STREAM_BODY if spec.mode == "stream" else JSON_BODY), None
            if spec.mode in ("json", "stream") and delay_s > 0:
                # The upstream derives its delay from the seed: subtract it per call.
                seed = rng.randrange(1_000_000)
                body = orjson.dumps({**(STREAM_REQUEST if spec.mode == "stream" else JSON_REQUEST), "seed": seed})
                upstream_s = delay_s * delay_factor(body)
            t0 = time.monotonic()
            first: float | None = None
            if spec.mode == "stream":
                status, first, events, done = await conn.stream(CHAT_PATH, body)
                ok = status == 200 and done and events == STREAM_EVENTS
                if status == 200 and not ok:
                    res.other[f"incomplete stream ({events} events, done={done})"] += 1
            elif spec.mode == "json":
                status, data = await conn.request(b"POST", CHAT_PATH, body)
                ok = status == 200 and b'"usage"' in data
                if status == 200 and not ok:
                    res.other["200 without usage"] += 1
            else:
                status, _ = await conn.request(b"GET", "/healthz")
                ok = status == 200
            t1 = time.monotonic()
            if not ok:
                if status != 200:
                    res.other[str(status)] += 1
                await asyncio.sleep(0.01)  # an error or a broken connection: do not spin
                continue
            res.ok_total += 1
            if start <= t1 <= end:
                res.total.append(t1 - t0)
                if upstream_s is not None:
                    res.excess.append(t1 - t0 - upstream_s)
                if first is not None:
                    res.ttft.append(first - t0)
                    if upstream_s is not None:
                        res.ttft_excess.append(first - t0 - upstream_s)
    finally:
        conn.close()


async def _drive(spec: BrokerCell, clients: list[int], barrier: Any) -> ClientResult:
    res = ClientResult()

    async def client(_: int, conn: StreamConn, window: tuple[float, float]) -> None:
        await _client(spec, conn, res, window)

    return await drive_window(
        spec, clients, barrier, res, lambda c: StreamConn("127.0.0.1", spec.port, f"agent{c}"), client
    )


# ---------------------------------------------------------------------- servers
# cProfile on CPU time (time.process_time), not wall time: on a shared 2-core machine a
# descheduled server would otherwise show its waits for a core as time spent in whatever
# function it was in. process_time is process-wide, so on SQLite the CPU of the aiosqlite
# threads lands on whatever the main thread was running; cProfile's own overhead per Python
# call also inflates small functions: read it for shares, not absolute times.
# Argument 1 is the output file, the rest are agentbus.cli's arguments.
CPU_PROFILE = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["agentbus", *sys.argv[2:]]
prof = cProfile.Profile(time.process_time)
try:
    prof.runcall(runpy.run_module, "agentbus.cli", run_name="__main__", alter_sys=True)
except (SystemExit, KeyboardInterrupt):
    pass
finally:
    prof.dump_stats(out)
"""


@dataclass
class Variant:
    """One agentbus server: a backend, with or without a per-principal budget."""

    backend: str
    budget: bool
    server: Server
    redis_prefix: str | None = None
    ok_total: int = 0  # complete 200 answers the clients saw, to check the budget counters

    @property
    def label(self) -> str:
        return f"agentbus/{self.backend}" + ("+budget" if self.budget else "")


def broker_yaml(upstream_port: int, budget: bool) -> str:
    """One endpoint. max_concurrency is raised from its default of 64, which 64 clients plus
    the health probe would reach, turning the cell into a test of the capacity limit."""
    cfg: dict[str, Any] = {
        "endpoints": [
            {
                "name": "local",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "models": [MODEL],
                "max_concurrency": 10_000,
                "timeout_s": 30,
            }
        ]
    }
    if budget:
        cfg["default_principal_limits"] = BUDGET
    return json.dumps(cfg, indent=1)  # JSON is YAML


def build_variants(
    args: argparse.Namespace, upstream_port: int, tmp: Path, log_root: Path, notes: list[str]
) -> list[Variant]:
    """Stores, configs and servers (not started) for every backend x budget asked for."""
    out: list[Variant] = []
    tag = uuid.uuid4().hex[:8]
    for backend in args.backends:
        if backend == "redis":
            why = redis_available()
            if why:
                notes.append(f"redis skipped: {why}")
                continue
        for budget in args.budgets:
            name = f"{backend}{'-budget' if budget else ''}"
            cfg = tmp / f"broker-{name}.yaml"
            cfg.write_text(broker_yaml(upstream_port, budget))
            env = {"AGENTBUS_BROKER_CONFIG": str(cfg)}
            prefix = None
            if backend == "sqlite":
                store = f"sqlite:///{tmp / f'agentbus-{name}.db'}"
                migrate(store)
            else:
                store = REDIS_URL
                prefix = f"abbroker{tag}{'b' if budget else 'n'}"
                env["AGENTBUS_REDIS_PREFIX"] = prefix
            log_dir = log_root / name
            log_dir.mkdir(parents=True)
            srv = agentbus_server(store, 1, log_dir, env)
            if args.profile:
                # workers=1 runs the app in the uvicorn process itself, so the profiler sees it
                # all; the profile is written when the server is stopped (with SIGINT, see run()).
                args.profile.mkdir(parents=True, exist_ok=True)
                if args.profiler == "pyinstrument":
                    # A wall-clock sampling profiler: low overhead and whole coroutine stacks,
                    # but on a busy machine it also counts the time the server waits for a core.
                    out_file = args.profile / f"agentbus-{name}.pyisession"
                    wrap = ["-m", "pyinstrument", "-r", "pyisession", "-o", str(out_file)]
                    srv.cmd = [sys.executable, *wrap, *srv.cmd[1:]]
                else:
                    prof = str(args.profile / f"agentbus-{name}.prof")
                    srv.cmd = [sys.executable, "-c", CPU_PROFILE, prof, *srv.cmd[3:]]  # cmd[3:]: after -m agentbus.cli
            out.append(Variant(backend, budget, srv, prefix))
    return out


def smoke(port: int, label: str) -> list[str]:
    """One call of each kind, so a misconfigured server fails loudly before any cell."""
    problems = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        r = c.post(CHAT_PATH, content=JSON_BODY, headers={"Content-Type": "application/json"})
        if r.status_code != 200 or r.json().get("usage") != USAGE:
            problems.append(f"{label}: non-streaming call answered {r.status_code}: {r.text[:300]}")
        with c.stream("POST", CHAT_PATH, content=STREAM_BODY, headers={"Content-Type": "application/json"}) as s:
            text = s.read().decode()
        if s.status_code != 200 or text.count("data:") != STREAM_EVENTS or "[DONE]" not in text:
            problems.append(f"{label}: streaming call answered {s.status_code}: {text[:300]}")
    return problems


def check_budget_counters(v: Variant) -> dict[str, Any]:
    """The tenant scope must have counted exactly the calls the clients saw complete (tokens
    = 20 per call from the upstream's usage), with nothing left reserved: the accounting
    stayed exact under load, with or without limits."""
    r = httpx.get(f"{v.server.url}/v1/budget", timeout=10, headers={"X-Agent-Id": "agent0"})
    r.raise_for_status()
    scopes = r.json()["scopes"]
    tenant = next(s for k, s in scopes.items() if k.startswith("t:"))["used"]
    want = {"requests": v.ok_total, "tokens": v.ok_total * TOKENS_PER_CALL, "inflight": 0}
    got = {k: tenant[k] for k in want}
    return {"target": v.label, "expected": want, "counted": got, "ok": got == want}


# ---------------------------------------------------------------------- cells
def measure(
    args: argparse.Namespace, target: str, port: int, mode: Mode, n: int, servers: dict[str, Server], pair: int
) -> tuple[dict[str, Any], int]:
    """Run one cell; return its summary and how many complete 200s the clients saw."""
    spec = BrokerCell(target, port, mode, n, args.warmup, args.duration, args.procs, args.upstream_delay_ms)
    probe = ProcessCpu(servers)
    results, _ = run_processes(_drive, spec, probe)
    total = sorted(x for r in results for x in r.total)
    ttft = sorted(x for r in results for x in r.ttft)
    excess = sorted(x for r in results for x in r.excess)
    ttft_excess = sorted(x for r in results for x in r.ttft_excess)
    other: Counter[str] = Counter()
    for r in results:
        other.update(r.other)
    cell = {
        "pair": pair,
        "target": target,
        "mode": mode,
        "concurrency": n,
        "duration_s": args.duration,
        "ok": len(total),
        "rps": len(total) / args.duration,
        "latency_ms": percentiles(total),
        "ttft_ms": percentiles(ttft) if mode == "stream" else {},
        "excess_ms": percentiles(excess) if excess else {},
        "ttft_excess_ms": percentiles(ttft_excess) if ttft_excess else {},
        "other": dict(other),
        "cpu": {
            "client_cores": sum(r.cpu_s for r in results) / args.duration,
            **{f"{k}_cores": v for k, v in probe.cores.items()},
            "machine_busy_cores": probe.machine,
        },
    }
    lat = cell["latency_ms"]
    nan = float("nan")
    first = f" ttft p50 {cell['ttft_ms'].get('p50', nan):6.2f} p99 {cell['ttft_ms'].get('p99', nan):6.2f}"
    cpu = cell["cpu"]
    print(
        f"  {target:24s} {mode:7s} {n:3d} clients: {cell['rps']:7.0f}/s p50 {lat.get('p50', nan):6.2f} "
        f"p99 {lat.get('p99', nan):6.2f} ms" + (first if mode == "stream" else "") + f" | cpu client "
        f"{cpu['client_cores']:.2f} server {cpu.get('server_cores', 0.0):.2f} upstream "
        f"{cpu['upstream_cores']:.2f} all {cpu['machine_busy_cores']:.2f}" + (f" other={dict(other)}" if other else ""),
        flush=True,
    )
    return cell, sum(r.ok_total for r in results)


def run(args: argparse.Namespace, res: dict[str, Any]) -> None:
    meta = res["meta"]
    logs = Path(tempfile.mkdtemp(prefix="agentbus-broker-bench-logs-"))
    meta["server_logs"] = str(logs)
    print(f"server logs: {logs}", flush=True)
    with tempfile.TemporaryDirectory(prefix="agentbus-broker-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cmd = [sys.executable, "-m", "bench.upstream_server", "--delay-ms", str(args.upstream_delay_ms)]
        upstream = Server("upstream", cmd, {}, logs / "upstream.log")
        variants: list[Variant] = []
        try:
            upstream.start()
            variants = build_variants(args, upstream.port, tmp, logs, meta["notes"])
            live: list[Variant] = []
            for v in variants:
                try:
                    v.server.start()
                    live.append(v)
                except RuntimeError as exc:
                    meta["notes"].append(f"{v.label} did not start: {str(exc).splitlines()[0]}")
                    print(f"  {v.label} did not start:\n{exc}", flush=True)
            problems = smoke(upstream.port, "direct")
            for v in live:
                problems += smoke(v.server.port, v.label)
                v.ok_total += 2
            if problems:
                raise RuntimeError("smoke calls failed:\n" + "\n".join(problems))
            pair = 0
            for mode in args.modes:
                for n in args.concurrency:
                    for v in live:
                        # direct, then agentbus at once: the pair sees the same machine.
                        pair += 1
                        for target, port in (("direct", upstream.port), (v.label, v.server.port)):
                            servers = {"upstream": upstream}
                            if target != "direct":
                                servers["server"] = v.server
                            try:
                                cell, ok_total = measure(args, target, port, mode, n, servers, pair)
                            except Exception as exc:  # one broken cell must not lose the run
                                msg = f"{target} {mode} {n} clients failed: {exc}"
                                meta["cell_errors"].append(msg)
                                print(f"  {msg}", flush=True)
                                continue
                            if target != "direct":
                                cell.update(backend=v.backend, budget=v.budget)
                                v.ok_total += ok_total
                            res["cells"].append(cell)
            if args.ceiling and live:
                # agentbus answering GET /healthz: the HTTP floor under every brokered call.
                v = live[0]
                for n in args.concurrency:
                    cell, _ = measure(
                        args, v.label, v.server.port, "healthz", n, {"upstream": upstream, "server": v.server}, 0
                    )
                    cell.update(backend=v.backend, budget=v.budget)
                    res["cells"].append(cell)
            for v in live:
                chk = check_budget_counters(v)
                res["checks"].append(chk)
                print(f"  budget counters {v.label}: {'ok' if chk['ok'] else 'MISMATCH'} {chk['counted']}", flush=True)
        finally:
            for v in variants:
                if args.profile and v.server.proc is not None and v.server.proc.poll() is None:
                    # uvicorn re-raises SIGTERM after shutting down, which kills the process
                    # before cProfile writes; SIGINT re-raised is a KeyboardInterrupt, which
                    # unwinds through cProfile's finally and writes the profile.
                    v.server.proc.send_signal(signal.SIGINT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        v.server.proc.wait(30)
                v.server.stop()
                if v.redis_prefix:
                    try:
                        n_keys = redis_delete_prefix(v.redis_prefix)
                        print(f"  deleted {n_keys} Redis keys of {v.label}", flush=True)
                    except Exception as exc:
                        meta["notes"].append(f"cleanup of Redis prefix {v.redis_prefix} failed: {exc}")
            upstream.stop()


# ---------------------------------------------------------------------- report
def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pairs(res: dict[str, Any], mode: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    by_pair: dict[int, dict[str, dict[str, Any]]] = {}
    for c in res["cells"]:
        if c["mode"] == mode and c["pair"]:
            by_pair.setdefault(c["pair"], {})["direct" if c["target"] == "direct" else "agentbus"] = c
    return [(p["direct"], p["agentbus"]) for _, p in sorted(by_pair.items()) if len(p) == 2]


def _metric(cell: dict[str, Any], what: str, q: str) -> float | None:
    return cell.get(what, {}).get(q)


def _added(a: dict[str, Any], d: dict[str, Any], what: str, q: str) -> float | None:
    excess = {"latency_ms": "excess_ms", "ttft_ms": "ttft_excess_ms"}.get(what)
    if excess and a.get(excess) and d.get(excess):
        # Seeded upstream delay: each call's latency minus its own delay, then the difference
        # of those percentiles (a difference of raw percentiles would carry the delay's spread).
        what = excess
    x, y = _metric(a, what, q), _metric(d, what, q)
    return None if x is None or y is None else x - y


def cpu_ms_per_call(cell: dict[str, Any]) -> float | None:
    """CPU the agentbus process spent per completed call: unlike latency, it does not grow
    with queueing, so it is the number to compare across client counts and machines."""
    cores = cell["cpu"].get("server_cores")
    return None if not cores or not cell["rps"] else cores / cell["rps"] * 1000.0


def overhead_table(res: dict[str, Any], mode: str, what: str) -> list[str]:
    rows = [
        "| clients | agentbus | direct p50 / p99 ms | agentbus p50 / p99 ms | **added p50** | **added p99** "
        "| direct calls/s | agentbus calls/s | throughput ratio | agentbus CPU ms/call "
        "| cores: agentbus / client / machine |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, a in sorted(_pairs(res, mode), key=lambda p: (p[1]["concurrency"], p[1]["target"])):
        cpu = a["cpu"]
        rows.append(
            f"| {a['concurrency']} | {a['target'].removeprefix('agentbus/')} | "
            f"{_f(_metric(d, what, 'p50'))} / {_f(_metric(d, what, 'p99'))} | "
            f"{_f(_metric(a, what, 'p50'))} / {_f(_metric(a, what, 'p99'))} | "
            f"**{_f(_added(a, d, what, 'p50'))}** | **{_f(_added(a, d, what, 'p99'))}** | "
            f"{d['rps']:.0f} | {a['rps']:.0f} | {a['rps'] / d['rps'] if d['rps'] else float('nan'):.3f}x | "
            f"{_f(cpu_ms_per_call(a))} | "
            f"{cpu.get('server_cores', 0.0):.2f} / {cpu['client_cores']:.2f} / {cpu['machine_busy_cores']:.2f} |"
        )
    return rows


def target_rows(res: dict[str, Any]) -> list[str]:
    rows = [
        f"| workload ({TARGET_CLIENTS} clients) | agentbus | added p50 (< {TARGET_P50_MS:g} ms) "
        f"| added p99 (< {TARGET_P99_MS:g} ms) | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for mode, what, name in (("json", "latency_ms", "non-streaming call"), ("stream", "ttft_ms", "streaming TTFT")):
        for d, a in _pairs(res, mode):
            if a["concurrency"] != TARGET_CLIENTS:
                continue
            p50, p99 = _added(a, d, what, "p50"), _added(a, d, what, "p99")
            ok = p50 is not None and p99 is not None and p50 < TARGET_P50_MS and p99 < TARGET_P99_MS
            rows.append(
                f"| {name} | {a['target'].removeprefix('agentbus/')} | {_f(p50)} ms | {_f(p99)} ms | "
                f"{'met' if ok else '**not met**'} |"
            )
    return rows


NOTES = [
    "The upstream is a no-op (bench/upstream_server.py: a raw asyncio server answering from "
    "pre-rendered bytes, no delay), so the added latency is agentbus's own cost per call, not "
    "a model's. Against a real model server the same milliseconds are added to a call that "
    "takes hundreds of milliseconds or more.",
    "The load generator, the upstream, agentbus and Redis share this machine's cores. The "
    "direct calls/s is mostly the limit of the client and the upstream on these cores; the "
    "agentbus calls/s is that of one agentbus worker process while the client takes the rest.",
    "Each agentbus cell follows its own direct cell (the `pair`); added = agentbus - direct, "
    "percentile by percentile. Each client is closed-loop with one keep-alive connection, so "
    "at N clients latency includes queueing behind the other N-1 calls in the one worker: "
    "past the worker's capacity the added p50 grows with N by construction.",
    "Streaming: the upstream writes its 10 events back to back, so a direct TTFT is nearly "
    "its total; through agentbus, TTFT is when the broker relays the first content chunk.",
    "Without limits (the default) the broker counts each call on the principal and tenant "
    "scopes and stores a usage record after the answer has gone out (batched, "
    "agentbus/broker/accounting.py). `+budget` adds a per-principal limit "
    f"(`default_principal_limits: {BUDGET}`) that is never reached: such a call reserves in "
    "the backend before it is sent and settles after, both on the call's path.",
    "Nearest-rank percentiles over the calls completed inside each window; p99 of a few "
    "seconds on a shared 2-core machine is noisy — compare runs, not digits.",
]


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        "## Broker overhead",
        "",
        f"Generated by `bench/broker.py` from `{meta['json']}`; re-render with "
        f"`.venv/bin/python -m bench.broker --report {meta['json']}`.",
        "",
        "Chat completions through agentbus's broker versus straight to the same local "
        + (
            f"upstream that answers each completion after {meta['upstream_delay_ms']:g} ms on average "
            "(0.5-1.5x, like a small model), "
            if meta.get("upstream_delay_ms")
            else "no-op upstream, "
        )
        + "measured in the same run, each agentbus cell right after its direct cell.",
        "",
        f"- date: {meta['started_at']} (took {meta.get('elapsed_s', 0):.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']:.1f} GiB RAM, {m['kernel']}",
        f"- load average before / after: {m['loadavg_before']} / {m.get('loadavg_after', 'n/a')}; "
        f"{m.get('background_busy_cores', 0.0):.2f} cores busy with other work just before the run",
        f"- agentbus {v['agentbus']} (git {v['git']}), Python {v['python']}, "
        + ", ".join(
            f"{k} {v.get(k, 'n/a')}"
            for k in ("fastapi", "uvicorn", "aiohttp", "httpx", "h11", "httptools", "uvloop", "redis-py")
        )
        + f"; Redis {v['redis']}",
        f"- settings: `agentbus serve --workers 1` (dev mode, `AGENTBUS_AUTH=false`), one endpoint; "
        f"{meta['duration_s']} s measured after {meta['warmup_s']} s warm-up per cell; "
        f"{meta['procs']} client processes; SQLite with agentbus defaults (WAL, `synchronous=FULL`)",
        "",
    ]
    if m.get("background_busy_cores", 0.0) > 0.25:
        lines += [
            f"**Warning: {m['background_busy_cores']:.2f} of {m['nproc']} cores were busy with other "
            "work before the run; these numbers are noisy.**",
            "",
        ]
    if meta.get("agentbus_env"):
        env = ", ".join(f"`{k}={v}`" for k, v in sorted(meta["agentbus_env"].items()) if "TOKEN" not in k)
        lines += [f"AGENTBUS_* environment inherited by the servers: {env}", ""]
    if meta.get("quick"):
        lines += ["**A --quick run: 1 s cells, too short for the p99 to mean much.**", ""]
    for label, items in (("Cells that failed", meta["cell_errors"]), ("Notes from this run", meta["notes"])):
        if items:
            lines += [f"{label}:", "", *[f"- {x}" for x in items], ""]
    lines += ["### Target: added p50 < 2 ms and p99 < 10 ms at 16 clients", "", *target_rows(res), ""]
    lines += ["### Non-streaming: latency of the whole call", "", *overhead_table(res, "json", "latency_ms"), ""]
    lines += ["### Streaming: time to first token", "", *overhead_table(res, "stream", "ttft_ms"), ""]
    lines += ["### Streaming: whole stream (10 events)", "", *overhead_table(res, "stream", "latency_ms"), ""]
    ceiling = [c for c in res["cells"] if c["mode"] == "healthz"]
    if ceiling:
        lines += [
            "### HTTP floor: agentbus answering `GET /healthz`",
            "",
            f"The same {ceiling[0]['target']} server with no broker work at all: what uvicorn + "
            "FastAPI + the client cost per request on these cores.",
            "",
            "| clients | calls/s | p50 ms | p99 ms |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c['concurrency']} | {c['rps']:.0f} | {_f(c['latency_ms'].get('p50'))} | "
            f"{_f(c['latency_ms'].get('p99'))} |"
            for c in ceiling
        ]
        lines.append("")
    if res["checks"]:
        lines += ["### Budget counters after the run", ""]
        for c in res["checks"]:
            lines.append(
                f"- {c['target']}: tenant scope counted {c['counted']}, clients saw {c['expected']} — "
                + ("exact." if c["ok"] else "**MISMATCH**.")
            )
        lines.append("")
    notes = list(NOTES)
    if meta.get("upstream_delay_ms"):
        notes[0] = (
            f"The upstream (bench/upstream_server.py --delay-ms {meta['upstream_delay_ms']:g}) answers each "
            "completion 0.5-1.5x that long after it arrives, as a model would, and costs no CPU while it waits; so "
            "the direct latency is about the delay, and added = agentbus - direct is agentbus's cost per call "
            "at a request rate that real model calls would bring. Each call carries an OpenAI "
            "`seed` from which the upstream derives its delay, so the client subtracts that call's own delay "
            "before taking percentiles: added p50/p99 = percentile(latency - delay), agentbus minus direct"
            + (
                " (streams too: time to first token and whole stream)."
                if any(c.get("ttft_excess_ms") for c in res.get("cells", []))
                else " (non-streaming calls only in this run: its streams were not seeded)."
            )
        )
    lines += ["### Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def versions() -> dict[str, str]:
    out = commit_bench_versions()
    for dist in ("aiohttp", "httpx", "h11", "httptools"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sqlite,redis", help="comma list of sqlite,redis")
    p.add_argument("--budgets", default="off,on", help="comma list: off (no limits), on (per-principal budget)")
    p.add_argument("--modes", default="json,stream", help="comma list of json,stream")
    p.add_argument("--concurrency", default="1,16,64", help="comma list of client counts")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 5; quick 1)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first (default 1; quick 0.5)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the GET /healthz cells")
    p.add_argument(
        "--upstream-delay-ms",
        type=float,
        default=0.0,
        help="the upstream answers each completion after this long, like a model (default 0: at once)",
    )
    p.add_argument("--profile", type=Path, default=None, help="run agentbus under a profiler, profiles here")
    p.add_argument(
        "--profiler",
        choices=("cprofile", "pyinstrument"),
        default="cprofile",
        help="cprofile (stdlib, CPU time; .prof for pstats) or pyinstrument (wall-clock sampling; must be "
        "importable, e.g. via PYTHONPATH)",
    )
    p.add_argument("--quick", action="store_true", help="1 s cells, results in /tmp")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/broker-<UTC>.json)")
    p.add_argument("--results-md", type=Path, default=None, help="Markdown (default bench/BROKER_RESULTS.md)")
    p.add_argument("--report", type=Path, default=None, help="only re-render the Markdown from this results JSON")
    args = p.parse_args(argv)
    args.backends = _csv(args.backends)
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    budgets = _csv(args.budgets)
    if not set(budgets) <= {"off", "on"}:
        p.error("--budgets takes off and/or on")
    args.budgets = [b == "on" for b in budgets]
    args.modes = _csv(args.modes)
    if not set(args.modes) <= {"json", "stream"}:
        p.error("--modes takes json and/or stream")
    args.concurrency = [int(x) for x in _csv(args.concurrency)]
    args.duration = args.duration if args.duration is not None else (1.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.out is None:
        scratch = Path(tempfile.gettempdir()) / f"agentbus-broker-quick-{stamp}.json"
        args.out = scratch if args.quick else ROOT / f"bench/results/broker-{stamp}.json"
    if args.results_md is None and not args.report:
        # bench/BROKER_RESULTS.md only ever describes a run recorded under bench/results/.
        recorded = args.out.resolve().parent == (ROOT / "bench" / "results").resolve()
        args.results_md = RESULTS_MD if recorded and not args.quick else args.out.with_suffix(".md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        res = json.loads(args.report.read_text())
        md = args.results_md or RESULTS_MD
        md.write_text(render(res))
        print(f"wrote {md}")
        return 0
    started = time.monotonic()
    res: dict[str, Any] = {
        "meta": {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python -m bench.broker", *(argv if argv is not None else sys.argv[1:])]),
            "json": os.path.relpath(args.out, ROOT) if args.out.is_relative_to(ROOT) else str(args.out),
            "backends": args.backends,
            "budgets": args.budgets,
            "modes": args.modes,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "procs": args.procs,
            "upstream_delay_ms": args.upstream_delay_ms,
            "quick": args.quick,
            "profiled": args.profile is not None,
            "machine": {**machine_info(), "loadavg_before": loadavg()},
            "versions": versions(),
            "notes": [],
            "cell_errors": [],
            # Inherited by every server (e.g. AGENTBUS_SQLITE_SYNCHRONOUS): part of what was measured.
            "agentbus_env": {k: v for k, v in os.environ.items() if k.startswith("AGENTBUS_")},
        },
        "checks": [],
        "cells": [],
    }
    meta = res["meta"]
    meta["machine"]["background_busy_cores"] = background_busy()
    print(
        f"agentbus broker bench: {meta['machine']['nproc']} CPUs, load {meta['machine']['loadavg_before']}, "
        f"{meta['machine']['background_busy_cores']:.2f} cores busy before any server started",
        flush=True,
    )
    if args.profile:
        meta["notes"].append(
            f"agentbus ran under {args.profiler}: its latencies are inflated, use them for the profile only"
        )
    try:
        run(args, res)
    except Exception as exc:
        meta["cell_errors"].append(f"run aborted: {exc}")
        print(f"run aborted: {exc}", flush=True)
    meta["machine"]["loadavg_after"] = loadavg()
    meta["elapsed_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    args.results_md.write_text(render(res))
    print(f"wrote {args.out} and {args.results_md} in {meta['elapsed_s']:.0f} s")
    if args.profile:
        how = "pyinstrument --load FILE" if args.profiler == "pyinstrument" else "python -m pstats FILE"
        print(f"profiles in {args.profile} (read with {how})")
    failed = meta["cell_errors"] + [c["target"] for c in res["checks"] if not c["ok"]]
    print(f"FAILURES: {failed}" if failed else "all cells ran; budget counters exact")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
