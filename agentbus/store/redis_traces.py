"""Timeline events on Redis: one capped stream per space, under the space's hash tag.

``{prefix}:{tenant/space}:trace`` is a stream (``XADD .. MAXLEN max_per_space``, exact) whose
entries hold one event each (field ``e``: JSON); the stream id is the cursor. Retention by
age: each append trims the stream with ``XTRIM MINID`` (ids start with the insert time in
ms) and sets the key's TTL to ``retention_s``, so an idle space's timeline expires by
itself; :meth:`prune` trims streams indexed in ``{prefix}:trace-streams`` (a zset of stream
keys scored by last write), which also drops index entries of expired streams.

Appends touch many slots (one stream per space) in one non-transactional pipeline of one
script call per stream (``lua/trace_append.lua``: its XADDs, trims and TTL); that is fine on
Redis Cluster (redis-py splits it by node) and needs no atomicity: each stream stands alone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import orjson

from agentbus.core.errors import ValidationFailed
from agentbus.store.base import TraceEvent, TraceStore

if TYPE_CHECKING:
    from agentbus.store.redis import RedisStore

_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


class RedisTraceStore(TraceStore):
    def __init__(self, redis: RedisStore, retention_s: float, max_per_space: int) -> None:
        super().__init__(retention_s, max_per_space)
        self.redis = redis

    def _key(self, tenant: str, space: str) -> str:
        return f"{self.redis._base(tenant, space)}:trace"

    @property
    def _index(self) -> str:
        return f"{self.redis.prefix}:trace-streams"

    async def append(self, events: list[TraceEvent]) -> None:
        if not events:
            return
        by_key: dict[str, list[TraceEvent]] = defaultdict(list)
        for e in events:
            by_key[self._key(e.tenant, e.space)].append(e)
        now = self.redis.now()
        min_id = f"{max(0, int((now - self.retention_s) * 1000))}-0"
        ttl = max(1, int(self.retention_s + 0.999))
        # One script call per stream (its XADDs, trims and TTL), one ZADD for the index: the
        # events of a batch cost the Python side a handful of commands, not one each.
        commands: list[tuple[Any, ...]] = [
            self.redis._trace_append.args([key], [self.max_per_space, min_id, ttl, *(_dump(e) for e in evs)])
            for key, evs in by_key.items()
        ]
        commands.append(("ZADD", self._index, *(x for key in by_key for x in (now, key))))
        async with self.redis._guard():
            await self.redis._pipeline(commands)

    async def events(self, tenant: str, space: str, after: str | None, limit: int) -> list[TraceEvent]:
        start = "-"
        if after:
            if not _STREAM_ID.fullmatch(after) or max(int(x) for x in after.split("-")) >= 2**63:
                raise ValidationFailed("after must be a cursor returned as 'next' by this API", code="invalid_cursor")
            start = "(" + after
        async with self.redis._guard():
            rows = await self.redis.client.xrange(self._key(tenant, space), min=start, max="+", count=limit)
        return [_load(tenant, space, _text(sid), fields) for sid, fields in rows]

    async def prune(self, now: float, spaces: set[tuple[str, str]] | None = None) -> int:
        # Every XADD keeps the count bound approximately (whole stream nodes); here both
        # bounds are applied exactly: age, then count.
        min_id = f"{max(0, int((now - self.retention_s) * 1000))}-0"
        total = 0
        async with self.redis._guard():
            keys = [_text(k) for k in await self.redis.client.zrange(self._index, 0, -1)]
            if not keys:
                return 0
            pipe = self.redis.client.pipeline(transaction=False)
            for key in keys:
                pipe.xtrim(key, minid=min_id, approximate=False)
                pipe.xtrim(key, maxlen=self.max_per_space, approximate=False)
                pipe.exists(key)
            results = await pipe.execute()
            gone = []
            for i, key in enumerate(keys):
                total += int(results[3 * i] or 0) + int(results[3 * i + 1] or 0)
                if not results[3 * i + 2]:
                    gone.append(key)
            if gone:
                await self.redis.client.zrem(self._index, *gone)
        return total


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _dump(e: TraceEvent) -> bytes:
    return orjson.dumps(
        {
            "ts": e.ts,
            "agent": e.agent,
            "session": e.session,
            "kind": e.kind,
            "trace_id": e.trace_id,
            "span_id": e.span_id,
            "data": e.data,
        }
    )


def _load(tenant: str, space: str, sid: str, fields: dict[Any, Any]) -> TraceEvent:
    raw = fields.get(b"e", fields.get("e"))
    d = orjson.loads(raw)
    return TraceEvent(
        tenant=tenant,
        space=space,
        ts=float(d["ts"]),
        agent=d["agent"],
        session=d["session"],
        kind=d["kind"],
        trace_id=d["trace_id"],
        span_id=d["span_id"],
        data=d["data"],
        id=sid,
    )
