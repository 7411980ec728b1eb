"""Benchmark agentbus commits against hand-written baselines on SQLite, PostgreSQL and Redis.

Usage (from the repository root; see bench/README.md):

    .venv/bin/python -m bench.run                  # full run (< 15 min), writes RESULTS.md
    .venv/bin/python -m bench.run --quick          # < 2 min smoke, results in /tmp
    .venv/bin/python -m bench.run --check          # correctness self-check only
    .venv/bin/python -m bench.run --report bench/results/X.json   # re-render RESULTS.md

For each backend it starts agentbus (and the baseline for that backend) as uvicorn
subprocesses on fresh stores, checks each server is correct (stale writes get 409, no lost
updates), then runs every cell (contention x agents x system/mode) for a fixed time,
interleaving systems cell by cell so a slow drift of the machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import checks, report
from bench.loadgen import CellResult, CellSpec, WindowProbe, run_cell
from bench.servers import ROOT, Target, build_targets, pg_server_version, redis_server_version

BACKENDS = ("sqlite", "postgres", "redis")
RESULTS_MD = ROOT / "bench" / "RESULTS.md"


# ---------------------------------------------------------------------- measurements
def percentiles(xs: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds of a sorted list of seconds."""
    if not xs:
        return {}

    def rank(p: float) -> float:
        return xs[max(0, math.ceil(p * len(xs)) - 1)] * 1000

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": xs[-1] * 1000,
        "mean": sum(xs) / len(xs) * 1000,
        "n": len(xs),
    }


def _proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


class CpuProbe(WindowProbe):
    """Server process-tree CPU and machine-wide busy CPU over the measured window."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.server_cores = 0.0
        self.machine_cores = 0.0
        self.restarted = False

    def _server_cpu(self) -> dict[int, float]:
        import psutil

        out: dict[int, float] = {}
        for pid in self.target.server.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.s0 = self._server_cpu()
        self.m0 = _proc_stat()

    def end(self) -> None:
        wall = time.monotonic() - self.t0
        s1 = self._server_cpu()
        # A worker that uvicorn replaced mid-window loses its CPU; flag it rather than guess.
        self.restarted = set(s1) != set(self.s0)
        self.server_cores = sum(cpu - self.s0.get(pid, 0.0) for pid, cpu in s1.items()) / wall
        busy, total = _proc_stat()
        frac = (busy - self.m0[0]) / max(1, total - self.m0[1])
        self.machine_cores = frac * (os.cpu_count() or 1)


def summarize(target: Target, cell: CellResult, probe: CpuProbe, verify: list[str]) -> dict[str, Any]:
    spec = cell.spec
    ok = cell.merged("commit_ok")
    conflict = cell.merged("commit_conflict")
    attempts = len(ok) + len(conflict)
    return {
        "backend": target.backend,
        "system": target.system,
        "mode": spec.mode,
        "contention": spec.contention,
        "concurrency": spec.concurrency,
        "hot_keys": spec.hot_keys if spec.contention == "high" else None,
        "duration_s": spec.duration_s,
        "commits_ok": len(ok),
        "commits_409": len(conflict),
        "gets": len(cell.merged("get")),
        "other": dict(cell.other),
        "commits_per_s": len(ok) / spec.duration_s,
        "attempts_per_s": attempts / spec.duration_s,
        "conflict_rate": len(conflict) / attempts if attempts else 0.0,
        "latency_ms": {
            "commit": percentiles(sorted(ok + conflict)),
            "commit_ok": percentiles(ok),
            "op": percentiles(cell.merged("op")),
            "get": percentiles(cell.merged("get")),
        },
        "cpu": {
            "client_cores": cell.client_cpu_s / spec.duration_s,
            "server_cores": probe.server_cores,
            "machine_busy_cores": probe.machine_cores,
            "server_processes_changed": probe.restarted,
        },
        "verify": verify,
    }


def one_cell(args: argparse.Namespace, target: Target, mode: str, contention: str, n: int) -> dict[str, Any]:
    spec = CellSpec(
        host="127.0.0.1",
        port=target.server.port,
        space=f"bench-{mode}-{contention}-{n}-{uuid.uuid4().hex[:6]}",
        mode=mode,  # type: ignore[arg-type]
        contention=contention,  # type: ignore[arg-type]
        concurrency=n,
        hot_keys=args.hot_keys,
        warmup_s=args.warmup,
        duration_s=args.duration,
        procs=args.procs,
    )
    probe = CpuProbe(target)
    cell = run_cell(spec, probe)
    verify = checks.verify_versions(cell) if mode != "ping" else []
    out = summarize(target, cell, probe, verify)
    lat = out["latency_ms"]["commit"]
    nan = float("nan")
    print(
        f"  {target.label:28s} {mode:4s} {contention:4s} {n:4d} agents: {out['commits_per_s']:8.0f}/s "
        f"p50 {lat.get('p50', nan):7.2f} ms p99 {lat.get('p99', nan):7.2f} ms "
        f"409 {100 * out['conflict_rate']:3.0f}% cpu client/server/all "
        f"{out['cpu']['client_cores']:.2f}/{out['cpu']['server_cores']:.2f}/{out['cpu']['machine_busy_cores']:.2f}"
        + (f" other={out['other']}" if out["other"] else "")
        + (f" VERIFY FAILED {verify}" if verify else "")
        + (" (server processes changed: a worker was restarted?)" if probe.restarted else ""),
        flush=True,
    )
    return out


def check_target(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Scripted semantics plus the high-contention counter, per commit mode."""
    sem = checks.semantics(target.server.port, f"chk-{uuid.uuid4().hex[:8]}", delivery_log=target.system == "agentbus")
    counters = []
    for mode in target.modes:
        counters.append(
            checks.counter(
                target.server.port,
                f"chk-{uuid.uuid4().hex[:8]}",
                f"rmw-{mode}",
                args.check_agents,
                args.hot_keys,
                args.check_seconds,
                args.procs,
            )
        )
    ok = not sem and all(c["ok"] for c in counters)
    summary = ", ".join(f"{c['mode']}: {c['applied']} applied, {c['conflicts_409']} 409s" for c in counters)
    print(f"  check {target.label:22s} {'ok' if ok else 'FAILED'} ({summary})", flush=True)
    for problem in sem + [p for c in counters for p in c["problems"]]:
        print(f"    - {problem}", flush=True)
    return {"target": target.label, "semantics": sem, "counters": counters, "ok": ok}


# ---------------------------------------------------------------------- environment
def machine_info() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": mem_kb / 1024 / 1024,
        "kernel": platform.platform(),
    }


BUSY_WARN_CORES = 0.25


def background_busy(seconds: float = 2.0) -> float:
    """Cores the rest of the machine keeps busy while the bench is idle (noise floor)."""
    b0, t0 = _proc_stat()
    time.sleep(seconds)
    b1, t1 = _proc_stat()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def versions() -> dict[str, str]:
    def ver(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        git += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        git = "unknown"
    return {
        "agentbus": ver("agentbus"),
        "git": git,
        "python": platform.python_version(),
        "fastapi": ver("fastapi"),
        "uvicorn": ver("uvicorn"),
        "sqlalchemy": ver("sqlalchemy"),
        "asyncpg": ver("asyncpg"),
        "redis-py": ver("redis"),
        "uvloop": ver("uvloop"),
        "postgres": pg_server_version(),
        "redis": redis_server_version(),
    }


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of sqlite,postgres,redis")
    p.add_argument("--concurrency", default=None, help="comma list of agent counts (default 1,8,32,128)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 5)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each cell (default 1)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers per server, same for all (default 2)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--hot-keys", type=int, default=4, help="keys shared by all agents under high contention")
    p.add_argument("--contention", default="low,high", help="comma list of low,high")
    p.add_argument("--modes", default="ev,dl", help="agentbus commit modes: ev (expected_version), dl (delivery log)")
    p.add_argument("--check-agents", type=int, default=32, help="agents in the counter self-check")
    p.add_argument("--check-seconds", type=float, default=None, help="seconds of the counter self-check (default 3)")
    p.add_argument("--no-calibration", action="store_true", help="skip the GET /healthz HTTP-ceiling cell")
    p.add_argument("--quick", action="store_true", help="< 2 min smoke: 8,32 agents, 1 s cells, report in /tmp")
    p.add_argument("--check", action="store_true", help="only the correctness self-checks; exit 1 on failure")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<UTC time>.json)")
    p.add_argument("--results-md", type=Path, default=None, help="Markdown report (default bench/RESULTS.md)")
    p.add_argument("--report", type=Path, default=None, help="only re-render the report from this results JSON")
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or ("8,32" if quick else "1,8,32,128")
    args.duration = args.duration if args.duration is not None else (1.0 if quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.check_seconds = args.check_seconds if args.check_seconds is not None else (1.0 if quick else 3.0)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.out is None:
        scratch = Path(tempfile.gettempdir())
        scratch_run = quick or args.check
        kind = "check" if args.check else "quick"
        args.out = (
            scratch / f"agentbus-bench-{kind}-{stamp}.json" if scratch_run else ROOT / f"bench/results/{stamp}.json"
        )
    args.results_md_explicit = args.results_md
    if args.results_md is None:
        # bench/RESULTS.md only ever describes a run recorded under bench/results/.
        recorded = args.out.resolve().parent == (ROOT / "bench" / "results").resolve()
        args.results_md = RESULTS_MD if recorded and not (quick or args.check) else args.out.with_suffix(".md")
    return args


def write_report(res: dict[str, Any], md_path: Path, png_path: Path) -> None:
    has_plot = report.plot(res, png_path)
    rel = os.path.relpath(png_path, md_path.parent) if has_plot else None
    md_path.write_text(report.render(res, rel))
    print(f"wrote {md_path}" + (f" and {png_path}" if has_plot else " (no plot: matplotlib is not installed)"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        res = json.loads(args.report.read_text())
        write_report(res, args.results_md_explicit or RESULTS_MD, args.report.with_suffix(".png"))
        return 0
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    concurrency = [int(x) for x in args.concurrency.split(",")]
    contentions = [c for c in args.contention.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    started = time.monotonic()
    res: dict[str, Any] = {
        "meta": {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python -m bench.run", *sys.argv[1:]]),
            "json": os.path.relpath(args.out, ROOT) if args.out.is_relative_to(ROOT) else str(args.out),
            "backends": backends,
            "concurrency": concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "procs": args.procs,
            "hot_keys": args.hot_keys,
            "quick": args.quick,
            "check_only": args.check,
            "machine": {**machine_info(), "loadavg_before": loadavg()},
            "versions": versions(),
            "notes": [],
            "cell_errors": [],
            "agentbus_env": {k: v for k, v in os.environ.items() if k.startswith("AGENTBUS_")},
        },
        "checks": [],
        "cells": [],
    }
    meta = res["meta"]
    meta["machine"]["background_busy_cores"] = background_busy()
    print(
        f"agentbus bench: {meta['machine']['nproc']} CPUs, load {meta['machine']['loadavg_before']}, "
        f"{meta['machine']['background_busy_cores']:.2f} cores busy before any server started",
        flush=True,
    )
    if meta["machine"]["background_busy_cores"] > BUSY_WARN_CORES:
        print("  WARNING: the machine is busy; these numbers will not be representative", flush=True)
    calibrated = args.no_calibration or args.check
    logs_root = Path(tempfile.mkdtemp(prefix="agentbus-bench-logs-"))
    meta["server_logs"] = str(logs_root)
    for backend in backends:
        print(f"[{backend}] at {time.monotonic() - started:.0f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"agentbus-bench-{backend}-") as tmp:
            # Server logs outlive the run (a 500 or a worker restart needs its traceback).
            log_dir = logs_root / backend
            log_dir.mkdir(parents=True)
            targets: list[Target] = []
            try:
                try:
                    notes = build_targets(backend, args.workers, log_dir, Path(tmp), targets)
                except Exception as exc:  # e.g. a failed migration: skip the backend, keep the run
                    notes = [f"{backend} skipped: setting up its stores failed: {exc}"]
                    targets_ok = False
                else:
                    targets_ok = True
                meta["notes"] += notes
                for n in notes:
                    print(f"  note: {n}", flush=True)
                live: list[Target] = []
                for t in targets if targets_ok else []:
                    try:
                        t.server.start()
                        live.append(t)
                    except RuntimeError as exc:
                        meta["notes"].append(f"{t.label} did not start: {str(exc).splitlines()[0]}")
                        print(f"  {t.label} did not start:\n{exc}", flush=True)
                for t in live:
                    t.modes = tuple(m for m in t.modes if m in modes) or t.modes[:1]
                    try:
                        res["checks"].append(check_target(args, t))
                    except Exception as exc:  # a crashed check is a failed check, not a lost run
                        print(f"  check {t.label} crashed: {exc}\n{t.server.log_tail()}", flush=True)
                        res["checks"].append(
                            {"target": t.label, "semantics": [f"check crashed: {exc}"], "counters": [], "ok": False}
                        )
                if args.check:
                    continue
                if not calibrated and live:
                    calibrated = True
                    try:
                        res["cells"].append(one_cell(args, live[0], "ping", "low", 32))
                    except Exception as exc:
                        meta["cell_errors"].append(f"calibration cell failed: {exc}")
                for contention in contentions:
                    for n in concurrency:
                        for t in live:
                            for mode in t.modes:
                                try:
                                    res["cells"].append(one_cell(args, t, mode, contention, n))
                                except Exception as exc:  # one broken cell must not lose the run
                                    msg = f"{t.label} {mode} {contention} {n} agents failed: {exc}"
                                    meta["cell_errors"].append(msg)
                                    print(f"  {msg}\n{t.server.log_tail()}", flush=True)
            finally:
                for t in targets:
                    for problem in t.cleanup():
                        meta["notes"].append(problem)
                        print(f"  {problem}", flush=True)
    meta["machine"]["loadavg_after"] = loadavg()
    meta["elapsed_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    failed = (
        [c["target"] for c in res["checks"] if not c["ok"]]
        + meta["cell_errors"]
        + [
            f"{c['system']}/{c['backend']} {c['mode']} {c['contention']} {c['concurrency']}"
            for c in res["cells"]
            if c["verify"]
        ]
    )
    if not args.check:
        write_report(res, args.results_md, args.out.with_suffix(".png"))
    ran = ", ".join(c["target"] for c in res["checks"]) or "nothing"
    print(f"done in {meta['elapsed_s']:.0f} s; checked {ran}; {len(res['cells'])} cells")
    for note in meta["notes"]:
        print(f"  note: {note}")
    print(f"server logs: {logs_root}")
    print(f"CORRECTNESS FAILURES: {failed}" if failed else "all checks ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
