"""Prometheus metrics of the service itself, served at ``/metrics``.

Several uvicorn workers: ``agentbus serve --workers N`` (N > 1) points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start (unless it is
already set), so every worker writes its samples there and ``/metrics`` on any worker
reports the sum over all of them (gauges: the most recent value). Without it (one worker,
or processes started some other way) each process reports only its own numbers.

In that multiprocess mode every ``inc()``/``observe()`` writes a memory-mapped file (a pid
check, a lock, a struct pack): about 6 us per commit request, 5% of a busy worker. So the
per-request metrics (those looked up through :func:`child`) are counted in the process and
added to the shared files every :data:`FLUSH_S` seconds and whenever this process renders
``/metrics``: a scrape may miss up to the last second of *another* worker's requests.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import shutil
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import multiprocess as _mp

disable_created_metrics()  # no *_created series: they double the exposition for nothing

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STORE = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_SIZES = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

HTTP_REQUESTS = Counter(
    "agentbus_http_requests_total", "HTTP requests by route template and status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "agentbus_http_request_duration_seconds", "HTTP request latency", ["method", "route"], buckets=_LATENCY
)
COMMITS = Counter("agentbus_commits_total", "Commits by outcome (committed, conflict, replayed)", ["outcome"])
CONFLICTS = Counter("agentbus_conflicts_total", "Conflicting keys of rejected commits, by kind", ["kind"])
READSET_SIZE = Histogram(
    "agentbus_commit_readset_size",
    "Read-set entries per commit: explicit reads plus the reads and listings this process delivered to the "
    "session in the epoch (a session spread over several workers is undercounted)",
    buckets=_SIZES,
)
BUS_OPS = Counter("agentbus_bus_operations_total", "Bus reads and listings", ["op"])
STORE_LATENCY = Histogram("agentbus_store_operation_seconds", "Latency of backend operations", ["op"], buckets=_STORE)
BROKER_CALLS = Counter(
    "agentbus_broker_calls_total", "Broker calls by model, endpoint and outcome", ["model", "endpoint", "outcome"]
)
BROKER_TOKENS = Counter(
    "agentbus_broker_tokens_total",
    "Tokens of broker calls (direction: input|output)",
    ["model", "endpoint", "direction"],
)
BROKER_COST = Counter("agentbus_broker_cost_total", "Priced cost of broker calls", ["model", "endpoint"])
BROKER_LATENCY = Histogram(
    "agentbus_broker_call_duration_seconds", "Broker call latency", ["model", "endpoint"], buckets=_LATENCY
)
BUDGET_REMAINING = Gauge(
    "agentbus_budget_remaining",
    "What remains of a budget scope after the last settled call (kind: tokens|cost|requests)",
    ["scope", "kind"],
    multiprocess_mode="mostrecent",
)
TRACE_EVENTS = Counter("agentbus_trace_events_total", "Timeline events (outcome: stored|dropped|failed)", ["outcome"])
ACCOUNTING = Counter(
    "agentbus_broker_accounting_total",
    "Broker usage records and counts written after the call (outcome: stored|retried|dropped)",
    ["outcome"],
)


# Buffered metrics are added to the shared multiprocess files this often.
FLUSH_S = 1.0


class _BufferedCounter:
    """A counter child whose increments wait in this process until :func:`flush`."""

    __slots__ = ("pending", "real")

    def __init__(self, real: Any) -> None:
        self.real = real
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.pending += amount
        _DIRTY.add(self)

    def flush(self) -> None:
        amount, self.pending = self.pending, 0.0
        if amount:
            self.real.inc(amount)


class _BufferedHistogram:
    """A histogram child whose observations wait in this process until :func:`flush`;
    bucketed as ``Histogram.observe`` does (the first upper bound >= the value)."""

    __slots__ = ("bounds", "counts", "real", "total")

    def __init__(self, real: Any) -> None:
        self.real = real
        self.bounds: list[float] = list(real._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount
        _DIRTY.add(self)

    def flush(self) -> None:
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        if not any(counts):
            return
        # prometheus_client keeps per-bucket (not cumulative) values and the sum; adding to
        # them is what `count` calls of observe() would have done.
        for i, n in enumerate(counts):
            if n:
                self.real._buckets[i].inc(n)
        self.real._sum.inc(total)


_DIRTY: set[_BufferedCounter | _BufferedHistogram] = set()


def flush() -> None:
    """Add everything buffered in this process to the shared values (event-loop thread)."""
    while _DIRTY:
        _DIRTY.pop().flush()


async def flush_forever(every_s: float = FLUSH_S) -> None:
    try:
        while True:
            await asyncio.sleep(every_s)
            flush()
    finally:
        flush()


def multiprocess() -> bool:
    """Whether this process writes its samples to the shared PROMETHEUS_MULTIPROC_DIR."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set: ``labels()`` validates and
    takes a lock on every call, which on the commit path was measurable. Only for bounded
    label values (route templates, operations, outcomes, conflict kinds). In multiprocess
    mode, buffered (see the module's docstring)."""
    real = metric.labels(*labels) if labels else metric
    if not multiprocess():
        return real
    if isinstance(metric, Counter):
        return _BufferedCounter(real)
    if isinstance(metric, Histogram):
        return _BufferedHistogram(real)
    return real


def render() -> bytes:
    """The exposition text: this process's registry, or all workers' in multiprocess mode."""
    flush()
    if multiprocess():
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


def prepare_multiprocess(workers: int) -> str | None:
    """Before uvicorn starts N > 1 workers: a fresh, empty PROMETHEUS_MULTIPROC_DIR for them
    (an operator-set one is emptied, as prometheus_client requires between runs)."""
    if workers <= 1:
        return None
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="agentbus-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path
