"""Timeline events on SQLite and PostgreSQL, sharing the engines and ``_tx`` of a SQLStore.

Rows are appended in batches by the telemetry flusher (never on a request's path); the
cursor is the row id, which only grows. Retention: :meth:`prune` deletes rows older than
``retention_s`` and, per space, all but the newest ``max_per_space`` rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import delete, func, select

from agentbus.core.errors import ValidationFailed
from agentbus.store.base import TraceEvent, TraceStore
from agentbus.store.schema import trace_events as te

if TYPE_CHECKING:
    from agentbus.store.sql import SQLStore

# The columns of a row handed to SQLStore.append_trace_rows, in order (id is generated).
COLUMNS = ("tenant", "space", "ts", "agent", "session", "kind", "trace_id", "span_id", "data")


class SQLTraceStore(TraceStore):
    def __init__(self, sql: SQLStore, retention_s: float, max_per_space: int) -> None:
        super().__init__(retention_s, max_per_space)
        self.sql = sql

    async def append(self, events: list[TraceEvent]) -> None:
        if not events:
            return
        rows = [
            (e.tenant, e.space, e.ts, e.agent, e.session, e.kind, e.trace_id, e.span_id, orjson.dumps(e.data).decode())
            for e in events
        ]
        await self.sql.append_trace_rows(rows)

    async def events(self, tenant: str, space: str, after: str | None, limit: int) -> list[TraceEvent]:
        q = select(te).where(te.c.tenant == tenant, te.c.space == space).order_by(te.c.id).limit(limit)
        if after:
            q = q.where(te.c.id > _cursor(after))
        async with self.sql._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [_event(r) for r in rows]

    async def prune(self, now: float, spaces: set[tuple[str, str]] | None = None) -> int:
        total = 0
        async with self.sql._tx() as conn:
            res = await conn.execute(delete(te).where(te.c.ts < now - self.retention_s))
            total += max(0, res.rowcount or 0)
            if spaces is None:
                crowded = (
                    await conn.execute(
                        select(te.c.tenant, te.c.space)
                        .group_by(te.c.tenant, te.c.space)
                        .having(func.count() > self.max_per_space)
                    )
                ).all()
            else:
                crowded = sorted(spaces)
            for tenant, space in crowded:
                in_space = (te.c.tenant == tenant) & (te.c.space == space)
                cutoff = (
                    await conn.execute(
                        select(te.c.id).where(in_space).order_by(te.c.id.desc()).offset(self.max_per_space).limit(1)
                    )
                ).scalar()
                if cutoff is not None:
                    res = await conn.execute(delete(te).where(in_space, te.c.id <= cutoff))
                    total += max(0, res.rowcount or 0)
        return total


def _cursor(after: str) -> int:
    try:
        value = int(after)
        if not 0 <= value < 2**62:
            raise ValueError(after)
    except ValueError as exc:
        raise ValidationFailed("after must be a cursor returned as 'next' by this API", code="invalid_cursor") from exc
    return value


def _event(row: Any) -> TraceEvent:
    return TraceEvent(
        tenant=row.tenant,
        space=row.space,
        ts=float(row.ts),
        agent=row.agent,
        session=row.session,
        kind=row.kind,
        trace_id=row.trace_id,
        span_id=row.span_id,
        data=orjson.loads(row.data),
        id=str(row.id),
    )
