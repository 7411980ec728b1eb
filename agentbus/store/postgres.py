"""PostgreSQL: the SQL store with its hot paths (read, commit) on raw asyncpg and server functions.

Why: through SQLAlchemy Core a delivered read was a six-statement transaction and a commit
about twelve statements, each built, compiled and sent through the greenlet bridge — several
milliseconds of CPU per request and a round trip per statement. Here a read is one call of
``agentbus_read`` and a commit is BEGIN, ``agentbus_commit_load``, ``agentbus_commit_apply``,
COMMIT, on asyncpg's prepared statements (migration 0005 creates the functions).

The guarantees are unchanged: the functions only fetch and store. The space row lock taken
by ``agentbus_commit_load`` is held until COMMIT, and which reads conflict is decided between
the two calls by :mod:`agentbus.core.validation`, as on every backend. Everything else
(listings, history, tokens, budgets, purge) stays on the SQLAlchemy engine of
:class:`~agentbus.store.sql.SQLStore`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson

from agentbus.core import validation as v
from agentbus.core.errors import BackendUnavailable, ReadSetExpired
from agentbus.core.model import CommitResult, Epoch, RangeRead, SessionRef, Shard, ShardMeta, StoredOutcome
from agentbus.store.base import CommitOutcome, CommitRequest, outcome_body
from agentbus.store.sql import SQLStore, transient_sqlstate

READ_SQL = "SELECT * FROM agentbus_read($1, $2, $3, $4, $5, $6, $7)"
LOAD_SQL = "SELECT * FROM agentbus_commit_load($1, $2, $3, $4, $5, $6, $7)"
APPLY_SQL = "SELECT agentbus_commit_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"

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


class PostgresStore(SQLStore):
    """:class:`SQLStore` on PostgreSQL, with reads and commits through server functions."""

    _pool: asyncpg.Pool | None = None

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
        if row is None or not row["o_found"] or row["o_deleted"]:
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
    async def commit(self, ref: SessionRef, req: CommitRequest) -> CommitOutcome:
        expired: ReadSetExpired | None = None
        keys = sorted({w.key for w in req.writes} | set(req.explicit_reads))
        async with self._raw() as conn, conn.transaction():
            now = self.now()
            row = await conn.fetchrow(
                LOAD_SQL, ref.tenant, ref.space, ref.subject, ref.session, keys, req.idempotency_key, now
            )
            assert row is not None
            seq = int(row["o_seq"])
            if row["o_idem"] is not None:
                fp, status, body, created_at = orjson.loads(row["o_idem"])
                if created_at >= now - self.settings.idempotency_ttl_s:
                    return CommitOutcome(stored=StoredOutcome(fingerprint=fp, status=status, body=json.loads(body)))
            epoch = _epoch(row["o_epoch"])
            try:
                v.check_epoch(epoch, now=now, ttl_s=self.settings.readset_ttl_s)
            except ReadSetExpired as exc:
                # The epoch ends here too; the 410 is raised after the delete commits.
                expired = exc
            if expired is not None:
                await conn.execute(APPLY_SQL, *_apply_args(ref, now, drop_epoch=True))
            else:
                heads: dict[str, ShardMeta | None] = dict.fromkeys(keys)
                for h in orjson.loads(row["o_heads"]):
                    heads[h[0]] = _meta(h)
                changed = [_meta(h) for h in orjson.loads(row["o_changed"])] if row["o_changed"] else []
                guards = v.build_guards(epoch, req.explicit_reads, req.writes)
                for k in guards.keys - heads.keys():
                    heads[k] = None
                outcome = self._decide(ref, req, guards, heads, changed, seq)
                args = _apply_args(ref, now, drop_epoch=epoch is not None)
                if outcome.result is not None:
                    res = outcome.result
                    args[4:12] = [
                        res.seq,
                        res.commit_id,
                        now,
                        [w.key for w in req.writes],
                        [res.versions[w.key] for w in req.writes],
                        [None if w.delete else w.value_json for w in req.writes],
                        [w.delete for w in req.writes],
                        json.dumps(
                            [{"key": w.key, "version": res.versions[w.key], "deleted": w.delete} for w in req.writes]
                        ),
                    ]
                if req.idempotency_key:
                    status, body = outcome_body(outcome)
                    args[13:17] = [req.idempotency_key, req.fingerprint or "", status, json.dumps(body)]
                await conn.execute(APPLY_SQL, *args)
        if expired is not None:
            raise expired
        return outcome

    @staticmethod
    def _decide(
        ref: SessionRef,
        req: CommitRequest,
        guards: Any,
        heads: dict[str, ShardMeta | None],
        changed: list[ShardMeta],
        seq: int,
    ) -> CommitOutcome:
        conflicts = v.find_conflicts(guards, heads, changed)
        if conflicts:
            return CommitOutcome(conflicts=conflicts)
        versions = v.next_versions(req.writes, heads)
        return CommitOutcome(result=CommitResult(commit_id=v.new_commit_id(), seq=seq + 1, versions=versions))


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


def _describe(exc: BaseException) -> str:
    return f"storage backend unavailable ({type(exc).__name__}); retry shortly"
