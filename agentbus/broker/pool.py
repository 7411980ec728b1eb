"""Per-endpoint live state and the selection policies.

State is per process (outstanding calls, observed latency, circuit breaker, last scraped
vLLM metrics): it steers choices, while budgets — which must be exact — live in the
backend. Selection never blocks: it ranks healthy candidates and the caller tries them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agentbus.broker import http
from agentbus.broker.config import BrokerConfig, Endpoint, Policy

log = logging.getLogger("agentbus.broker")

VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(slots=True)
class Load:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    at: float = 0.0  # monotonic time of the scrape; 0 = never


@dataclass(slots=True)
class EndpointState:
    endpoint: Endpoint
    outstanding: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    consecutive_failures: int = 0
    open_until: float = 0.0
    half_open_trial: bool = False
    load: Load = field(default_factory=Load)
    healthy: bool = True

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        data = sorted(self.latencies_ms)
        idx = min(len(data) - 1, max(0, round(q * (len(data) - 1))))
        return data[idx]


class CircuitOpen(Exception):
    pass


class EndpointPool:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.states: dict[str, EndpointState] = {e.name: EndpointState(e) for e in config.endpoints}
        # Smooth weighted round robin state: candidate set -> endpoint -> current weight.
        self._swrr: dict[tuple[str, ...], dict[str, float]] = {}

    def reconfigure(self, config: BrokerConfig) -> None:
        """Keep live state of endpoints that survive a config reload."""
        old = self.states
        self.states = {}
        for e in config.endpoints:
            st = old.get(e.name) or EndpointState(e)
            st.endpoint = e
            self.states[e.name] = st
        self.config = config

    # ------------------------------------------------------------------ health
    def available(self, st: EndpointState, now: float) -> bool:
        """Closed: open_until == 0. Open: now < open_until. Half-open (cooldown over): one
        trial call at a time decides whether the circuit closes or opens again."""
        if not st.healthy:
            return False
        if st.open_until and (now < st.open_until or st.half_open_trial):
            return False
        return st.outstanding < st.endpoint.max_concurrency

    def started(self, st: EndpointState) -> None:
        st.outstanding += 1
        if st.open_until and st.open_until <= time.monotonic():
            st.half_open_trial = True

    def finished(self, st: EndpointState, *, ok: bool, latency_ms: float | None, counts_as_failure: bool) -> None:
        st.outstanding = max(0, st.outstanding - 1)
        if ok:
            if latency_ms is not None:
                st.latencies_ms.append(latency_ms)
            st.consecutive_failures = 0
            st.open_until = 0.0
            st.half_open_trial = False
            return
        if not counts_as_failure:
            # Not the endpoint's fault (an upstream 4xx or 429, the caller went away): a
            # half-open trial proved nothing either way, so the next call is the trial.
            st.half_open_trial = False
            return
        st.consecutive_failures += 1
        if st.half_open_trial or st.consecutive_failures >= self.config.circuit.failures:
            st.open_until = time.monotonic() + self.config.circuit.cooldown_s
            st.half_open_trial = False
            log.warning("circuit open for endpoint %s", st.endpoint.name)

    # ------------------------------------------------------------------ choice
    def candidates(self, names: Sequence[str], model: str, exclude: set[str]) -> list[EndpointState]:
        now = time.monotonic()
        out = []
        for n in names:
            st = self.states.get(n)
            if st is None or n in exclude or model not in st.endpoint.models:
                continue
            if self.available(st, now):
                out.append(st)
        return out

    def score(self, st: EndpointState, *, use_metrics: bool) -> float:
        """Expected queueing per unit of weight; metrics older than 3 intervals are ignored."""
        load = float(st.outstanding)
        fresh = st.load.at and time.monotonic() - st.load.at < 3 * self.config.metrics_interval_s
        if use_metrics and fresh:
            load = max(load, st.load.running) + 2.0 * st.load.waiting
            if st.load.kv_usage > 0.9:
                load += 10.0 * (st.load.kv_usage - 0.9) * 10
        return load / st.endpoint.weight

    def order(self, policy: Policy, cands: list[EndpointState], prefix_key: str) -> list[EndpointState]:
        """Candidates best-first under ``policy``; the rest follow as retry targets."""
        if len(cands) <= 1:
            return cands
        if policy == "round_robin":
            # Smooth weighted round robin (as nginx): every candidate gains its weight, the
            # richest goes first and pays the total. Equal weights strictly alternate; weights
            # 3:1 give a a b a. State is kept per candidate set, so routes do not disturb
            # each other.
            names = tuple(c.endpoint.name for c in cands)
            if len(self._swrr) > 1024:
                self._swrr.clear()
            current = self._swrr.setdefault(names, dict.fromkeys(names, 0.0))
            for c in cands:
                current[c.endpoint.name] += c.endpoint.weight
            first = max(range(len(cands)), key=lambda i: current[names[i]])
            current[names[first]] -= sum(c.endpoint.weight for c in cands)
            return cands[first:] + cands[:first]
        if policy == "prefix_affinity":
            ranked = sorted(cands, key=lambda c: _rendezvous(prefix_key, c.endpoint.name), reverse=True)
            a, b = ranked[0], ranked[1]
            # Two choices: stay with the prefix's home for KV reuse unless it is clearly busier.
            if self.score(a, use_metrics=True) > 2 * self.score(b, use_metrics=True) + 2:
                a, b = b, a
            rest = sorted(ranked[2:], key=lambda c: self.score(c, use_metrics=True))
            return [a, b, *rest]
        use_metrics = policy == "load_aware"
        jitter = {id(c): random.random() for c in cands}  # break ties without herding
        return sorted(cands, key=lambda c: (self.score(c, use_metrics=use_metrics), jitter[id(c)]))

    # ------------------------------------------------------------------ scraping
    async def scrape_forever(self, client: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.gather(*(self.scrape(client, st) for st in list(self.states.values())))
            await asyncio.sleep(self.config.metrics_interval_s)

    async def scrape(self, client: aiohttp.ClientSession, st: EndpointState) -> None:
        try:
            timeout = http.total_timeout(max(0.5, self.config.metrics_interval_s))
            async with client.get(st.endpoint.metrics, timeout=timeout) as r:
                text = await r.text()
                if r.status != 200:
                    return
            st.load = parse_vllm_metrics(text)
        except (TimeoutError, ValueError, *http.NETWORK_ERRORS) as exc:
            log.debug("metrics scrape of %s failed: %s", st.endpoint.name, exc)


def parse_vllm_metrics(text: str) -> Load:
    """Sum vLLM's gauges over models/engines on one endpoint."""
    load = Load(at=time.monotonic())
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == VLLM_RUNNING:
                load.running += sample.value
            elif sample.name == VLLM_WAITING:
                load.waiting += sample.value
            elif sample.name in VLLM_KV:
                load.kv_usage = max(load.kv_usage, sample.value)
    return load


def _rendezvous(key: str, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{name}\x00{key}".encode(), digest_size=8).digest(), "big")
