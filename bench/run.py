"""Benchmark agentbus commits against hand-written baselines on SQLite, PostgreSQL and Redis.

Usage (from the repository root; see bench/README.md):

    .venv/bin/python -m bench.run                  # full run (~16 min), writes RESULTS.md
    .venv/bin/python -m bench.run --quick          # < 3 min smoke, results in /tmp
    .venv/bin/python -m bench.run --check          # correctness self-check only
    .venv/bin/python -m bench.run --report bench/results/X.json   # re-render RESULTS.md

For each backend it starts agentbus (and the baseline for that backend) as uvicorn
subprocesses on fresh stores, checks each server is correct (stale writes get 409, no lost
updates), then runs every cell (contention x agents x system/mode) for a fixed time,
interleaving systems cell by cell so a slow drift of the machine hits all of them alike.
Last, per backend, the worker-scaling cells: agentbus alone on the same store with each
``--scaling-workers`` count of uvicorn workers (default 1 and 2).
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
from bench.loadgen import CellResult, CellSpec, ProcessCpu, proc_stat, run_cell
from bench.servers import ROOT, Target, agentbus_server, build_targets, pg_server_version, redis_server_version

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


def summarize(target: Target, cell: CellResult, probe: ProcessCpu, verify: list[str]) -> dict[str, Any]:
    spec = cell.spec
    ok = cell.merged("commit_ok")
    conflict = cell.merged("commit_conflict")
    attempts = len(ok) + len(conflict)
    return {
        "backend": target.backend,
        "system": target.system,
        "workers": target.workers,
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
            "server_cores": probe.cores["server"],
            "machine_busy_cores": probe.machine,
            "server_processes_changed": bool(probe.restarted),
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
    probe = ProcessCpu({"server": target.server})
    cell = run_cell(spec, probe)
    verify = checks.verify_versions(cell) if mode != "ping" else []
    out = summarize(target, cell, probe, verify)
    lat = out["latency_ms"]["commit"]
    nan = float("nan")
    label = f"{target.label} w{target.workers}"
    print(
        f"  {label:28s} {mode:4s} {contention:4s} {n:4d} agents: {out['commits_per_s']:8.0f}/s "
        f"p50 {lat.get('p50', nan):7.2f} ms p99 {lat.get('p99', nan):7.2f} ms "
        f"409 {100 * out['conflict_rate']:3.0f}% cpu client/server/all "
        f"{out['cpu']['client_cores']:.2f}/{out['cpu']['server_cores']:.2f}/{out['cpu']['machine_busy_cores']:.2f}"
        + (f" other={out['other']}" if out["other"] else "")
        + (f" VERIFY FAILED {verify}" if verify else "")
        + (" (server processes changed: a worker was restarted?)" if probe.restarted else ""),
        flush=True,
    )
    return out


def worker_scaling(args: argparse.Namespace, main: Target, log_dir: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker-scaling cells: the backend's agentbus server again with each ``--scaling-workers``
    count of uvicorn worker processes, one server at a time on the same store (the main
    server is stopped first, so only one agentbus runs), ``--scaling-modes`` commits under
    low contention at ``--scaling-concurrency`` agents."""
    cells: list[dict[str, Any]] = []
    main.server.stop()
    store = main.server.env["AGENTBUS_STORE"]
    env = {k: v for k, v in main.server.env.items() if k != "AGENTBUS_STORE"}
    for w in args.scaling_workers:
        d = log_dir / f"scaling-{w}-workers"
        d.mkdir(parents=True, exist_ok=True)
        t = Target("agentbus", main.backend, agentbus_server(store, w, d, env), args.scaling_modes, workers=w)
        try:
            t.server.start()
        except RuntimeError as exc:
            meta["cell_errors"].append(f"{t.label} with {w} workers did not start: {str(exc).splitlines()[0]}")
            continue
        try:
            for mode in t.modes:
                for n in args.scaling_concurrency:
                    try:
                        cells.append(one_cell(args, t, mode, "low", n))
                    except Exception as exc:  # one broken cell must not lose the run
                        msg = f"{t.label} w{w} {mode} low {n} agents failed: {exc}"
                        meta["cell_errors"].append(msg)
                        print(f"  {msg}\n{t.server.log_tail()}", flush=True)
        finally:
            t.server.stop()
    return cells


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
    b0, t0 = proc_stat()
    time.sleep(seconds)
    b1, t1 = proc_stat()
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
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 3)")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of every cell, the systems' order reversed each time; the report takes the median (default 3)",
    )
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each cell (default 1)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers per server, same for all (default 2)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--hot-keys", type=int, default=4, help="keys shared by all agents under high contention")
    p.add_argument("--contention", default="low,high", help="comma list of low,high")
    p.add_argument("--modes", default="ev,dl", help="agentbus commit modes: ev (expected_version), dl (delivery log)")
    p.add_argument(
        "--scaling-workers",
        default="1,2",
        help="worker-scaling cells: agentbus with each of these uvicorn worker counts (default 1,2; '' = none)",
    )
    p.add_argument(
        "--scaling-concurrency", default=None, help="agents in the worker-scaling cells (default 8,32; quick 32)"
    )
    p.add_argument("--scaling-modes", default="ev", help="commit modes of the worker-scaling cells (default ev)")
    p.add_argument("--check-agents", type=int, default=32, help="agents in the counter self-check")
    p.add_argument("--check-seconds", type=float, default=None, help="seconds of the counter self-check (default 3)")
    p.add_argument("--no-calibration", action="store_true", help="skip the GET /healthz HTTP-ceiling cell")
    p.add_argument("--quick", action="store_true", help="< 3 min smoke: 8,32 agents, 1 s cells, report in /tmp")
    p.add_argument("--check", action="store_true", help="only the correctness self-checks; exit 1 on failure")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<UTC time>.json)")
    p.add_argument("--results-md", type=Path, default=None, help="Markdown report (default bench/RESULTS.md)")
    p.add_argument("--report", type=Path, default=None, help="only re-render the report from this results JSON")
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or ("8,32" if quick else "1,8,32,128")
    args.duration = args.duration if args.duration is not None else (1.0 if quick else 3.0)
    args.repeat = args.repeat if args.repeat is not None else (1 if quick else 3)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.check_seconds = args.check_seconds if args.check_seconds is not None else (1.0 if quick else 3.0)
    args.scaling_workers = [int(x) for x in args.scaling_workers.split(",") if x]
    args.scaling_concurrency = [
        int(x) for x in (args.scaling_concurrency or ("32" if quick else "8,32")).split(",") if x
    ]
    args.scaling_modes = tuple(m for m in args.scaling_modes.split(",") if m)
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
            "repeat": args.repeat,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "procs": args.procs,
            "hot_keys": args.hot_keys,
            "scaling_workers": args.scaling_workers,
            "scaling_concurrency": args.scaling_concurrency,
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
        "scaling_cells": [],
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
                        # Each run of a cell group in the other order (A B, B A, A B, ...): a
                        # drift of the machine within the group hits both systems alike.
                        for rep in range(args.repeat):
                            for t in live if rep % 2 == 0 else live[::-1]:
                                for mode in t.modes:
                                    try:
                                        cell = one_cell(args, t, mode, contention, n)
                                        cell["rep"] = rep
                                        res["cells"].append(cell)
                                    except Exception as exc:  # one broken cell must not lose the run
                                        msg = f"{t.label} {mode} {contention} {n} agents failed: {exc}"
                                        meta["cell_errors"].append(msg)
                                        print(f"  {msg}\n{t.server.log_tail()}", flush=True)
                main = next((t for t in live if t.system == "agentbus"), None)
                if main is not None and args.scaling_workers:
                    res["scaling_cells"] += worker_scaling(args, main, log_dir, meta)
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
            for c in res["cells"] + res["scaling_cells"]
            if c["verify"]
        ]
    )
    if not args.check:
        write_report(res, args.results_md, args.out.with_suffix(".png"))
    ran = ", ".join(c["target"] for c in res["checks"]) or "nothing"
    print(
        f"done in {meta['elapsed_s']:.0f} s; checked {ran}; {len(res['cells'])} cells "
        f"+ {len(res['scaling_cells'])} worker-scaling cells"
    )
    for note in meta["notes"]:
        print(f"  note: {note}")
    print(f"server logs: {logs_root}")
    print(f"CORRECTNESS FAILURES: {failed}" if failed else "all checks ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
