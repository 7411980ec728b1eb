"""agentbus.store.coalesce: calls that would queue for the same lock go out as one batch.

A stand-in "space" applies calls in order and hands out gap-free seqs, as the PostgreSQL
space lock does; ``one`` and ``many`` yield to the loop so other calls can arrive while they
run. The PostgreSQL side (one transaction per batch) is tested in test_pg_commit_path.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus.store.coalesce import Coalescer


class Space:
    """Applies calls one after the other; a call's result is the seq it got."""

    def __init__(self, delay: Callable[[], float] = lambda: 0.0) -> None:
        self.applied: list[tuple[str, Any]] = []
        self.ones: list[Any] = []
        self.manys: list[list[Any]] = []
        self.in_flight: dict[str, int] = {}
        self.most_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.fail_many: BaseException | None = None
        self.delay = delay

    @contextlib.asynccontextmanager
    async def _flight(self, lane: str) -> AsyncIterator[None]:
        """Counts the lane's calls in flight (a cancelled one included, until it leaves)."""
        self.in_flight[lane] = self.in_flight.get(lane, 0) + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[lane])
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay())
            yield
        finally:
            self.in_flight[lane] -= 1

    async def one(self, arg: tuple[str, Any]) -> int:
        self.ones.append(arg)
        async with self._flight(arg[0]):
            if arg[1] == "bad":
                raise ValueError("this call fails on its own")
            self.applied.append(arg)
            return len(self.applied)

    async def many(self, args: list[tuple[str, Any]]) -> list[int]:
        lane = args[0][0]
        assert all(a[0] == lane for a in args), "a batch mixed lanes"
        self.manys.append(list(args))
        async with self._flight(lane):
            if self.fail_many is not None:
                raise self.fail_many
            if any(a[1] == "bad" for a in args):
                raise ValueError("one call of the batch fails; the batch changes nothing")
            out = []
            for a in args:
                self.applied.append(a)
                out.append(len(self.applied))
            return out


def coalescer(space: Space, *, alone: bool = True, **kw: Any) -> Coalescer[tuple[str, Any], int]:
    return Coalescer(space.one, space.many, alone=lambda exc: alone, **kw)


def gated(**kw: Any) -> tuple[Space, Coalescer[tuple[str, Any], int]]:
    """A space whose calls wait at its gate until the test opens it, and a coalescer on it."""
    space = Space()
    space.gate = asyncio.Event()
    return space, coalescer(space, **kw)


async def submitted(c: Coalescer[tuple[str, Any], int], lane: str, values: Any) -> list[asyncio.Task[int]]:
    """One call per value, submitted in order; returns once each has started or queued."""
    tasks = [asyncio.create_task(c.submit(lane, (lane, v))) for v in values]
    await asyncio.sleep(0.01)
    return tasks


async def settle(c: Coalescer[Any, Any]) -> None:
    """Waits for the drains (one may still run the call of a waiter cancelled after its
    batch was taken), then checks nothing is left behind."""
    while c._drains:
        await asyncio.gather(*c._drains)
    for _ in range(3):
        await asyncio.sleep(0)
    assert c._lanes == {}


def test_a_lone_call_runs_at_once_as_a_single_call() -> None:
    async def main() -> None:
        space = Space()
        c = coalescer(space)
        assert await c.submit("a", ("a", 1)) == 1
        assert await c.submit("a", ("a", 2)) == 2
        assert (space.ones, space.manys) == ([("a", 1), ("a", 2)], [])
        await settle(c)

    asyncio.run(main())


def test_calls_that_arrive_while_the_slots_are_busy_go_out_together_in_arrival_order() -> None:
    async def main() -> None:
        space, c = gated(slots=2)
        tasks = await submitted(c, "a", range(7))
        assert space.ones == [("a", 0), ("a", 1)] and space.manys == []
        space.gate.set()
        got = await asyncio.gather(*tasks)
        # The two singles apply first (seqs 1, 2); the five that waited form one batch.
        assert space.manys == [[("a", i) for i in range(2, 7)]]
        assert sorted(got[:2]) == [1, 2] and got[2:] == [3, 4, 5, 6, 7]
        assert space.most_in_flight == 2
        assert (c.singles, c.batches, c.batched) == (2, 1, 5)
        await settle(c)

    asyncio.run(main())


def test_a_batch_carries_at_most_max_batch_calls() -> None:
    async def main() -> None:
        space, c = gated(slots=1, max_batch=4)
        tasks = await submitted(c, "a", range(10))
        space.gate.set()
        assert await asyncio.gather(*tasks) == list(range(1, 11))
        assert [len(b) for b in space.manys] == [4, 4]
        assert space.ones == [("a", 0), ("a", 9)]  # the last one left alone: a single call
        await settle(c)

    asyncio.run(main())


def test_lanes_do_not_wait_for_each_other() -> None:
    async def main() -> None:
        space, c = gated(slots=1)
        [held] = await submitted(c, "a", [1])
        [other] = await submitted(c, "b", [1])
        assert ("b", 1) in space.ones  # went out at once, although lane a is busy
        space.gate.set()
        await asyncio.gather(held, other)
        await settle(c)

    asyncio.run(main())


@pytest.mark.parametrize("alone", [True, False])
def test_a_failed_batch_is_retried_call_by_call_or_fails_every_waiter(alone: bool) -> None:
    async def main() -> None:
        space, c = gated(slots=1, alone=alone)
        first, *waiting = await submitted(c, "a", ["first", "x", "bad", "y"])
        space.gate.set()
        got = await asyncio.gather(first, *waiting, return_exceptions=True)
        assert got[0] == 1
        assert len(space.manys) == 1
        if alone:
            # Each call found out alone: only the bad one fails, the others apply.
            assert got[1] == 2 and isinstance(got[2], ValueError) and got[3] == 3
            assert [a[1] for a in space.applied] == ["first", "x", "y"]
        else:
            assert all(isinstance(g, ValueError) for g in got[1:])
            assert [a[1] for a in space.applied] == ["first"]
        await settle(c)

    asyncio.run(main())


def test_a_waiter_cancelled_before_its_batch_leaves_the_batch() -> None:
    async def main() -> None:
        space, c = gated(slots=1)
        first, *waiting = await submitted(c, "a", [0, 1, 2, 3])
        waiting[1].cancel()
        space.gate.set()
        got = await asyncio.gather(first, *waiting, return_exceptions=True)
        assert got[0] == 1 and got[1] == 2 and isinstance(got[2], asyncio.CancelledError) and got[3] == 3
        assert space.manys == [[("a", 1), ("a", 3)]]
        await settle(c)

    asyncio.run(main())


def test_a_cancelled_single_call_still_hands_its_slot_on() -> None:
    async def main() -> None:
        space, c = gated(slots=1)
        first, *later = await submitted(c, "a", [0, 1, 2])
        first.cancel()
        await asyncio.sleep(0.01)
        space.gate.set()
        assert await asyncio.gather(*later) == [1, 2]
        await settle(c)

    asyncio.run(main())


def test_bad_sizes_are_refused() -> None:
    space = Space()
    with pytest.raises(ValueError):
        coalescer(space, slots=0)
    with pytest.raises(ValueError):
        coalescer(space, max_batch=0)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.sampled_from("ab"), st.floats(0, 0.002), st.booleans()), min_size=1, max_size=40),
    slots=st.integers(1, 3),
    max_batch=st.integers(1, 8),
    delays=st.lists(st.floats(0, 0.002), min_size=1, max_size=8),
)
def test_every_call_gets_its_own_result_exactly_once(
    arrivals: list[tuple[str, float, bool]], slots: int, max_batch: int, delays: list[float]
) -> None:
    """Random arrival times, call durations and cancellations: every call that was not
    cancelled is applied exactly once and gets the seq its own application got; a lane
    never has more than ``slots`` calls in flight; nothing is left behind."""

    async def main() -> None:
        it = iter(delays * 100)
        space = Space(delay=lambda: next(it, 0.0))
        c = coalescer(space, slots=slots, max_batch=max_batch)

        async def call(i: int, lane: str, wait: float) -> int:
            await asyncio.sleep(wait)
            return await c.submit(lane, (lane, i))

        tasks = [asyncio.create_task(call(i, lane, wait)) for i, (lane, wait, _) in enumerate(arrivals)]
        for t, (_, wait, cancel) in zip(tasks, arrivals, strict=True):
            if cancel:
                asyncio.get_running_loop().call_later(wait + 0.0005, t.cancel)
        got = await asyncio.gather(*tasks, return_exceptions=True)
        seq_of = {a: n for n, a in enumerate(space.applied, start=1)}
        assert len(seq_of) == len(space.applied), "a call was applied twice"
        for i, ((lane, _, _), g) in enumerate(zip(arrivals, got, strict=True)):
            if isinstance(g, asyncio.CancelledError):
                continue  # it may or may not have been applied: its caller left
            assert seq_of[(lane, i)] == g
        assert space.most_in_flight <= slots
        assert all(len(b) <= max_batch for b in space.manys)
        await settle(c)

    asyncio.run(main())


def test_a_drain_cancelled_mid_batch_never_sends_that_batch_again() -> None:
    """The batch in flight may have taken effect: its callers are cancelled, not retried
    alone; the calls still waiting run alone."""

    async def main() -> None:
        first_may_finish = asyncio.Event()
        ones: list[int] = []
        manys: list[list[int]] = []

        async def one(arg: int) -> int:
            ones.append(arg)
            if arg == 0:
                await first_may_finish.wait()
            return arg

        async def many(args: list[int]) -> list[int]:
            manys.append(args)
            await asyncio.Event().wait()  # never answers
            raise AssertionError("unreachable")

        c: Coalescer[int, int] = Coalescer(one, many, alone=lambda exc: True, slots=1, max_batch=2)
        tasks = [asyncio.create_task(c.submit("a", n)) for n in range(4)]
        await asyncio.sleep(0.01)
        first_may_finish.set()
        assert await tasks[0] == 0
        await asyncio.sleep(0.01)
        assert manys == [[1, 2]]
        [drain] = c._drains
        drain.cancel()
        got = await asyncio.gather(*tasks[1:], return_exceptions=True)
        assert isinstance(got[0], asyncio.CancelledError) and isinstance(got[1], asyncio.CancelledError)
        assert got[2] == 3 and ones == [0, 3]  # 3 had not been sent: it ran alone
        await settle(c)

    asyncio.run(main())
