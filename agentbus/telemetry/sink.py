"""Timeline events from the request path to the backend, off the request path.

A finished bus or broker span hands its event to :meth:`TraceSink.put` (a deque append, no
I/O); one asyncio task per process writes the buffer every ``trace_flush_s`` (sooner when
:data:`FLUSH_AT` events wait) as one batch, and :meth:`close` writes what is left at
shutdown. A failed write is retried with the next batch; the buffer is bounded
(:data:`MAX_BUFFER`, oldest dropped and counted) so a backend outage cannot exhaust memory.
A second task prunes every ``trace_prune_s``: events past ``trace_retention_s`` (an indexed
delete) and, in the spaces this process wrote to since, events past the per-space bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from agentbus.store.base import TraceEvent, TraceStore
from agentbus.telemetry import metrics as m

log = logging.getLogger("agentbus.telemetry")

MAX_BUFFER = 50_000
# Small batches, written one after another: encoding a batch runs on the event loop, and a
# batch of thousands of events stalled every request for ~100 ms (seen as the p99 of the
# Redis commit benchmark); 200 events cost a few ms.
FLUSH_AT = 200
BATCH = 200


class TraceSink:
    def __init__(self, store: TraceStore, flush_s: float, prune_s: float) -> None:
        self.store = store
        self.flush_s = flush_s
        self.prune_s = prune_s
        self._buf: deque[TraceEvent] = deque()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Spaces written since the last prune: only they can have grown past the count bound.
        self._touched: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._flush_forever()), asyncio.create_task(self._prune_forever())]

    def put(self, event: TraceEvent) -> None:
        if len(self._buf) >= MAX_BUFFER:
            self._buf.popleft()
            m.TRACE_EVENTS.labels("dropped").inc()
        self._buf.append(event)
        if len(self._buf) >= FLUSH_AT and self._wake is not None and self._loop is not None:
            try:
                if asyncio.get_running_loop() is self._loop:
                    self._wake.set()
            except RuntimeError:  # another thread: the timer flushes it
                pass

    async def flush(self) -> int:
        """Write everything buffered now; returns how many events were stored."""
        stored = 0
        while self._buf:
            batch = [self._buf.popleft() for _ in range(min(BATCH, len(self._buf)))]
            try:
                await self.store.append(batch)
            except Exception:
                # Back to the front, in order, for the next flush (bounded by put()).
                self._buf.extendleft(reversed(batch))
                m.TRACE_EVENTS.labels("failed").inc(len(batch))
                raise
            stored += len(batch)
            self._touched.update((e.tenant, e.space) for e in batch)
            m.TRACE_EVENTS.labels("stored").inc(len(batch))
        return stored

    async def _flush_forever(self) -> None:
        assert self._wake is not None
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.warning("storing timeline events failed; retrying with the next batch", exc_info=True)
                await asyncio.sleep(self.flush_s)

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.prune_s)
            try:
                touched, self._touched = self._touched, set()
                await self.store.prune(time.time(), touched)
            except Exception:
                log.warning("pruning timeline events failed", exc_info=True)

    async def close(self) -> None:
        # The flusher is not cancelled mid-write (a cancelled batch would be lost or stored
        # twice): it is told to stop, finishes its batch, and the rest is written here.
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        for t in self._tasks[1:]:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        try:
            await self.flush()
        except Exception:
            log.warning("could not store %d timeline events at shutdown", len(self._buf), exc_info=True)
