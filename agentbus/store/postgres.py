"""PostgreSQL: the SQL store with its hot paths (read, commit) on raw asyncpg and server functions.

Why: through SQLAlchemy Core a delivered read was a six-statement transaction and a commit
about twelve statements, each built, compiled and sent through the greenlet bridge — several
milliseconds of CPU per request and a round trip per statement. Here a read is one call of
``agentbus_read`` (migrations 0005, 0007) and a commit is optimistic (migration 0006):

1. ``agentbus_commit_peek`` fetches the space seq, the idempotency record, the epoch, the
   heads and the heads changed under range reads, taking no lock;
2. Python decides with :mod:`agentbus.core.validation`, as on every backend;
3. ``agentbus_commit_try`` takes the space row lock, checks that nothing the decision
   depended on changed since the peek, and applies it with seq = locked seq + 1; or returns
   :data:`TRY_FAILED` having changed nothing, and we start again from 1.

So the space row lock is held for zero network round trips, only while one statement runs
(BEGIN, load, apply, COMMIT held it across three, which capped a busy space at one commit
per three client round trips, however many clients). A commit is two round trips; a
rejected ``expected_version`` with nothing to store (no epoch to end, no Idempotency-Key) is
one. After :data:`OPTIMISTIC_ATTEMPTS` failed checks a commit falls back to that locked path
(``agentbus_commit_load`` .. ``agentbus_commit_apply`` in one transaction), so a hot key
cannot starve anyone.

One round trip (migration 0007): when every write is guarded, by its ``expected_version``,
an explicit read, or a read in the session's epoch that this process holds an exact copy of
(:mod:`agentbus.store.shadows`, fed by ``agentbus_read``), core validation plans the commit
*before* looking, on the assumption that each guarded head is at its guarded version.
``agentbus_commit_blind`` checks that assumption and the epoch's tag, then runs the same try;
if anything differs it returns the peek's row instead, and the commit goes on from step 2.
So the assumption never decides anything: the try's checks under the lock do, as above.

Batches (migration 0008): a space's commits serialise on its row lock anyway, so calls
(blind, or a try after a peek) that arrive while :data:`SPACE_SLOTS` of the space's calls
are in flight from this process wait in Python (:mod:`agentbus.store.coalesce`) and then
go out together: ``agentbus_commit_blind_many`` runs them in order in one transaction. Each
sees the ones before it as if committed, so every answer is the one the calls would have
got one after the other; the batch is one lock acquisition and one WAL flush, and its
commits are acknowledged once it has committed. If PostgreSQL refuses the batch (rolled
back whole), each call runs alone; if the connection is gone, each gets the 503 it would
have got alone. A lone commit is never held back.

The guarantees are unchanged. Every writer of a space's shards holds its space row lock, and
each statement inside the (VOLATILE) try function takes a fresh snapshot, so once it has the
lock it sees every earlier commit. The decision depends only on the versions of the heads it
looked at, the session's epoch (compared by header row version, so an added entry, an
overflow or a clear-and-recreate all count as a change), the space seq when the epoch has
range reads, and the absence of a live idempotency record under the key; if all of these are
as seen, the state validated against is the state at the commit point, and the outcome is
the one the locked path would have produced. Seq order stays visibility order: the seq is
assigned and applied under the lock, and a batch's commits become visible together.
Everything else (listings, history, tokens, budgets, purge) stays on the SQLAlchemy engine
of :class:`~agentbus.store.sql.SQLStore`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from agentbus.core import validation as v
from agentbus.core.errors import BackendUnavailable, ReadSetExpired
from agentbus.core.model import (
    CommitResult,
    ConflictItem,
    Epoch,
    RangeRead,
    SessionRef,
    Shard,
    ShardMeta,
    StoredOutcome,
)
from agentbus.settings import Settings
from agentbus.store.base import CommitOutcome, CommitRequest, Listing, outcome_body
from agentbus.store.coalesce import Coalescer
from agentbus.store.shadows import EpochShadows
from agentbus.store.sql import SQLStore, transient_sqlstate

READ_SQL = "SELECT * FROM agentbus_read($1, $2, $3, $4, $5, $6, $7)"
PEEK_SQL = "SELECT * FROM agentbus_commit_peek($1, $2, $3, $4, $5, $6)"
TRY_SQL = (
    "SELECT agentbus_commit_try($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,"
    " $19, $20, $21)"
)
BLIND_SQL = (
    "SELECT * FROM agentbus_commit_blind($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,"
    " $17, $18, $19, $20, $21, $22)"
)
BLIND_MANY_SQL = "SELECT * FROM agentbus_commit_blind_many($1::agentbus_blind_call[])"
LOAD_SQL = "SELECT * FROM agentbus_commit_load($1, $2, $3, $4, $5, $6, $7)"
APPLY_SQL = "SELECT agentbus_commit_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"

# What agentbus_commit_try returns when something the decision depended on changed.
TRY_FAILED = -1
# Optimistic tries before a commit takes the locked path. Each failure means another commit
# of the space landed in between, so the store as a whole made progress; two bounds the
# extra round trips of one unlucky commit.
OPTIMISTIC_ATTEMPTS = 2
# Calls (blind or try) of one space in flight from one process before the next ones wait and
# go out as a batch (agentbus.store.coalesce), and the most one batch carries. Measured with
# 2 processes (bench.run, 32 and 128 agents on one space): 2 and 4 slots gave the same
# throughput without contention; with 4, calls wait less behind a hot key's queue.
SPACE_SLOTS = 4
SPACE_BATCH = 64
# Stands in for the seq in a 200's stored body; the try function puts the seq it assigns
# there. A NUL cannot occur in anything PostgreSQL stores as text, so it cannot collide.
_SEQ_MARK = "\x00seq\x00"
_SEQ_MARK_JSON = json.dumps(_SEQ_MARK)

# What asyncpg raises when the server or the connection is gone (as opposed to a bad query).
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    ConnectionError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    # A connection whose operation the server cut off: "cannot switch to state N; another
    # operation is in progress" (seen during a PostgreSQL restart).
    asyncpg.exceptions.InternalClientError,
)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, asyncpg.PostgresError) and transient_sqlstate(getattr(exc, "sqlstate", None))


def dsn(url: str) -> str:
    """The libpq-style URL asyncpg takes, from AGENTBUS_STORE (``+asyncpg`` or ``postgres://`` allowed)."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgres") else url


@dataclass(slots=True)
class _Plan:
    """What one look at the space decided, and what that decision depended on.

    Exactly one of ``expired``, ``conflicts`` and ``commit_id`` (with ``versions``) is set.
    """

    now: float
    seq: int
    space_exists: bool
    epoch: Epoch | None
    epoch_tag: str | None
    heads: dict[str, ShardMeta | None]
    has_ranges: bool
    expired: ReadSetExpired | None = None
    conflicts: list[ConflictItem] | None = None
    commit_id: str | None = None
    versions: dict[str, int] | None = None

    def outcome(self, seq: int) -> CommitOutcome:
        """The outcome, for a 200 with the seq the apply was given."""
        if self.conflicts:
            return CommitOutcome(conflicts=self.conflicts)
        assert self.commit_id is not None and self.versions is not None
        return CommitOutcome(result=CommitResult(commit_id=self.commit_id, seq=seq, versions=self.versions))


class PostgresStore(SQLStore):
    """:class:`SQLStore` on PostgreSQL, with reads and commits through server functions."""

    _pool: asyncpg.Pool | None = None

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        super().__init__(settings, url)
        self._shadows = EpochShadows()
        # Tests turn this off to drive the peek/try path alone.
        self.one_trip = True
        # A space's calls that arrive while its slots are busy go out together.
        self.space_calls: Coalescer[list[Any], Mapping[str, Any]] = Coalescer(
            self._call_alone,
            self._call_batch,
            alone=_run_alone,
            slots=SPACE_SLOTS,
            max_batch=SPACE_BATCH,
        )

    async def start(self) -> None:
        await super().start()
        self._pool = None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        await super().close()

    async def _get_pool(self) -> asyncpg.Pool:
        # Lazily, so a server that starts while PostgreSQL is down still starts (and answers 503).
        if self._pool is None:
            pool = await asyncpg.create_pool(
                dsn(self.url),
                min_size=1,
                max_size=self.settings.pool_size,
                # Statements are prepared per connection and reused: the point of this path.
                statement_cache_size=64,
                max_inactive_connection_lifetime=300,
                # A partitioned server neither answers nor refuses: bound every wait (503).
                timeout=self.settings.db_connect_timeout_s,
                command_timeout=self.settings.db_command_timeout_s,
            )
            if self._pool is None:
                self._pool = pool
            else:  # another task won the race
                await pool.close()
        return self._pool

    @asynccontextmanager
    async def _raw(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.settings.pool_timeout_s) as conn:
                try:
                    yield conn
                except BaseException as exc:
                    if _unavailable(exc):
                        # The server went away mid-operation (restart, partition): this
                        # connection's protocol state is unknown, so it must not be reused.
                        conn.terminate()
                    raise
        except BaseException as exc:
            if _unavailable(exc):
                raise BackendUnavailable(_describe(exc)) from exc
            raise

    async def append_trace_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """COPY: the timeline's batches (hundreds of rows a second under load) went through
        SQLAlchemy's per-row parameter processing on the event loop."""
        from agentbus.store.sql_traces import COLUMNS

        async with self._raw() as conn:
            await conn.copy_records_to_table("trace_events", records=rows, columns=COLUMNS)

    # ------------------------------------------------------------------ reads
    async def read(self, ref: SessionRef, key: str) -> Shard | None:
        async with self._raw() as conn:
            row = await conn.fetchrow(
                READ_SQL,
                ref.tenant,
                ref.space,
                ref.subject,
                ref.session,
                key,
                self.now(),
                self.settings.readset_max_entries,
            )
        assert row is not None
        self._shadows.follow(
            ref,
            key,
            int(row["o_version"]),
            row["o_did"].encode(),
            row["o_tag_before"],
            row["o_tag_after"],
            float(row["o_started"]),
        )
        if not row["o_found"] or row["o_deleted"]:
            return None
        meta = ShardMeta(
            key=key,
            version=int(row["o_version"]),
            deleted=False,
            seq=int(row["o_seq"]),
            updated_by=row["o_updated_by"],
            updated_at=float(row["o_updated_at"]),
        )
        return Shard(meta=meta, value_json=row["o_value"])

    # ------------------------------------------------------------------ commit
    async def list(self, ref: SessionRef, prefix: str, start_after: str | None, limit: int) -> Listing:
        self._shadows.drop(ref)  # range reads: the commit peeks at the epoch itself
        return await super().list(ref, prefix, start_after, limit)

    async def clear_epoch(self, ref: SessionRef) -> None:
        self._shadows.drop(ref)
        await super().clear_epoch(ref)

    async def commit(self, ref: SessionRef, req: CommitRequest) -> CommitOutcome:
        keys = sorted({w.key for w in req.writes} | set(req.explicit_reads))
        # Every outcome ends the epoch, so a copy of it is used at most once.
        shadow = self._shadows.pop(ref)
        blind = self._blind_plan(req, shadow) if self.one_trip else None
        # No connection is held while a call waits for its space's slot: the batch needs one.
        row: Mapping[str, Any] | None = None
        if blind is not None:
            row = await self._call(ref, [*self._try_args(ref, req, blind), keys])
            if row["o_new_seq"] is not None:
                return blind.outcome(int(row["o_new_seq"]))
        for _ in range(OPTIMISTIC_ATTEMPTS):
            done = await self._commit_optimistic(ref, req, keys, row)
            row = None
            if done is not None:
                break
        else:
            async with self._raw() as conn:
                done = await self._commit_locked(conn, ref, req, keys)
        if isinstance(done, ReadSetExpired):
            # The epoch ended in the backend; only now is the 410 raised.
            raise done
        return done

    async def _commit_optimistic(
        self,
        ref: SessionRef,
        req: CommitRequest,
        keys: list[str],
        peeked: Mapping[str, Any] | None = None,
    ) -> CommitOutcome | ReadSetExpired | None:
        """Peek (unless ``peeked`` is a peek row already), decide, try; None if the try
        found the state changed (nothing was stored)."""
        now = self.now()
        row = peeked
        if row is None:
            async with self._raw() as conn:
                row = await self._peek(conn, ref, keys, req.idempotency_key)
        plan = self._plan(req, keys, row, now)
        if isinstance(plan, CommitOutcome):
            return plan
        if plan.conflicts and plan.epoch is None and not req.idempotency_key and plan.space_exists:
            # Nothing to store: the 409 of the peek's snapshot (a committed state) is final.
            return plan.outcome(0)
        new_seq = int((await self._call(ref, [*self._try_args(ref, req, plan), None]))["o_new_seq"])
        if new_seq == TRY_FAILED:
            return None
        return plan.expired or plan.outcome(new_seq)

    async def _call(self, ref: SessionRef, args: list[Any]) -> Mapping[str, Any]:
        """A blind call (``args[-1]``: the keys to peek at if it fails) or a try (``None``),
        alone or in a batch with the space's other calls (:mod:`agentbus.store.coalesce`)."""
        return await self.space_calls.submit((ref.tenant, ref.space), args)

    async def _call_alone(self, args: list[Any]) -> Mapping[str, Any]:
        async with self._raw() as conn:
            if args[-1] is None:
                return {"o_new_seq": await self._try(conn, args[:-1])}
            return await self._blind(conn, args)

    async def _call_batch(self, calls: list[list[Any]]) -> list[Mapping[str, Any]]:
        """Each call's row, run in order in one transaction (migration 0008): each sees the
        ones before it as committed."""
        async with self._raw() as conn:
            rows = await self._blind_many(conn, calls)
        return sorted(rows, key=lambda r: r["o_i"])

    async def _blind_many(self, conn: asyncpg.Connection, calls: list[list[Any]]) -> list[asyncpg.Record]:
        return await conn.fetch(BLIND_MANY_SQL, [tuple(c) for c in calls])

    async def _peek(
        self, conn: asyncpg.Connection, ref: SessionRef, keys: list[str], idem: str | None
    ) -> asyncpg.Record:
        row = await conn.fetchrow(PEEK_SQL, ref.tenant, ref.space, ref.subject, ref.session, keys, idem)
        assert row is not None
        return row

    async def _blind(self, conn: asyncpg.Connection, args: list[Any]) -> asyncpg.Record:
        """``o_new_seq`` if the assumption held and the commit applied, else a peek row."""
        row = await conn.fetchrow(BLIND_SQL, *args)
        assert row is not None
        return row

    def _blind_plan(self, req: CommitRequest, shadow: tuple[Epoch, str] | None) -> _Plan | None:
        """A plan made before looking, if the request and the epoch's copy guard every key
        it writes: assume each guarded head is at its guarded version. None if that cannot
        be assumed (a write nobody guards, two guards disagreeing, range reads, an epoch
        that core would refuse): then the commit peeks first, as before."""
        epoch, tag = shadow if shadow is not None else (None, None)
        now = self.now()
        if epoch is not None:
            if epoch.ranges:
                return None
            try:
                v.check_epoch(epoch, now=now, ttl_s=self.settings.readset_ttl_s)
            except ReadSetExpired:
                return None
        guards = v.build_guards(epoch, req.explicit_reads, req.writes)
        assumed: dict[str, int] = {}
        for g in guards.points:
            if assumed.setdefault(g.key, g.version) != g.version:
                return None
        if any(w.key not in assumed for w in req.writes):
            return None
        heads = {
            k: ShardMeta(key=k, version=ver, deleted=False, seq=0, updated_by="", updated_at=0.0) if ver else None
            for k, ver in assumed.items()
        }
        if v.find_conflicts(guards, heads):
            return None
        return _Plan(
            now=now,
            seq=0,
            space_exists=True,
            epoch=epoch,
            epoch_tag=tag,
            heads=heads,
            has_ranges=False,
            commit_id=v.new_commit_id(),
            versions=v.next_versions(req.writes, heads),
        )

    async def _try(self, conn: asyncpg.Connection, args: list[Any]) -> int:
        """The new seq, 0 if the commit wrote nothing (a 409, a 410), or :data:`TRY_FAILED`."""
        return int(await conn.fetchval(TRY_SQL, *args))

    def _try_args(self, ref: SessionRef, req: CommitRequest, plan: _Plan) -> list[Any]:
        """Arguments of ``agentbus_commit_try``: what the plan depended on, then what to store."""
        if plan.expired is not None:
            # The 410 depends on the epoch alone, and stores nothing but its end.
            seen_keys, seen_versions, seen_seq, idem = [], [], None, None
        elif plan.conflicts:
            # A 409 holds at the peek's snapshot, a committed state: it stays the answer
            # whatever commits since (as when there is nothing to store). Only the epoch it
            # ends and the idempotency slot it fills must still be as seen.
            seen_keys, seen_versions, seen_seq, idem = [], [], None, req.idempotency_key
        else:
            seen_keys = list(plan.heads)
            seen_versions = [v.current_version(m) for m in plan.heads.values()]
            seen_seq = plan.seq if plan.has_ranges else None
            idem = req.idempotency_key
        writes: list[Any] = [None, [], [], [], [], "[]"]
        if plan.commit_id is not None and plan.versions is not None:
            writes = [plan.commit_id, *_write_args(req, plan.versions)]
        stored: list[Any] = [None] * 5
        if idem:
            status, body = outcome_body(plan.outcome(0))
            head, tail = _split_at_seq(body) if plan.commit_id is not None else (json.dumps(body), None)
            stored = [idem, req.fingerprint or "", status, head, tail]
        cutoff = plan.now - self.settings.idempotency_ttl_s
        return [
            *(ref.tenant, ref.space, ref.subject, ref.session, plan.now),
            *(seen_keys, seen_versions, plan.epoch_tag, seen_seq, cutoff),
            *writes,
            *stored,
        ]

    async def _commit_locked(
        self, conn: asyncpg.Connection, ref: SessionRef, req: CommitRequest, keys: list[str]
    ) -> CommitOutcome | ReadSetExpired:
        """The fallback: the space row lock held from load to COMMIT, so nothing can change
        under the decision and no check can fail."""
        async with conn.transaction():
            now = self.now()
            row = await conn.fetchrow(
                LOAD_SQL, ref.tenant, ref.space, ref.subject, ref.session, keys, req.idempotency_key, now
            )
            assert row is not None
            plan = self._plan(req, keys, row, now)
            if isinstance(plan, CommitOutcome):
                return plan
            args = _apply_args(ref, now, drop_epoch=plan.epoch is not None)
            if plan.expired is not None:
                await conn.execute(APPLY_SQL, *args)
                return plan.expired
            outcome = plan.outcome(plan.seq + 1)
            if plan.commit_id is not None and plan.versions is not None:
                args[4:12] = [plan.seq + 1, plan.commit_id, now, *_write_args(req, plan.versions)]
            if req.idempotency_key:
                status, body = outcome_body(outcome)
                args[13:17] = [req.idempotency_key, req.fingerprint or "", status, json.dumps(body)]
            await conn.execute(APPLY_SQL, *args)
        return outcome

    def _plan(self, req: CommitRequest, keys: list[str], row: Mapping[str, Any], now: float) -> CommitOutcome | _Plan:
        """Decide from a peek or load row: a replayed outcome, or a plan to store."""
        if row["o_idem"] is not None:
            fp, status, body, created_at = orjson.loads(row["o_idem"])
            if created_at >= now - self.settings.idempotency_ttl_s:
                return CommitOutcome(stored=StoredOutcome(fingerprint=fp, status=status, body=json.loads(body)))
        epoch = _epoch(row["o_epoch"])
        plan = _Plan(
            now=now,
            seq=int(row["o_seq"]),
            # The load function creates the space; only the peek can find it missing.
            space_exists=row.get("o_space", True),
            epoch=epoch,
            epoch_tag=row.get("o_epoch_tag"),
            heads=dict.fromkeys(keys),
            has_ranges=bool(epoch and epoch.ranges),
        )
        try:
            v.check_epoch(epoch, now=now, ttl_s=self.settings.readset_ttl_s)
        except ReadSetExpired as exc:
            # The epoch ends here too; the 410 is raised after that is stored.
            plan.expired = exc
            return plan
        for h in orjson.loads(row["o_heads"]):
            plan.heads[h[0]] = _meta(h)
        changed = [_meta(h) for h in orjson.loads(row["o_changed"])] if row["o_changed"] else []
        guards = v.build_guards(epoch, req.explicit_reads, req.writes)
        for k in guards.keys - plan.heads.keys():
            plan.heads[k] = None
        conflicts = v.find_conflicts(guards, plan.heads, changed)
        if conflicts:
            plan.conflicts = conflicts
        else:
            plan.commit_id = v.new_commit_id()
            plan.versions = v.next_versions(req.writes, plan.heads)
        return plan


def _write_args(req: CommitRequest, versions: dict[str, int]) -> list[Any]:
    """keys, versions, values, deleted flags and the commit log's JSON of a commit's writes."""
    return [
        [w.key for w in req.writes],
        [versions[w.key] for w in req.writes],
        [None if w.delete else w.value_json for w in req.writes],
        [w.delete for w in req.writes],
        json.dumps([{"key": w.key, "version": versions[w.key], "deleted": w.delete} for w in req.writes]),
    ]


def _split_at_seq(body: dict[str, Any]) -> tuple[str, str]:
    """A 200 body as JSON text before and after its seq, which only the try function knows.

    Split, not re-encoded in SQL: jsonb would reorder the keys, and a replay must answer
    with exactly the bytes of the first response."""
    text = json.dumps({**body, "seq": _SEQ_MARK})
    head, tail = text.split(_SEQ_MARK_JSON)
    return head, tail


def _apply_args(ref: SessionRef, now: float, *, drop_epoch: bool) -> list[Any]:
    """Arguments of ``agentbus_commit_apply`` that write nothing but (optionally) end the epoch."""
    return [ref.tenant, ref.space, ref.subject, ref.session, None, None, now, [], [], [], [], "[]", drop_epoch] + [
        None
    ] * 4


def _epoch(text: str | None) -> Epoch | None:
    if text is None:
        return None
    started_at, overflow, gen, entries = orjson.loads(text)
    epoch = Epoch(started_at=float(started_at), overflow=bool(overflow), generation=int(gen))
    for kind, ident, version, prefix, start_after, end_at in entries:
        if kind == "p":
            epoch.points[ident] = int(version)
        else:
            epoch.ranges.append(RangeRead(prefix or "", start_after, end_at, int(version)))
    return epoch


def _meta(h: list[Any]) -> ShardMeta:
    key, version, deleted, seq, updated_by, updated_at = h
    return ShardMeta(
        key=key, version=int(version), deleted=bool(deleted), seq=int(seq), updated_by=updated_by, updated_at=updated_at
    )


def _run_alone(exc: BaseException) -> bool:
    """Whether the calls of a failed batch should each try alone: yes unless the connection
    or the server is gone (then each would fail the same way, and gets the 503 now). A
    server-side error (a deadlock, a value PostgreSQL refuses) rolled the whole batch back,
    and may belong to one call only."""
    if isinstance(exc, BackendUnavailable):
        cause = exc.__cause__
        return isinstance(cause, asyncpg.PostgresError) and not isinstance(cause, _UNAVAILABLE)
    return True


def _describe(exc: BaseException) -> str:
    return f"storage backend unavailable ({type(exc).__name__}); retry shortly"
