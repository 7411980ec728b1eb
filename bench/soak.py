"""Soak run: a bounded stretch of mixed bus + broker load against one agentbus server,
checking at the end that nothing went wrong and that the server's memory stayed flat.

Usage (from the repository root; see bench/README.md, "Soak"):

    .venv/bin/python -m bench.soak                          # 120 s on embedded SQLite
    .venv/bin/python -m bench.soak --duration 600 --store postgres
    .venv/bin/python -m bench.soak --report bench/results/soak-X.json   # re-render SOAK_RESULTS.md
    make soak SOAK_ARGS="--duration 300 --store redis"

Loopback only and bounded in time. It starts the no-op model upstream
(bench/upstream_server.py) and ``agentbus serve`` with a broker config pointing at it, then
forks client processes for ``--duration`` seconds:

* bus clients: agents (tests/history.py ``Agent``) each running multi-key transactions in
  one shared space - read 1-3 shards (recorded in the server's delivery log), commit 1-2
  writes with an Idempotency-Key - with every read and commit recorded;
* broker clients: chat completions through ``/v1/chat/completions``, alternating
  non-streaming and streaming calls.

Meanwhile the server's RSS (uvicorn master + workers, psutil) is sampled every second. At the
end the recorded history is checked against the server's commit log and shard histories
(tests/history.py ``check``: every acknowledged commit present exactly once, no stale read
committed, no dependency cycle, ...), each broker agent's budget counters must equal the
calls it saw succeed, and the results go to bench/SOAK_RESULTS.md (+ a JSON and a PNG of
RSS over time in bench/results/). Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.run import background_busy, loadavg, machine_info, versions
from bench.servers import (
    REDIS_URL,
    ROOT,
    Server,
    agentbus_server,
    migrate,
    pg_create,
    pg_drop,
    redis_delete_prefix,
)
from bench.upstream_server import MODEL, USAGE
from tests.history import Agent, History, UnexpectedResponse, Write, check, fetch_state

RESULTS_MD = ROOT / "bench" / "SOAK_RESULTS.md"
TOKENS_PER_CALL = USAGE["total_tokens"]
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# ---------------------------------------------------------------------- clients
async def _bus_agents(url: str, space: str, keys: list[str], proc: int, agents: int, end: float, think_s: float) -> Any:
    history = History()
    stats: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=agents + 4, max_keepalive_connections=agents + 4)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as http:

        async def agent(i: int) -> None:
            rng = random.Random(proc * 1000 + i)
            name = f"p{proc}a{i}"
            ag = Agent(http, url, space, name, history=history, retries=10)
            n = 0
            while time.monotonic() < end:
                picked = rng.sample(keys, 3)
                try:
                    for k in picked[: rng.randint(1, 3)]:
                        await ag.read(k)
                        stats["reads"] += 1
                except (httpx.TransportError, UnexpectedResponse) as exc:
                    stats[f"read error {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.1)
                    continue
                n += 1
                writes = [Write(k, f"{name}-{n}-{k}") for k in rng.sample(picked, rng.randint(1, 2))]
                txn = await ag.commit(writes, idempotency_key=uuid.uuid4().hex)
                stats[f"commit {txn.status or 'transport error'}"] += 1
                if think_s:
                    await asyncio.sleep(rng.uniform(0, 2 * think_s))

        await asyncio.gather(*(agent(i) for i in range(agents)))
    return history, stats


async def _broker_clients(url: str, proc: int, clients: int, end: float, think_s: float) -> Any:
    stats: Counter[str] = Counter()
    ok_by_agent: Counter[str] = Counter()
    messages = [{"role": "user", "content": "Say hello in eight tokens, then stop."}]
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:

        async def client(i: int) -> None:
            rng = random.Random(proc * 1000 + i)
            name = f"chat-p{proc}c{i}"
            n = 0
            while time.monotonic() < end:
                n += 1
                stream = n % 2 == 0
                body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 16}
                if stream:
                    body |= {"stream": True, "stream_options": {"include_usage": True}}
                kind = "stream" if stream else "json"
                try:
                    async with http.stream(
                        "POST", "/v1/chat/completions", json=body, headers={"X-Agent-Id": name}
                    ) as r:
                        data = await r.aread()
                    ok = r.status_code == 200 and (b"[DONE]" in data if stream else b'"usage"' in data)
                    stats[f"chat {kind} {r.status_code}{'' if ok or r.status_code != 200 else ' incomplete'}"] += 1
                    if ok:
                        ok_by_agent[name] += 1
                except httpx.HTTPError as exc:
                    stats[f"chat {kind} {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.1)
                if think_s:
                    await asyncio.sleep(rng.uniform(0, 2 * think_s))

        await asyncio.gather(*(client(i) for i in range(clients)))
    return stats, ok_by_agent


def _child(kind: str, args: tuple[Any, ...], out: Any) -> None:
    try:
        if kind == "bus":
            out.put(("bus", asyncio.run(_bus_agents(*args))))
        else:
            out.put(("broker", asyncio.run(_broker_clients(*args))))
    except BaseException as exc:  # report, never hang the coordinator
        out.put(("error", f"{kind}: {type(exc).__name__}: {exc}"))


# ---------------------------------------------------------------------- RSS
class RssSampler(threading.Thread):
    """RSS of the server's process tree, every ``every_s`` seconds."""

    def __init__(self, server: Server, every_s: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.every_s = every_s
        self.samples: list[tuple[float, float, int]] = []  # (t since start, MiB, processes)
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        total, n = 0, 0
        for pid in self.server.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
                n += 1
            except psutil.NoSuchProcess:
                pass
        self.samples.append((time.monotonic() - self.t0, total / 2**20, n))

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _slope_mib_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(m for _, m in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return None if den == 0 else sum((t - mx) * (m - my) for t, m in points) / den * 60


def rss_summary(samples: list[tuple[float, float, int]], load_start: float, load_end: float) -> dict[str, Any]:
    """Start = just before the load; warm = 10% into it (caches, pools and allocator arenas
    filled); end = the last sample under load. Growth is end - warm; the slope is a
    least-squares fit over the second half of the load, the number to watch in long runs."""
    before = [s for s in samples if s[0] <= load_start]
    under = [s for s in samples if load_start < s[0] <= load_end]
    if not under:
        return {}
    warm_t = load_start + 0.1 * (load_end - load_start)
    warm = next((s for s in under if s[0] >= warm_t), under[0])
    half = [(t, m) for t, m, _ in under if t >= load_start + 0.5 * (load_end - load_start)]
    return {
        "start_mib": (before[-1] if before else under[0])[1],
        "warm_mib": warm[1],
        "end_mib": under[-1][1],
        "max_mib": max(m for _, m, _ in under),
        "growth_mib": under[-1][1] - warm[1],
        "growth_pct": 100.0 * (under[-1][1] - warm[1]) / warm[1] if warm[1] else None,
        "slope_second_half_mib_per_min": _slope_mib_per_min(half),
        "processes": under[-1][2],
    }


def plot_rss(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ts = [s[0] for s in res["rss_samples"]]
    ms = [s[1] for s in res["rss_samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(ts, ms, marker=".", linewidth=1)
    ax.axvspan(res["load_window"][0], res["load_window"][1], color="tab:orange", alpha=0.1, label="load")
    ax.set_xlabel("seconds since the first sample (server ready)")
    ax.set_ylabel("RSS MiB (master + workers)")
    meta = res["meta"]
    ax.set_title(f"agentbus soak: {meta['store_kind']}, {meta['workers']} worker(s), {meta['duration_s']:.0f} s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- report
def render(res: dict[str, Any], png: str | None) -> str:
    meta, m, v = res["meta"], res["meta"]["machine"], res["meta"]["versions"]
    rss = res["rss"]
    bus, chat = res["bus"], res["broker"]
    hist = res["history_check"]

    def f(x: float | None, d: int = 1) -> str:
        return "n/a" if x is None else f"{x:,.{d}f}"

    ok = not res["failures"]
    lines = [
        "# agentbus soak results",
        "",
        f"Generated by `bench/soak.py` from `{meta['json']}` — do not edit by hand; rerun with the command below.",
        "",
        f"**Result: {'PASS' if ok else 'FAIL'}**" + ("" if ok else " — " + "; ".join(res["failures"])),
        "",
        "## Run",
        "",
        f"- date: {meta['started_at']} (took {meta['elapsed_s']:.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']:.1f} GiB RAM, {m['kernel']}",
        f"- load average before / after: {m['loadavg_before']} / {m.get('loadavg_after', 'n/a')}; "
        f"{m.get('background_busy_cores', 0.0):.2f} cores busy with other work just before the run",
        f"- agentbus {v['agentbus']} (git {v['git']}), Python {v['python']}; store: {meta['store_kind']}",
        f"- load: {meta['duration_s']:.0f} s; {meta['bus_procs']} bus client processes x {meta['agents']} agents "
        f"over {meta['keys']} keys in one space; {meta['broker_procs']} broker client process(es) x "
        f"{meta['broker_clients']} clients; think time ~{meta['think_ms']} ms; `agentbus serve --workers "
        f"{meta['workers']}` (dev mode) with the no-op upstream (bench/upstream_server.py) as its one endpoint",
        "",
    ]
    if m.get("background_busy_cores", 0.0) > 0.25:
        lines += [
            f"**Warning: {m['background_busy_cores']:.2f} of {m['nproc']} cores were busy with other work before "
            "the run: the operation rates are low, the correctness and memory results stand.**",
            "",
        ]
    lines += [
        "## Operations",
        "",
        "| what | count | per second |",
        "|---|---:|---:|",
    ]
    dur = meta["duration_s"]
    for k, n in sorted({**bus["ops"], **chat["ops"]}.items()):
        lines.append(f"| {k} | {n:,} | {n / dur:,.1f} |")
    lines += [
        "",
        "## Correctness",
        "",
        f"- history check (tests/history.py) over {hist['txns']:,} recorded commits ({hist['acknowledged']:,} "
        f"acknowledged, {hist['unknown']:,} with unknown outcome), {hist['log']:,} commits in the server's log, "
        f"{hist['reads']:,} recorded reads: **anomalies = {hist['anomalies']}**, "
        f"**lost acknowledged commits = {hist['lost']}**"
        + (f" ({', '.join(f'{k}={n}' for k, n in sorted(hist['kinds'].items()))})" if hist["kinds"] else ""),
        f"- broker budget counters: {chat['budget_ok']}/{chat['budget_agents']} agents' counters equal "
        f"{TOKENS_PER_CALL} tokens x the calls they saw succeed, none left in flight",
        "",
    ]
    if hist.get("examples"):
        lines += ["First anomalies:", "", *[f"- {a}" for a in hist["examples"]], ""]
    lines += [
        "## Server memory (RSS of the uvicorn master + workers)",
        "",
        "| start (before load) | warm (10% into the load) | end | max | growth end - warm | "
        "slope over the second half |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {f(rss.get('start_mib'))} MiB | {f(rss.get('warm_mib'))} MiB | {f(rss.get('end_mib'))} MiB | "
        f"{f(rss.get('max_mib'))} MiB | {f(rss.get('growth_mib'))} MiB ({f(rss.get('growth_pct'))}%) | "
        f"{f(rss.get('slope_second_half_mib_per_min'), 2)} MiB/min |",
        "",
    ]
    lines += [f"![RSS over time]({png})", ""] if png else ["(No plot: matplotlib is not installed.)", ""]
    if meta["notes"]:
        lines += ["## Notes from this run", "", *[f"- {n}" for n in meta["notes"]], ""]
    lines += [
        "## Reading it",
        "",
        "- A soak proves the absence of slow failures over its duration only: leaks smaller than "
        "the slope's noise, or that need hours, are not excluded by a 2-minute run. Rerun with "
        "`--duration 3600` before a release.",
        "- The server's memory includes what the store keeps in-process (connection pools, the "
        "SQLite page cache, telemetry buffers); the commit log and delivery log themselves live in "
        "the store, so steady RSS under a growing log is the property checked.",
        "- Throughput here is not a benchmark (think time, httpx clients, history recording); see "
        "RESULTS.md and BROKER_RESULTS.md for those.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument(
        "--store",
        default="sqlite",
        help="sqlite (a fresh file, default), postgres (a fresh database), redis (a fresh key prefix), "
        "or a store URL (used as is, migrated first)",
    )
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    p.add_argument("--bus-procs", type=int, default=2, help="bus client processes (default 2)")
    p.add_argument("--agents", type=int, default=6, help="agents per bus client process (default 6)")
    p.add_argument("--keys", type=int, default=24, help="keys in the shared space (default 24)")
    p.add_argument("--broker-procs", type=int, default=1, help="broker client processes (default 1)")
    p.add_argument("--broker-clients", type=int, default=4, help="clients per broker process (default 4)")
    p.add_argument("--think-ms", type=float, default=5.0, help="mean pause between an agent's operations")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period (default 1 s)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/soak-<UTC>.json)")
    p.add_argument("--results-md", type=Path, default=None, help="Markdown (default bench/SOAK_RESULTS.md)")
    p.add_argument("--report", type=Path, default=None, help="only re-render the Markdown and PNG from this JSON")
    args = p.parse_args(argv)
    if args.report is not None:
        args.out = args.report
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.out is None:
        args.out = ROOT / f"bench/results/soak-{stamp}.json"
    if args.results_md is None:
        recorded = args.out.resolve().parent == (ROOT / "bench" / "results").resolve()
        args.results_md = RESULTS_MD if recorded else args.out.with_suffix(".md")
    return args


def _store(args: argparse.Namespace, tmp: Path, undo: list[tuple[str, str]]) -> tuple[str, dict[str, str], str]:
    """(store URL, extra server env, kind) for --store; what to clean up goes to ``undo``."""
    env: dict[str, str] = {}
    s = args.store
    if s == "sqlite":
        url, kind = f"sqlite:///{tmp / 'soak.db'}", "sqlite (fresh file)"
    elif s == "postgres":
        url = pg_create("agentbus_soak")
        undo.append(("pg", url))
        kind = "postgres (fresh database)"
    elif s == "redis" or s.startswith("redis"):
        url = REDIS_URL if s == "redis" else s
        prefix = f"absoak{uuid.uuid4().hex[:8]}"
        env["AGENTBUS_REDIS_PREFIX"] = prefix
        undo.append(("redis", prefix))
        kind = f"redis (key prefix {prefix})"
    else:
        url, kind = s, s.split("://", 1)[0]
    if not url.startswith("redis"):
        migrate(url)
    return url, env, kind


def write_report(res: dict[str, Any], json_path: Path, md_path: Path) -> None:
    png = json_path.with_suffix(".png")
    has_plot = plot_rss(res, png)
    rel = os.path.relpath(png, md_path.parent) if has_plot else None
    md_path.write_text(render(res, rel))
    print(f"wrote {md_path}" + (f" and {png}" if has_plot else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        write_report(json.loads(args.report.read_text()), args.report, args.results_md)
        return 0
    started = time.monotonic()
    res: dict[str, Any] = {
        "meta": {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python -m bench.soak", *(argv if argv is not None else sys.argv[1:])]),
            "json": os.path.relpath(args.out, ROOT) if args.out.is_relative_to(ROOT) else str(args.out),
            "duration_s": args.duration,
            "workers": args.workers,
            "bus_procs": args.bus_procs,
            "agents": args.agents,
            "keys": args.keys,
            "broker_procs": args.broker_procs,
            "broker_clients": args.broker_clients,
            "think_ms": args.think_ms,
            "machine": {**machine_info(), "loadavg_before": loadavg()},
            "versions": versions(),
            "notes": [],
        },
        "failures": [],
    }
    meta = res["meta"]
    meta["machine"]["background_busy_cores"] = background_busy(1.0)
    logs = Path(tempfile.mkdtemp(prefix="agentbus-soak-logs-"))
    meta["server_logs"] = str(logs)
    print(f"agentbus soak: {args.duration:.0f} s, store {args.store}; server logs in {logs}", flush=True)
    undo: list[tuple[str, str]] = []
    upstream: Server | None = None
    server: Server | None = None
    with tempfile.TemporaryDirectory(prefix="agentbus-soak-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            url, env, meta["store_kind"] = _store(args, tmp, undo)
            upstream = Server("upstream", [sys.executable, "-m", "bench.upstream_server"], {}, logs / "upstream.log")
            upstream.start()
            from bench.broker import broker_yaml

            cfg = tmp / "broker.yaml"
            cfg.write_text(broker_yaml(upstream.port, budget=False))
            server = agentbus_server(url, args.workers, logs, {**env, "AGENTBUS_BROKER_CONFIG": str(cfg)})
            server.start()
            sampler = RssSampler(server, args.sample_s)
            sampler.sample()
            sampler.start()
            time.sleep(2 * args.sample_s)  # a baseline before the load
            run_load(args, res, server, sampler)
            sampler.stop()
            res["rss_samples"] = sampler.samples
            res["rss"] = rss_summary(sampler.samples, *res["load_window"])
            if server.proc is None or server.proc.poll() is not None:
                res["failures"].append("the server exited during the soak")
        except Exception as exc:
            res["failures"].append(f"run aborted: {type(exc).__name__}: {exc}")
            print(f"run aborted: {exc}", flush=True)
        finally:
            if server is not None:
                server.stop()
            if upstream is not None:
                upstream.stop()
            for kind, what in undo:
                try:
                    pg_drop(what) if kind == "pg" else redis_delete_prefix(what)
                except Exception as exc:
                    meta["notes"].append(f"cleanup of {kind} {what} failed: {exc}")
    meta["machine"]["loadavg_after"] = loadavg()
    meta["elapsed_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    if "rss" in res and "bus" in res:
        print(f"wrote {args.out}")
        write_report(res, args.out, args.results_md)
    else:
        print(f"wrote {args.out} (no report: the run did not finish)")
    rss = res.get("rss", {})
    if rss:
        print(
            f"RSS start {rss['start_mib']:.1f} warm {rss['warm_mib']:.1f} end {rss['end_mib']:.1f} MiB "
            f"(growth {rss['growth_mib']:+.1f} MiB, slope {rss['slope_second_half_mib_per_min'] or 0:+.2f} MiB/min)"
        )
    print(f"FAILURES: {res['failures']}" if res["failures"] else "soak ok")
    return 1 if res["failures"] else 0


def run_load(args: argparse.Namespace, res: dict[str, Any], server: Server, sampler: RssSampler) -> None:
    space = f"soak-{uuid.uuid4().hex[:8]}"
    keys = [f"{'ab'[i % 2]}/k{i}" for i in range(args.keys)]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    load_start = time.monotonic()
    end = load_start + args.duration
    think = args.think_ms / 1000.0
    children = [
        ctx.Process(target=_child, args=("bus", (server.url, space, keys, p, args.agents, end, think), out))
        for p in range(args.bus_procs)
    ] + [
        ctx.Process(target=_child, args=("broker", (server.url, p, args.broker_clients, end, think), out))
        for p in range(args.broker_procs)
    ]
    for c in children:
        c.start()
    history = History()
    bus_ops: Counter[str] = Counter()
    chat_ops: Counter[str] = Counter()
    ok_by_agent: Counter[str] = Counter()
    errors: list[str] = []
    next_note = load_start + 30
    try:
        got = 0
        while got < len(children):
            if time.monotonic() > next_note:
                last = sampler.samples[-1] if sampler.samples else (0.0, 0.0, 0)
                print(f"  {time.monotonic() - load_start:5.0f} s: server RSS {last[1]:.1f} MiB", flush=True)
                next_note += 30
            try:
                kind, payload = out.get(timeout=1.0)
            except Exception:  # queue.Empty
                if time.monotonic() > end + 120:
                    raise RuntimeError("client processes did not report within 120 s of the end") from None
                continue
            got += 1
            if kind == "bus":
                h, stats = payload
                history.txns += h.txns
                history.reads += h.reads
                history.lists += h.lists
                bus_ops.update(stats)
            elif kind == "broker":
                stats, oks = payload
                chat_ops.update(stats)
                ok_by_agent.update(oks)
            else:
                errors.append(payload)
    finally:
        for c in children:
            c.join(10)
            if c.is_alive():
                c.terminate()
    load_end = time.monotonic()
    res["load_window"] = (load_start - sampler.t0, load_end - sampler.t0)
    res["failures"] += [f"client process failed: {e}" for e in errors]
    print(f"  load done: {dict(bus_ops)} {dict(chat_ops)}; checking the history ...", flush=True)
    res["bus"] = {"ops": dict(bus_ops)}
    res["history_check"] = check_history(server.url, space, keys, history)
    hc = res["history_check"]
    if hc["anomalies"] or hc["lost"]:
        res["failures"].append(f"history check: {hc['anomalies']} anomalies, {hc['lost']} lost")
    if not hc["acknowledged"]:
        res["failures"].append("no commit was acknowledged")
    res["broker"] = {"ops": dict(chat_ops), **check_budgets(server.url, ok_by_agent)}
    if res["broker"]["budget_ok"] != res["broker"]["budget_agents"]:
        res["failures"].append(f"budget counters wrong for {res['broker']['budget_mismatch']}")
    bad = {k: n for k, n in {**bus_ops, **chat_ops}.items() if " 5" in k or "error" in k.lower() or "incomplete" in k}
    if bad:
        res["failures"].append(f"errors under load: {bad}")


def check_history(url: str, space: str, keys: list[str], history: History) -> dict[str, Any]:
    async def go() -> Any:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return await fetch_state(http, url, space, keys=keys)

    state = asyncio.run(go())
    anomalies = check(history, state)
    kinds = Counter(a.kind for a in anomalies)
    return {
        "txns": len(history.txns),
        "acknowledged": sum(t.status == 200 for t in history.txns),
        "unknown": sum(t.outcome == "unknown" for t in history.txns),
        "reads": len(history.reads),
        "log": len(state.log),
        "anomalies": len(anomalies),
        "lost": kinds.get("lost_commit", 0) + kinds.get("lost_write", 0),
        "kinds": dict(kinds),
        "examples": [str(a)[:400] for a in anomalies[:10]],
    }


def check_budgets(url: str, ok_by_agent: Counter[str]) -> dict[str, Any]:
    """Each broker agent's principal scope counted exactly its successful calls' tokens.
    Usage records are written in the background: wait a little for the counters to settle."""
    mismatch: dict[str, Any] = {}
    deadline = time.monotonic() + 15
    with httpx.Client(base_url=url, timeout=10) as http:
        for name, ok in sorted(ok_by_agent.items()):
            want = {"requests": ok, "tokens": ok * TOKENS_PER_CALL, "inflight": 0}
            while True:
                scopes = http.get("/v1/budget", headers={"X-Agent-Id": name}).json()["scopes"]
                used = next((s["used"] for k, s in scopes.items() if k.startswith("p:") and k.endswith(name)), {})
                got = {k: used.get(k) for k in want}
                if got == want or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if got != want:
                mismatch[name] = {"want": want, "got": got}
    return {
        "budget_agents": len(ok_by_agent),
        "budget_ok": len(ok_by_agent) - len(mismatch),
        "budget_mismatch": mismatch,
    }


if __name__ == "__main__":
    sys.exit(main())
