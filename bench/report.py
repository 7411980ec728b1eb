"""Turn a results JSON into bench/RESULTS.md tables (and a PNG plot when matplotlib exists).

RESULTS.md is always regenerated from the JSON, never edited by hand, so every number in it
can be traced to a recorded run (``python -m bench.run --report bench/results/X.json``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

Cell = dict[str, Any]

# Targets from the issue, checked against the recorded cells.
REDIS_MIN_COMMITS_PER_S = 2000.0
P99_MAX_MS_AT_32 = 20.0
BUSY_WARN_CORES = 0.25  # background load above this makes a run unrepresentative


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _key(c: Cell) -> tuple[str, str, str, str, int]:
    return (c["backend"], c["system"], c["mode"], c["contention"], c["concurrency"])


def merge_repeats(cells: list[Cell]) -> list[Cell]:
    """One cell per (backend, system, mode, contention, agents): with ``--repeat`` runs, the
    run with the median throughput (so its latencies and 409 share are one run's, not a
    mix), plus ``runs``: every run's commits/s by run number, for the paired ratios."""
    groups: dict[tuple[str, str, str, str, int], list[Cell]] = defaultdict(list)
    for c in cells:
        groups[_key(c)].append(c)
    out: list[Cell] = []
    for group in groups.values():
        median = dict(sorted(group, key=lambda c: c["commits_per_s"])[(len(group) - 1) // 2])
        median["runs"] = {c.get("rep", 0): c["commits_per_s"] for c in group}
        out.append(median)
    return out


def paired_ratios(a: Cell | None, b: Cell | None) -> list[float]:
    """agentbus ÷ baseline run by run (run i of both came from the same pass over the group;
    a run one side lost to a failed cell pairs with nothing)."""
    if a is None or b is None:
        return []
    ra, rb = a.get("runs") or {0: a["commits_per_s"]}, b.get("runs") or {0: b["commits_per_s"]}
    return sorted(ra[r] / rb[r] for r in ra if rb.get(r))


def _median(xs: list[float]) -> float | None:
    return xs[(len(xs) - 1) // 2] if xs else None


def _index(cells: list[Cell]) -> dict[tuple[str, str, str, str, int], Cell]:
    return {_key(c): c for c in merge_repeats(cells)}


def _lat(cell: Cell | None, which: str, p: str) -> float | None:
    if cell is None:
        return None
    return cell["latency_ms"].get(which, {}).get(p)


def _tput(cell: Cell | None) -> float | None:
    return None if cell is None else cell["commits_per_s"]


def _conf(cell: Cell | None) -> str:
    if cell is None:
        return "n/a"
    return f"{100 * cell['conflict_rate']:.0f}%"


def comparison_tables(res: dict[str, Any]) -> list[str]:
    """Per backend and contention: agentbus (expected_version commits) vs the baseline."""
    out: list[str] = []
    cells = res["cells"]
    idx = _index(cells)
    concs = sorted({c["concurrency"] for c in cells if c["mode"] != "ping"})
    for backend in res["meta"]["backends"]:
        systems = sorted({c["system"] for c in cells if c["backend"] == backend and c["system"] != "agentbus"})
        if not any(c["backend"] == backend for c in cells):
            continue
        baseline = systems[0] if systems else None
        for contention in ("low", "high"):
            desc = "each agent its own key" if contention == "low" else f"all agents on {res['meta']['hot_keys']} keys"
            out.append(f"### {backend}, {contention} contention ({desc}), expected_version commits\n")
            head = "| agents | agentbus commits/s | p50 ms | p99 ms | 409 |"
            sep = "|---:|---:|---:|---:|---:|"
            if baseline:
                head += f" {baseline} commits/s | p50 ms | p99 ms | 409 | throughput ratio | p99 ratio |"
                sep += "---:|---:|---:|---:|---:|---:|"
            out += [head, sep]
            for n in concs:
                a = idx.get((backend, "agentbus", "ev", contention, n))
                row = f"| {n} | {_f(_tput(a), 0)} | {_f(_lat(a, 'commit', 'p50'), 2)} | "
                row += f"{_f(_lat(a, 'commit', 'p99'), 2)} | {_conf(a)} |"
                if baseline:
                    b = idx.get((backend, baseline, "ev", contention, n))
                    row += f" {_f(_tput(b), 0)} | {_f(_lat(b, 'commit', 'p50'), 2)} | "
                    row += f"{_f(_lat(b, 'commit', 'p99'), 2)} | {_conf(b)} | "
                    paired = paired_ratios(a, b)
                    spread = f" ({paired[0]:.2f}-{paired[-1]:.2f})" if len(paired) > 1 else ""
                    ratio = f"{_median(paired):.2f}x{spread}" if paired else "n/a"
                    row += f"{ratio} | {_ratio(_lat(a, 'commit', 'p99'), _lat(b, 'commit', 'p99'))} |"
                out.append(row)
            out.append("")
    if out:
        out.insert(
            0,
            "Throughput = applied (200) commits per second. p50/p99 = latency of one commit request "
            "(200 or 409). 409 = share of commit requests rejected (each is retried). Ratios are "
            "agentbus ÷ baseline: a throughput ratio ≥ 1.00x and a p99 ratio ≤ 1.00x favour agentbus. "
            "With several runs per cell (`repeat` above) a system's columns are its median run, and the "
            "throughput ratio is the median of the run-by-run ratios (lowest-highest in brackets).\n",
        )
    return out


def delivery_log_tables(res: dict[str, Any]) -> list[str]:
    """The price of the delivery log: GET + commit without expected_version vs expected_version."""
    out: list[str] = []
    cells = res["cells"]
    idx = _index(cells)
    concs = sorted({c["concurrency"] for c in cells if c["mode"] != "ping"})
    for backend in res["meta"]["backends"]:
        if not any(c["backend"] == backend and c["mode"] == "dl" for c in cells):
            continue
        out.append(f"### {backend}\n")
        out.append(
            "| contention | agents | ev commits/s | dl commits/s | dl ÷ ev | ev commit p50/p99 ms | "
            "dl commit p50/p99 ms | dl GET p50/p99 ms | dl op p99 ms | dl 409 |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for contention in ("low", "high"):
            for n in concs:
                ev = idx.get((backend, "agentbus", "ev", contention, n))
                dl = idx.get((backend, "agentbus", "dl", contention, n))
                if ev is None and dl is None:
                    continue
                out.append(
                    f"| {contention} | {n} | {_f(_tput(ev), 0)} | {_f(_tput(dl), 0)} | "
                    f"{_ratio(_tput(dl), _tput(ev))} | "
                    f"{_f(_lat(ev, 'commit', 'p50'), 2)} / {_f(_lat(ev, 'commit', 'p99'), 2)} | "
                    f"{_f(_lat(dl, 'commit', 'p50'), 2)} / {_f(_lat(dl, 'commit', 'p99'), 2)} | "
                    f"{_f(_lat(dl, 'get', 'p50'), 2)} / {_f(_lat(dl, 'get', 'p99'), 2)} | "
                    f"{_f(_lat(dl, 'op', 'p99'), 2)} | {_conf(dl)} |"
                )
        out.append("")
    if out:
        out.insert(
            0,
            "`ev` = commit with expected_version only (no read recorded, no read set to rebuild). "
            "`dl` = GET the shard (recorded in the delivery log), then commit *without* "
            "expected_version, so the server reconstructs the read set and validates it. "
            "A dl commit needs two requests, so `dl ÷ ev` includes the extra GET; compare the "
            "commit latency columns for the cost of read-set reconstruction alone. `op` = GET(s) + "
            "commit(s) until a commit is applied.\n",
        )
    return out


def targets_section(res: dict[str, Any]) -> list[str]:
    idx = _index(res["cells"])
    lines = ["| target | cell | measured | verdict |", "|---|---|---:|---|"]

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "**not met**")

    r = idx.get(("redis", "agentbus", "ev", "low", 32))
    uncontended = [
        c
        for c in idx.values()
        if (c["backend"], c["system"], c["mode"], c["contention"]) == ("redis", "agentbus", "ev", "low")
    ]
    best = max(uncontended, key=lambda c: c["commits_per_s"], default=None)
    if best is not None:
        ok = best["commits_per_s"] >= REDIS_MIN_COMMITS_PER_S
        lines.append(
            f"| Redis uncontended ≥ {REDIS_MIN_COMMITS_PER_S:,.0f} commits/s ({res['meta']['workers']} workers) | "
            f"low, best cell ({best['concurrency']} agents) | {_f(best['commits_per_s'], 0)}/s | {verdict(ok)} |"
        )
    else:
        lines.append(f"| Redis uncontended ≥ {REDIS_MIN_COMMITS_PER_S:,.0f} commits/s | n/a | n/a | not measured |")
    p99 = _lat(r, "commit", "p99")
    lines.append(
        f"| Redis p99 < {P99_MAX_MS_AT_32:.0f} ms at 32 agents | low, 32 agents | "
        f"{_f(p99, 2) + ' ms' if p99 is not None else 'n/a'} | "
        f"{verdict(None if p99 is None else p99 < P99_MAX_MS_AT_32)} |"
    )
    for backend, base in (("postgres", "pg-serializable"), ("redis", "redis-watch")):
        pairs = [
            (c, idx.get((backend, base, "ev", c["contention"], c["concurrency"])))
            for c in idx.values()
            if c["backend"] == backend and c["system"] == "agentbus" and c["mode"] == "ev"
        ]
        ratios = [(a, _median(paired_ratios(a, b))) for a, b in pairs if b is not None]
        ratios = [(a, r) for a, r in ratios if r is not None]
        if not ratios:
            lines.append(f"| agentbus ≥ {base} on {backend} | n/a | n/a | not measured |")
            continue
        wins = sum(1 for _, r in ratios if r >= 1.0)
        worst, ratio = min(ratios, key=lambda ar: ar[1])
        lines.append(
            f"| agentbus ≥ {base} on {backend} (throughput) | {wins}/{len(ratios)} cells | "
            f"worst {ratio:.2f}x ({worst['contention']}, {worst['concurrency']} agents) | "
            f"{verdict(wins == len(ratios))} |"
        )
    return lines


def worker_scaling_section(res: dict[str, Any]) -> list[str]:
    """agentbus with 1, 2, ... uvicorn workers on the same store, one server at a time."""
    cells = res.get("scaling_cells") or []
    if not cells:
        return ["Not measured in this run (`--scaling-workers`).", ""]
    lines = [
        "The same agentbus server started with each number of uvicorn worker processes, one at a "
        "time on the same store; low contention (each agent its own key). Speedup = commits/s "
        "÷ the same cell with the fewest workers. On a machine with as many cores as the client, "
        "the server and the database need together, speedup tracks the workers; here they "
        "share the cores (see server / machine cores).",
        "",
        "| backend | mode | agents | workers | commits/s | speedup | p50 ms | p99 ms | server cores | machine busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[tuple[str, str, int], float] = {}
    for c in sorted(cells, key=lambda c: (c["backend"], c["mode"], c["concurrency"], c["workers"])):
        key = (c["backend"], c["mode"], c["concurrency"])
        base.setdefault(key, c["commits_per_s"])
        lines.append(
            f"| {c['backend']} | {c['mode']} | {c['concurrency']} | {c['workers']} | {_f(c['commits_per_s'], 0)} | "
            f"{_ratio(c['commits_per_s'], base[key])} | {_f(_lat(c, 'commit', 'p50'), 2)} | "
            f"{_f(_lat(c, 'commit', 'p99'), 2)} | {_f(c['cpu']['server_cores'], 2)} | "
            f"{_f(c['cpu']['machine_busy_cores'], 2)} |"
        )
    lines.append("")
    return lines


def checks_section(res: dict[str, Any]) -> list[str]:
    lines = ["| server | scripted 409 semantics | counter mode | agents/keys | applied | 409s | result |"]
    lines.append("|---|---|---|---:|---:|---:|---|")
    for chk in res["checks"]:
        sem = "ok" if not chk["semantics"] else "**FAILED**: " + "; ".join(chk["semantics"])
        if not chk["counters"]:
            lines.append(f"| {chk['target']} | {sem} | n/a | n/a | n/a | n/a | not run |")
        for c in chk["counters"]:
            result = "ok" if c["ok"] else "**FAILED**: " + "; ".join(c["problems"])
            lines.append(
                f"| {chk['target']} | {sem} | {c['mode']} | {c['concurrency']}/{c['hot_keys']} | "
                f"{c['applied']} | {c['conflicts_409']} | {result} |"
            )
    every = res["cells"] + res.get("scaling_cells", [])
    bad = [
        f"{c['backend']}/{c['system']}/{c['mode']}/{c['contention']}/{c['concurrency']}/w{c.get('workers', '?')}"
        for c in every
        if c["verify"]
    ]
    lines.append("")
    lines.append(
        "After every timed cell each key's final version was compared with the number of 200 "
        f"commits the clients counted for it: {'all matched' if not bad else 'MISMATCH in ' + ', '.join(bad)}."
    )
    return lines


def cpu_section(res: dict[str, Any]) -> list[str]:
    lines = [
        "CPU cores used during each measured window (of "
        f"{res['meta']['machine']['nproc']}): load generator, the server under test (uvicorn "
        "master + workers) and the whole machine (includes PostgreSQL/Redis).\n",
        "| backend | system | mode | contention | agents | commits/s | client cores | server cores | machine busy |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in merge_repeats(res["cells"]):  # the median run's CPU
        cpu = c["cpu"]
        lines.append(
            f"| {c['backend']} | {c['system']} | {c['mode']} | {c['contention']} | {c['concurrency']} | "
            f"{_f(c['commits_per_s'], 0)} | {_f(cpu['client_cores'], 2)} | {_f(cpu['server_cores'], 2)} | "
            f"{_f(cpu['machine_busy_cores'], 2)} |"
        )
    return lines


def render(res: dict[str, Any], plot_name: str | None) -> str:
    meta = res["meta"]
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        "# agentbus benchmark results",
        "",
        "Generated by `bench/run.py` from "
        f"`{meta['json']}` — do not edit by hand; regenerate with "
        f"`.venv/bin/python -m bench.run --report {meta['json']}`.",
        "",
        "## Run",
        "",
        f"- date: {meta['started_at']} (took {meta['elapsed_s']:.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']:.1f} GiB RAM, {m['kernel']}",
        f"- load average before / after: {m['loadavg_before']} / {m['loadavg_after']}; "
        f"{m.get('background_busy_cores', 0.0):.2f} cores busy with other work just before the run",
        f"- agentbus {v['agentbus']} (git {v['git']}), Python {v['python']}, "
        + ", ".join(f"{k} {v[k]}" for k in ("fastapi", "uvicorn", "sqlalchemy", "asyncpg", "redis-py", "uvloop"))
        + f"; PostgreSQL {v['postgres']}, Redis {v['redis']}",
        f"- settings: {meta['workers']} uvicorn workers per server, {meta['duration_s']} s measured after "
        f"{meta['warmup_s']} s warm-up per cell, each cell run {meta.get('repeat', 1)} time(s) "
        f"(systems in alternating order), {meta['procs']} client processes, "
        f"{meta['hot_keys']} hot keys under high contention; agentbus default settings "
        "(SQLite `synchronous=FULL`, pool size 10)",
        "",
    ]
    busy = m.get("background_busy_cores", 0.0)
    if busy > BUSY_WARN_CORES:
        lines += [
            f"**Warning: {busy:.2f} of {m['nproc']} cores were busy with other work before the run "
            "started; these numbers are not representative of this machine.**",
            "",
        ]
    if meta.get("cell_errors"):
        lines += ["Cells that failed:", ""] + [f"- {e}" for e in meta["cell_errors"]] + [""]
    if meta.get("agentbus_env"):
        env = ", ".join(f"`{k}={v}`" for k, v in sorted(meta["agentbus_env"].items()) if "TOKEN" not in k)
        lines += [f"AGENTBUS_* environment inherited by the servers: {env}", ""]
    if meta.get("notes"):
        lines += ["Skipped / notes from this run:", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    if meta.get("quick"):
        lines += ["**This is a --quick smoke run: cells are too short for the numbers to mean much.**", ""]
    lines += ["## Targets from the issue", "", *targets_section(res), ""]
    if plot_name:
        lines += [f"![throughput and p99 vs agents]({plot_name})", ""]
    else:
        lines += ["(No plot: matplotlib is not installed in this environment.)", ""]
    lines += ["## agentbus vs hand-written baselines", "", *comparison_tables(res)]
    lines += ["## Cost of the delivery log", "", *delivery_log_tables(res)]
    lines += ["## Worker scaling", "", *worker_scaling_section(res)]
    cal = [c for c in res["cells"] if c["mode"] == "ping"]
    if cal:
        c = cal[0]
        lines += [
            "## HTTP ceiling",
            "",
            f"`GET /healthz` on agentbus ({c['backend']}), {c['concurrency']} agents: "
            f"{_f(c['commits_per_s'], 0)} requests/s, p50 {_f(_lat(c, 'commit', 'p50'), 2)} ms, "
            f"p99 {_f(_lat(c, 'commit', 'p99'), 2)} ms — the most this client + uvicorn setup can do "
            "on this machine with no storage work at all.",
            "",
        ]
    lines += ["## Correctness checks (same run)", "", *checks_section(res), ""]
    lines += ["## CPU", "", *cpu_section(res), ""]
    lines += ["## Notes", "", *[f"- {n}" for n in HONEST_NOTES], ""]
    lines += [
        "Where the time goes (profiles, and what to try next) is written up by hand in "
        "[README.md](README.md#where-the-time-goes), not here: this file is regenerated.",
        "",
    ]
    return "\n".join(lines)


HONEST_NOTES = [
    "The load generator runs on the same machine as the servers and the databases and shares "
    "its cores; the CPU table shows how much it took. On a 2-core machine every number here "
    "is a lower bound of what the server does with cores of its own.",
    "Each simulated agent holds one keep-alive HTTP/1.1 connection and issues one request at a "
    "time (closed loop); throughput is what N such agents achieve, not an open-loop arrival rate.",
    "High contention retries a 409 at once (ev: with the current_version the 409 reports; dl: "
    "by re-reading), with no back-off, which is the worst case for conflict storms.",
    "The baselines do strictly less work than agentbus: no version history, no commit log, no "
    "delivery log, no idempotency table; the PostgreSQL baseline's seq comes from a sequence "
    "(not gap-free per space). The ratios are the price of those features plus agentbus's "
    "code paths, not of the check-and-write alone.",
    "Latency percentiles are nearest-rank over every request completed inside the window; a "
    "cell's p99 over a few seconds on a shared machine is noisy — compare runs, not digits.",
]


def plot(res: dict[str, Any], path: Path) -> bool:
    """Throughput and p99 vs agents, one column per backend; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in merge_repeats(res["cells"]) if c["mode"] != "ping"]
    backends = [b for b in res["meta"]["backends"] if any(c["backend"] == b for c in cells)]
    if not backends:
        return False
    fig, axes = plt.subplots(2, len(backends), figsize=(5 * len(backends), 7), squeeze=False)
    series: dict[tuple[str, str, str, str], list[Cell]] = defaultdict(list)
    for c in cells:
        series[(c["backend"], c["system"], c["mode"], c["contention"])].append(c)
    colors: dict[tuple[str, str], str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    concs = sorted({c["concurrency"] for c in cells})
    for col, backend in enumerate(backends):
        for (b, system, mode, contention), pts in sorted(series.items()):
            if b != backend:
                continue
            pts.sort(key=lambda c: c["concurrency"])
            xs = [c["concurrency"] for c in pts]
            color = colors.setdefault((system, mode), palette[len(colors) % len(palette)])
            kw = {"color": color, "linestyle": "-" if contention == "low" else "--", "marker": "o"}
            label = f"{system} {mode} {contention}"
            axes[0][col].plot(xs, [c["commits_per_s"] for c in pts], label=label, **kw)
            axes[1][col].plot(xs, [c["latency_ms"]["commit"].get("p99") for c in pts], label=label, **kw)
        axes[0][col].set_title(f"{backend}: commits/s")
        axes[1][col].set_title(f"{backend}: commit p99 (ms)")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(concs, [str(n) for n in concs])
            axes[row][col].set_xlabel("concurrent agents")
            axes[row][col].grid(True, alpha=0.3)
        axes[1][col].set_yscale("log")
        axes[0][col].legend(fontsize=7)
    fig.suptitle("solid: low contention, dashed: high contention")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
