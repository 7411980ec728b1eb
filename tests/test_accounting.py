"""The broker's accounting queue (:mod:`agentbus.broker.accounting`): counts and usage
records written after the answer, batched, retried through outages, never silently lost.

A stand-in backend records every ``account`` call, so the tests can see batches, order and
retries; the real backends' ``account`` is tested in ``test_budget_store.py``, and the broker
end to end (its counts exact after load) in ``test_broker*.py`` and ``bench.broker``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from agentbus.broker import accounting as acc
from agentbus.broker.budget import Amount, Charge, Limits
from agentbus.core.errors import BackendUnavailable
from agentbus.store.base import UsageRecord


def rec(i: int) -> UsageRecord:
    return UsageRecord(
        at=1000.0 + i,
        tenant="t",
        subject="a",
        session="s",
        model="m",
        upstream_model="m",
        endpoint="e",
        route="default",
        input_tokens=i,
        output_tokens=0,
        cost=0.0,
        latency_ms=1.0,
        ttft_ms=None,
        outcome="ok",
        status=200,
        stream=False,
    )


class Backend:
    """Writes into lists; fails the next ``outages`` calls with a 503, and refuses (a plain
    error) any batch holding a record whose input_tokens is in ``poison``."""

    def __init__(self, *, atomic: bool = True) -> None:
        self.atomic_batches = atomic
        self.calls: list[tuple[int, int]] = []  # (charges, records) per successful call
        self.charges: list[Charge] = []
        self.records: list[int] = []
        self.outages = 0
        self.poison: set[int] = set()
        self.gate: asyncio.Event | None = None

    async def account(self, charges: Sequence[Charge], records: Sequence[UsageRecord]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.outages:
            self.outages -= 1
            raise BackendUnavailable("backend away")
        if any(r.input_tokens in self.poison for r in records):
            raise ValueError("refused")
        self.calls.append((len(charges), len(records)))
        self.charges.extend(charges)
        self.records.extend(r.input_tokens for r in records)


def run(body: Any) -> Any:
    return asyncio.run(body())


def accountant(backend: Backend) -> acc.Accountant:
    return acc.Accountant(lambda: backend)  # type: ignore[arg-type, return-value]


async def writing_entry_0(backend: Backend) -> acc.Accountant:
    """A started accountant whose writer has taken entry 0 and waits at the backend's gate
    (needs ``LINGER_S = 0``, so the writer takes it at once)."""
    a = accountant(backend)
    backend.gate = asyncio.Event()
    a.start()
    a.record(rec(0))
    await asyncio.sleep(0.01)
    return a


CHARGE = ({"t:t": Limits()}, Amount(3, 0.5))


def test_a_burst_shares_its_writes_and_keeps_its_order() -> None:
    backend = Backend()

    async def body() -> None:
        a = accountant(backend)
        a.start()
        backend.gate = asyncio.Event()
        for i in range(100):
            a.charge(*CHARGE, 1000.0 + i)
            a.record(rec(i))
        backend.gate.set()
        assert await a.drain(5)
        assert backend.records == list(range(100))
        assert [c.at for c in backend.charges] == [1000.0 + i for i in range(100)]
        # The writer was busy with the first entry while the rest queued: a few calls, not 200.
        assert len(backend.calls) <= 3, backend.calls
        await a.close()

    run(body)


def test_a_trickle_shares_one_write_and_drain_does_not_wait_out_the_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    # One client calling in a loop: entries arrive one by one with the writer idle. They
    # wait for company (the linger) and go in one write; a reader's drain ends the wait.
    monkeypatch.setattr(acc, "LINGER_S", 60.0)
    backend = Backend()

    async def body() -> None:
        a = accountant(backend)
        a.start()
        for i in range(5):
            a.record(rec(i))
            await asyncio.sleep(0.01)
        assert backend.calls == []
        assert await a.drain(5)
        assert backend.calls == [(0, 5)]
        await a.close()

    run(body)


def test_a_full_batch_is_written_without_lingering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "LINGER_S", 60.0)
    monkeypatch.setattr(acc, "MAX_BATCH", 4)
    backend = Backend()

    async def body() -> None:
        a = accountant(backend)
        a.start()
        for i in range(4):
            a.record(rec(i))
            await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if backend.calls:
                break
        assert backend.calls == [(0, 4)]
        await a.close()

    run(body)


def test_non_atomic_backend_gets_one_entry_per_call() -> None:
    backend = Backend(atomic=False)

    async def body() -> None:
        a = accountant(backend)
        for i in range(5):
            a.record(rec(i))
            a.charge(*CHARGE, 1000.0)
        assert await a.drain(5)
        assert backend.calls == [(0, 1), (1, 0)] * 5
        await a.close()

    run(body)


def test_outage_is_retried_and_drain_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "RETRY_S", 0.01)
    backend = Backend()
    backend.outages = 4

    async def body() -> None:
        a = accountant(backend)
        for i in range(10):
            a.record(rec(i))
        assert await a.drain(5)
        assert backend.records == list(range(10)) and backend.outages == 0
        await a.close()

    run(body)


def test_drain_gives_up_after_its_timeout_and_close_keeps_trying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "RETRY_S", 0.01)
    monkeypatch.setattr(acc, "RETRY_MAX_S", 0.02)
    backend = Backend()
    backend.outages = 10**9

    async def body() -> None:
        a = accountant(backend)
        a.record(rec(1))
        assert not await a.drain(0.2)
        assert a.queued == 1
        backend.outages = 3  # the backend comes back while shutting down
        await a.close(timeout_s=5)
        assert backend.records == [1] and a.queued == 0

    run(body)


def test_a_refused_entry_is_dropped_alone() -> None:
    backend = Backend()
    backend.poison = {3}

    async def body() -> None:
        a = accountant(backend)
        backend.gate = asyncio.Event()
        for i in range(8):
            a.record(rec(i))
        backend.gate.set()
        assert await a.drain(5)
        assert backend.records == [0, 1, 2, 4, 5, 6, 7]
        # Later entries go in batches again.
        backend.gate = asyncio.Event()
        for i in range(10, 20):
            a.record(rec(i))
        backend.gate.set()
        assert await a.drain(5)
        assert backend.records[-10:] == list(range(10, 20))
        assert len(backend.calls) <= 7 + 3, backend.calls
        await a.close()

    run(body)


def test_a_full_queue_drops_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "MAX_QUEUED", 5)
    monkeypatch.setattr(acc, "LINGER_S", 0.0)  # the writer takes entry 0 at once
    backend = Backend()

    async def body() -> None:
        a = await writing_entry_0(backend)
        for i in range(1, 9):
            a.record(rec(i))
        backend.gate.set()
        assert await a.drain(5)
        assert backend.records == [0, 4, 5, 6, 7, 8]
        await a.close()

    run(body)


def test_drain_waits_for_the_batch_in_flight_even_when_the_queue_overflowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Entry 0 is being written when entries 1-3, which a reader waits for, are dropped by an
    # overflow: the reader must still wait for entry 0, not take the drop for progress.
    monkeypatch.setattr(acc, "MAX_QUEUED", 3)
    monkeypatch.setattr(acc, "LINGER_S", 0.0)
    backend = Backend()

    async def body() -> None:
        a = await writing_entry_0(backend)
        for i in (1, 2, 3):
            a.record(rec(i))
        reader = asyncio.ensure_future(a.drain(5))
        await asyncio.sleep(0)
        for i in (4, 5, 6):
            a.record(rec(i))  # drops 1, 2, 3
        await asyncio.sleep(0.05)
        assert not reader.done(), "drain returned while entry 0 was still being written"
        backend.gate.set()
        assert await reader
        assert 0 in backend.records
        assert await a.drain(5)
        assert backend.records == [0, 4, 5, 6]
        await a.close()

    run(body)


def test_close_writes_what_is_queued() -> None:
    backend = Backend()

    async def body() -> None:
        a = accountant(backend)
        for i in range(7):
            a.record(rec(i))
        await a.close()
        assert backend.records == list(range(7))

    run(body)


def test_an_entry_after_close_is_reported_not_left_behind() -> None:
    backend = Backend()

    async def body() -> None:
        a = accountant(backend)
        a.record(rec(1))
        await a.close()
        a.record(rec(2))  # e.g. a stream that finished past shutdown
        assert a.queued == 0 and a._task is None
        assert backend.records == [1]

    run(body)
