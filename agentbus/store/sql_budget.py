"""Budget accounting on SQLite and PostgreSQL, sharing the engines and ``_tx`` of a SQLStore.

Atomicity: a reservation runs in one write transaction that first upserts every counter row
it needs (one ``INSERT .. ON CONFLICT DO UPDATE .. RETURNING``, rows in sorted scope order). On
PostgreSQL the upsert takes the row lock, so concurrent calls on a scope queue behind each
other and two calls on overlapping scopes lock them in the same order (no deadlock); on
SQLite every write transaction is ``BEGIN IMMEDIATE``, which holds the database write lock
across processes. Roll, admit and reserve (:mod:`agentbus.broker.budget`) then run in Python
on the locked rows, and the new values are written before the lock is released, so the sum
of admitted reservations can never pass a limit.

Settle deletes the reservation row first and only touches the counters if that delete
removed it: a second settle (or a sweep racing a settle) finds nothing and changes nothing.

The counter row remembers the ``window_s`` of the limits it was last reserved under, because
settle and sweep have no limits to roll with, only the reservation.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from agentbus.broker import budget as b
from agentbus.broker.budget import Amount, Counter, Denial, Limits
from agentbus.store.base import BudgetStore, Reservation, UsageRecord
from agentbus.store.schema import budget_counters, budget_reservations, usage

if TYPE_CHECKING:
    from agentbus.store.sql import SQLStore

# Sweep releases at most this many reservations per transaction, so one sweep after an
# outage never holds the write lock for long.
SWEEP_BATCH = 500

_COUNTER_FIELDS = b.COUNTER_FIELDS


# (scopes, reserved, actual, reserved_at, release)
_SettleItem = tuple[list[str], Amount, Amount, float, bool]
_RES_COLS = (
    budget_reservations.c.scopes,
    budget_reservations.c.tokens,
    budget_reservations.c.cost,
    budget_reservations.c.created_at,
)


def _settle_item(row: Any, actual: Amount, release: bool) -> _SettleItem:
    reserved = Amount(int(row.tokens), float(row.cost))
    return (json.loads(row.scopes), reserved, actual, float(row.created_at), release)


class SQLBudgetStore(BudgetStore):
    def __init__(self, sql: SQLStore) -> None:
        self.sql = sql

    # ------------------------------------------------------------------ counters
    async def _lock_counters(self, conn: AsyncConnection, scopes: dict[str, Limits]) -> dict[str, Counter]:
        """Create the scopes' rows if missing and lock them; returns them as stored (not rolled).

        One statement for all scopes, its rows in sorted order: PostgreSQL inserts (or, on a
        conflict, locks) the rows of a VALUES list in that order, so two calls on overlapping
        scopes always lock them in the same order. The no-op ``DO UPDATE`` (rather than ``DO
        NOTHING``) is what makes it lock an existing row and return it in one round trip.
        """
        zero = _counter_row(Counter())
        rows = [{"scope": key, "window_s": scopes[key].window_s, **zero} for key in sorted(scopes)]
        stmt = self.sql._insert(budget_counters).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope"], set_={"window_s": budget_counters.c.window_s}
        ).returning(*budget_counters.c)
        return {r.scope: _counter(r) for r in (await conn.execute(stmt)).all()}

    async def _load_for_settle(self, conn: AsyncConnection, scope: str) -> tuple[Counter, float] | None:
        q = select(budget_counters).where(budget_counters.c.scope == scope)
        if not self.sql.is_sqlite:
            q = q.with_for_update()
        row = (await conn.execute(q)).first()
        return None if row is None else (_counter(row), float(row.window_s))

    async def _store_counters(self, conn: AsyncConnection, rows: list[tuple[str, float, Counter]]) -> None:
        """(scope, window_s, counter) rows in one executemany: fewer round trips while the
        rows are locked."""
        params = []
        for scope, window_s, counter in rows:
            row = {"scope": scope, "window_s": window_s, **_counter_row(counter)}
            params.append({f"b_{k}": v for k, v in row.items()})
        await conn.execute(
            update(budget_counters)
            .where(budget_counters.c.scope == bindparam("b_scope"))
            .values({c: bindparam(f"b_{c}") for c in ("window_s", *_COUNTER_FIELDS)}),
            params,
        )

    async def _store_counter(self, conn: AsyncConnection, scope: str, counter: Counter) -> None:
        await conn.execute(
            update(budget_counters).where(budget_counters.c.scope == scope).values(**_counter_row(counter))
        )

    # ------------------------------------------------------------------ reserve / settle
    async def reserve(
        self, scopes: dict[str, Limits], amount: Amount, now: float, ttl_s: float
    ) -> Reservation | Denial:
        if not scopes:
            raise ValueError("reserve needs at least one scope")
        keys = sorted(scopes)
        async with self.sql._tx() as conn:
            stored = await self._lock_counters(conn, scopes)
            charged: list[tuple[str, float, Counter]] = []
            for key in keys:
                limits = scopes[key]
                counter = b.roll(stored[key], limits, now)
                denial = b.admit(key, counter, limits, amount, now)
                if denial is not None:
                    # Nothing written: the transaction ends with only the (harmless) zero
                    # rows the upsert may have created.
                    return denial
                charged.append((key, limits.window_s, b.reserve(counter, amount)))
            await self._store_counters(conn, charged)
            res = Reservation(
                id=uuid.uuid4().hex,
                scopes=tuple(keys),
                amount=amount,
                created_at=now,
                expires_at=now + ttl_s,
            )
            await conn.execute(
                insert(budget_reservations).values(
                    id=res.id,
                    scopes=json.dumps(list(res.scopes)),
                    tokens=amount.tokens,
                    cost=amount.cost,
                    created_at=res.created_at,
                    expires_at=res.expires_at,
                )
            )
        return res

    async def charge(self, scopes: dict[str, Limits], actual: Amount, now: float, *, release: bool = False) -> None:
        if not scopes:
            raise ValueError("charge needs at least one scope")
        await self.account([b.Charge(scopes, actual, now, release)], [])

    atomic_batches = True

    async def account(self, charges: Sequence[b.Charge], records: Sequence[UsageRecord]) -> None:
        """One transaction for the batch: the counters of all its scopes locked once (in
        scope order, like every other writer), charged in order, stored in one statement."""
        if not charges and not records:
            return
        async with self.sql._tx() as conn:
            if charges:
                scopes = {key: lim for c in charges for key, lim in c.scopes.items()}
                after = b.apply_charges(await self._lock_counters(conn, scopes), charges)
                await self._store_counters(conn, [(key, w, c) for key, (w, c) in sorted(after.items())])
            if records:
                await conn.execute(insert(usage), [r.to_json() for r in records])

    async def settle(self, reservation: Reservation, actual: Amount, now: float, *, release: bool = False) -> bool:
        async with self.sql._tx() as conn:
            row = (
                await conn.execute(
                    delete(budget_reservations).where(budget_reservations.c.id == reservation.id).returning(*_RES_COLS)
                )
            ).first()
            if row is None:
                return False
            # The stored amount and scopes are the truth, not what the caller kept.
            await self._apply_settles(conn, [_settle_item(row, actual, release)], now)
        return True

    async def _apply_settles(self, conn: AsyncConnection, items: Iterable[_SettleItem], now: float) -> None:
        """Apply settle() for deleted reservations, locking each counter once, in sorted order."""
        per_scope: dict[str, list[_SettleItem]] = {}
        for item in items:
            for scope in item[0]:
                per_scope.setdefault(scope, []).append(item)
        for scope in sorted(per_scope):
            loaded = await self._load_for_settle(conn, scope)
            if loaded is None:
                continue  # the scope row is gone; there is nothing to give back
            counter, window_s = loaded
            counter = b.roll(counter, Limits(window_s=window_s), now)
            for _, reserved, actual, reserved_at, release in per_scope[scope]:
                counter = b.settle(
                    counter, reserved, actual, reserved_at=reserved_at, window_s=window_s, release=release
                )
            await self._store_counter(conn, scope, counter)

    async def sweep(self, now: float) -> int:
        total = 0
        while True:
            async with self.sql._tx() as conn:
                q = (
                    select(budget_reservations.c.id)
                    .where(budget_reservations.c.expires_at < now)
                    .order_by(budget_reservations.c.id)
                    .limit(SWEEP_BATCH)
                )
                if not self.sql.is_sqlite:
                    # Concurrent sweeps (one per process) split the work instead of queueing.
                    q = q.with_for_update(skip_locked=True)
                ids = list((await conn.execute(q)).scalars())
                if not ids:
                    return total
                rows = (
                    await conn.execute(
                        delete(budget_reservations).where(budget_reservations.c.id.in_(ids)).returning(*_RES_COLS)
                    )
                ).all()
                await self._apply_settles(conn, [_settle_item(r, Amount(), True) for r in rows], now)
                total += len(rows)
            if len(ids) < SWEEP_BATCH:
                return total

    # ------------------------------------------------------------------ inspection
    async def counters(self, scopes: dict[str, Limits], now: float) -> dict[str, Counter]:
        async with self.sql._tx(write=False) as conn:
            rows = (
                await conn.execute(select(budget_counters).where(budget_counters.c.scope.in_(sorted(scopes))))
            ).all()
        stored = {r.scope: _counter(r) for r in rows}
        return {key: b.roll(stored.get(key, Counter()), limits, now) for key, limits in scopes.items()}

    async def reset_scope(self, scope: str) -> None:
        # Zeroed rather than deleted: the row keeps its window_s for settles still in flight.
        async with self.sql._tx() as conn:
            await self._store_counter(conn, scope, Counter())

    # ------------------------------------------------------------------ usage
    async def record_usage(self, rec: UsageRecord) -> None:
        async with self.sql._tx() as conn:
            await conn.execute(insert(usage).values(**rec.to_json()))

    async def usage(
        self, tenant: str | None, subject: str | None, limit: int, before: float | None = None
    ) -> list[UsageRecord]:
        q = select(usage).order_by(usage.c.at.desc(), usage.c.id.desc()).limit(limit)
        if tenant is not None:
            q = q.where(usage.c.tenant == tenant)
        if subject is not None:
            q = q.where(usage.c.subject == subject)
        if before is not None:
            q = q.where(usage.c.at < before)
        async with self.sql._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [_usage(r) for r in rows]


def _counter_row(c: Counter) -> dict[str, Any]:
    return {f: getattr(c, f) for f in _COUNTER_FIELDS}


def _counter(row: Any) -> Counter:
    return Counter(
        window_start=float(row.window_start),
        tokens=int(row.tokens),
        cost=float(row.cost),
        requests=int(row.requests),
        minute_start=float(row.minute_start),
        minute_requests=int(row.minute_requests),
        minute_tokens=int(row.minute_tokens),
        inflight=int(row.inflight),
    )


def _usage(row: Any) -> UsageRecord:
    return UsageRecord(
        at=float(row.at),
        tenant=row.tenant,
        subject=row.subject,
        session=row.session,
        model=row.model,
        upstream_model=row.upstream_model,
        endpoint=row.endpoint,
        route=row.route,
        input_tokens=int(row.input_tokens),
        output_tokens=int(row.output_tokens),
        cost=float(row.cost),
        latency_ms=float(row.latency_ms),
        ttft_ms=None if row.ttft_ms is None else float(row.ttft_ms),
        outcome=row.outcome,
        status=int(row.status),
        stream=bool(row.stream),
    )
