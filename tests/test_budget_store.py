"""BudgetStore on every backend (SQLite, PostgreSQL, Redis): unit semantics, equivalence with
the pure arithmetic of :mod:`agentbus.broker.budget`, and races that must never overspend.

pytest-asyncio is not used: each test runs its coroutine with ``asyncio.run``. PostgreSQL
tests share one database per session, so every test uses its own tenant and keeps its
reservations' expiry an hour out (only the sweep test makes short ones); Redis tests get a
key prefix of their own and delete only those keys afterwards.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import random
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentbus.broker import budget as b
from agentbus.broker.budget import Amount, Counter, Denial, Limits
from agentbus.core.errors import BackendUnavailable
from agentbus.migrate import upgrade
from agentbus.settings import Settings
from agentbus.store import open_store
from agentbus.store.base import BudgetStore, Reservation, UsageRecord
from agentbus.store.redis_budget import RedisBudgetStore, scope_tenant

TTL = 3600.0
_MIGRATED: set[str] = set()


@dataclass(frozen=True)
class Target:
    """Where a test's stores live; picklable, so worker processes can open their own."""

    backend: str
    url: str
    prefix: str


async def open_budgets(
    t: Target, *, pool_size: int = 4, **kw: Any
) -> tuple[BudgetStore, Callable[[], Awaitable[None]]]:
    """A fresh store on ``t`` (as one broker process would have) and its closer."""
    if t.backend == "redis":
        pool = aioredis.BlockingConnectionPool.from_url(t.url, max_connections=32, timeout=10.0)
        client = aioredis.Redis(connection_pool=pool)
        return RedisBudgetStore(client, t.prefix, **kw), client.aclose
    # A small pool: the PostgreSQL server is shared (with other test sessions, too). NORMAL
    # sync: these tests are about atomicity, not durability, and FULL is slow on a busy disk.
    store = open_store(Settings(pool_size=pool_size, sqlite_synchronous="NORMAL"), t.url)
    await store.start()
    # Each SQL dialect has its own budget hot path; make sure it is the one under test.
    expected = "SQLiteBudgetStore" if t.backend == "sqlite" else "SQLBudgetStore"
    assert type(store.budgets).__name__ == expected  # type: ignore[attr-defined]
    return store.budgets, store.close


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, copied for each test (migrating each time is slow)."""
    db = tmp_path_factory.mktemp("budget-template") / "template.db"
    upgrade(f"sqlite:///{db}")
    return db


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    backend = str(request.param)
    prefix = f"bt{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        db = tmp_path / "budget.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), db)
        url = f"sqlite:///{db}"
    elif backend == "postgres":
        url = request.getfixturevalue("pg_database")
        if url not in _MIGRATED:
            upgrade(url)
            _MIGRATED.add(url)
    else:
        url = request.getfixturevalue("redis_url")
    yield Target(backend, url, prefix)
    if backend == "redis":
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.unlink(*keys)
        r.close()


def run(t: Target, body: Callable[[BudgetStore], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        store, close = await open_budgets(t, **kw)
        try:
            return await body(store)
        finally:
            await close()

    return asyncio.run(main())


def tenant() -> str:
    return f"ten{uuid.uuid4().hex[:10]}"


def minute_now() -> float:
    """A real-ish time 5 s into an hour (so also into a minute and any shorter window): tests
    decide when windows roll, and a run in the last minute of an hour cannot cross one."""
    return math.floor(time.time() / 3600) * 3600 + 5.0


# ---------------------------------------------------------------------- unit semantics
def test_reserve_charges_every_scope_and_settle_swaps_in_actual(target: Target) -> None:
    ten = tenant()
    ts, ps = f"t:{ten}", f"p:{ten}/alice"
    scopes = {ts: Limits(max_tokens=10_000, window_s=3600), ps: Limits(rpm=10)}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        res = await s.reserve(scopes, Amount(300, 0.03), now, TTL)
        assert isinstance(res, Reservation)
        assert res.scopes == (ps, ts) and res.amount == Amount(300, 0.03)
        assert res.created_at == now and res.expires_at == now + TTL and len(res.id) == 32
        c = await s.counters(scopes, now)
        window = math.floor(now / 3600) * 3600
        minute = math.floor(now / 60) * 60
        assert c[ts] == Counter(window, 300, 0.03, 1, minute, 1, 300, 1)
        assert c[ps] == Counter(0.0, 300, 0.03, 1, minute, 1, 300, 1)
        assert await s.settle(res, Amount(120, 0.012), now + 1)
        c = await s.counters(scopes, now + 1)
        # requests stay counted; tokens and cost become the actual usage; nothing in flight
        assert c[ts] == Counter(window, 120, pytest.approx(0.012), 1, minute, 1, 120, 0)
        assert c[ps].inflight == 0 and c[ps].tokens == 120
        # unknown scopes read as zero counters, rolled to the current windows
        empty = await s.counters({f"t:{tenant()}": Limits(window_s=60)}, now)
        assert list(empty.values()) == [Counter(minute, 0, 0.0, 0, minute, 0, 0, 0)]

    run(target, body)


def test_charge_leaves_what_reserve_plus_settle_would(target: Target) -> None:
    """The one-step charge for callers without limits: the same counters as a reservation of
    the actual usage settled at once (released calls give their request back), on two sets
    of scopes side by side, windows included."""
    ten_a, ten_b = tenant(), tenant()
    now = minute_now()

    def scopes(ten: str) -> dict[str, Limits]:
        return {f"t:{ten}": Limits(window_s=3600), f"p:{ten}/alice": Limits()}

    calls = [(Amount(120, 0.01), False), (Amount(0, 0.0), True), (Amount(7, 0.5), False), (Amount(40), True)]

    async def body(s: BudgetStore) -> None:
        for i, (actual, release) in enumerate(calls):
            t = now + i
            await s.charge(scopes(ten_a), actual, t, release=release)
            res = await s.reserve(scopes(ten_b), actual, t, TTL)
            assert isinstance(res, Reservation)
            assert await s.settle(res, actual, t, release=release)
        t = now + len(calls)
        got_a = await s.counters(scopes(ten_a), t)
        got_b = await s.counters(scopes(ten_b), t)
        assert list(got_a.values()) == list(got_b.values())
        c = got_a[f"t:{ten_a}"]
        assert (c.tokens, c.requests, c.minute_requests, c.inflight) == (167, 2, 4, 0)
        assert c.cost == pytest.approx(0.51)
        with pytest.raises(ValueError):
            await s.charge({}, Amount(1), t)

    run(target, body)


def test_concurrent_charges_are_all_counted(target: Target) -> None:
    ten = tenant()
    scopes = {f"t:{ten}": Limits(), f"p:{ten}/bob": Limits()}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        await asyncio.gather(*(s.charge(scopes, Amount(3, 0.25), now) for _ in range(40)))
        for c in (await s.counters(scopes, now)).values():
            assert (c.tokens, c.requests, c.inflight) == (120, 40, 0)
            assert c.cost == pytest.approx(10.0)

    run(target, body)


def test_denial_writes_nothing_and_names_the_first_scope(target: Target) -> None:
    ten = tenant()
    ts, ps = f"t:{ten}", f"p:{ten}/bob"
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        ok = {ts: Limits(max_tokens=1000, window_s=600), ps: Limits(max_tokens=500, window_s=600)}
        assert isinstance(await s.reserve(ok, Amount(400), now, TTL), Reservation)
        before = await s.counters(ok, now)
        d = await s.reserve(ok, Amount(200), now, TTL)
        # The principal (p:... sorts first) is over; the tenant would have admitted it.
        assert d == Denial(
            scope=ps, reason="tokens", retry_after_s=math.floor(now / 600) * 600 + 600 - now, limit=500, used=400
        )
        assert "token budget" in d.message()
        assert await s.counters(ok, now) == before
        both = {ts: Limits(max_cost=0.001), ps: Limits(max_cost=0.001)}
        d2 = await s.reserve(both, Amount(1, 0.5), now, TTL)
        assert isinstance(d2, Denial) and d2.scope == ps and d2.reason == "cost"
        # A lifetime budget (window_s=0) has no reset to wait for: no retry can succeed.
        assert math.isinf(d2.retry_after_s)
        assert await s.counters(ok, now) == before

    run(target, body)


def test_settle_twice_applies_once_and_release_gives_everything_back(target: Target) -> None:
    ten = tenant()
    scopes = {f"t:{ten}": Limits(max_tokens=1000)}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        r1 = await s.reserve(scopes, Amount(500, 0.5), now, TTL)
        r2 = await s.reserve(scopes, Amount(400, 0.4), now, TTL)
        assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
        assert await s.settle(r1, Amount(100, 0.1), now)
        assert not await s.settle(r1, Amount(100, 0.1), now)
        assert not await s.settle(r1, Amount(), now)
        assert await s.settle(r2, Amount(), now)  # release
        assert not await s.settle(r2, Amount(), now)
        c = (await s.counters(scopes, now))[f"t:{ten}"]
        assert (c.tokens, c.cost, c.requests, c.inflight) == (100, pytest.approx(0.1), 2, 0)
        # Concurrent double settles: still exactly one applies.
        r3 = await s.reserve(scopes, Amount(300), now, TTL)
        assert isinstance(r3, Reservation)
        applied = await asyncio.gather(*(s.settle(r3, Amount(50), now) for _ in range(10)))
        assert sum(applied) == 1
        c = (await s.counters(scopes, now))[f"t:{ten}"]
        assert (c.tokens, c.inflight) == (150, 0)

    run(target, body)


def test_concurrency_limit(target: Target) -> None:
    ten = tenant()
    ps = f"p:{ten}/carol"
    scopes = {f"t:{ten}": Limits(), ps: Limits(max_concurrent=3)}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        held = [await s.reserve(scopes, Amount(10), now, TTL) for _ in range(3)]
        assert all(isinstance(r, Reservation) for r in held)
        d = await s.reserve(scopes, Amount(10), now, TTL)
        assert isinstance(d, Denial) and d.reason == "concurrency" and d.scope == ps
        assert d.retry_after_s > 0 and (d.limit, d.used) == (3, 3)
        assert isinstance(await s.reserve(scopes, Amount(10), now, TTL), Denial)
        first = held[0]
        assert isinstance(first, Reservation)
        assert await s.settle(first, Amount(5), now)
        again = await s.reserve(scopes, Amount(10), now, TTL)
        assert isinstance(again, Reservation)
        assert isinstance(await s.reserve(scopes, Amount(10), now, TTL), Denial)
        assert (await s.counters(scopes, now))[ps].inflight == 3

    run(target, body)


def test_rpm_and_tpm_windows_roll_with_the_clock(target: Target) -> None:
    ten = tenant()
    ps = f"p:{ten}/dave"
    scopes = {ps: Limits(rpm=2, tpm=250, max_requests=100, window_s=3600)}
    now = minute_now()  # 5 s into a minute

    async def body(s: BudgetStore) -> None:
        for _ in range(2):
            r = await s.reserve(scopes, Amount(100), now, TTL)
            assert isinstance(r, Reservation)
            assert await s.settle(r, Amount(100), now)
        d = await s.reserve(scopes, Amount(10), now + 10, TTL)
        assert isinstance(d, Denial) and d.reason == "rpm" and d.retry_after_s == pytest.approx(45.0)
        c = (await s.counters(scopes, now + 10))[ps]
        assert (c.minute_requests, c.minute_tokens, c.requests) == (2, 200, 2)
        # Next minute: the per-minute counters start over, the hourly budget does not.
        later = now + 60
        c = (await s.counters(scopes, later))[ps]
        assert (c.minute_requests, c.minute_tokens, c.requests, c.tokens) == (0, 0, 2, 200)
        r = await s.reserve(scopes, Amount(200), later, TTL)
        assert isinstance(r, Reservation)
        d = await s.reserve(scopes, Amount(100), later, TTL)
        assert isinstance(d, Denial) and d.reason == "tpm" and d.used == 200
        assert await s.settle(r, Amount(50), later)
        assert isinstance(await s.reserve(scopes, Amount(100), later, TTL), Reservation)
        c = (await s.counters(scopes, later))[ps]
        assert (c.minute_requests, c.minute_tokens, c.requests, c.tokens, c.inflight) == (2, 150, 4, 350, 1)

    run(target, body)


def test_budget_window_rolls(target: Target) -> None:
    ten = tenant()
    ts = f"t:{ten}"
    scopes = {ts: Limits(max_tokens=500, window_s=600)}
    start = math.floor(time.time() / 600) * 600 + 1.0

    async def body(s: BudgetStore) -> None:
        r = await s.reserve(scopes, Amount(500), start, TTL)
        assert isinstance(r, Reservation)
        assert await s.settle(r, Amount(500), start)
        d = await s.reserve(scopes, Amount(1), start + 100, TTL)
        assert isinstance(d, Denial) and d.reason == "tokens" and d.retry_after_s == pytest.approx(499.0)
        nxt = start + 600
        assert (await s.counters(scopes, nxt))[ts].tokens == 0
        assert isinstance(await s.reserve(scopes, Amount(500), nxt, TTL), Reservation)

    run(target, body)


def test_sweep_releases_expired_reservations(target: Target) -> None:
    ten = tenant()
    ts = f"t:{ten}"
    scopes = {ts: Limits(max_concurrent=10), f"p:{ten}/erin": Limits()}
    now = time.time()

    async def body(s: BudgetStore) -> None:
        short = [await s.reserve(scopes, Amount(100, 0.1), now, 5.0) for _ in range(3)]
        long = await s.reserve(scopes, Amount(40, 0.04), now, TTL)
        settled = await s.reserve(scopes, Amount(7), now, 5.0)
        assert isinstance(settled, Reservation) and isinstance(long, Reservation)
        assert await s.settle(settled, Amount(7), now)
        assert await s.sweep(now + 1) == 0
        assert await s.sweep(now + 10) == 3
        assert await s.sweep(now + 10) == 0
        for r in short:
            assert isinstance(r, Reservation)
            assert not await s.settle(r, Amount(1), now + 11)
        c = (await s.counters(scopes, now + 10))[ts]
        # The three swept calls are released: their tokens and requests are given back.
        assert (c.inflight, c.tokens, c.cost, c.requests) == (1, 47, pytest.approx(0.04), 2)
        assert await s.settle(long, Amount(30, 0.03), now + 12)

    run(target, body)


def test_reset_scope(target: Target) -> None:
    ten = tenant()
    ts, ps = f"t:{ten}", f"p:{ten}/frank"
    scopes = {ts: Limits(max_requests=2, window_s=3600), ps: Limits()}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        held = [await s.reserve(scopes, Amount(10), now, TTL) for _ in range(2)]
        assert isinstance(await s.reserve(scopes, Amount(10), now, TTL), Denial)
        await s.reset_scope(ts)
        await s.reset_scope(f"t:{tenant()}")  # unknown: nothing to do
        c = await s.counters(scopes, now)
        assert (c[ts].requests, c[ts].tokens, c[ts].inflight) == (0, 0, 0)
        assert c[ps].requests == 2
        assert isinstance(await s.reserve(scopes, Amount(10), now, TTL), Reservation)
        for r in held:  # settles of calls in flight across the reset never go negative
            assert isinstance(r, Reservation)
            assert await s.settle(r, Amount(3), now)
        c = await s.counters(scopes, now)
        assert c[ts].inflight == 0 and c[ts].tokens >= 0

    run(target, body)


def _usage_rec(at: float, tenant: str, subject: str, **kw: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "at": at,
        "tenant": tenant,
        "subject": subject,
        "session": "s1",
        "model": "fast",
        "upstream_model": "qwen",
        "endpoint": "http://gpu1:8000",
        "route": "default",
        "input_tokens": 10,
        "output_tokens": 5,
        "cost": 0.0015,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "outcome": "ok",
        "status": 200,
        "stream": False,
    }
    return UsageRecord(**{**base, **kw})


def test_usage_records_newest_first(target: Target) -> None:
    t1, t2 = tenant(), tenant()
    # Far in the future, so on the shared PostgreSQL database these are the newest records.
    base = 4_000_000_000.0 + random.random() * 1e6

    async def body(s: BudgetStore) -> None:
        recs = [
            _usage_rec(base + 1, t1, "a", ttft_ms=3.25, stream=True),
            _usage_rec(base + 2, t1, "b", outcome="error", status=502),
            _usage_rec(base + 3, t2, "a"),
            _usage_rec(base + 4, t1, "a", cost=0.1),
            _usage_rec(base + 4, t1, "a", cost=0.1),  # identical records are both kept
        ]
        for r in recs:
            await s.record_usage(r)
        assert await s.usage(t1, None, 10) == [recs[4], recs[3], recs[1], recs[0]]
        assert await s.usage(t1, "a", 10) == [recs[4], recs[3], recs[0]]
        assert await s.usage(t1, "a", 10, before=base + 4) == [recs[0]]
        assert await s.usage(t1, None, 2) == [recs[4], recs[3]]
        assert await s.usage(t2, "b", 10) == []
        assert await s.usage(None, None, 4) == [recs[4], recs[3], recs[2], recs[1]]
        got = await s.usage(None, "a", 10, before=base + 4)
        assert got[:2] == [recs[2], recs[0]]
        assert recs[0].to_json()["ttft_ms"] == 3.25

    run(target, body)


def test_account_batch_equals_one_call_at_a_time(target: Target) -> None:
    """``account`` (the broker's accounting queue) on a batch leaves the counters and usage
    records that ``charge`` and ``record_usage`` one by one leave: random calls across
    scopes, windows that roll inside the batch, released calls."""
    rng = random.Random(7)
    now = minute_now()
    ten_a, ten_b = tenant(), tenant()

    def scopes(ten: str, who: str) -> dict[str, Limits]:
        return {f"t:{ten}": Limits(window_s=60), f"p:{ten}/{who}": Limits(window_s=3600)}

    def batch(ten: str) -> tuple[list[b.Charge], list[UsageRecord]]:
        charges = [
            b.Charge(
                scopes(ten, rng.choice(["ann", "bob"])),
                Amount(rng.randint(0, 50), rng.choice([0.0, 0.25])),
                now + i * 7.0,  # crosses minute windows inside the batch
                release=rng.random() < 0.2,
            )
            for i in range(30)
        ]
        records = [_usage_rec(4_000_000_000.0 + i, ten, "ann", input_tokens=i) for i in range(12)]
        return charges, records

    async def body(s: BudgetStore) -> None:
        charges, records = batch(ten_a)
        await s.account(charges, records)
        for c in charges:
            await s.charge({k.replace(ten_a, ten_b): v for k, v in c.scopes.items()}, c.amount, c.at, release=c.release)
        for r in records:
            await s.record_usage(UsageRecord(**{**r.to_json(), "tenant": ten_b}))
        end = now + 30 * 7.0
        for who in ("ann", "bob"):
            got_a = await s.counters(scopes(ten_a, who), end)
            got_b = await s.counters(scopes(ten_b, who), end)
            assert list(got_a.values()) == list(got_b.values())
        assert sum(c.requests for c in got_a.values()) > 0
        assert [r.input_tokens for r in await s.usage(ten_a, None, 50)] == list(range(11, -1, -1))
        await s.account([], [])  # nothing to write is fine

    run(target, body)


@pytest.mark.redis
def test_redis_usage_is_capped(redis_url: str) -> None:
    t = Target("redis", redis_url, f"bt{uuid.uuid4().hex[:10]}")
    ten = tenant()

    async def body(s: BudgetStore) -> None:
        for i in range(8):
            await s.record_usage(_usage_rec(1000.0 + i, ten, "a" if i % 2 else "b"))
        assert [r.at for r in await s.usage(ten, None, 100)] == [1007.0, 1006.0, 1005.0, 1004.0, 1003.0]
        assert [r.at for r in await s.usage(ten, "a", 100)] == [1007.0, 1005.0, 1003.0, 1001.0]

    try:
        run(t, body, usage_cap=5)
    finally:
        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{t.prefix}:*", count=1000))
        if keys:
            r.unlink(*keys)
        r.close()


def test_scope_keys() -> None:
    assert scope_tenant("t:acme") == "acme"
    assert scope_tenant("p:acme/bob") == "acme"
    assert scope_tenant("p:acme/svc/with/slashes") == "acme"
    for bad in ("acme", "x:acme", "t:", "p:acme", "p:/bob"):
        with pytest.raises(ValueError):
            scope_tenant(bad)


@pytest.mark.redis
def test_redis_scopes_must_share_a_tenant(redis_url: str) -> None:
    t = Target("redis", redis_url, f"bt{uuid.uuid4().hex[:10]}")

    async def body(s: BudgetStore) -> None:
        with pytest.raises(ValueError):
            await s.reserve({"t:a": Limits(), "p:b/x": Limits()}, Amount(1), time.time(), TTL)
        with pytest.raises(ValueError):
            await s.reserve({}, Amount(1), time.time(), TTL)

    run(t, body)


# ---------------------------------------------------------------------- same arithmetic everywhere
class Model:
    """The reference: agentbus.broker.budget applied to in-memory counters."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.windows: dict[str, float] = {}

    def reserve(self, scopes: dict[str, Limits], amount: Amount, now: float) -> Denial | None:
        rolled: dict[str, Counter] = {}
        for key in sorted(scopes):
            c = b.roll(self.counters.get(key, Counter()), scopes[key], now)
            denial = b.admit(key, c, scopes[key], amount, now)
            if denial is not None:
                return denial
            rolled[key] = c
        for key, c in rolled.items():
            self.counters[key] = b.reserve(c, amount)
            self.windows[key] = scopes[key].window_s
        return None

    def settle(self, res: Reservation, actual: Amount, now: float, release: bool = False) -> None:
        for key in res.scopes:
            w = self.windows[key]
            c = b.roll(self.counters[key], Limits(window_s=w), now)
            self.counters[key] = b.settle(
                c, res.amount, actual, reserved_at=res.created_at, window_s=w, release=release
            )

    def view(self, scopes: dict[str, Limits], now: float) -> dict[str, Counter]:
        return {k: b.roll(self.counters.get(k, Counter()), lim, now) for k, lim in scopes.items()}


def test_backend_matches_the_pure_arithmetic(target: Target) -> None:
    """A random but seeded mix of reserves, settles and releases, over a clock that crosses
    minute and budget windows: every decision and every counter equals the reference."""
    ten = tenant()
    tenant_limits = Limits(max_tokens=3000, max_cost=0.5, window_s=120, rpm=9, max_concurrent=4)
    principals = {
        f"p:{ten}/a": Limits(max_requests=40, tpm=900),
        f"p:{ten}/b": Limits(rpm=5, tpm=2000, window_s=45),
    }
    rng = random.Random(20261126)

    async def body(s: BudgetStore) -> None:
        model = Model()
        # Aligned to every window used (60, 120 and 45 s divide 360), so the run is the same each time.
        now = math.floor(time.time() / 360) * 360 + 0.25
        open_: list[Reservation] = []
        decisions = {"granted": 0, "denied": 0}
        for _ in range(120):
            now += rng.choice((0.0, 0.5, 3.25, 7.0, 19.5))
            p = rng.choice(sorted(principals))
            scopes = {f"t:{ten}": tenant_limits, p: principals[p]}
            if open_ and rng.random() < 0.45:
                res = open_.pop(rng.randrange(len(open_)))
                release = rng.random() < 0.3
                if release:
                    actual = Amount()
                else:
                    actual = Amount(rng.randint(0, res.amount.tokens), round(rng.random() * res.amount.cost, 6))
                model.settle(res, actual, now, release)
                assert await s.settle(res, actual, now, release=release)
            else:
                tokens = rng.randint(1, 400)
                amount = Amount(tokens, tokens * 1.7e-4 + rng.random() * 0.01)
                expected = model.reserve(scopes, amount, now)
                got = await s.reserve(scopes, amount, now, TTL)
                if expected is None:
                    assert isinstance(got, Reservation), got
                    open_.append(got)
                    decisions["granted"] += 1
                else:
                    assert got == expected
                    decisions["denied"] += 1
            every = {f"t:{ten}": tenant_limits, **principals}
            assert await s.counters(every, now) == model.view(every, now)
        # The sequence exercised both outcomes.
        assert decisions["granted"] > 20 and decisions["denied"] > 10, decisions

    run(target, body)


# ---------------------------------------------------------------------- races
RACE_VARIANTS = {
    "requests": Limits(max_requests=50, window_s=3600),
    "tokens": Limits(max_tokens=5000, window_s=3600),
}


def _race_scopes(ten: str, variant: str) -> dict[str, Limits]:
    return {f"t:{ten}": RACE_VARIANTS[variant], f"p:{ten}/racer": Limits()}


def _check_race(results: list[Reservation | Denial], ten: str, variant: str) -> list[Reservation]:
    granted = [r for r in results if isinstance(r, Reservation)]
    denied = [r for r in results if isinstance(r, Denial)]
    assert len(granted) == 50 and len(denied) == 150
    assert len({r.id for r in granted}) == 50
    for d in denied:
        assert (d.scope, d.reason) == (f"t:{ten}", variant)
        assert d.retry_after_s > 0
    return granted


async def _settle_all_and_check(s: BudgetStore, granted: list[Reservation], ten: str, variant: str, now: float) -> None:
    scopes = _race_scopes(ten, variant)
    c = (await s.counters(scopes, now))[f"t:{ten}"]
    assert (c.requests, c.tokens, c.inflight) == (50, 5000, 50)
    assert c.cost == pytest.approx(0.5)
    # Actual usage below the reservations: the counters end at exactly the actual total.
    applied = await asyncio.gather(*(s.settle(r, Amount(37, 0.0037), now) for r in granted))
    assert all(applied)
    for key in scopes:
        c = (await s.counters(scopes, now))[key]
        assert (c.requests, c.tokens, c.inflight) == (50, 50 * 37, 0)
        assert c.cost == pytest.approx(50 * 0.0037)
        assert c.tokens <= 5000 and c.requests <= 50


@pytest.mark.parametrize("variant", sorted(RACE_VARIANTS))
def test_race_in_one_process(target: Target, variant: str) -> None:
    """200 concurrent reserves on one store, limits admitting exactly 50."""
    ten = tenant()
    scopes = _race_scopes(ten, variant)
    now = time.time()

    async def body(s: BudgetStore) -> None:
        results = await asyncio.gather(*(s.reserve(scopes, Amount(100, 0.01), now, TTL) for _ in range(200)))
        granted = _check_race(list(results), ten, variant)
        await _settle_all_and_check(s, granted, ten, variant, now)

    run(target, body)


def _race_worker(t: Target, scopes: dict[str, Limits], now: float, n: int, barrier: Any, out: Any) -> None:
    """One broker process: its own store, ``n`` concurrent reserves after the others are up."""

    async def main() -> list[Reservation | Denial]:
        store, close = await open_budgets(t, pool_size=2)
        try:
            return list(await asyncio.gather(*(store.reserve(scopes, Amount(100, 0.01), now, TTL) for _ in range(n))))
        finally:
            await close()

    try:
        barrier.wait(30)
        out.put(("ok", asyncio.run(main())))
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(("error", repr(exc)))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(RACE_VARIANTS))
def test_race_across_processes(target: Target, variant: str) -> None:
    """4 processes x 50 concurrent reserves, each process with its own store instance."""
    ten = tenant()
    scopes = _race_scopes(ten, variant)
    now = time.time()
    # fork: the workers need no re-import, which keeps the test fast; each opens its own store.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(target, scopes, now, 50, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        replies = [out.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [msg for kind, msg in replies if kind == "error"]
    assert not errors, errors
    results = [r for _, rs in replies for r in rs]
    granted = _check_race(results, ten, variant)
    run(target, lambda s: _settle_all_and_check(s, granted, ten, variant, now))


# ---------------------------------------------------------------------- backend down
def test_unreachable_backends_raise_backend_unavailable() -> None:
    scopes = {"t:x": Limits(max_tokens=10)}
    res = Reservation("0" * 32, ("t:x",), Amount(1), 0.0, 1.0)

    async def check(s: BudgetStore) -> None:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: s.reserve(scopes, Amount(1), 0.0, TTL),
            lambda: s.settle(res, Amount(), 0.0),
            lambda: s.counters(scopes, 0.0),
            lambda: s.sweep(0.0),
            lambda: s.usage(None, None, 10),
            lambda: s.record_usage(_usage_rec(1.0, "x", "y")),
            lambda: s.reset_scope("t:x"),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable):
                await call()

    async def main() -> None:
        # No retries, as RedisStore builds its client: each refused connect fails at once.
        client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        try:
            await check(RedisBudgetStore(client, "down"))
        finally:
            await client.aclose()
        # (SQLite has no server to lose; its errors take the same _tx mapping as PostgreSQL's.)
        store = open_store(Settings(), "postgresql://postgres@127.0.0.1:1/nope")
        await store.start()
        try:
            await check(store.budgets)
        finally:
            await store.close()

    asyncio.run(main())


def test_settle_after_a_window_rolled_keeps_other_calls_usage(target: Target) -> None:
    """A reservation charged to the previous window must not be subtracted from the new one."""
    ten = tenant()
    ps = f"p:{ten}/gus"
    scopes = {ps: Limits(max_tokens=100_000, window_s=60)}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        old = await s.reserve(scopes, Amount(1000), now, TTL)
        assert isinstance(old, Reservation)
        later = now + 60  # the next window
        other = await s.reserve(scopes, Amount(800), later, TTL)
        assert isinstance(other, Reservation)
        assert await s.settle(other, Amount(800), later)
        assert await s.settle(old, Amount(900), later)
        c = (await s.counters(scopes, later))[ps]
        # 800 from the other call plus the 900 actually used; nothing of the old window's 1000.
        assert (c.tokens, c.inflight) == (1700, 0)

    run(target, body)


def test_release_gives_back_the_request_but_not_the_rate(target: Target) -> None:
    ten = tenant()
    ps = f"p:{ten}/hal"
    scopes = {ps: Limits(max_requests=1, rpm=5, window_s=3600)}
    now = minute_now()

    async def body(s: BudgetStore) -> None:
        r = await s.reserve(scopes, Amount(10), now, TTL)
        assert isinstance(r, Reservation)
        assert await s.settle(r, Amount(), now, release=True)
        c = (await s.counters(scopes, now))[ps]
        assert (c.requests, c.minute_requests, c.tokens) == (0, 1, 0)
        # The failed call did not use up the single allowed request.
        assert isinstance(await s.reserve(scopes, Amount(10), now, TTL), Reservation)

    run(target, body)
