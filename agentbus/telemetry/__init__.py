"""Traces, timeline events and metrics (SPEC: "Traces").

One :class:`Telemetry` per app: its own tracer provider (exporters from the OTEL_*
variables, see :mod:`.tracing`), the sink that keeps timeline events in the backend
(:mod:`.sink`), and the read-set tally for metrics. Spans are made in :mod:`.spans`, the
server span of every request in :mod:`.middleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from opentelemetry.sdk.trace import SpanProcessor

from agentbus import __version__
from agentbus.settings import Settings
from agentbus.store.base import Store, TraceEvent, TraceStore
from agentbus.telemetry import metrics as m
from agentbus.telemetry.sink import TraceSink
from agentbus.telemetry.spans import ReadSetTally
from agentbus.telemetry.tracing import make_provider

log = logging.getLogger("agentbus.telemetry")
# The budget-remaining gauges of one principal are refreshed at most this often.
GAUGE_EVERY_S = 1.0


class Telemetry:
    def __init__(self, settings: Settings, processors: list[SpanProcessor] | None = None) -> None:
        self.settings = settings
        self.provider = make_provider(processors)
        self.tracer = self.provider.get_tracer("agentbus", __version__)
        self.readsets = ReadSetTally()
        self.traces: TraceStore | None = None
        self.sink: TraceSink | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._gauges_at: dict[tuple[str, str], float] = {}
        self._flusher: asyncio.Task[None] | None = None

    @property
    def exporting(self) -> bool:
        """Whether spans can be recorded at all (an exporter or processor is configured)."""
        return bool(getattr(self.provider.sampler, "exporting", True))

    async def start(self, store: Store) -> None:
        if m.multiprocess():  # only then does child() buffer anything
            self._flusher = asyncio.create_task(m.flush_forever())
        if not self.settings.trace_store:
            return
        from agentbus.store import open_trace_store

        self.traces = open_trace_store(store)
        self.sink = TraceSink(self.traces, self.settings.trace_flush_s, self.settings.trace_prune_s)
        self.sink.start()

    async def close(self) -> None:
        """Before the store closes: write buffered events, then flush and stop exporters
        (on a thread, so an exporter never blocks the event loop)."""
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._flusher is not None:
            self._flusher.cancel()  # flushes what is buffered as it stops
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.sink is not None:
            await self.sink.close()
        await asyncio.to_thread(self.provider.shutdown)

    def emit(self, event: TraceEvent) -> None:
        if self.sink is not None:
            self.sink.put(event)

    def update_budget_gauges(self, broker: Any, principal: Any) -> None:
        """After a settle: what remains of the caller's scopes, read in the background.

        At most once per second per principal, and never for a caller without token, cost or
        request limits (there is no remaining to report): the read is a store round trip,
        which on every call would be a large part of what the broker adds to it."""
        scopes = broker.scopes(principal)
        if not any(
            lim.max_tokens is not None or lim.max_cost is not None or lim.max_requests is not None
            for lim in scopes.values()
        ):
            return
        who = (principal.tenant, principal.subject)
        now = time.monotonic()
        if now - self._gauges_at.get(who, -1e9) < GAUGE_EVERY_S:
            return
        if len(self._gauges_at) > 10_000:
            self._gauges_at.clear()
        self._gauges_at[who] = now

        async def update() -> None:
            from agentbus.broker import budget as b

            try:
                counters = await broker.store.budgets.counters(scopes, time.time())
                for key, limits in scopes.items():
                    left = b.remaining(counters[key], limits)
                    for kind in ("tokens", "cost", "requests"):
                        if left[kind] is not None:
                            m.BUDGET_REMAINING.labels(key, kind).set(left[kind])
            except Exception:
                log.debug("budget gauge update failed", exc_info=True)

        try:
            task = asyncio.get_running_loop().create_task(update())
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
