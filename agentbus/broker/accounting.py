"""Accounting off the response path: counts of callers without limits and usage records.

Why: on the embedded default each was a write transaction awaited (the count) or started
(the usage record) per call, so a model call paid one or two fsyncs and a writer-thread hop
before its answer went out, and under load the writes queued one by one. Here a call only
appends to a queue; one task per process writes everything queued so far in one
:meth:`~agentbus.store.base.BudgetStore.account` call (one transaction on SQL), so the
answer does not wait and a burst of calls shares its writes. On a backend that writes a
batch atomically the task also waits up to :data:`LINGER_S` for company before it writes, so
a steady trickle of calls (one client calling in a loop) shares one transaction too, instead
of paying one fsync per call in the background.

What this costs and how it is bounded:

- A count lags its call by up to :data:`LINGER_S` and one write. Nothing is admitted on it: callers with
  limits still reserve and settle on the call's path. ``GET /v1/budget`` and ``/v1/usage``
  first :meth:`drain` this process's queue, so a caller reads its own calls; another worker
  process may show them a write later.
- Nothing is dropped while the backend is away: a batch that met a 503 goes back to the
  front and is retried with backoff. The queue is bounded (:data:`MAX_QUEUED`, oldest
  dropped, logged and counted) so a long outage cannot exhaust memory, and shutdown
  writes what is left (:meth:`close`). An entry the backend refuses outright (a bug, not
  an outage) is dropped alone, logged, after its batch is retried entry by entry.
- A write whose reply was lost after it was applied is written again: it may be counted
  twice. A write that never reached the backend is counted once. A batch is one
  transaction on SQL backends; on Redis entries go one at a time, so a retry never repeats
  entries already acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from agentbus.broker.budget import Amount, Charge, Limits
from agentbus.core.errors import BackendUnavailable
from agentbus.store.base import BudgetStore, UsageRecord
from agentbus.telemetry import metrics as m

log = logging.getLogger("agentbus.broker")

MAX_QUEUED = 100_000
# Entries per backend call: one transaction stays short however long the queue is.
MAX_BATCH = 500
# On an atomic-batch backend, the writer waits this long after the first entry of a batch for
# more, unless the batch is already full or someone waits for it (drain, close).
LINGER_S = 0.05
# A batch the backend refused is retried after this many seconds, doubling up to RETRY_MAX_S.
RETRY_S = 0.05
RETRY_MAX_S = 2.0
# How long a view waits for this process's queue before reading anyway.
DRAIN_TIMEOUT_S = 5.0

_Entry = Charge | UsageRecord


class Accountant:
    def __init__(self, budgets: Callable[[], BudgetStore]) -> None:
        self._budgets = budgets
        self._queue: deque[tuple[int, _Entry]] = deque()
        self._seq = 0  # entries put so far
        self._inflight: int | None = None  # first entry of the batch being written
        self._isolate_to = 0  # entries up to this one are written one at a time
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()  # cut the linger short: a reader or close() waits
        self._written = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def charge(self, scopes: dict[str, Limits], actual: Amount, now: float, *, release: bool = False) -> None:
        """Count a finished call of a caller without limits (see ``BudgetStore.charge``)."""
        self._put(Charge(scopes=scopes, amount=actual, at=now, release=release))

    def record(self, rec: UsageRecord) -> None:
        self._put(rec)

    def _put(self, entry: _Entry) -> None:
        if len(self._queue) >= MAX_QUEUED:
            _, lost = self._queue.popleft()
            m.ACCOUNTING.labels("dropped").inc()
            log.error("accounting queue full (backend unavailable for long?): dropped %r", lost)
        if self._closing and self._task is None:
            # After close() (a call finishing past shutdown): nothing will write it.
            m.ACCOUNTING.labels("dropped").inc()
            log.error("accounting entry after shutdown, not stored: %r", entry)
            return
        self._seq += 1
        self._queue.append((self._seq, entry))
        self._wake.set()
        if len(self._queue) >= MAX_BATCH:
            self._flush.set()
        if self._task is None:
            # Not started (e.g. a broker used without its lifespan): write it now.
            self.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until everything put before this call is written; False on timeout."""
        target = self._seq
        if self._finished(target):
            return True
        self._flush.set()
        async with self._written:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._written.wait_for(lambda: self._finished(target)), timeout_s)
        return self._finished(target)

    def _finished(self, target: int) -> bool:
        """Every entry up to ``target`` is written or dropped. Entries are handled in order:
        whatever is below both the queue's first entry and the batch in flight is done (a
        failed batch goes back to the front of the queue; a dropped entry leaves it)."""
        first_open = self._queue[0][0] if self._queue else self._seq + 1
        if self._inflight is not None:
            first_open = min(first_open, self._inflight)
        return first_open > target

    async def _run(self) -> None:
        delay = RETRY_S
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._linger()
            self._flush.clear()
            if await self._write_batch():
                delay = RETRY_S
            else:
                if self._closing:
                    return
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    async def _linger(self) -> None:
        if self._flush.is_set() or self._closing or len(self._queue) >= MAX_BATCH:
            return
        if not self._budgets().atomic_batches:
            return  # entries go one at a time anyway: waiting would share nothing
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                await self._flush.wait()

    async def _write_batch(self) -> bool:
        budgets = self._budgets()
        size = MAX_BATCH if budgets.atomic_batches and self._queue[0][0] > self._isolate_to else 1
        batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
        self._inflight = batch[0][0]
        try:
            return await self._write(budgets, batch)
        finally:
            self._inflight = None
            async with self._written:
                self._written.notify_all()

    async def _write(self, budgets: BudgetStore, batch: list[tuple[int, _Entry]]) -> bool:
        charges = [e for _, e in batch if isinstance(e, Charge)]
        records = [e for _, e in batch if isinstance(e, UsageRecord)]
        try:
            await budgets.account(charges, records)
        except BackendUnavailable as exc:
            # Back to the front, in order: the next try writes them before anything newer.
            self._queue.extendleft(reversed(batch))
            m.ACCOUNTING.labels("retried").inc(len(batch))
            log.warning("storing %d accounting entries failed (%s); retrying", len(batch), exc)
            return False
        except Exception:
            if len(batch) > 1:
                # Not the backend's state but an entry it refuses: retry this batch entry by
                # entry, so only that entry is lost, not the batch, and the queue moves on.
                self._queue.extendleft(reversed(batch))
                self._isolate_to = batch[-1][0]
                return True
            m.ACCOUNTING.labels("dropped").inc()
            log.exception("the backend refused an accounting entry; dropped %r", batch[0][1])
        else:
            m.ACCOUNTING.labels("stored").inc(len(batch))
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (retrying for up to ``timeout_s``), then stop."""
        deadline = time.monotonic() + timeout_s
        task, self._task = self._task, None
        self._closing = True
        self._wake.set()
        self._flush.set()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        while self._queue and time.monotonic() < deadline:
            if not await self._write_batch():
                await asyncio.sleep(RETRY_S)
        if self._queue:
            m.ACCOUNTING.labels("dropped").inc(len(self._queue))
            log.error("shutting down with %d accounting entries not stored", len(self._queue))
