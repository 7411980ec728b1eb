"""Coalescing of calls that serialise on the same lock anyway.

Why: on PostgreSQL every commit of a space takes the space's row lock and holds it through
its WAL flush, so a busy space runs its commits one at a time whatever the number of
connections. Sending them one transaction each only adds lock hand-overs, flushes and
backends queued on the lock (and, on a small machine, lock holders descheduled by the very
processes waiting for them). A :class:`Coalescer` keeps at most ``slots`` calls per lane
(per space) in flight from this process; a call that arrives while they are all busy waits,
and when a slot frees, everything that waited goes out as one batch (one round trip, one
transaction, one lock acquisition, one flush).

A lone call is never delayed: with a free slot it runs at once, as the single call it was
before. Batches form only under load, and only from calls that would otherwise have waited
for the same lock.

What a batch means is the business of ``many``: it must return one result per argument,
in the arguments' order, as if the calls had run one after the other (in an order of its
choosing); if it fails, nothing of it may have taken effect. Then each waiter either gets
that exception (``alone(exc)`` false: e.g. the connection is gone, every call would fail
the same way) or runs its call alone (``alone`` true: e.g. one call in the batch hit an
error, which must not fail the others).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

# A waiter's result that says: the batch failed in a way that is yours to find out alone.
_ALONE = object()


@dataclass(slots=True, eq=False)
class _Lane(Generic[A]):
    busy: int = 0
    waiting: deque[tuple[A, asyncio.Future[object]]] = field(default_factory=deque)


class Coalescer(Generic[A, R]):
    """Runs ``one(arg)`` at once while a lane has a free slot, else batches through ``many``."""

    def __init__(
        self,
        one: Callable[[A], Awaitable[R]],
        many: Callable[[list[A]], Awaitable[list[R]]],
        *,
        alone: Callable[[BaseException], bool],
        slots: int = 1,
        max_batch: int = 64,
    ) -> None:
        if slots < 1 or max_batch < 1:
            raise ValueError("slots and max_batch must be at least 1")
        self._one = one
        self._many = many
        self._alone = alone
        self.slots = slots
        self.max_batch = max_batch
        self._lanes: dict[Hashable, _Lane[A]] = {}
        self._drains: set[asyncio.Task[None]] = set()
        # What happened, for tests and the benchmark notes: calls run alone, batches sent,
        # calls sent in batches.
        self.singles = self.batches = self.batched = 0

    async def submit(self, lane_key: Hashable, arg: A) -> R:
        lane = self._lanes.get(lane_key)
        if lane is None:
            lane = self._lanes[lane_key] = _Lane()
        if lane.busy < self.slots:
            lane.busy += 1
            try:
                self.singles += 1
                return await self._one(arg)
            finally:
                self._release(lane_key, lane)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        lane.waiting.append((arg, fut))
        got = await fut
        if got is _ALONE:
            self.singles += 1
            return await self._one(arg)
        return got  # type: ignore[return-value]

    def _release(self, lane_key: Hashable, lane: _Lane[A]) -> None:
        """A slot is free: hand it to whoever waits, or give it back."""
        if lane.waiting:
            task = asyncio.get_running_loop().create_task(self._drain(lane_key, lane))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
            return
        lane.busy -= 1
        if lane.busy == 0 and self._lanes.get(lane_key) is lane:
            del self._lanes[lane_key]

    async def _drain(self, lane_key: Hashable, lane: _Lane[A]) -> None:
        """Send what waits, batch after batch, until nothing does; the slot is ours meanwhile."""
        batch: list[tuple[A, asyncio.Future[object]]] = []
        try:
            while True:
                batch = self._take(lane)
                if not batch:
                    return
                await self._send(batch)
        except BaseException:
            # Cancelled (the loop is closing). The batch in flight may or may not have taken
            # effect: its callers are cancelled too, never sent again. Nobody may be left
            # waiting for a slot: what had not been sent runs alone.
            for _, fut in batch:
                fut.cancel()
            for _, fut in lane.waiting:
                if not fut.done():
                    fut.set_result(_ALONE)
            lane.waiting.clear()
            raise
        finally:
            lane.busy -= 1
            if lane.busy == 0 and not lane.waiting and self._lanes.get(lane_key) is lane:
                del self._lanes[lane_key]

    def _take(self, lane: _Lane[A]) -> list[tuple[A, asyncio.Future[object]]]:
        """The next batch: what waits, oldest first."""
        batch: list[tuple[A, asyncio.Future[object]]] = []
        while lane.waiting and len(batch) < self.max_batch:
            item = lane.waiting.popleft()
            if not item[1].done():  # its request was cancelled while waiting
                batch.append(item)
        return batch

    async def _send(self, batch: list[tuple[A, asyncio.Future[object]]]) -> None:
        outcome: list[object]
        if len(batch) == 1:
            # One is one: the single call, and its own exception if it fails.
            try:
                self.singles += 1
                outcome = [await self._one(batch[0][0])]
            except Exception as exc:
                fut = batch[0][1]
                if not fut.done():
                    fut.set_exception(exc)
                return
        else:
            try:
                self.batches += 1
                self.batched += len(batch)
                outcome = list(await self._many([arg for arg, _ in batch]))
                if len(outcome) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} calls returned {len(outcome)} results")
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        if self._alone(exc):
                            fut.set_result(_ALONE)
                        else:
                            fut.set_exception(exc)
                return
        for (_, fut), got in zip(batch, outcome, strict=True):
            if not fut.done():
                fut.set_result(got)
