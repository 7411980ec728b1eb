"""RedisStore against the real Redis: store-level semantics, and equivalence with the SQLite store.

Each test gets its own ``redis_prefix`` (and deletes only its own keys afterwards), because
the Redis is shared with other tests and developers. pytest-asyncio is not used: each test
runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis import exceptions as rexc

from agentbus.core import validation as v
from agentbus.core.errors import AgentbusError, BackendUnavailable, BadRequest, ReadSetExpired
from agentbus.core.model import RangeRead, SessionRef, WriteOp
from agentbus.settings import Settings
from agentbus.store.base import CommitOutcome, CommitRequest, Store, TraceEvent, outcome_body
from agentbus.store.redis import RedisStore, _lex_bounds
from agentbus.store.redis_traces import RedisTraceStore

pytestmark = pytest.mark.redis

T = "tenant1"
SP = "space1"

Body = Callable[..., Awaitable[Any]]


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = f"rt{uuid.uuid4().hex[:10]}"
    yield p
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{p}:*", count=1000))
    if keys:
        r.unlink(*keys)
    r.close()


@pytest.fixture
def run(redis_url: str, prefix: str) -> Callable[..., Any]:
    """``run(body, n=1, **settings)``: open ``n`` stores (as if n bus processes) sharing one
    prefix, await ``body(*stores)``, close them."""

    def runner(body: Body, n: int = 1, **settings: Any) -> Any:
        async def main() -> Any:
            cfg = Settings(redis_prefix=prefix, **settings)
            stores = [RedisStore(cfg, redis_url) for _ in range(n)]
            for s in stores:
                await s.start()
            try:
                return await body(*stores)
            finally:
                for s in stores:
                    await s.close()

        return asyncio.run(main())

    return runner


def ref(subject: str, session: str = "", space: str = SP, tenant: str = T) -> SessionRef:
    return SessionRef(tenant, space, subject, session)


def put(key: str, value: Any = 1, expected: int | None = None) -> WriteOp:
    import json

    return WriteOp(key, json.dumps(value), False, expected)


def delete(key: str, expected: int | None = None) -> WriteOp:
    return WriteOp(key, None, True, expected)


def req(*writes: WriteOp, reads: dict[str, int] | None = None, idem: str | None = None) -> CommitRequest:
    fp = v.fingerprint([str(w) for w in writes]) if idem else None
    return CommitRequest(tuple(writes), dict(reads or {}), idem, fp)


async def ok(store: Store, who: SessionRef, *writes: WriteOp, reads: dict[str, int] | None = None) -> dict[str, int]:
    out = await store.commit(who, req(*writes, reads=reads))
    assert out.result is not None, out
    return out.result.versions


def kinds(out: CommitOutcome) -> list[tuple[str, str]]:
    assert out.conflicts is not None, out
    return [(c.key, c.kind) for c in out.conflicts]


# ---------------------------------------------------------------------------- reads/commits


def test_read_commit_versions_and_values(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        assert await s.read(a, "doc") is None
        out = await s.commit(a, req(put("doc", {"v": "ü"}), put("n", 1)))
        assert out.result is not None
        assert out.result.seq == 1 and out.result.versions == {"doc": 1, "n": 1}
        assert len(out.result.commit_id) == 32
        shard = await s.read(a, "doc")
        assert shard is not None
        assert shard.value_json == '{"v": "\\u00fc"}'
        assert (shard.meta.key, shard.meta.version, shard.meta.deleted, shard.meta.seq) == ("doc", 1, False, 1)
        assert shard.meta.updated_by == "alice"
        assert abs(shard.meta.updated_at - time.time()) < 60
        # Another commit by the same session (its read of doc is current): versions grow by one.
        assert await ok(s, a, put("doc", 2)) == {"doc": 2}
        shard = await s.read(a, "doc")
        assert shard is not None and shard.meta.version == 2 and shard.meta.seq == 2
        assert await s.space_exists(T, SP)
        assert not await s.space_exists(T, "other")

    run(body)


def test_stale_read_conflict_names_committer(run: Callable[..., Any]) -> None:
    async def body(s1: RedisStore, s2: RedisStore) -> None:
        alice, bob = ref("alice"), ref("bob")
        await ok(s1, alice, put("a", 1), put("b", 1))
        assert (await s1.read(alice, "a")) is not None
        assert (await s1.read(alice, "b")) is not None
        await ok(s2, bob, put("a", 2), put("b", 2))  # another "process"
        out = await s1.commit(alice, req(put("c", 3)))
        assert kinds(out) == [("a", "stale_read"), ("b", "stale_read")]
        item = out.conflicts[0]  # type: ignore[index]
        assert (item.read_version, item.current_version, item.committed_by, item.commit_seq) == (1, 2, "bob", 2)
        status, payload = outcome_body(out)
        assert status == 409 and payload["error"]["code"] == "stale_read"
        # Nothing applied, epoch ended: the retry after re-reading passes.
        assert await s1.read(alice, "c") is None
        assert await s1.get_epoch(alice) is not None
        await s1.read(alice, "a")
        assert await ok(s1, alice, put("c", 3)) == {"c": 1}

    run(body, n=2)


def test_read_as_absent_conflicts_with_later_create(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        alice, bob = ref("alice"), ref("bob")
        assert await s.read(alice, "x") is None
        await ok(s, bob, put("x", 1))
        out = await s.commit(alice, req(put("y", 1)))
        assert kinds(out) == [("x", "stale_read")]
        assert out.conflicts[0].read_version == 0  # type: ignore[index]

    run(body)


def test_write_conflict_and_expected_zero(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        assert await ok(s, a, put("k", 1, expected=0)) == {"k": 1}
        out = await s.commit(a, req(put("k", 2, expected=0)))
        assert kinds(out) == [("k", "write_conflict")]
        c = out.conflicts[0]  # type: ignore[index]
        assert (c.read_version, c.current_version) == (0, 1)
        out = await s.commit(a, req(put("k", 2, expected=5), put("j", 1, expected=3)))
        assert kinds(out) == [("j", "write_conflict"), ("k", "write_conflict")]
        assert await ok(s, a, put("k", 2, expected=1)) == {"k": 2}
        # Explicit reads win over the delivery log and are validated too.
        await s.read(a, "k")
        out = await s.commit(a, req(put("z", 1), reads={"k": 1}))
        assert kinds(out) == [("k", "stale_read")]

    run(body)


def test_write_conflict_reported_before_stale_read(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, b, put("k", 1))
        await s.read(a, "k")
        await ok(s, b, put("k", 2))
        out = await s.commit(a, req(put("k", 3, expected=1)))
        assert kinds(out) == [("k", "write_conflict"), ("k", "stale_read")]
        assert outcome_body(out)[1]["error"]["code"] == "write_conflict"

    run(body)


def test_tombstones(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, a, put("t", 1))
        assert await ok(s, a, delete("t")) == {"t": 2}
        # A tombstone reads as absent but records its version.
        assert await s.read(a, "t") is None
        epoch = await s.get_epoch(a)
        assert epoch is not None and epoch.points == {"t": 2}
        assert (await s.list(a, "", None, 10)).items == []
        # expected_version 0 accepts a tombstone; the version is never reused.
        assert await ok(s, a, put("t", 3, expected=0)) == {"t": 3}
        await s.read(b, "t")
        assert await ok(s, b, delete("t", expected=3)) == {"t": 4}
        hist = await s.history(T, SP, "t", None, 10)
        assert [(h.version, h.deleted, h.value_json) for h in hist] == [
            (4, True, None),
            (3, False, "3"),
            (2, True, None),
            (1, False, "1"),
        ]
        log = await s.log(T, SP, 0, 10)
        assert log[1].writes == [{"key": "t", "version": 2, "deleted": True}]
        # Deleting a never-written key is a version too.
        assert await ok(s, a, delete("ghost")) == {"ghost": 1}

    run(body)


# ---------------------------------------------------------------------------- listings/phantoms


def test_list_pagination_and_cursor(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        keys = ["p/a", "p/b", "p/c", "p/d", "p0", "p", "q/a", "o"]
        await ok(s, a, *[put(k) for k in keys])
        page = await s.list(a, "p/", None, 2)
        assert [m.key for m in page.items] == ["p/a", "p/b"]
        assert page.next_cursor is not None
        from agentbus.core.names import decode_cursor

        after = decode_cursor(page.next_cursor)
        page2 = await s.list(a, "p/", after, 2)
        assert [m.key for m in page2.items] == ["p/c", "p/d"]
        # Exactly limit items left: has_more is false, so no cursor (like SQLStore).
        assert page2.next_cursor is None
        everything = await s.list(a, "", None, 100)
        assert [m.key for m in everything.items] == sorted(keys)
        assert all(m.version == 1 and m.seq == 1 for m in everything.items)
        epoch = await s.get_epoch(a)
        assert epoch is not None
        want = [
            v.range_from_listing("p/", None, ["p/a", "p/b"], True, 1),
            v.range_from_listing("p/", "p/b", ["p/c", "p/d"], False, 1),
            v.range_from_listing("", None, sorted(keys), False, 1),
        ]
        assert sorted(epoch.ranges, key=lambda r: r.ident) == sorted(want, key=lambda r: r.ident)

    run(body)


def test_lex_bounds_byte_order() -> None:
    assert _lex_bounds("", None) == (b"-", b"+")
    assert _lex_bounds("ab", None) == (b"[ab", b"(ac")
    assert _lex_bounds("ab", "ab/x") == (b"(ab/x", b"(ac")
    assert _lex_bounds("", "m") == (b"(m", b"+")
    assert _lex_bounds("b", "a") == (b"[b", b"(c")


def test_phantom_conflicts(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, b, put("tasks/1"), put("tasks/2"), put("notes/1"))
        await s.list(a, "tasks/", None, 10)
        # Outside the prefix: no conflict.
        await ok(s, b, put("notes/2"), put("tasks", 0), put("tasksX", 0))
        assert await ok(s, a, put("out", 1)) == {"out": 1}
        # Created, changed or deleted under the prefix: phantom.
        for change in (put("tasks/3"), put("tasks/1", 5), delete("tasks/2")):
            await s.list(a, "tasks/", None, 10)
            await ok(s, b, change)
            out = await s.commit(a, req(put("out", 2)))
            assert kinds(out) == [(change.key, "phantom")]
            c = out.conflicts[0]  # type: ignore[index]
            assert c.read_version is None and c.committed_by == "bob"

    run(body)


def test_phantom_respects_page_bounds(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, b, *[put(f"k/{i}") for i in range(5)])
        page = await s.list(a, "k/", None, 2)  # covers k/0 .. k/1 only
        assert [m.key for m in page.items] == ["k/0", "k/1"]
        await ok(s, b, put("k/3", 9))  # after end_at
        assert await ok(s, a, put("x", 1)) == {"x": 1}
        await s.list(a, "k/", "k/1", 2)  # covers (k/1, k/3]
        await ok(s, b, put("k/1", 9))  # at start_after: outside
        await ok(s, b, put("k/4", 9))  # after end_at: outside
        assert await ok(s, a, put("x", 2)) == {"x": 2}
        await s.list(a, "k/", "k/1", 2)
        await ok(s, b, put("k/2b", 1))  # inside
        out = await s.commit(a, req(put("x", 3)))
        assert kinds(out) == [("k/2b", "phantom")]

    run(body)


def test_stale_key_not_also_reported_as_phantom(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, b, put("d/1"))
        await s.read(a, "d/1")
        await s.list(a, "d/", None, 10)
        await ok(s, b, put("d/1", 2), put("d/2", 1))
        out = await s.commit(a, req(put("z")))
        assert kinds(out) == [("d/1", "stale_read"), ("d/2", "phantom")]

    run(body)


# ---------------------------------------------------------------------------- epochs


def test_epoch_keeps_first_version(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, b, put("k", 1))
        await s.read(a, "k")
        await ok(s, b, put("k", 2))
        shard = await s.read(a, "k")  # sees v2, but v1 stays in the read set
        assert shard is not None and shard.meta.version == 2
        epoch = await s.get_epoch(a)
        assert epoch is not None and epoch.points == {"k": 1}
        assert kinds(await s.commit(a, req(put("z")))) == [("k", "stale_read")]
        # Same for ranges: the first seq recorded is kept.
        await s.list(a, "", None, 10)
        await ok(s, b, put("new", 1))
        await s.list(a, "", None, 10)
        epoch = await s.get_epoch(a)
        assert epoch is not None and [r.seq for r in epoch.ranges] == [2]
        assert kinds(await s.commit(a, req(put("z")))) == [("new", "phantom")]

    run(body)


def test_every_commit_ends_the_epoch(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, a2, b = ref("alice"), ref("alice", "task2"), ref("bob")
        await s.read(a, "k")
        await s.read(a2, "k")
        await ok(s, a, put("k", 1))
        assert await s.get_epoch(a) is None
        # Sessions are separate read sets.
        epoch2 = await s.get_epoch(a2)
        assert epoch2 is not None and epoch2.points == {"k": 0}
        assert kinds(await s.commit(a2, req(put("j")))) == [("k", "stale_read")]
        assert await s.get_epoch(a2) is None
        await s.read(b, "k")
        await s.clear_epoch(b)
        assert await s.get_epoch(b) is None

    run(body)


def test_epoch_reload_when_a_read_lands_during_commit(run: Callable[..., Any]) -> None:
    """A read of the same session between loading the epoch and running the script must be
    validated (as PostgreSQL's row lock guarantees): the script asks Python to reload."""

    async def body(s: RedisStore, other: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(s, b, put("k", 1))
        await s.read(a, "j")
        real = s._eval_args
        injected = False

        async def eval_args(args: tuple[Any, ...]) -> Any:
            nonlocal injected
            if not injected and args[:2] == ("EVALSHA", s._commit.sha):
                injected = True
                await other.read(a, "k")  # records k@1 after the epoch was loaded
                await ok(other, b, put("k", 2))
            return await real(args)

        s._eval_args = eval_args  # type: ignore[method-assign]
        out = await s.commit(a, req(put("z")))
        assert injected
        assert kinds(out) == [("k", "stale_read")]

    run(body, n=2)


class _CountLoads:
    """Counts the epoch loads (HGETALL) a store sends."""

    def __init__(self, store: RedisStore) -> None:
        self.n = 0
        real = store.client.hgetall

        async def hgetall(*a: Any, **kw: Any) -> Any:
            self.n += 1
            return await real(*a, **kw)

        store.client.hgetall = hgetall


def test_commit_after_reads_uses_the_epoch_shadow(run: Callable[..., Any]) -> None:
    """Reads served by this process: the commit needs no epoch load, and still sees
    every conflict (stale read, overflow)."""

    async def body(s: RedisStore, other: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(other, b, put("x", 1), put("y", 1))
        loads = _CountLoads(s)
        await s.read(a, "x")
        await s.read(a, "y")
        await s.read(a, "x")  # already recorded: the shadow follows a no-op too
        await ok(s, a, put("z"))
        assert loads.n == 0
        await s.read(a, "x")
        await s.read(a, "nope")
        await ok(other, b, put("x", 2))
        out = await s.commit(a, req(put("z")))
        assert kinds(out) == [("x", "stale_read")] and loads.n == 0
        for k in ("p", "q", "r"):  # readset_max_entries=2: the third read overflows
            await s.read(a, k)
        with pytest.raises(ReadSetExpired) as exc:
            await s.commit(a, req(put("z")))
        # A 410 is only raised after looking for a stored outcome (Idempotency-Key), so the
        # shadow's overflow sends the commit down the loading path.
        assert exc.value.code == "read_set_overflow" and loads.n == 1

    run(body, n=2, readset_max_entries=2)


def test_epoch_shadow_is_dropped_when_another_process_reads(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore, other: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        await ok(other, b, put("k1"), put("k2"), put("k3"))
        loads = _CountLoads(s)
        await s.read(a, "k1")
        await other.read(a, "k2")  # same session, other process: gen moves by one we did not do
        await s.read(a, "k3")
        await ok(other, b, put("k2", 2))
        out = await s.commit(a, req(put("z")))
        assert kinds(out) == [("k2", "stale_read")]
        assert loads.n == 1  # the shadow was dropped, so the epoch was loaded

    run(body, n=2)


def test_epoch_shadow_matches_loading_the_epoch(redis_url: str, prefix: str) -> None:
    """Random reads (from two processes), listings and foreign writes for one session, then a
    commit: the outcome is the same with and without the shadow."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agentbus.store.shadows import EpochShadows

    op = st.one_of(
        st.tuples(st.just("read"), st.integers(0, 1), st.sampled_from(["a", "b", "c", "n"])),
        st.tuples(st.just("write"), st.just(2), st.sampled_from(["a", "b", "c", "l1"])),
        st.tuples(st.just("list"), st.integers(0, 1), st.just("l")),
    )

    async def replay(stores: list[RedisStore], space: str, ops: list[tuple[str, int, str]], commit_by: int) -> Any:
        a, w = ref("alice", space=space), ref("writer", space=space)
        for kind, who, key in ops:
            if kind == "read":
                await stores[who].read(a, key)
            elif kind == "list":
                await stores[who].list(a, key, None, 10)
            else:
                await ok(stores[who], w, put(key, random.random()))
        try:
            out = await stores[commit_by].commit(a, req(put("z")))
        except ReadSetExpired as exc:
            return exc.code
        return "ok" if out.result is not None else kinds(out)

    cfg = Settings(redis_prefix=prefix, readset_max_entries=3)
    shadowed = [RedisStore(cfg, redis_url) for _ in range(3)]
    plain = [RedisStore(cfg, redis_url) for _ in range(3)]
    for st_ in plain:
        st_._shadows = EpochShadows(cap=0)  # keeps nothing
    loop = asyncio.new_event_loop()
    for st_ in (*shadowed, *plain):
        loop.run_until_complete(st_.start())
    try:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(ops=st.lists(op, max_size=8), commit_by=st.integers(0, 1))
        def check(ops: list[tuple[str, int, str]], commit_by: int) -> None:
            space = f"sh{uuid.uuid4().hex[:8]}"
            got = loop.run_until_complete(replay(shadowed, space, ops, commit_by))
            want = loop.run_until_complete(replay(plain, space + "p", ops, commit_by))
            assert got == want, (ops, got, want)

        check()
    finally:
        for st_ in (*shadowed, *plain):
            loop.run_until_complete(st_.close())
        loop.close()


def test_overflow_gives_410_and_ends_epoch(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        for k in ("a", "b", "c", "d"):
            await s.read(a, k)
        epoch = await s.get_epoch(a)
        assert epoch is not None and epoch.overflow and epoch.points == {"a": 0, "b": 0}
        with pytest.raises(ReadSetExpired) as exc:
            await s.commit(a, req(put("x")))
        assert exc.value.status == 410 and exc.value.code == "read_set_overflow"
        assert await s.get_epoch(a) is None
        assert await s.read(a, "x") is None  # nothing applied
        # A 410 still creates the space, as SQLStore does.
        assert await s.space_exists(T, SP)
        await s.read(a, "a")
        assert await ok(s, a, put("x")) == {"x": 1}

    run(body, readset_max_entries=2)


def test_ttl_gives_410(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        await s.read(a, "k")
        await asyncio.sleep(0.3)
        with pytest.raises(ReadSetExpired) as exc:
            await s.commit(a, req(put("x")))
        assert exc.value.code == "read_set_expired"
        assert await s.get_epoch(a) is None
        assert await ok(s, a, put("x")) == {"x": 1}

    run(body, readset_ttl_s=0.2)


def test_epoch_and_idempotency_keys_expire(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        await s.read(a, "k")
        ttl = await s.client.pttl(s._epoch_key(a))
        assert 0 < ttl <= 5000
        await s.read(a, "j")  # a later read does not extend the retention
        assert await s.client.pttl(s._epoch_key(a)) <= ttl
        await s.commit(a, req(put("x"), idem="key-1"))
        ttl = await s.client.pttl(s._idem_key(a, "key-1"))
        assert 0 < ttl <= 7000

    run(body, readset_retention_s=5, idempotency_ttl_s=7)


def test_epoch_expires_after_retention(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        await s.read(a, "k")
        await asyncio.sleep(0.4)
        assert await s.get_epoch(a) is None

    run(body, readset_retention_s=0.2)


# ---------------------------------------------------------------------------- idempotency


def test_idempotent_replay_of_200_and_409(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        first = await s.commit(a, req(put("k", 1), idem="i1"))
        assert first.result is not None
        again = await s.commit(a, req(put("k", 1), idem="i1"))
        assert again.stored is not None and again.result is None
        assert (again.stored.status, again.stored.body) == outcome_body(first)
        assert again.stored.fingerprint == req(put("k", 1), idem="i1").fingerprint
        assert (await s.log(T, SP, 0, 10))[-1].seq == 1  # applied once
        # Another subject's identical key is a different record.
        other = await s.commit(b, req(put("k", 1), idem="i1"))
        assert other.result is not None and other.result.versions == {"k": 2}
        # A 409 is replayed too, even after the state changed.
        await s.read(a, "k")
        await ok(s, b, put("k", 3))
        conflict = await s.commit(a, req(put("j"), idem="i2"))
        assert conflict.conflicts
        replay = await s.commit(a, req(put("j"), idem="i2"))
        assert replay.stored is not None
        assert (replay.stored.status, replay.stored.body) == outcome_body(conflict)
        # A different body under a used key returns the stored outcome (the API rejects it
        # by comparing fingerprints).
        reused = await s.commit(a, req(put("other"), idem="i1"))
        assert reused.stored is not None and reused.stored.fingerprint != req(put("other"), idem="i1").fingerprint
        # A replay does not end the epoch.
        await s.read(a, "k")
        await s.commit(a, req(put("k", 1), idem="i1"))
        assert await s.get_epoch(a) is not None

    run(body)


def test_concurrent_retries_apply_once(run: Callable[..., Any]) -> None:
    async def body(*stores: RedisStore) -> None:
        a, b = ref("alice"), ref("bob")
        outs = await asyncio.gather(*[s.commit(a, req(put("k", 1), idem="same")) for s in stores for _ in range(5)])
        applied = [o for o in outs if o.result is not None]
        assert len(applied) == 1
        want = outcome_body(applied[0])
        assert all(outcome_body(o) == want for o in outs)
        assert len(await stores[0].log(T, SP, 0, 100)) == 1
        # Concurrent retries of a conflicting commit all get the same 409.
        await stores[0].read(a, "k")
        await ok(stores[0], b, put("k", 2))
        outs = await asyncio.gather(*[s.commit(a, req(put("j"), idem="c")) for s in stores for _ in range(5)])
        bodies = [outcome_body(o) for o in outs]
        assert bodies[0][0] == 409 and all(x == bodies[0] for x in bodies)

    run(body, n=4)


# ---------------------------------------------------------------------------- history/log/spaces


def test_history_pages(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice")
        for i in range(1, 8):
            await ok(s, a, put("h", i), put(f"other{i}", i))
        hist = await s.history(T, SP, "h", None, 3)
        assert [h.version for h in hist] == [7, 6, 5]
        assert [h.seq for h in hist] == [7, 6, 5]
        assert [h.value_json for h in hist] == ["7", "6", "5"]
        assert [h.version for h in await s.history(T, SP, "h", 5, 3)] == [4, 3, 2]
        assert [h.version for h in await s.history(T, SP, "h", 2, 3)] == [1]
        assert await s.history(T, SP, "h", 1, 3) == []
        assert [h.version for h in await s.history(T, SP, "h", 100, 2)] == [7, 6]
        assert await s.history(T, SP, "nope", None, 10) == []
        assert all(h.updated_by == "alice" and h.key == "h" for h in hist)

    run(body)


def test_log_is_oldest_first_by_seq(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        a = ref("alice", "sess-1")
        ids = []
        for i in range(5):
            out = await s.commit(a, req(put(f"k{i}", i), delete(f"d{i}")))
            assert out.result is not None
            ids.append(out.result.commit_id)
        log = await s.log(T, SP, 0, 100)
        assert [r.seq for r in log] == [1, 2, 3, 4, 5]
        assert [r.commit_id for r in log] == ids
        assert log[0].subject == "alice" and log[0].session == "sess-1"
        assert log[2].writes == [
            {"key": "k2", "version": 1, "deleted": False},
            {"key": "d2", "version": 1, "deleted": True},
        ]
        assert [r.seq for r in await s.log(T, SP, 2, 2)] == [3, 4]
        assert await s.log(T, SP, 5, 10) == []
        assert await s.log(T, "nothing", 0, 10) == []
        j = log[0].to_json()
        assert set(j) == {"seq", "commit_id", "committed_by", "session", "at", "writes"}

    run(body)


def test_list_spaces_and_reset(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        await ok(s, ref("a", space="zeta"), put("k"))
        await ok(s, ref("a", space="alpha"), put("k"), put("j"))
        await ok(s, ref("a", space="alpha"), put("k"))
        await ok(s, ref("a", space="x", tenant="other"), put("k"))
        await s.read(ref("a", space="readonly"), "k")  # reads create no space
        conflict = await s.commit(ref("a", space="conf"), req(put("k", 1, expected=3)))
        assert conflict.conflicts  # but any commit attempt does (as in SQLStore)
        spaces = await s.list_spaces(T)
        assert [(d["space"], d["seq"]) for d in spaces] == [("alpha", 2), ("conf", 0), ("zeta", 1)]
        assert all(isinstance(d["created_at"], float) for d in spaces)
        await s.reset(T)
        assert await s.list_spaces(T) == []
        assert not await s.space_exists(T, "alpha")
        assert await s.get_epoch(ref("a", space="readonly")) is None
        assert await s.history(T, "alpha", "k", None, 10) == []
        assert [d["space"] for d in await s.list_spaces("other")] == ["x"]
        # A space used after a reset starts from scratch and is listed again.
        assert await ok(s, ref("a", space="alpha"), put("k")) == {"k": 1}
        assert [d["space"] for d in await s.list_spaces(T)] == ["alpha"]

    run(body)


def test_prefixes_isolate_stores(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        s1 = RedisStore(Settings(redis_prefix=prefix), redis_url)
        s2 = RedisStore(Settings(redis_prefix=prefix + "b"), redis_url)
        try:
            await ok(s1, ref("a"), put("k"))
            assert await s2.list_spaces(T) == []
            assert await s2.read(ref("a"), "k") is None
            await s2.reset(T)
            assert [d["space"] for d in await s1.list_spaces(T)] == [SP]
        finally:
            await s2.reset(T)
            await s1.close()
            await s2.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_counter_has_no_lost_updates(run: Callable[..., Any]) -> None:
    """Agents on several "processes" increment one counter with read-validate-commit."""

    async def body(*stores: RedisStore) -> None:
        await ok(stores[0], ref("init"), put("counter", 0))

        async def agent(i: int) -> int:
            s = stores[i % len(stores)]
            who = ref(f"agent{i}")
            done = conflicts = 0
            while done < 10:
                shard = await s.read(who, "counter")
                assert shard is not None
                out = await s.commit(who, req(put("counter", int(shard.value_json) + 1)))
                if out.result is not None:
                    done += 1
                else:
                    conflicts += 1
            return conflicts

        await asyncio.gather(*[agent(i) for i in range(8)])
        shard = await stores[0].read(ref("check"), "counter")
        assert shard is not None and shard.value_json == "80" and shard.meta.version == 81
        log = await stores[0].log(T, SP, 0, 1000)
        assert [r.seq for r in log] == list(range(1, 82))
        hist = await stores[0].history(T, SP, "counter", None, 1000)
        assert [h.value_json for h in reversed(hist)] == [str(i) for i in range(81)]

    run(body, n=3)


# ---------------------------------------------------------------------------- unavailability


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_redis_is_503() -> None:
    async def main() -> None:
        s = RedisStore(Settings(redis_prefix="never"), f"redis://127.0.0.1:{_closed_port()}/0")
        await s.start()  # does not connect
        calls: list[Callable[[], Awaitable[Any]]] = [
            s.ping,
            lambda: s.read(ref("a"), "k"),
            lambda: s.list(ref("a"), "", None, 10),
            lambda: s.commit(ref("a"), req(put("k"))),
            lambda: s.commit(ref("a"), req(put("k"), idem="i")),
            lambda: s.get_epoch(ref("a")),
            lambda: s.clear_epoch(ref("a")),
            lambda: s.space_exists(T, SP),
            lambda: s.history(T, SP, "k", None, 10),
            lambda: s.log(T, SP, 0, 10),
            lambda: s.list_spaces(T),
            lambda: s.reset(T),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable) as exc:
                await call()
            assert exc.value.status == 503 and exc.value.retryable
        await s.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "error",
    [
        rexc.ConnectionError("reset by peer"),
        rexc.TimeoutError("Timeout reading from socket"),
        rexc.BusyLoadingError("Redis is loading the dataset in memory"),
        OSError("network is unreachable"),
        TimeoutError(),
        rexc.ResponseError("BUSY Redis is busy running a script."),
        rexc.ReadOnlyError("You can't write against a read only replica."),
        rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ],
)
def test_transient_errors_are_503(run: Callable[..., Any], error: BaseException) -> None:
    async def body(s: RedisStore) -> None:
        async def boom(*_args: Any, **_kw: Any) -> Any:
            raise error

        class BoomPipeline:
            def execute_command(self, *_args: Any, **_kw: Any) -> None:
                pass

            async def execute(self, *_args: Any, **_kw: Any) -> Any:
                raise error

        s.client.execute_command = boom
        s.client.hgetall = boom
        s.client.pipeline = lambda *_a, **_kw: BoomPipeline()
        with pytest.raises(BackendUnavailable):
            await s.read(ref("a"), "k")
        # Both commit paths: the one-round-trip path of a session with no reads, and the
        # two-trip path of one this process delivered a read to.
        with pytest.raises(BackendUnavailable):
            await s.commit(ref("a"), req(put("k")))
        s._note_reader(ref("a"))
        with pytest.raises(BackendUnavailable):
            await s.commit(ref("a"), req(put("k")))

    run(body)


def test_other_errors_are_not_hidden_as_503(run: Callable[..., Any]) -> None:
    async def body(s: RedisStore) -> None:
        async def boom(*_args: Any, **_kw: Any) -> Any:
            raise rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

        s.client.execute_command = boom
        with pytest.raises(rexc.ResponseError):
            await s.read(ref("a"), "k")

    run(body)


def test_scripts_reload_after_noscript_is_transparent(run: Callable[..., Any]) -> None:
    """NOSCRIPT (a restarted Redis, a failover) must not surface: the script is loaded again.
    Simulated with script texts Redis has never seen (SCRIPT FLUSH would hit other users)."""

    async def body(s: RedisStore) -> None:
        tag = uuid.uuid4().hex
        for script in (s._read, s._commit, s._list, s._history):
            script.source += f"\n-- {tag}"
            script.sha = hashlib.sha1(script.source.encode()).hexdigest()
        await s.read(ref("a"), "k")
        assert await ok(s, ref("b"), put("k")) == {"k": 1}
        assert (await s.list(ref("a"), "", None, 5)).items[0].key == "k"
        assert len(await s.history(T, SP, "k", None, 5)) == 1

    run(body)


# ---------------------------------------------------------------------------- SQL equivalence


class _Clock:
    t = 1_000_000.0


def _norm(x: Any) -> Any:
    """Comparable form of a store answer: commit ids are random, everything else must match."""
    if isinstance(x, CommitOutcome):
        if x.result is not None:
            return ("ok", x.result.seq, x.result.versions)
        if x.stored is not None:
            body = dict(x.stored.body)
            body.pop("commit_id", None)
            return ("stored", x.stored.status, body, x.stored.fingerprint)
        return ("conflict", [c.to_json() for c in x.conflicts or []])
    if isinstance(x, list):
        return [_norm(i) for i in x]
    if hasattr(x, "__dataclass_fields__"):
        d = {f: _norm(getattr(x, f)) for f in x.__dataclass_fields__}
        d.pop("commit_id", None)
        d.pop("generation", None)  # internal change counter; Redis also bumps it on overflow
        if "ranges" in d:
            d["ranges"] = sorted(d["ranges"], key=lambda r: str(r))
        return d
    return x


async def _scenario(store: Store, seed: int, log: list[Any], clock: _Clock) -> None:
    rng = random.Random(seed)
    agents = [ref("a"), ref("b"), ref("b", "s2"), ref("c")]
    keys = ["x/1", "x/2", "x/10", "y/1", "y", "z"]
    prefixes = ["", "x/", "y", "x/1", "q"]
    for step in range(250):
        clock.t += 1.0
        who = rng.choice(agents)
        op = rng.random()
        try:
            if op < 0.35:
                res: Any = await store.read(who, rng.choice(keys))
            elif op < 0.5:
                pfx = rng.choice(prefixes)
                start = rng.choice([None, None, *[k for k in keys if k.startswith(pfx)]])
                res = await store.list(who, pfx, start, rng.choice([1, 2, 100]))
            elif op < 0.9:
                writes = []
                for k in rng.sample(keys, rng.randint(1, 3)):
                    expected = rng.choice([None, None, None, 0, 1, 2])
                    if rng.random() < 0.2:
                        writes.append(delete(k, expected))
                    else:
                        writes.append(put(k, step, expected))
                reads = {k: rng.randint(0, 3) for k in rng.sample(keys, rng.choice([0, 0, 0, 1]))}
                idem = rng.choice([None, None, "k1", "k2"])
                res = await store.commit(who, req(*writes, reads=reads, idem=idem))
            elif op < 0.95:
                res = await store.get_epoch(who)
            else:
                res = await store.clear_epoch(who)
        except AgentbusError as exc:
            res = ("error", exc.status, exc.code)
        log.append((step, _norm(res)))
    for k in keys:
        log.append(("history", k, _norm(await store.history(T, SP, k, None, 100))))
    log.append(("log", _norm(await store.log(T, SP, 0, 1000))))
    spaces = await store.list_spaces(T)
    log.append(("spaces", [(d["space"], d["seq"], d["created_at"]) for d in spaces]))


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A new, migrated PostgreSQL database (the scenario below owns its tenant and space)."""
    from agentbus.migrate import upgrade
    from tests.conftest import fresh_pg_database

    with fresh_pg_database("agentbus_eq") as url:
        upgrade(url)
        yield url


@pytest.mark.postgres
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_answers_on_every_backend(
    redis_url: str, fresh_pg_url: str, prefix: str, tmp_path: Path, seed: int
) -> None:
    """A random workload gives identical answers on SQLite, PostgreSQL and Redis (time is
    faked so that timestamps, TTL expiry and overflow line up). Each backend has its own hot
    path for reads and commits (a writer thread, server functions, Lua), so this is what
    keeps them saying the same thing."""
    from agentbus.migrate import upgrade
    from agentbus.store import open_store

    url = f"sqlite:///{tmp_path / 'eq.db'}"
    upgrade(url)
    cfg = Settings(redis_prefix=prefix, readset_ttl_s=12, readset_max_entries=5, sqlite_synchronous="OFF")

    async def main() -> list[list[Any]]:
        out: list[list[Any]] = []
        for store in (open_store(cfg, url), open_store(cfg, fresh_pg_url), RedisStore(cfg, redis_url)):
            clock = _Clock()
            store.now = lambda clock=clock: clock.t  # type: ignore[method-assign]
            await store.start()
            try:
                log: list[Any] = []
                await _scenario(store, seed, log, clock)
                out.append(log)
            finally:
                await store.close()
        return out

    sqlite_log, pg_log, redis_log = asyncio.run(main())
    kinds_seen = {type(r[1]).__name__ if not isinstance(r[1], tuple) else r[1][0] for r in sqlite_log}
    assert {"conflict", "ok"} <= kinds_seen
    for a, b, c in zip(sqlite_log, pg_log, redis_log, strict=True):
        assert a == b, "SQLite and PostgreSQL disagree"
        assert a == c, "SQLite and Redis disagree"


def test_range_ident_format_matches_core() -> None:
    """list.lua builds the range ident as RangeRead.ident(end_at=None) + end_at."""
    for p, s, e in [("", None, None), ("a/", "a/b", "a/c"), ("x", None, "xy")]:
        assert RangeRead(p, s, e, 0).ident == RangeRead(p, s, None, 0).ident + (e or "")


# ---------------------------------------------------------------------------- tokens and audit


async def _token_and_audit_answers(store: Store, tenant: str) -> list[Any]:
    """The same token/audit calls on any store, answers as comparable data."""
    from agentbus.auth.bootstrap import ensure_admin, issue_token
    from agentbus.auth.tokens import AuditEvent

    s: Any = store
    out: list[Any] = []

    def pub(recs: list[Any]) -> list[Any]:
        return [(r.hash, r.public()) for r in recs]

    plain, rec = issue_token(
        tenant=tenant, subject="agent-1", kind="agent", token="ab_fixedtoken-1", spaces=["s1"], description="d"
    )
    rec.id, rec.created_at = "tok_one", 1000.0
    await s.put_token(rec)
    _, rec2 = issue_token(tenant=tenant + "x", subject="op", kind="operator", token="ab_fixedtoken-2", expires_in_s=60)
    rec2.id, rec2.created_at, rec2.expires_at = "tok_two", 1001.5, 1061.5
    await s.put_token(rec2)
    from sqlalchemy.exc import IntegrityError

    with pytest.raises((BadRequest, IntegrityError)):  # the hash is unique
        await s.put_token(rec)
    out.append(pub([await s.token_by_hash(rec.hash)]))
    out.append(await s.token_by_hash("0" * 64))
    out.append(pub([r for r in await s.list_tokens(None) if r.tenant.startswith(tenant)]))
    out.append(pub(await s.list_tokens(tenant)))
    out.append(await s.revoke_token("tok_nonexistent", 5.0))
    first = await s.revoke_token(rec.id, 2000.0)
    again = await s.revoke_token(rec.id, 3000.0)
    out.append((first.revoked_at, again.revoked_at))
    out.append(plain == "ab_fixedtoken-1")
    for i, (at, tn) in enumerate([(10.0, tenant), (11.0, tenant + "x"), (11.0, tenant), (12.5, tenant)]):
        await s.record_audit(AuditEvent(at, tn, f"sub{i}", "token.create", f"t{i}", 200, "127.0.0.1", {"i": i}))
    out.append([e.to_json() for e in await s.audit_log(tenant, 10)])
    out.append([e.to_json() for e in await s.audit_log(tenant, 10, before=12.5)])
    out.append([e.to_json() for e in await s.audit_log(tenant, 1)])
    mine = [e for e in await s.audit_log(None, 1000) if e.tenant.startswith(tenant)]
    out.append([e.to_json() for e in mine])
    # The admin bootstrap works on this store: it creates one admin token, once.
    had_admin = await s.has_admin_token()
    created = await ensure_admin(s, tenant, None)
    assert (created is None) == had_admin
    assert await s.has_admin_token()
    assert await ensure_admin(s, tenant, None) is None
    return out


def test_tokens_and_audit_same_as_sql_store(redis_url: str, prefix: str, tmp_path: Path) -> None:
    from agentbus.migrate import upgrade
    from agentbus.store import open_store

    url = f"sqlite:///{tmp_path / 'tok.db'}"
    upgrade(url)
    cfg = Settings(redis_prefix=prefix, sqlite_synchronous="OFF")

    async def main() -> list[list[Any]]:
        answers = []
        for store in (open_store(cfg, url), RedisStore(cfg, redis_url)):
            await store.start()
            try:
                answers.append(await _token_and_audit_answers(store, "tn"))
            finally:
                await store.close()
        return answers

    sql_answers, redis_answers = asyncio.run(main())
    assert sql_answers == redis_answers


def test_audit_retention_purge(run: Callable[..., Any]) -> None:
    from agentbus.auth.tokens import AuditEvent

    async def body(s: RedisStore) -> None:
        now = time.time()
        await s.record_audit(AuditEvent(now - 100, "t", "a", "x", "y", 403))
        await s.record_audit(AuditEvent(now, "t", "b", "x", "y", 403))
        assert await s.purge() == 1
        assert [e.subject for e in await s.audit_log("t", 10)] == ["b"]
        assert [e.subject for e in await s.audit_log(None, 10)] == ["b"]

    run(body, audit_retention_s=50)


def test_space_listed_again_after_a_reset_by_another_process(run: Callable[..., Any]) -> None:
    async def body(s1: RedisStore, s2: RedisStore) -> None:
        await ok(s1, ref("a"), put("k"))
        await s2.reset(T)
        assert await s1.list_spaces(T) == []
        await ok(s1, ref("a"), put("k"))  # s1 had registered SP before the reset
        assert [d["space"] for d in await s2.list_spaces(T)] == [SP]
        await s2.reset(T)
        out = await s1.commit(ref("a"), req(put("k", 1, expected=7)))  # a 409 creates it too
        assert out.conflicts
        assert [(d["space"], d["seq"]) for d in await s2.list_spaces(T)] == [(SP, 0)]

    run(body, n=2)


# ---------------------------------------------------------------------------- Redis Cluster


@pytest.fixture(scope="module")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway 3-node Redis Cluster (no replicas) of our own, on free ports."""
    import shutil
    import subprocess

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("SKIPPING: redis-server/redis-cli not installed, cannot start a Redis Cluster")
    root = tmp_path_factory.mktemp("cluster")
    procs: list[subprocess.Popen[bytes]] = []

    def start_nodes() -> list[int] | None:
        """Three nodes on fresh ports; None if one exited (its port was taken meanwhile)."""
        ports = _cluster_ports(3)
        for port in ports:
            d = root / f"{port}-{uuid.uuid4().hex[:6]}"
            d.mkdir()
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", "nodes.conf", "--dir", str(d), "--save", "", "--appendonly", "no"]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        for port, proc in zip(ports, procs[-3:], strict=True):
            while not _port_ready(port):
                if proc.poll() is not None:
                    return None
                if time.monotonic() > deadline:
                    pytest.fail("the test Redis Cluster nodes did not start")
                time.sleep(0.05)
        return ports

    try:
        for _ in range(3):
            started = start_nodes()
            if started is not None:
                break
            for proc in procs:
                proc.terminate()
            procs.clear()
        else:
            pytest.fail("the test Redis Cluster nodes kept exiting at start (ports taken?)")
        ports = started
        nodes = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while redis.Redis(host="127.0.0.1", port=ports[0]).cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                pytest.fail("the test Redis Cluster did not converge")
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free and valid too."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        # Bus ports (port + 10000) stay below Linux's ephemeral range (32768+), where an
        # outgoing connection may hold the port at any moment.
        port = rng.randrange(20000, 22700)
        if port not in ports and not _port_ready(port) and not _port_ready(port + 10000):
            ports.append(port)
    return ports


def _port_ready(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_redis_cluster_keeps_each_space_in_one_slot(redis_cluster_url: str) -> None:
    """Every script touches only keys of one space's hash tag (a CROSSSLOT error otherwise),
    and spaces spread over the nodes; the random workload still matches the SQL answers'
    shape (no errors), tokens/audit and reset work across nodes."""

    async def main() -> None:
        s = RedisStore(Settings(redis_prefix="cl"), redis_cluster_url)
        await s.start()
        try:
            for sp in (f"space-{i}" for i in range(6)):
                a, b = ref("alice", space=sp), ref("bob", space=sp)
                await s.read(a, "k")
                await s.list(a, "j/", None, 10)
                assert (await s.commit(b, req(put("k"), put("j/1"), idem="i1"))).result is not None
                assert kinds(await s.commit(a, req(put("z"), idem="i2"))) == [("k", "stale_read"), ("j/1", "phantom")]
                replay = await s.commit(a, req(put("z"), idem="i2"))
                assert replay.stored is not None and replay.stored.status == 409
                assert len(await s.history(T, sp, "k", None, 10)) == 1
                assert [r.seq for r in await s.log(T, sp, 0, 10)] == [1]
            assert len(await s.list_spaces(T)) == 6
            clock = _Clock()
            steps: list[Any] = []
            await _scenario(s, 7, steps, clock)
            assert any(isinstance(x[1], tuple) and x[1][0] == "conflict" for x in steps)
            await _token_and_audit_answers(s, "tn")
            # Timeline events of all six spaces (several nodes) in one append: one script
            # call per space's stream, each in its own slot.
            traces = RedisTraceStore(s, retention_s=3600, max_per_space=100)
            now = time.time()
            await traces.append(
                [
                    TraceEvent(T, f"space-{i}", now, "alice", "s", "commit", "", "", {"n": n})
                    for n in range(3)
                    for i in range(6)
                ]
            )
            for i in range(6):
                got = await traces.events(T, f"space-{i}", None, 10)
                assert [e.data["n"] for e in got] == [0, 1, 2]
            await s.reset(T)
            assert await s.list_spaces(T) == []
        finally:
            await s.close()

    asyncio.run(main())
    # The six spaces were spread over more than one node.
    r = redis.RedisCluster.from_url(redis_cluster_url.replace("redis+cluster", "redis"))
    slots = {r.keyslot(f"cl:{{{T}/space-{i}}}:meta") for i in range(6)}
    owners = {str(r.get_node_from_key(f"cl:{{{T}/space-{i}}}:meta")) for i in range(6)}
    r.close()
    assert len(slots) == 6 and len(owners) > 1


def test_budgets_share_the_store_client(run: Callable[..., Any]) -> None:
    """The broker's budget accounting uses the same Redis and prefix as the bus."""
    from agentbus.store.redis_budget import RedisBudgetStore

    async def body(s: RedisStore) -> None:
        assert isinstance(s.budgets, RedisBudgetStore)
        assert s.budgets.client is s.client and s.budgets.prefix == s.prefix
        assert await s.budgets.counters({}, time.time()) == {}

    run(body)


def test_connection_pool_serves_waiters_in_order(redis_url: str) -> None:
    """A waiter is not overtaken by callers that come later (redis-py's own blocking pool
    let tasks that release and re-acquire in a loop starve a waiter until its timeout)."""
    from agentbus.store.redis_pool import FairBlockingConnectionPool

    async def main(pool_cls: Any) -> float:
        pool = pool_cls.from_url(redis_url, max_connections=1, timeout=3.0)
        stop = False

        async def hog() -> None:
            while not stop:
                conn = await pool.get_connection()
                await asyncio.sleep(0.001)
                await pool.release(conn)

        hogs = [asyncio.create_task(hog()) for _ in range(4)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        waits = []
        try:
            for _ in range(20):
                conn = await pool.get_connection()
                waits.append(time.monotonic() - t0)
                await pool.release(conn)
                t0 = time.monotonic()
        finally:
            stop = True
            await asyncio.gather(*hogs)
            await pool.disconnect()
        return max(waits)

    # Four hogs ahead of us: a fair turn comes within a few of their 1 ms holds.
    assert asyncio.run(main(FairBlockingConnectionPool)) < 0.5
    # The control: redis-py's pool starves the same waiter until its timeout. (If a redis-py
    # release makes this pass, its pool has become fair and ours can go.)
    import redis.asyncio as aioredis

    with pytest.raises(rexc.ConnectionError, match="No connection available"):
        asyncio.run(main(aioredis.BlockingConnectionPool))
