"""What SQLite and PostgreSQL share (SQLAlchemy 2 Core, async drivers): listings, history,
the commit log, tokens, audit, budgets and purge.

The hot paths, read and commit, are per dialect — :mod:`agentbus.store.sqlite` (one writer
thread) and :mod:`agentbus.store.postgres` (server functions on asyncpg) — because through
SQLAlchemy they cost several milliseconds of CPU each. Both keep the same atomicity: every
commit first takes its space row (``INSERT .. ON CONFLICT DO UPDATE .. RETURNING seq``). On
PostgreSQL that is the row lock that orders all commits of a space; on SQLite every write
transaction is ``BEGIN IMMEDIATE``, which takes the database write lock across processes.
Validation and apply then run inside that one transaction, so commit seq order equals
visibility order (SSE resume relies on it) and no process-local lock is part of the guarantee.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import and_, delete, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from agentbus.auth.tokens import AuditEvent, TokenRecord
from agentbus.core import validation as v
from agentbus.core.errors import BackendUnavailable
from agentbus.core.model import (
    CommitRecord,
    Epoch,
    RangeRead,
    SessionRef,
    ShardMeta,
)
from agentbus.core.names import encode_cursor
from agentbus.settings import Settings
from agentbus.store.base import HistoryEntry, Listing, Store
from agentbus.store.schema import (
    audit,
    commits,
    idempotency,
    readset_entries,
    readset_epochs,
    shard_versions,
    shards,
    spaces,
    tokens,
)
from agentbus.store.sql_budget import SQLBudgetStore


def async_url(url: str) -> str:
    """Map the user-facing URL to the async driver SQLAlchemy should use."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def prefix_upper(prefix: str) -> str | None:
    """Smallest string above every string starting with ``prefix`` (keys are ASCII)."""
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SQLStore(Store):
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        super().__init__(settings)
        self.url = async_url(url or settings.store)
        self.is_sqlite = self.url.startswith("sqlite")
        self._insert = sqlite.insert if self.is_sqlite else postgresql.insert
        self.engine: AsyncEngine
        self.reader: AsyncEngine

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.is_sqlite:
            self.engine = self._sqlite_engine(immediate=True)
            self.reader = self._sqlite_engine(immediate=False)
        else:
            self.engine = create_async_engine(
                self.url,
                pool_size=self.settings.pool_size,
                max_overflow=self.settings.pool_size,
                pool_timeout=self.settings.pool_timeout_s,
                pool_pre_ping=True,
                # A partitioned server neither answers nor refuses: bound every wait.
                connect_args={
                    "timeout": self.settings.db_connect_timeout_s,
                    "command_timeout": self.settings.db_command_timeout_s,
                },
                pool_recycle=1800,
            )
            self.reader = self.engine
        self.budgets = SQLBudgetStore(self)

    def _sqlite_engine(self, *, immediate: bool) -> AsyncEngine:
        engine = create_async_engine(self.url, pool_size=self.settings.pool_size, max_overflow=0)
        busy = self.settings.sqlite_busy_timeout_ms
        sync_mode = self.settings.sqlite_synchronous

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            # Take transaction control from the driver so BEGIN IMMEDIATE is ours to issue.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # Busy timeout first: the journal-mode switch takes a lock and would otherwise
            # fail at once on a busy database.
            cur.execute(f"PRAGMA busy_timeout={int(busy)}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync_mode}")
            cur.execute("PRAGMA foreign_keys=OFF")
            cur.close()

        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)

        return engine

    async def close(self) -> None:
        await self.engine.dispose()
        if self.reader is not self.engine:
            await self.reader.dispose()

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        engine = self.engine if write else self.reader
        try:
            async with engine.begin() as conn:
                yield conn
        except (TimeoutError, OperationalError, OSError, ConnectionError) as exc:
            raise BackendUnavailable(_describe(exc)) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated or _is_transient(exc):
                raise BackendUnavailable(_describe(exc)) from exc
            raise

    @abc.abstractmethod
    async def append_trace_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Timeline rows (``sql_traces.COLUMNS`` order) in one transaction, by each dialect's
        bulk path (COPY on PostgreSQL, the writer thread on SQLite)."""

    async def ping(self) -> None:
        async with self._tx(write=False) as conn:
            await conn.execute(select(1))

    # ------------------------------------------------------------------ reads
    async def list(self, ref: SessionRef, prefix: str, start_after: str | None, limit: int) -> Listing:
        async with self._tx() as conn:
            # Seq first, listing second: a commit the listing missed has a larger seq.
            seq = await self._space_seq(conn, ref.tenant, ref.space)
            conds = [shards.c.tenant == ref.tenant, shards.c.space == ref.space, shards.c.deleted.is_(False)]
            if prefix:
                conds.append(shards.c.key >= prefix)
                upper = prefix_upper(prefix)
                if upper is not None:
                    conds.append(shards.c.key < upper)
            if start_after is not None:
                conds.append(shards.c.key > start_after)
            rows = (await conn.execute(select(shards).where(*conds).order_by(shards.c.key).limit(limit + 1))).all()
            has_more = len(rows) > limit
            items = [_meta(r) for r in rows[:limit]]
            rr = v.range_from_listing(prefix, start_after, [m.key for m in items], has_more, seq)
            await self._record_range(conn, ref, rr)
        cursor = encode_cursor(items[-1].key) if has_more and items else None
        return Listing(items=items, next_cursor=cursor)

    async def _space_seq(self, conn: AsyncConnection, tenant: str, space: str) -> int:
        seq = (
            await conn.execute(select(spaces.c.seq).where(spaces.c.tenant == tenant, spaces.c.space == space))
        ).scalar()
        return int(seq or 0)

    async def _lock_epoch(self, conn: AsyncConnection, ref: SessionRef) -> Any:
        """Create-or-lock the epoch header; on PostgreSQL this row lock orders a session's
        reads against its own commit, so no read can fall between two epochs."""
        stmt = self._insert(readset_epochs).values(
            tenant=ref.tenant,
            space=ref.space,
            subject=ref.subject,
            session=ref.session,
            started_at=self.now(),
            n=0,
            overflow=False,
            gen=0,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant", "space", "subject", "session"],
            set_={"gen": readset_epochs.c.gen},
        ).returning(readset_epochs.c.n, readset_epochs.c.overflow)
        return (await conn.execute(stmt)).one()

    async def _record(
        self, conn: AsyncConnection, ref: SessionRef, kind: str, ident: str, version: int, **extra: Any
    ) -> None:
        hdr = await self._lock_epoch(conn, ref)
        if hdr.overflow:
            return
        if hdr.n >= self.settings.readset_max_entries:
            # Full: a key already recorded needs no entry; a new one cannot be recorded.
            known = (
                await conn.execute(
                    select(readset_entries.c.version).where(
                        *_entry_pk(ref), readset_entries.c.kind == kind, readset_entries.c.ident == ident
                    )
                )
            ).first()
            if known is None:
                await conn.execute(update(readset_epochs).where(*_epoch_pk(ref)).values(overflow=True))
            return
        stmt = (
            self._insert(readset_entries)
            .values(
                tenant=ref.tenant,
                space=ref.space,
                subject=ref.subject,
                session=ref.session,
                kind=kind,
                ident=ident,
                version=version,
                **extra,
            )
            .on_conflict_do_nothing()
        )
        res = await conn.execute(stmt)
        if res.rowcount == 1:
            await conn.execute(
                update(readset_epochs)
                .where(*_epoch_pk(ref))
                .values(n=readset_epochs.c.n + 1, gen=readset_epochs.c.gen + 1)
            )

    async def _record_range(self, conn: AsyncConnection, ref: SessionRef, rr: RangeRead) -> None:
        await self._record(
            conn, ref, "r", rr.ident, rr.seq, prefix=rr.prefix, start_after=rr.start_after, end_at=rr.end_at
        )

    # ------------------------------------------------------------------ epochs
    async def _load_epoch(self, conn: AsyncConnection, ref: SessionRef, *, lock: bool) -> Epoch | None:
        q = select(readset_epochs).where(*_epoch_pk(ref))
        if lock and not self.is_sqlite:
            q = q.with_for_update()
        hdr = (await conn.execute(q)).first()
        if hdr is None:
            return None
        epoch = Epoch(started_at=hdr.started_at, overflow=bool(hdr.overflow), generation=int(hdr.gen))
        rows = (await conn.execute(select(readset_entries).where(*_entry_pk(ref)))).all()
        for r in rows:
            if r.kind == "p":
                epoch.points[r.ident] = int(r.version)
            else:
                epoch.ranges.append(RangeRead(r.prefix or "", r.start_after, r.end_at, int(r.version)))
        return epoch

    async def _drop_epoch(self, conn: AsyncConnection, ref: SessionRef) -> None:
        await conn.execute(delete(readset_entries).where(*_entry_pk(ref)))
        await conn.execute(delete(readset_epochs).where(*_epoch_pk(ref)))

    async def get_epoch(self, ref: SessionRef) -> Epoch | None:
        async with self._tx(write=False) as conn:
            return await self._load_epoch(conn, ref, lock=False)

    async def clear_epoch(self, ref: SessionRef) -> None:
        async with self._tx() as conn:
            await self._drop_epoch(conn, ref)

    # ------------------------------------------------------------------ inspection
    async def space_exists(self, tenant: str, space: str) -> bool:
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(select(spaces.c.seq).where(spaces.c.tenant == tenant, spaces.c.space == space))
            ).first()
        return row is not None

    async def history(
        self, tenant: str, space: str, key: str, before_version: int | None, limit: int
    ) -> list[HistoryEntry]:
        conds = [shard_versions.c.tenant == tenant, shard_versions.c.space == space, shard_versions.c.key == key]
        if before_version is not None:
            conds.append(shard_versions.c.version < before_version)
        async with self._tx(write=False) as conn:
            rows = (
                await conn.execute(
                    select(shard_versions).where(*conds).order_by(shard_versions.c.version.desc()).limit(limit)
                )
            ).all()
        return [
            HistoryEntry(
                key=r.key,
                version=int(r.version),
                value_json=r.value,
                deleted=bool(r.deleted),
                seq=int(r.seq),
                updated_by=r.updated_by,
                updated_at=r.updated_at,
            )
            for r in rows
        ]

    async def log(self, tenant: str, space: str, after_seq: int, limit: int) -> list[CommitRecord]:
        async with self._tx(write=False) as conn:
            rows = (
                await conn.execute(
                    select(commits)
                    .where(commits.c.tenant == tenant, commits.c.space == space, commits.c.seq > after_seq)
                    .order_by(commits.c.seq)
                    .limit(limit)
                )
            ).all()
        return [
            CommitRecord(
                seq=int(r.seq),
                commit_id=r.commit_id,
                subject=r.subject,
                session=r.session,
                at=r.at,
                writes=json.loads(r.writes),
            )
            for r in rows
        ]

    async def list_spaces(self, tenant: str) -> list[dict[str, Any]]:
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(spaces).where(spaces.c.tenant == tenant).order_by(spaces.c.space))).all()
        return [{"space": r.space, "seq": int(r.seq), "created_at": r.created_at} for r in rows]

    async def reset(self, tenant: str) -> None:
        async with self._tx() as conn:
            for table in (readset_entries, readset_epochs, idempotency, commits, shard_versions, shards, spaces):
                await conn.execute(delete(table).where(table.c.tenant == tenant))

    async def purge(self) -> int:
        """Drop epochs past their retention, expired idempotency records and audit events
        older than ``audit_retention_s``."""
        now = self.now()
        async with self._tx() as conn:
            old = (
                await conn.execute(
                    select(readset_epochs).where(readset_epochs.c.started_at < now - self.settings.readset_retention_s)
                )
            ).all()
            for hdr in old:
                await self._drop_epoch(conn, SessionRef(hdr.tenant, hdr.space, hdr.subject, hdr.session))
            res = await conn.execute(
                delete(idempotency).where(idempotency.c.created_at < now - self.settings.idempotency_ttl_s)
            )
            aud = await conn.execute(delete(audit).where(audit.c.at < now - self.settings.audit_retention_s))
        return len(old) + int(res.rowcount or 0) + int(aud.rowcount or 0)

    async def count_rows(self) -> dict[str, int]:
        """Row counts per table, for tests and the operator."""
        out: dict[str, int] = {}
        async with self._tx(write=False) as conn:
            for t in (spaces, shards, shard_versions, commits, readset_epochs, readset_entries, idempotency):
                out[t.name] = int((await conn.execute(select(func.count()).select_from(t))).scalar_one())
        return out

    # ------------------------------------------------------------------ tokens and audit
    async def put_token(self, rec: TokenRecord) -> None:
        async with self._tx() as conn:
            await conn.execute(insert(tokens).values(**_token_row(rec)))

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(tokens).where(tokens.c.hash == token_hash))).first()
        return _token(row) if row is not None else None

    async def list_tokens(self, tenant: str | None) -> list[TokenRecord]:
        q = select(tokens).order_by(tokens.c.created_at)
        if tenant is not None:
            q = q.where(tokens.c.tenant == tenant)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [_token(r) for r in rows]

    async def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        async with self._tx() as conn:
            await conn.execute(
                update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None)).values(revoked_at=at)
            )
            row = (await conn.execute(select(tokens).where(tokens.c.id == token_id))).first()
        return _token(row) if row is not None else None

    async def has_admin_token(self) -> bool:
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(
                    select(tokens.c.id).where(tokens.c.kind == "admin", tokens.c.revoked_at.is_(None)).limit(1)
                )
            ).first()
        return row is not None

    async def record_audit(self, event: AuditEvent) -> None:
        async with self._tx() as conn:
            await conn.execute(
                insert(audit).values(
                    at=event.at,
                    tenant=event.tenant,
                    subject=event.subject,
                    action=event.action,
                    target=event.target,
                    status=event.status,
                    client=event.client,
                    detail=json.dumps(event.detail),
                )
            )

    async def audit_log(self, tenant: str | None, limit: int, before: float | None = None) -> list[AuditEvent]:
        q = select(audit).order_by(audit.c.at.desc(), audit.c.id.desc()).limit(limit)
        if tenant is not None:
            q = q.where(audit.c.tenant == tenant)
        if before is not None:
            q = q.where(audit.c.at < before)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [
            AuditEvent(
                at=r.at,
                tenant=r.tenant,
                subject=r.subject,
                action=r.action,
                target=r.target,
                status=int(r.status),
                client=r.client,
                detail=json.loads(r.detail),
            )
            for r in rows
        ]


def _meta(row: Any) -> ShardMeta:
    return ShardMeta(
        key=row.key,
        version=int(row.version),
        deleted=bool(row.deleted),
        seq=int(row.seq),
        updated_by=row.updated_by,
        updated_at=float(row.updated_at),
    )


def _token_row(rec: TokenRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "hash": rec.hash,
        "tenant": rec.tenant,
        "subject": rec.subject,
        "kind": rec.kind,
        "scopes": json.dumps(sorted(rec.scopes)),
        "spaces": json.dumps(sorted(rec.spaces)) if rec.spaces is not None else None,
        "created_at": rec.created_at,
        "expires_at": rec.expires_at,
        "revoked_at": rec.revoked_at,
        "description": rec.description,
        "budgets": json.dumps(rec.budgets),
    }


def _token(row: Any) -> TokenRecord:
    return TokenRecord(
        id=row.id,
        hash=row.hash,
        tenant=row.tenant,
        subject=row.subject,
        kind=row.kind,
        scopes=frozenset(json.loads(row.scopes)),
        spaces=frozenset(json.loads(row.spaces)) if row.spaces is not None else None,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        description=row.description,
        budgets=json.loads(row.budgets),
    )


def _epoch_pk(ref: SessionRef) -> Iterable[Any]:
    return (
        readset_epochs.c.tenant == ref.tenant,
        readset_epochs.c.space == ref.space,
        readset_epochs.c.subject == ref.subject,
        readset_epochs.c.session == ref.session,
    )


def _entry_pk(ref: SessionRef) -> Iterable[Any]:
    return (
        and_(
            readset_entries.c.tenant == ref.tenant,
            readset_entries.c.space == ref.space,
            readset_entries.c.subject == ref.subject,
            readset_entries.c.session == ref.session,
        ),
    )


# PostgreSQL SQLSTATE classes that mean "the server cannot serve now", not "bad request":
# 08 connection exception, 53 insufficient resources (e.g. too many clients), 57P0x
# operator intervention (shutdown, restart), 40001/40P01 serialization failure / deadlock.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P0", "40001", "40P01")
_TRANSIENT_SQLITE = ("database is locked", "database is busy", "disk i/o error")


def _is_transient(exc: DBAPIError) -> bool:
    """Retryable backend trouble (503), by SQLSTATE on PostgreSQL and by message on SQLite."""
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        return transient_sqlstate(sqlstate)
    text = str(orig).lower() if orig is not None else ""
    return any(s in text for s in _TRANSIENT_SQLITE)


def transient_sqlstate(sqlstate: str | None) -> bool:
    """True for a PostgreSQL SQLSTATE that means "retry shortly" (503), not "bad request"."""
    return isinstance(sqlstate, str) and sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)


def _describe(exc: BaseException) -> str:
    kind = type(getattr(exc, "orig", None) or exc).__name__
    return f"storage backend unavailable ({kind}); retry shortly"
