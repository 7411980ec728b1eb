"""Budget accounting on Redis: one Lua script per reserve and per settle.

Atomicity comes from Redis running each script alone: ``budget_reserve.lua`` rolls, admits
and charges every scope of a call, or none, in one step, with the arithmetic of
:mod:`agentbus.broker.budget` mirrored in ``lua/budget_common.lua``. No lock in this process
is part of the guarantee, so any number of broker processes can share one Redis.

Redis Cluster: a script may only touch keys of one hash slot, and a call's scopes are a
principal (``p:<tenant>/<subject>``) and its tenant (``t:<tenant>``). So every budget key
carries the hash tag of the *tenant*, derived from the scope key (tenant names are plain,
:data:`agentbus.core.names.SPACE_RE`, so they cannot hold ``/``, ``:`` or braces), and
all scopes of one call must belong to one tenant. With ``T = "{prefix}:{t:<tenant>}"``:

=====================================  =====================================================
``T:budget:<scope>``        hash       the fields of ``budget.Counter`` plus ``window_s``
                                       (the period last reserved under; settle rolls by it)
``T:budget-resv``           hash       reservation id -> JSON {scopes, tokens, cost, ...}
``T:budget-exp``            zset       reservation id -> expires_at, for :meth:`sweep`
``T:usage``                 zset       usage records (JSON) scored by time
``T:usage:s:<subject>``     zset       the same, one subject only
``{prefix}:budget-tenants`` set        tenants with budget keys, for sweep and
                                       ``usage(tenant=None)``
=====================================  =====================================================

(The bus keys of :mod:`agentbus.store.redis` use the tag ``{tenant/space}``, which always
holds a ``/`` and never a ``:``, so the two layouts cannot collide.)

Usage memory is bounded: each usage sorted set keeps the newest ``usage_cap`` records
(10,000 by default), trimmed with ``ZREMRANGEBYRANK`` on every write; older ones are
dropped, unlike the SQL table, which keeps everything.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import orjson

from agentbus.broker import budget as b
from agentbus.broker.budget import Amount, Counter, Denial, Limits
from agentbus.store.base import BudgetStore, Reservation, UsageRecord
from agentbus.store.redis_errors import is_unavailable, unavailable

USAGE_CAP = 10_000
# Sweep reads expired reservations of a tenant in pages of this size.
SWEEP_BATCH = 500

_FIELDS = b.COUNTER_FIELDS


def _one_tenant(scopes: dict[str, Limits], what: str) -> tuple[list[str], str]:
    """The scope keys in lock order and their one tenant (one script touches one hash slot)."""
    if not scopes:
        raise ValueError(f"{what} needs at least one scope")
    keys = sorted(scopes)
    tenants = {scope_tenant(k) for k in keys}
    if len(tenants) != 1:
        raise ValueError(f"the scopes of one {what} must share a tenant, got {sorted(tenants)}")
    return keys, tenants.pop()


def scope_tenant(scope: str) -> str:
    """The tenant a scope key belongs to: ``t:<tenant>`` or ``p:<tenant>/<subject>``."""
    kind, _, rest = scope.partition(":")
    tenant = rest.split("/", 1)[0] if kind == "p" else rest
    if kind not in ("t", "p") or not tenant or (kind == "p" and "/" not in rest):
        raise ValueError(f"not a budget scope key: {scope!r} (expected t:<tenant> or p:<tenant>/<subject>)")
    return tenant


def _load(name: str) -> str:
    lua = resources.files("agentbus.store").joinpath("lua")
    return lua.joinpath("budget_common.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt(value: float | None) -> str:
    return "" if value is None else repr(value)


class RedisBudgetStore(BudgetStore):
    def __init__(self, client: Any, prefix: str, *, usage_cap: int = USAGE_CAP) -> None:
        """``client`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` (bytes or decoded
        replies both work); ``prefix`` is the store's ``redis_prefix``."""
        self.client = client
        self.prefix = prefix
        self.usage_cap = usage_cap
        self._reserve = client.register_script(_load("budget_reserve"))
        self._settle = client.register_script(_load("budget_settle"))
        self._reset = client.register_script(_load("budget_reset"))
        self._charge = client.register_script(_load("budget_charge"))
        # Tenants this instance has already added to the tenants set (it only ever grows).
        self._indexed: set[str] = set()

    # ------------------------------------------------------------------ keys
    def _base(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}"

    def _counter_prefix(self, tenant: str) -> str:
        return f"{self._base(tenant)}:budget:"

    def _counter_key(self, scope: str) -> str:
        return self._counter_prefix(scope_tenant(scope)) + scope

    def _resv_keys(self, tenant: str) -> tuple[str, str]:
        base = self._base(tenant)
        return f"{base}:budget-resv", f"{base}:budget-exp"

    def _usage_key(self, tenant: str, subject: str | None) -> str:
        base = f"{self._base(tenant)}:usage"
        return base if subject is None else f"{base}:s:{subject}"

    @property
    def _tenants_key(self) -> str:
        return f"{self.prefix}:budget-tenants"

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Map "Redis cannot serve now" to BackendUnavailable (503, retryable), never a 500."""
        try:
            yield
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise

    async def _index(self, tenant: str) -> None:
        """Add the tenant to the tenants set before it has anything sweep must find: the set
        has its own hash slot, so no script can add to it."""
        if tenant not in self._indexed:
            await self.client.sadd(self._tenants_key, tenant)
            self._indexed.add(tenant)

    async def _tenants(self) -> list[str]:
        return sorted(_text(t) for t in await self.client.smembers(self._tenants_key))

    # ------------------------------------------------------------------ reserve / settle
    async def reserve(
        self, scopes: dict[str, Limits], amount: Amount, now: float, ttl_s: float
    ) -> Reservation | Denial:
        keys, tenant = _one_tenant(scopes, "reserve")
        res = Reservation(
            id=uuid.uuid4().hex,
            scopes=tuple(keys),
            amount=amount,
            created_at=now,
            expires_at=now + ttl_s,
        )
        record = orjson.dumps(
            {
                "scopes": list(res.scopes),
                "tokens": amount.tokens,
                "cost": float(amount.cost),
                "created_at": res.created_at,
                "expires_at": res.expires_at,
            }
        )
        argv: list[str | bytes] = [
            repr(float(now)),
            str(int(amount.tokens)),
            repr(float(amount.cost)),
            res.id,
            repr(float(res.expires_at)),
            record,
        ]
        for key in keys:
            lim = scopes[key]
            argv += [
                key,
                _opt(lim.max_tokens),
                _opt(lim.max_cost),
                _opt(lim.max_requests),
                repr(float(lim.window_s)),
                _opt(lim.rpm),
                _opt(lim.tpm),
                _opt(lim.max_concurrent),
            ]
        async with self._guard():
            await self._index(tenant)
            out = await self._reserve(keys=[*(self._counter_key(k) for k in keys), *self._resv_keys(tenant)], args=argv)
        if _text(out[0]) == "OK":
            return res
        _, scope, reason, retry, limit, used = (_text(x) for x in out)
        return Denial(scope=scope, reason=reason, retry_after_s=float(retry), limit=float(limit), used=float(used))

    async def charge(self, scopes: dict[str, Limits], actual: Amount, now: float, *, release: bool = False) -> None:
        keys, tenant = _one_tenant(scopes, "charge")
        argv: list[str] = [repr(float(now)), str(int(actual.tokens)), repr(float(actual.cost)), "1" if release else "0"]
        argv += [repr(float(scopes[k].window_s)) for k in keys]
        async with self._guard():
            await self._index(tenant)
            await self._charge(keys=[self._counter_key(k) for k in keys], args=argv)

    async def settle(self, reservation: Reservation, actual: Amount, now: float, *, release: bool = False) -> bool:
        async with self._guard():
            return await self._settle_scopes(reservation.id, reservation.scopes, actual, now, release)

    async def _settle_scopes(
        self, rid: str, scopes: Iterable[str], actual: Amount, now: float, release: bool = False
    ) -> bool:
        scopes = list(scopes)
        tenant = scope_tenant(scopes[0])
        out = await self._settle(
            keys=[*self._resv_keys(tenant), *(self._counter_key(s) for s in scopes)],
            args=[
                rid,
                repr(float(now)),
                str(int(actual.tokens)),
                repr(float(actual.cost)),
                self._counter_prefix(tenant),
                "1" if release else "0",
            ],
        )
        return int(out) == 1

    async def sweep(self, now: float) -> int:
        total = 0
        async with self._guard():
            for tenant in await self._tenants():
                resv, exp = self._resv_keys(tenant)
                while True:
                    ids = [_text(i) for i in await self.client.zrangebyscore(exp, "-inf", f"({now!r}", 0, SWEEP_BATCH)]
                    if not ids:
                        break
                    records = await self.client.hmget(resv, ids)
                    for rid, rec in zip(ids, records, strict=True):
                        if rec is None:
                            # Settled between the two reads; only the expiry index still lists it.
                            await self.client.zrem(exp, rid)
                            continue
                        scopes = orjson.loads(rec)["scopes"]
                        total += await self._settle_scopes(rid, scopes, Amount(), now, True)
                    if len(ids) < SWEEP_BATCH:
                        break
        return total

    # ------------------------------------------------------------------ inspection
    async def counters(self, scopes: dict[str, Limits], now: float) -> dict[str, Counter]:
        keys = list(scopes)
        async with self._guard():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._counter_key(key), list(_FIELDS))
            rows = await pipe.execute()
        out: dict[str, Counter] = {}
        for key, row in zip(keys, rows, strict=True):
            counter = Counter() if row[0] is None else _counter(row)
            out[key] = b.roll(counter, scopes[key], now)
        return out

    async def reset_scope(self, scope: str) -> None:
        async with self._guard():
            await self._reset(keys=[self._counter_key(scope)], args=[])

    # ------------------------------------------------------------------ usage
    async def record_usage(self, rec: UsageRecord) -> None:
        # The random id keeps two identical records from collapsing into one member.
        member = orjson.dumps({"id": uuid.uuid4().hex, **rec.to_json()})
        async with self._guard():
            await self._index(rec.tenant)
            pipe = self.client.pipeline(transaction=False)
            for key in (self._usage_key(rec.tenant, None), self._usage_key(rec.tenant, rec.subject)):
                pipe.zadd(key, {member: rec.at})
                pipe.zremrangebyrank(key, 0, -(self.usage_cap + 1))
            await pipe.execute()

    async def usage(
        self, tenant: str | None, subject: str | None, limit: int, before: float | None = None
    ) -> list[UsageRecord]:
        if limit <= 0:
            return []
        top = "+inf" if before is None else f"({before!r}"
        async with self._guard():
            tenants = [tenant] if tenant is not None else await self._tenants()
            pipe = self.client.pipeline(transaction=False)
            for t in tenants:
                pipe.zrevrangebyscore(self._usage_key(t, subject), top, "-inf", start=0, num=limit)
            pages = await pipe.execute() if tenants else []
        recs = [_usage(orjson.loads(m)) for page in pages for m in page]
        recs.sort(key=lambda r: r.at, reverse=True)
        return recs[:limit]


def _counter(row: list[Any]) -> Counter:
    v = dict(zip(_FIELDS, (_text(x) for x in row), strict=True))
    return Counter(
        window_start=float(v["window_start"]),
        tokens=int(float(v["tokens"])),
        cost=float(v["cost"]),
        requests=int(float(v["requests"])),
        minute_start=float(v["minute_start"]),
        minute_requests=int(float(v["minute_requests"])),
        minute_tokens=int(float(v["minute_tokens"])),
        inflight=int(float(v["inflight"])),
    )


def _usage(data: dict[str, Any]) -> UsageRecord:
    data.pop("id", None)
    return UsageRecord(**data)
