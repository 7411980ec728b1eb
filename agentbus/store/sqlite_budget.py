"""Broker budgets on SQLite: reserve, settle and usage records on the store's writer thread.

Why: through SQLAlchemy + aiosqlite a reserve, a settle and a usage record cost about 20 ms
of CPU together — the largest part of what the broker added to a model call on the embedded
default. Here each is one function on :class:`~agentbus.store.sqlite.SQLiteStore`'s writer
thread (one thread hop, prepared statements). The rules are those of
:mod:`agentbus.store.sql_budget` (whose docstring explains the atomicity) and the arithmetic
is :mod:`agentbus.broker.budget`; inspection, sweep and reset stay on the SQLAlchemy path.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agentbus.broker import budget as b
from agentbus.broker.budget import Amount, Counter, Denial, Limits
from agentbus.store.base import Reservation, UsageRecord
from agentbus.store.sql_budget import SQLBudgetStore

if TYPE_CHECKING:
    from agentbus.store.sqlite import SQLiteStore

_FIELDS = b.COUNTER_FIELDS
_COLS = ", ".join(_FIELDS)

LOCK_COUNTER = (
    f"INSERT INTO budget_counters (scope, window_s, {_COLS}) VALUES (?, ?{', ?' * len(_FIELDS)}) "
    f"ON CONFLICT (scope) DO UPDATE SET window_s = window_s RETURNING {_COLS}"
)
STORE_COUNTER = f"UPDATE budget_counters SET window_s = ?, {', '.join(f'{f} = ?' for f in _FIELDS)} WHERE scope = ?"
LOAD_COUNTER = f"SELECT window_s, {_COLS} FROM budget_counters WHERE scope = ?"
SETTLE_COUNTER = f"UPDATE budget_counters SET {', '.join(f'{f} = ?' for f in _FIELDS)} WHERE scope = ?"
ADD_RESERVATION = (
    "INSERT INTO budget_reservations (id, scopes, tokens, cost, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)"
)
TAKE_RESERVATION = "DELETE FROM budget_reservations WHERE id = ? RETURNING scopes, tokens, cost, created_at"
_USAGE_FIELDS = tuple(UsageRecord.__dataclass_fields__)
ADD_USAGE = f"INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) VALUES ({', '.join('?' * len(_USAGE_FIELDS))})"


class SQLiteBudgetStore(SQLBudgetStore):
    sql: SQLiteStore

    async def reserve(
        self, scopes: dict[str, Limits], amount: Amount, now: float, ttl_s: float
    ) -> Reservation | Denial:
        if not scopes:
            raise ValueError("reserve needs at least one scope")
        # Neither a reservation nor its settle is fsync'd on its own (see SQLiteStore._run):
        # the call's usage record, which the accountant writes durably within LINGER_S of
        # the answer, fsyncs them with it. Until then an OS crash (not an application
        # crash) can lose them: the call then counts as released, like a call whose usage
        # record was lost.
        return await self.sql._run(_reserve, scopes, amount, now, ttl_s, durable=False)

    async def settle(self, reservation: Reservation, actual: Amount, now: float, *, release: bool = False) -> bool:
        return await self.sql._run(_settle, reservation.id, actual, now, release, durable=False)

    async def counters(self, scopes: dict[str, Limits], now: float) -> dict[str, Counter]:
        # On the writer thread too: through SQLAlchemy + aiosqlite the broker's once-a-second
        # budget gauge read per principal took ~13% of a busy worker (py-spy, 16 callers).
        # Durable as any transaction: it writes nothing, so its COMMIT has nothing to fsync.
        return await self.sql._run(_counters, scopes, now)

    async def record_usage(self, rec: UsageRecord) -> None:
        await self.sql._run(_add_usage, rec)

    async def account(self, charges: Sequence[b.Charge], records: Sequence[UsageRecord]) -> None:
        if charges or records:
            await self.sql._run(_account, charges, records)


def _stored(conn: sqlite3.Connection, key: str, limits: Limits) -> Counter:
    """The scope's counter as stored, created if missing (the transaction holds the write
    lock, so it stays ours until the commit)."""
    zero = tuple(getattr(Counter(), f) for f in _FIELDS)
    row = conn.execute(LOCK_COUNTER, (key, limits.window_s, *zero)).fetchone()
    return Counter(**dict(zip(_FIELDS, row, strict=True)))


def _loaded(conn: sqlite3.Connection, key: str) -> tuple[float, Counter] | None:
    """The scope's window and counter as stored, or None if it has no row."""
    row = conn.execute(LOAD_COUNTER, (key,)).fetchone()
    if row is None:
        return None
    return float(row[0]), Counter(**dict(zip(_FIELDS, row[1:], strict=True)))


def _locked(conn: sqlite3.Connection, key: str, limits: Limits, now: float) -> Counter:
    """The scope's counter, created if missing, rolled to ``now``."""
    return b.roll(_stored(conn, key, limits), limits, now)


def _store(conn: sqlite3.Connection, rows: list[tuple[str, float, Counter]]) -> None:
    conn.executemany(STORE_COUNTER, [(w, *(getattr(c, f) for f in _FIELDS), key) for key, w, c in rows])


def _reserve(
    conn: sqlite3.Connection, scopes: dict[str, Limits], amount: Amount, now: float, ttl_s: float
) -> Reservation | Denial:
    keys = sorted(scopes)
    charged: list[tuple[str, float, Counter]] = []
    for key in keys:
        limits = scopes[key]
        counter = _locked(conn, key, limits, now)
        denial = b.admit(key, counter, limits, amount, now)
        if denial is not None:
            # Nothing written but the (harmless) zero rows the upsert may have created.
            return denial
        charged.append((key, limits.window_s, b.reserve(counter, amount)))
    _store(conn, charged)
    res = Reservation(id=uuid.uuid4().hex, scopes=tuple(keys), amount=amount, created_at=now, expires_at=now + ttl_s)
    conn.execute(
        ADD_RESERVATION, (res.id, json.dumps(list(res.scopes)), amount.tokens, amount.cost, now, res.expires_at)
    )
    return res


def _settle(conn: sqlite3.Connection, reservation_id: str, actual: Amount, now: float, release: bool) -> bool:
    row = conn.execute(TAKE_RESERVATION, (reservation_id,)).fetchone()
    if row is None:
        return False  # settled or swept already: nothing changes twice
    scopes_json, tokens, cost, reserved_at = row
    # The stored amount and scopes are the truth, not what the caller kept.
    reserved = Amount(int(tokens), float(cost))
    for scope in sorted(json.loads(scopes_json)):
        loaded = _loaded(conn, scope)
        if loaded is None:
            continue  # the scope row is gone; there is nothing to give back
        window_s, stored = loaded
        counter = b.roll(stored, Limits(window_s=window_s), now)
        counter = b.settle(counter, reserved, actual, reserved_at=reserved_at, window_s=window_s, release=release)
        conn.execute(SETTLE_COUNTER, (*(getattr(counter, f) for f in _FIELDS), scope))
    return True


def _counters(conn: sqlite3.Connection, scopes: dict[str, Limits], now: float) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for key, limits in scopes.items():
        loaded = _loaded(conn, key)
        out[key] = b.roll(loaded[1] if loaded is not None else Counter(), limits, now)
    return out


def _add_usage(conn: sqlite3.Connection, rec: UsageRecord) -> None:
    conn.execute(ADD_USAGE, tuple(getattr(rec, f) for f in _USAGE_FIELDS))


def _account(conn: sqlite3.Connection, charges: Sequence[b.Charge], records: Sequence[UsageRecord]) -> None:
    if charges:
        scopes = {key: lim for c in charges for key, lim in c.scopes.items()}
        stored = {key: _stored(conn, key, lim) for key, lim in sorted(scopes.items())}
        _store(conn, [(key, w, c) for key, (w, c) in sorted(b.apply_charges(stored, charges).items())])
    if records:
        conn.executemany(ADD_USAGE, [tuple(getattr(r, f) for f in _USAGE_FIELDS) for r in records])
