"""PostgresStore's optimistic commit path (peek, decide in Python, try under the space lock).

The try is a compare-and-apply: these tests make other commits land between the peek and
the try and check that the commit is re-validated (never decided on a stale look), that
the locked fallback answers exactly like the optimistic path, that seqs stay unique and
gap-free under contention, and that an idempotent 200 stores the seq the try assigned.

Stores are driven directly (no HTTP). A second store plays another bus process; hooks
wrapped around ``_peek`` make it commit at the worst moment. pytest-asyncio is not used:
each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg.exceptions as asyncpg_errors
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentbus.core import validation as v
from agentbus.core.errors import BackendUnavailable, ReadSetExpired
from agentbus.core.model import SessionRef, WriteOp
from agentbus.settings import Settings
from agentbus.store import postgres as pg
from agentbus.store.base import CommitOutcome, CommitRequest, Store, outcome_body
from agentbus.store.postgres import PostgresStore
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.postgres

Body = Callable[..., Awaitable[Any]]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A new, migrated database for this module (tests use their own tenant)."""
    from agentbus.migrate import upgrade

    with fresh_pg_database("agentbus_commit") as url:
        upgrade(url)
        yield url


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def run(pg_url: str) -> Callable[..., Any]:
    """``run(body, n=2, one_trip=False, **settings)``: open ``n`` stores (as if n bus
    processes) on the database, await ``body(*stores)``, close them. Most tests here drive
    the peek/try path alone (``one_trip=False``); the one-round-trip tests turn it on."""

    def runner(body: Body, n: int = 2, one_trip: bool = False, **settings: Any) -> Any:
        async def main() -> Any:
            stores = [PostgresStore(Settings(store=pg_url, **settings), pg_url) for _ in range(n)]
            for s in stores:
                s.one_trip = one_trip
                await s.start()
            try:
                return await asyncio.wait_for(body(*stores), 120)
            finally:
                for s in stores:
                    await s.close()

        return asyncio.run(main())

    return runner


def put(key: str, value: Any = 1, expected: int | None = None) -> WriteOp:
    return WriteOp(key, json.dumps(value), False, expected)


def req(*writes: WriteOp, reads: dict[str, int] | None = None, idem: str | None = None) -> CommitRequest:
    fp = v.fingerprint([str(w) for w in writes]) if idem else None
    return CommitRequest(tuple(writes), dict(reads or {}), idem, fp)


async def ok(store: Store, who: SessionRef, *writes: WriteOp) -> CommitOutcome:
    out = await store.commit(who, req(*writes))
    assert out.result is not None, out
    return out


def kinds(out: CommitOutcome) -> list[tuple[str, str]]:
    assert out.conflicts is not None, out
    return [(c.key, c.kind) for c in out.conflicts]


class Calls:
    """Counts calls of the store's commit steps, and runs ``after_peek`` hooks (in order,
    one per peek; an empty list means no more interference)."""

    def __init__(self, store: PostgresStore, after_peek: list[Callable[[], Awaitable[Any]]] | None = None) -> None:
        self.peeks = self.tries = self.failed_tries = self.locked = self.blinds = self.blinds_applied = 0
        self.after_peek = list(after_peek or [])
        peek, try_, locked, blind = store._peek, store._try, store._commit_locked, store._blind

        async def blind_hook(*a: Any) -> Any:
            self.blinds += 1
            row = await blind(*a)
            self.blinds_applied += row["o_new_seq"] is not None
            return row

        async def peek_hook(*a: Any) -> Any:
            self.peeks += 1
            row = await peek(*a)
            if self.after_peek:
                await self.after_peek.pop(0)()
            return row

        async def try_hook(*a: Any) -> int:
            self.tries += 1
            res = await try_(*a)
            self.failed_tries += res == pg.TRY_FAILED
            return res

        async def locked_hook(*a: Any) -> Any:
            self.locked += 1
            return await locked(*a)

        store._peek = peek_hook  # type: ignore[method-assign]
        store._try = try_hook  # type: ignore[method-assign]
        store._commit_locked = locked_hook  # type: ignore[method-assign]
        store._blind = blind_hook  # type: ignore[method-assign]


async def seqs_of(store: Store, tenant: str, space: str) -> list[int]:
    return [c.seq for c in await store.log(tenant, space, 0, 100_000)]


# ---------------------------------------------------------------------------- round trips


def test_a_clean_commit_is_one_peek_and_one_try(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore) -> None:
        who = SessionRef(tenant, "sp", "alice")
        calls = Calls(a)
        out = await ok(a, who, put("k", 1, expected=0))
        assert out.result is not None and out.result.seq == 1
        assert (calls.peeks, calls.tries, calls.failed_tries, calls.locked) == (1, 1, 0, 0)

    run(body, n=1)


def test_a_rejected_expected_version_with_nothing_to_store_is_one_round_trip(
    run: Callable[..., Any], tenant: str
) -> None:
    async def body(a: PostgresStore) -> None:
        who = SessionRef(tenant, "sp", "alice")
        await ok(a, who, put("k", 1, expected=0))
        calls = Calls(a)
        out = await a.commit(who, req(put("k", 2, expected=0)))
        assert kinds(out) == [("k", "write_conflict")]
        assert out.conflicts is not None and out.conflicts[0].current_version == 1
        assert (calls.peeks, calls.tries) == (1, 0)
        # With an epoch to end, or an Idempotency-Key, the 409 must be stored: a try.
        await a.read(who, "k")
        out = await a.commit(who, req(put("k", 2, expected=0)))
        assert kinds(out) == [("k", "write_conflict")]
        assert (calls.peeks, calls.tries) == (2, 1)
        assert await a.get_epoch(who) is None

    run(body, n=1)


def test_a_409_on_a_new_space_still_creates_the_space(run: Callable[..., Any], tenant: str) -> None:
    """As on the locked path (and SQLite, Redis): every commit outcome creates the space."""

    async def body(a: PostgresStore) -> None:
        who = SessionRef(tenant, "fresh", "alice")
        out = await a.commit(who, req(put("k", 1, expected=3)))
        assert kinds(out) == [("k", "write_conflict")]
        assert [(d["space"], d["seq"]) for d in await a.list_spaces(tenant)] == [("fresh", 0)]

    run(body, n=1)


# ---------------------------------------------------------------------------- a commit between peek and try


def test_expected_version_made_stale_after_the_peek_is_revalidated(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1, expected=0))
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("k", 2))])
        out = await a.commit(who, req(put("k", 3, expected=1)))
        assert kinds(out) == [("k", "write_conflict")]
        assert out.conflicts is not None
        assert (out.conflicts[0].current_version, out.conflicts[0].committed_by) == (2, "bob")
        # The try failed, the second peek saw bob's commit: a 409 with nothing to store.
        assert (calls.peeks, calls.tries, calls.failed_tries, calls.locked) == (2, 1, 1, 0)
        assert await seqs_of(a, tenant, "sp") == [1, 2]

    run(body)


def test_delivery_log_read_made_stale_after_the_peek_is_revalidated(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1))
        await a.read(who, "k")
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("k", 2))])
        out = await a.commit(who, req(put("out", 1)))
        assert kinds(out) == [("k", "stale_read")]
        assert (calls.peeks, calls.tries, calls.failed_tries) == (2, 2, 1)
        assert await a.get_epoch(who) is None  # a 409 ends the epoch too
        assert await a.read(who, "out") is None

    run(body)


def test_unrelated_commit_after_the_peek_does_not_fail_the_try(run: Callable[..., Any], tenant: str) -> None:
    """No range reads: only the heads looked at matter, so the try succeeds at once, with
    the seq assigned under the lock (not the peek's seq + 1)."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1))
        await a.read(who, "k")
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("elsewhere", 1))])
        out = await ok(a, who, put("k", 2, expected=1))
        assert out.result is not None
        assert (out.result.seq, out.result.versions) == (3, {"k": 2})
        assert (calls.peeks, calls.tries, calls.failed_tries, calls.locked) == (1, 1, 0, 0)
        log = await a.log(tenant, "sp", 0, 100)
        assert [(c.seq, c.subject, c.writes[0]["key"]) for c in log] == [
            (1, "alice", "k"),
            (2, "bob", "elsewhere"),
            (3, "alice", "k"),
        ]
        assert log[2].commit_id == out.result.commit_id
        assert [(d["space"], d["seq"]) for d in await a.list_spaces(tenant)] == [("sp", 3)]

    run(body)


def test_range_read_fails_the_try_on_any_commit_and_finds_phantoms(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("p/1", 1))
        # An unrelated commit: the try fails (the seq moved), the retry commits.
        await a.list(who, "p/", None, 10)
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("q/1", 1))])
        out = await ok(a, who, put("out", 1))
        assert out.result is not None and out.result.seq == 3
        assert (calls.peeks, calls.tries, calls.failed_tries) == (2, 2, 1)
        # A commit under the prefix: the retry finds the phantom.
        await a.list(who, "p/", None, 10)
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("p/2", 1))])
        out = await a.commit(who, req(put("out", 2)))
        assert kinds(out) == [("p/2", "phantom")]
        assert (calls.peeks, calls.tries, calls.failed_tries) == (2, 2, 1)
        assert await seqs_of(a, tenant, "sp") == [1, 2, 3, 4]

    run(body)


def test_epoch_replaced_after_the_peek_is_noticed_although_its_generation_is_the_same(
    run: Callable[..., Any], tenant: str
) -> None:
    """Between peek and try the session clears its read set and reads another shard, which
    bob then changes: the new epoch has the same generation and start time (frozen clock)
    as the one peeked, but it is another epoch, and the commit must be validated against it."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        a.now = lambda: 1000.0  # type: ignore[method-assign]
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1), put("j", 1))
        await a.read(who, "k")

        async def replace_epoch() -> None:
            before = await a.get_epoch(who)
            await a.clear_epoch(who)
            await a.read(who, "j")
            after = await a.get_epoch(who)
            assert before is not None and after is not None
            assert (before.generation, before.started_at) == (after.generation, after.started_at)
            await ok(b, other, put("j", 2))

        calls = Calls(a, after_peek=[replace_epoch])
        out = await a.commit(who, req(put("out", 1)))
        assert kinds(out) == [("j", "stale_read")]
        assert (calls.peeks, calls.failed_tries) == (2, 1)

    run(body)


def test_a_read_by_the_same_session_after_the_peek_is_validated(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1), put("j", 1))
        await a.read(who, "k")

        async def read_j_then_bob_writes_it() -> None:
            await a.read(who, "j")
            await ok(b, other, put("j", 2))

        calls = Calls(a, after_peek=[read_j_then_bob_writes_it])
        out = await a.commit(who, req(put("out", 1)))
        assert kinds(out) == [("j", "stale_read")]
        assert (calls.peeks, calls.failed_tries) == (2, 1)

    run(body)


def test_a_hot_space_falls_back_to_the_locked_path(run: Callable[..., Any], tenant: str) -> None:
    """Every optimistic try fails (a commit lands after each peek): after two, the locked
    path decides, with the same rules."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("p/1", 1))
        await a.list(who, "p/", None, 10)
        calls = Calls(a, after_peek=[lambda i=i: ok(b, other, put(f"q/{i}", i)) for i in range(2)])
        out = await ok(a, who, put("out", 1))
        assert out.result is not None and out.result.seq == 4
        assert (calls.peeks, calls.tries, calls.failed_tries, calls.locked) == (2, 2, 2, 1)
        # The locked path ended the epoch and put the commit at its place in the log.
        assert await a.get_epoch(who) is None
        log = await a.log(tenant, "sp", 0, 100)
        assert [c.seq for c in log] == [1, 2, 3, 4]
        assert log[-1].commit_id == out.result.commit_id
        # Same with a phantom that appears after the last peek: the locked path finds it.
        await a.list(who, "p/", None, 10)
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("q/y", 0)), lambda: ok(b, other, put("p/x", 1))])
        out = await a.commit(who, req(put("out", 2)))
        assert kinds(out) == [("p/x", "phantom")]
        assert (calls.failed_tries, calls.locked) == (2, 1)
        # A 409 seen by a peek is the answer, whatever commits after it: its try (which
        # stores the epoch's end) does not fail on them.
        await a.list(who, "p/", None, 10)
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("p/z", 1)), lambda: ok(b, other, put("p/w", 1))])
        out = await a.commit(who, req(put("out", 3)))
        assert kinds(out) == [("p/z", "phantom")]
        assert (calls.peeks, calls.tries, calls.failed_tries, calls.locked) == (2, 2, 1, 0)
        assert await a.get_epoch(who) is None

    run(body)


# ---------------------------------------------------------------------------- optimistic == locked


async def _scenario(s: PostgresStore, b: PostgresStore, tenant: str, clock: list[float]) -> list[Any]:
    """A fixed sequence of commits of every kind; the answers as comparable data."""
    out: list[Any] = []
    a1, a2 = SessionRef(tenant, "sp", "alice", "s1"), SessionRef(tenant, "sp", "alice", "s2")
    bob = SessionRef(tenant, "sp", "bob")

    async def commit(who: SessionRef, r: CommitRequest) -> None:
        try:
            o = await s.commit(who, r)
        except ReadSetExpired as exc:
            out.append(("expired", exc.code))
            return
        status, body = outcome_body(o)
        body = {k: val for k, val in body.items() if k != "commit_id"}
        out.append((status, o.stored is not None, body))

    await commit(a1, req(put("x", 1, expected=0)))
    await commit(a1, req(put("x", 1, expected=0)))  # write_conflict
    await s.read(a1, "x")
    await ok(b, bob, put("x", 2))
    await commit(a1, req(put("y", 1)))  # stale_read
    await s.read(a1, "x")
    await s.read(a1, "nothing")
    await commit(a1, req(put("y", 2), put("nothing", 1)))  # 200 with two reads
    await s.list(a2, "p/", None, 10)
    await ok(b, bob, put("p/1", 1))
    await commit(a2, req(put("z", 1)))  # phantom
    await s.list(a2, "p/", None, 10)
    await ok(b, bob, put("q/1", 1))
    await commit(a2, req(put("z", 2)))  # 200 (a commit outside the range)
    for _ in range(2):
        await commit(a1, req(put("w", 1), idem="i-200"))
    await s.read(a1, "x")
    await ok(b, bob, put("x", 3))
    for _ in range(2):
        await commit(a1, req(put("y", 3), idem="i-409"))
    await commit(a1, req(put("q", 1), reads={"x": 1}))  # stale explicit read
    await commit(a1, req(put("q", 1), reads={"x": 3}))
    await commit(a1, req(WriteOp("x", None, True, 3)))  # delete
    await commit(a1, req(put("x", 4, expected=0)))  # a tombstone accepts 0
    await s.read(a1, "x")
    clock[0] += 100  # past readset_ttl_s
    await commit(a1, req(put("y", 4)))
    for k in ("r1", "r2", "r3", "r4"):
        await s.read(a2, k)  # one more than readset_max_entries
    await commit(a2, req(put("y", 5)))
    await commit(SessionRef(tenant, "other", "alice"), req(put("k", 1, expected=5)))  # a new space, 409
    for who in (a1, a2):
        out.append(("epoch", await s.get_epoch(who)))
    out.append(("log", [(c.seq, c.subject, c.session, c.writes) for c in await s.log(tenant, "sp", 0, 1000)]))
    out.append(("spaces", await s.list_spaces(tenant)))
    for key in ("x", "y", "w", "nothing"):
        out.append(
            (
                "history",
                [(h.version, h.value_json, h.deleted, h.seq) for h in await s.history(tenant, "sp", key, None, 100)],
            )
        )
    return out


@pytest.mark.parametrize("mode", ["locked-only", "tries-fail", "one-trip"])
def test_locked_path_gives_the_same_answers(
    run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The same scenario on the optimistic path and on the locked path (optimistic tries
    made to fail, so every commit that stores anything falls back) gives the same answers,
    row for row; and so does the one-round-trip path where it applies."""

    async def body(s: PostgresStore, b: PostgresStore) -> tuple[list[Any], list[Any], Calls]:
        clock = [1_000_000.0]
        s.now = lambda: clock[0]  # type: ignore[method-assign]
        b.now = lambda: clock[0]  # type: ignore[method-assign]
        reference = await _scenario(s, b, f"t{uuid.uuid4().hex[:10]}", clock)
        clock[0] = 1_000_000.0
        calls = Calls(s)
        if mode == "tries-fail":
            # The try is not even sent: as if every one had found the state changed.
            async def fail(*_: Any) -> int:
                calls.tries += 1
                return pg.TRY_FAILED

            s._try = fail  # type: ignore[method-assign]
        elif mode == "one-trip":
            s.one_trip = True
        else:
            monkeypatch.setattr(pg, "OPTIMISTIC_ATTEMPTS", 0)
        locked = await _scenario(s, b, f"t{uuid.uuid4().hex[:10]}", clock)
        return reference, locked, calls

    reference, locked, calls = run(body, readset_ttl_s=50, readset_max_entries=3)
    if mode == "one-trip":
        # Only commits whose every write is guarded go blind: the first write, the delete
        # (applied in one trip), and three stale expected_versions (the peek inside that trip).
        assert (calls.blinds, calls.blinds_applied, calls.locked) == (5, 2, 0), vars(calls)
    else:
        assert calls.locked > 5
    statuses = [r[0] for r in reference]
    assert (statuses.count(200), statuses.count(409), statuses.count("expired")) == (8, 7, 2), reference
    assert reference == locked


# ---------------------------------------------------------------------------- contention


@pytest.mark.parametrize("one_trip", [False, True], ids=["peek-try", "one-trip"])
@pytest.mark.parametrize("mode", ["expected", "readset"])
def test_concurrent_increments_lose_nothing_and_seqs_have_no_gaps(
    run: Callable[..., Any], tenant: str, mode: str, one_trip: bool
) -> None:
    """32 tasks on two stores (4 connections each) increment one counter, retrying on 409:
    with ``expected_version`` only (the conflict says the current version), or through the
    delivery log (read, then commit). Every 200 is one increment; seqs are 1..n. With the
    one-round-trip path, commits race between its unlocked pre-check and the try."""
    tasks, per_task = 32, 3

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        space = f"hot-{mode}"
        await ok(a, SessionRef(tenant, space, "setup"), put("counter", 0, expected=0))
        results: list[CommitOutcome] = []
        conflicts = 0

        async def worker(i: int) -> None:
            nonlocal conflicts
            store = (a, b)[i % 2]
            who = SessionRef(tenant, space, f"agent{i}", "s")
            version, done = 1, 0
            while done < per_task:
                if mode == "readset":
                    shard = await store.read(who, "counter")
                    assert shard is not None
                    version = shard.meta.version
                    assert json.loads(shard.value_json) == version - 1
                    r = req(put("counter", version))
                else:
                    r = req(put("counter", version, expected=version))
                out = await store.commit(who, r)
                if out.result is not None:
                    results.append(out)
                    version, done = out.result.versions["counter"], done + 1
                else:
                    assert out.conflicts is not None and len(out.conflicts) == 1
                    c = out.conflicts[0]
                    assert c.kind == ("write_conflict" if mode == "expected" else "stale_read")
                    conflicts += 1
                    version = c.current_version

        await asyncio.gather(*(worker(i) for i in range(tasks)))
        n = tasks * per_task
        assert len(results) == n
        assert conflicts > 0, "no contention: the test proves nothing"
        shard = await a.read(SessionRef(tenant, space, "observer"), "counter")
        assert shard is not None
        assert (json.loads(shard.value_json), shard.meta.version) == (n, n + 1)
        log = await a.log(tenant, space, 0, 100_000)
        assert [c.seq for c in log] == list(range(1, n + 2))
        by_seq = {c.seq: c for c in log}
        assert sorted(o.result.seq for o in results if o.result) == list(range(2, n + 2))
        for o in results:
            assert o.result is not None
            rec = by_seq[o.result.seq]
            assert rec.commit_id == o.result.commit_id
            assert rec.writes == [{"key": "counter", "version": o.result.versions["counter"], "deleted": False}]
        history = await a.history(tenant, space, "counter", None, 1000)
        assert [(h.version, json.loads(h.value_json or "null")) for h in history] == [
            (ver, ver - 1) for ver in range(n + 1, 0, -1)
        ]

    run(body, pool_size=4, one_trip=one_trip)


# ---------------------------------------------------------------------------- idempotency


def _bytes(o: CommitOutcome) -> bytes:
    """What the API would send (orjson, dict order)."""
    status, body = outcome_body(o)
    return str(status).encode() + orjson.dumps(body)


def test_idempotent_200_stores_the_seq_the_try_assigned(run: Callable[..., Any], tenant: str) -> None:
    """A commit lands between the peek and the try, so the seq is not the peek's seq + 1;
    the replay must still say exactly what the first response said."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1))
        calls = Calls(a, after_peek=[lambda: ok(b, other, put("elsewhere", 1))])
        r = req(put("k", 2), put("a-key-with-seq", 3), idem="once")
        first = await a.commit(who, r)
        assert first.result is not None and first.result.seq == 3
        assert calls.failed_tries == 0
        again = await a.commit(who, r)
        assert again.stored is not None and again.stored.fingerprint == r.fingerprint
        assert _bytes(again) == _bytes(first)
        assert json.dumps(again.stored.body) == json.dumps(first.result.to_json())
        assert await seqs_of(a, tenant, "sp") == [1, 2, 3]

    run(body)


@pytest.mark.parametrize("outcome", [200, 409])
def test_a_twin_that_lands_between_peek_and_try_is_replayed(run: Callable[..., Any], tenant: str, outcome: int) -> None:
    """The same request, sent again through another process, completes between this one's
    peek and try. For a 409 no head changed: only the idempotency slot tells the try."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who = SessionRef(tenant, "sp", "alice")
        await ok(a, who, put("src", 1))
        r = req(put("src", 2, expected=1 if outcome == 200 else 0), idem="twin")
        twin: list[CommitOutcome] = []

        async def send_twin() -> None:
            twin.append(await b.commit(who, r))

        calls = Calls(a, after_peek=[send_twin])
        out = await a.commit(who, r)
        assert twin[0].stored is None and out.stored is not None
        assert _bytes(out) == _bytes(twin[0])
        assert outcome_body(out)[0] == outcome
        assert (calls.peeks, calls.tries, calls.failed_tries) == (2, 1, 1)
        assert await seqs_of(a, tenant, "sp") == ([1, 2] if outcome == 200 else [1])

    run(body)


@pytest.mark.parametrize("one_trip", [False, True], ids=["peek-try", "one-trip"])
@pytest.mark.parametrize("outcome", [200, 409])
def test_concurrent_identical_requests_apply_once(
    run: Callable[..., Any], tenant: str, outcome: int, one_trip: bool
) -> None:
    """Ten identical requests at once (other commits going on too): one executes, nine replay
    it, byte for byte; a later retry replays it again."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("src", 1))
        expected = 1 if outcome == 200 else 0
        r = req(put("dst", "once", expected=None), put("src", 2, expected=expected), idem="k-1")

        async def noise() -> None:
            for i in range(10):
                await ok(b, other, put(f"noise/{i}", i))

        outs = await asyncio.gather(*(a.commit(who, r) for _ in range(10)), noise())
        outs = outs[:10]
        fresh = [o for o in outs if o.stored is None]
        assert len(fresh) == 1, outs
        assert {_bytes(o) for o in outs} == {_bytes(fresh[0])}
        assert outcome_body(fresh[0])[0] == outcome
        assert _bytes(await a.commit(who, r)) == _bytes(fresh[0])
        log = await a.log(tenant, "sp", 0, 1000)
        assert [c.seq for c in log] == list(range(1, len(log) + 1))
        applied = [c for c in log if c.writes[0]["key"] == "dst"]
        if outcome == 200:
            assert fresh[0].result is not None
            assert [c.commit_id for c in applied] == [fresh[0].result.commit_id]
            assert applied[0].seq == fresh[0].result.seq
        else:
            assert applied == []

    run(body, pool_size=12, one_trip=one_trip)


# ---------------------------------------------------------------------------- read-set expiry


def test_an_expired_read_set_is_dropped_then_410(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore) -> None:
        clock = [1000.0]
        a.now = lambda: clock[0]  # type: ignore[method-assign]
        who = SessionRef(tenant, "sp", "alice")
        await ok(a, who, put("k", 1))
        await a.read(who, "k")
        clock[0] += 11
        calls = Calls(a)
        with pytest.raises(ReadSetExpired) as exc:
            await a.commit(who, req(put("k", 2), idem="exp"))
        assert exc.value.code == "read_set_expired"
        assert (calls.tries, calls.failed_tries, calls.locked) == (1, 0, 0)
        assert await a.get_epoch(who) is None
        assert await seqs_of(a, tenant, "sp") == [1]
        # Nothing was stored under the key: the retry (with a new epoch) executes.
        out = await a.commit(who, req(put("k", 2), idem="exp"))
        assert out.result is not None and out.stored is None

    run(body, n=1, readset_ttl_s=10)


# ---------------------------------------------------------------------------- one round trip


def test_a_commit_that_guards_every_write_is_one_round_trip(run: Callable[..., Any], tenant: str) -> None:
    """expected_version on every write, or reads this process served: no peek."""

    async def body(a: PostgresStore) -> None:
        who = SessionRef(tenant, "sp", "alice")
        calls = Calls(a)
        first = await ok(a, who, put("k", 1, expected=0), put("j", 1, expected=0))
        assert first.result is not None and (first.result.seq, first.result.versions) == (1, {"k": 1, "j": 1})
        await ok(a, who, put("k", 2, expected=1))
        # Delivery log: read k and j, write k (guarded by its read), j only read.
        assert (await a.read(who, "k")) is not None and (await a.read(who, "j")) is not None
        out = await ok(a, who, put("k", 3))
        assert out.result is not None and (out.result.seq, out.result.versions) == (3, {"k": 3})
        assert await a.get_epoch(who) is None  # the commit ended the epoch
        # A key read as absent (version 0), then created.
        assert await a.read(who, "new") is None
        await ok(a, who, put("new", 1))
        assert (calls.blinds, calls.blinds_applied, calls.peeks, calls.tries) == (4, 4, 0, 0)
        # A write nobody guards needs the head: peek first.
        await ok(a, who, put("unguarded", 1))
        assert (calls.blinds, calls.peeks, calls.tries) == (4, 1, 1)
        history = await a.history(tenant, "sp", "k", None, 10)
        assert [(h.version, h.value_json) for h in history] == [(3, "3"), (2, "2"), (1, "1")]

    run(body, n=1, one_trip=True)


def test_a_stale_assumption_is_one_round_trip_for_a_409_with_nothing_to_store(
    run: Callable[..., Any], tenant: str
) -> None:
    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, who, put("k", 1, expected=0))
        await ok(b, other, put("k", 2))
        calls = Calls(a)
        out = await a.commit(who, req(put("k", 3, expected=1)))
        assert kinds(out) == [("k", "write_conflict")]
        assert out.conflicts is not None and (out.conflicts[0].current_version, out.conflicts[0].committed_by) == (
            2,
            "bob",
        )
        assert (calls.blinds, calls.blinds_applied, calls.peeks, calls.tries) == (1, 0, 0, 0)
        assert await seqs_of(a, tenant, "sp") == [1, 2]

    run(body, one_trip=True)


def test_a_read_served_by_another_process_makes_the_copy_stale(run: Callable[..., Any], tenant: str) -> None:
    """Process a holds a copy of the epoch {k}; process b adds j to it; j then changes. The
    commit through a must see j: the tag check sends it to the peek, and it is a stale read."""

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        who, other = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "bob")
        await ok(a, other, put("k", 1))
        await ok(a, other, put("j", 1))
        await a.read(who, "k")
        await b.read(who, "j")
        await ok(b, other, put("j", 2))
        calls = Calls(a)
        out = await a.commit(who, req(put("k", 2)))
        assert kinds(out) == [("j", "stale_read")]
        assert (calls.blinds, calls.blinds_applied, calls.peeks, calls.tries) == (1, 0, 0, 1)
        assert await a.get_epoch(who) is None
        assert await seqs_of(a, tenant, "sp") == [1, 2, 3]

    run(body, one_trip=True)


def test_reads_report_the_epoch_tag_they_left(run: Callable[..., Any], tenant: str) -> None:
    """The copy follows reads exactly: same content and tag as a peek would load."""

    async def body(a: PostgresStore) -> None:
        who = SessionRef(tenant, "sp", "alice")
        await ok(a, SessionRef(tenant, "sp", "bob"), put("k", 1))
        for key in ("k", "missing", "k", "x"):
            await a.read(who, key)
        copy = a._shadows.pop(who)
        assert copy is not None
        async with a._raw() as conn:
            row = await a._peek(conn, who, [], None)
        assert copy[1] == row["o_epoch_tag"]
        assert copy[0].points == {"k": 1, "missing": 0, "x": 0} == pg._epoch(row["o_epoch"]).points  # type: ignore[union-attr]

    run(body, n=1, one_trip=True)


def test_one_round_trip_answers_like_peek_and_try(pg_url: str) -> None:
    """Random reads (through two processes), listings, clears and foreign writes for one
    session, then a commit with random guards: the same answer, epoch and heads with the
    one-round-trip path as without it."""
    keys = ["a", "b", "c", "l/1"]
    read = st.tuples(st.just("read"), st.integers(0, 1), st.sampled_from([*keys, "n"]))
    op = st.one_of(
        read,
        read,
        st.tuples(st.just("write"), st.just(2), st.sampled_from(keys)),
        st.tuples(st.just("list"), st.integers(0, 1), st.just("l/")),
        st.tuples(st.just("clear"), st.integers(0, 1), st.just("")),
    )
    # Biased towards guards that hold, so the path is taken often: -1 stands for the key's
    # current version.
    expected = st.one_of(st.none(), st.just(-1), st.just(-1), st.integers(0, 3))
    write = st.tuples(st.sampled_from([*keys, "z"]), expected, st.booleans())
    commit = st.tuples(
        st.lists(write, min_size=1, max_size=3, unique_by=lambda w: w[0]),
        st.dictionaries(st.sampled_from(keys), st.integers(1, 2), max_size=2),
        st.integers(0, 1),
        st.booleans(),
    )

    async def replay(stores: list[PostgresStore], tenant: str, ops: list[tuple[str, int, str]], c: Any) -> Any:
        alice, writer = SessionRef(tenant, "sp", "alice"), SessionRef(tenant, "sp", "writer")
        for k in keys:
            await ok(stores[0], writer, put(k, 0))
        current = dict.fromkeys(keys, 1)
        for i, (kind, who, key) in enumerate(ops):
            if kind == "read":
                await stores[who].read(alice, key)
            elif kind == "list":
                await stores[who].list(alice, key, None, 10)
            elif kind == "clear":
                await stores[who].clear_epoch(alice)
            else:
                await ok(stores[who], writer, put(key, i))
                current[key] += 1
        writes, reads, by, idem = c
        r = req(
            *(
                WriteOp(k, None if delete else json.dumps(k), delete, current.get(k, 0) if exp == -1 else exp)
                for k, exp, delete in writes
            ),
            reads=reads,
            idem="i" if idem else None,
        )
        try:
            out = await stores[by].commit(alice, r)
        except ReadSetExpired as exc:
            return ("expired", exc.code)
        status, body = outcome_body(out)
        body = {k: val for k, val in body.items() if k != "commit_id"}
        epoch = await stores[0].get_epoch(alice)
        heads = [
            (h.version, h.value_json, h.deleted, h.seq)
            for k in [*keys, "z"]
            for h in await stores[0].history(tenant, "sp", k, None, 1)
        ]
        return status, body, epoch, heads

    async def main() -> None:
        cfg = Settings(store=pg_url, readset_max_entries=3)
        blind = [PostgresStore(cfg, pg_url) for _ in range(3)]
        plain = [PostgresStore(cfg, pg_url) for _ in range(3)]
        for s_ in plain:
            s_.one_trip = False
        for s_ in (*blind, *plain):
            await s_.start()
        applied = 0
        try:
            for _ in range(40):
                ops = data.draw(st.lists(op, max_size=6))
                c = data.draw(commit)
                calls = Calls(blind[c[2]])
                got = await replay(blind, f"t{uuid.uuid4().hex[:10]}", ops, c)
                want = await replay(plain, f"t{uuid.uuid4().hex[:10]}", ops, c)
                assert got == want, (ops, c, got, want)
                applied += calls.blinds_applied
        finally:
            for s_ in (*blind, *plain):
                await s_.close()
        stats.append(applied)

    stats: list[int] = []

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(d: st.DataObject) -> None:
        nonlocal data
        data = d
        asyncio.run(main())

    data: Any = None
    check()
    print("one-round-trip commits applied per example:", stats)
    assert sum(stats) > 10, "the one-round-trip path never applied: the comparison proves little"


def test_migrations_0007_0008_downgrade_to_the_functions_of_0005_and_upgrade_again() -> None:
    from alembic import command

    from agentbus.migrate import alembic_config, upgrade

    async def functions(url: str) -> dict[str, str]:
        import asyncpg

        conn = await asyncpg.connect(pg.dsn(url))
        try:
            rows = await conn.fetch(
                "SELECT proname, pg_get_function_result(oid) AS result FROM pg_proc"
                " WHERE proname IN ('agentbus_read', 'agentbus_record', 'agentbus_commit_blind',"
                " 'agentbus_commit_blind_many')"
                " UNION ALL SELECT typname, 'type' FROM pg_type WHERE typname = 'agentbus_blind_call'"
            )
        finally:
            await conn.close()
        return {r["proname"]: r["result"] for r in rows}

    with fresh_pg_database("agentbus_mig") as url:
        upgrade(url)
        head = asyncio.run(functions(url))
        assert set(head) == {
            "agentbus_read",
            "agentbus_record",
            "agentbus_commit_blind",
            "agentbus_commit_blind_many",
            "agentbus_blind_call",
        }
        assert "o_tag_after" in head["agentbus_read"] and head["agentbus_record"] == "record"
        command.downgrade(alembic_config(url), "0006")
        old = asyncio.run(functions(url))
        assert old["agentbus_record"] == "void" and "o_tag_after" not in old["agentbus_read"]
        assert not {"agentbus_commit_blind", "agentbus_commit_blind_many", "agentbus_blind_call"} & set(old)
        upgrade(url)
        assert asyncio.run(functions(url)) == head


# ---------------------------------------------------------------------------- batches (0008)


def _blind_args(store: PostgresStore, who: SessionRef, r: CommitRequest) -> list[Any]:
    """What ``commit`` submits for a one-trip commit (the session's copy is used up)."""
    plan = store._blind_plan(r, store._shadows.pop(who))
    assert plan is not None
    keys = sorted({w.key for w in r.writes} | set(r.explicit_reads))
    return [*store._try_args(who, r, plan), keys]


def test_commits_that_queue_for_a_busy_space_go_out_as_one_batch(run: Callable[..., Any], tenant: str) -> None:
    """64 agents on two processes, each writing its own key: what waits for a busy space is
    sent in batches, and every commit still gets its own seq, versions and log entry."""
    agents, rounds = 64, 4

    async def body(a: PostgresStore, b: PostgresStore) -> None:
        results: list[tuple[int, CommitOutcome]] = []

        async def agent(i: int) -> None:
            store = (a, b)[i % 2]
            who = SessionRef(tenant, "busy", f"agent{i}")
            for n in range(rounds):
                out = await ok(store, who, put(f"k{i}", n, expected=n))
                results.append((i, out))

        await asyncio.gather(*(agent(i) for i in range(agents)))
        assert a.space_calls.batches + b.space_calls.batches > 0, "no batch formed: the test proves nothing"
        assert a.space_calls.batched + b.space_calls.batched >= agents
        seqs = sorted(o.result.seq for _, o in results if o.result)
        assert seqs == list(range(1, agents * rounds + 1))
        by_seq = {c.seq: c for c in await a.log(tenant, "busy", 0, 100_000)}
        assert sorted(by_seq) == seqs
        for i, o in results:
            assert o.result is not None
            rec = by_seq[o.result.seq]
            assert rec.commit_id == o.result.commit_id and rec.subject == f"agent{i}"
            assert rec.writes == [{"key": f"k{i}", "version": o.result.versions[f"k{i}"], "deleted": False}]
        for i in range(agents):
            history = await a.history(tenant, "busy", f"k{i}", None, 10)
            assert [(h.version, json.loads(h.value_json or "null")) for h in history] == [
                (n + 1, n) for n in reversed(range(rounds))
            ]

    run(body, one_trip=True, pool_size=4)


def test_a_batch_that_fails_in_postgresql_leaves_nothing_and_each_call_tries_alone(
    run: Callable[..., Any], tenant: str
) -> None:
    """One call of a batch breaks a constraint: the batch's transaction rolls back (the
    earlier calls in it included), then each call runs alone, so only that one fails."""

    async def body(a: PostgresStore) -> None:
        a.space_calls.slots = 1
        calls = [_blind_args(a, SessionRef(tenant, "sp", f"s{i}"), req(put(f"k{i}", i, expected=0))) for i in range(4)]
        calls[2][12] = [None]  # no version for its write: NOT NULL violation in the apply
        got = await asyncio.gather(*(a.space_calls.submit((tenant, "sp"), c) for c in calls), return_exceptions=True)
        assert (a.space_calls.batches, a.space_calls.batched) == (1, 3)
        assert isinstance(got[2], asyncpg_errors.NotNullViolationError), got
        assert [got[i]["o_new_seq"] for i in (0, 1, 3)] == [1, 2, 3]  # type: ignore[index]
        log = await a.log(tenant, "sp", 0, 100)
        assert [(c.seq, c.writes[0]["key"]) for c in log] == [(1, "k0"), (2, "k1"), (3, "k3")]

    run(body, n=1, one_trip=True)


def test_a_batch_whose_connection_breaks_answers_503_to_every_call_in_it(run: Callable[..., Any], tenant: str) -> None:
    async def body(a: PostgresStore) -> None:
        a.space_calls.slots = 1

        async def broken(conn: Any, calls: list[list[Any]]) -> list[Any]:
            raise ConnectionResetError("connection reset by peer")

        a._blind_many = broken  # type: ignore[method-assign]
        rs = [req(put(f"k{i}", i, expected=0)) for i in range(4)]
        got = await asyncio.gather(
            *(a.commit(SessionRef(tenant, "sp", f"s{i}"), r) for i, r in enumerate(rs)), return_exceptions=True
        )
        assert isinstance(got[0], CommitOutcome) and got[0].result is not None
        assert all(isinstance(g, BackendUnavailable) for g in got[1:]), got
        assert await seqs_of(a, tenant, "sp") == [1]

    run(body, n=1, one_trip=True)


def test_a_batch_answers_like_its_calls_one_after_the_other(pg_url: str) -> None:
    """Random one-trip commits (stale and fresh guards, delivery-log reads, deletes,
    repeated Idempotency-Keys, sessions committing twice, tries after a peek) as one batch
    (built without the bus's filter, so calls do fail because of earlier ones), and the same
    calls one at a time on another tenant in the order the batch ran them (its stale calls
    first): the same rows back and the same state after."""
    key = st.sampled_from(["a", "b", "c"])
    call = st.tuples(
        st.sampled_from(["s1", "s2", "s3"]),
        st.lists(key, max_size=2, unique=True),  # read first through the delivery log
        st.lists(st.tuples(key, st.integers(0, 3), st.booleans()), min_size=1, max_size=2, unique_by=lambda w: w[0]),
        st.sampled_from([None, None, "i1", "i2"]),
    )

    async def run_calls(
        store: PostgresStore, tenant: str, batch: list[Any], together: bool, order: list[int] | None = None
    ) -> Any:
        """The calls as one batch, or one at a time in ``order`` (default: as given); the
        order they ran in, their rows in that order, and the state after."""
        args = []
        for n, (session, reads, writes, idem) in enumerate(batch):
            who = SessionRef(tenant, "sp", session)
            for k in reads:
                await store.read(who, k)
            rd = set(reads)
            ws = [WriteOp(k, json.dumps([n, k]), delete, None if k in rd else ver) for k, ver, delete in writes]
            r = req(*ws, idem=idem)
            blind = store._blind_plan(r, store._shadows.pop(who))
            keys = sorted({w.key for w in r.writes} | set(r.explicit_reads))
            if blind is not None:
                args.append([*store._try_args(who, r, blind), keys])
                continue
            # Not every write guarded (the session's copy went to its earlier commit): a
            # try, planned on a peek taken before the batch, so earlier calls may fail it.
            async with store._raw() as conn:
                row = await store._peek(conn, who, keys, idem)
            plan = store._plan(r, keys, row, store.now())
            if not isinstance(plan, CommitOutcome):
                args.append([*store._try_args(who, r, plan), None])
        if together:
            async with store._raw() as conn:
                rows = list(await store._blind_many(conn, args))  # in the order they ran
            order = [r["o_i"] for r in rows]
            assert sorted(order) == list(range(len(args)))
        else:
            order = order if order is not None else list(range(len(args)))
            rows = [await store._call_alone(args[i]) for i in order]
        seen = []
        for row in rows:
            # A try alone answers its seq only; in a batch the peek's columns are NULL.
            d = {k: val for k, val in dict(row).items() if k != "o_i" and val is not None}
            if "o_epoch_tag" in d:
                d["o_epoch_tag"] = "a tag"  # xmin: differs between the two tenants
            if "o_idem" in d:
                fp, status, body, created = orjson.loads(d["o_idem"])
                d["o_idem"] = (fp, status, {k: val for k, val in json.loads(body).items() if k != "commit_id"}, created)
            seen.append(d)
            if together:
                kind = "try" if "o_seq" not in d and d["o_new_seq"] in (-1, 0) else None
                kind = kind or ("applied" if d.get("o_new_seq", 0) > 0 else "peeked" if "o_seq" in d else "stored")
                exercised[kind] = exercised.get(kind, 0) + 1
        state = (
            [(c.seq, c.writes, c.subject, c.session) for c in await store.log(tenant, "sp", 0, 1000)],
            [
                [(h.version, h.value_json, h.deleted, h.seq) for h in await store.history(tenant, "sp", k, None, 100)]
                for k in "abc"
            ],
            [await store.get_epoch(SessionRef(tenant, "sp", s)) for s in ("s1", "s2", "s3")],
        )
        return order, seen, state

    async def main(setup: list[Any], batch: list[Any]) -> None:
        store = PostgresStore(Settings(store=pg_url), pg_url)
        store.now = lambda: 1_000_000.0  # type: ignore[method-assign]
        await store.start()
        try:
            t1, t2 = (f"t{uuid.uuid4().hex[:10]}" for _ in range(2))
            for t in (t1, t2):
                await run_calls(store, t, setup, together=False)
            order, *got = await run_calls(store, t1, batch, together=True)
            _, *want = await run_calls(store, t2, batch, together=False, order=order)
            assert got == want
        finally:
            await store.close()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(call, max_size=4), st.lists(call, min_size=2, max_size=8))
    def check(setup: list[Any], batch: list[Any]) -> None:
        asyncio.run(main(setup, batch))

    exercised: dict[str, int] = {}
    check()
    # Batches held commits applied, stale assumptions answered with a peek, and tries.
    assert {"applied", "peeked", "try"} <= exercised.keys(), exercised
