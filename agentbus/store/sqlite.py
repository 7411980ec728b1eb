"""SQLite: the SQL store with its hot paths (read, commit) on one writer thread per process.

Why: through SQLAlchemy + aiosqlite every statement of a read (six) or a commit (about
twelve) was built, compiled and handed to aiosqlite's thread and back — several
milliseconds of CPU per request. SQLite runs one writer at a time anyway (``BEGIN
IMMEDIATE``), so here a whole read or commit runs as one function on a dedicated thread with
its own ``sqlite3`` connection and the module's prepared-statement cache: one thread hop per
request. Transactions that queued while the thread was busy run as one SQLite transaction,
each in its own savepoint (group commit): they share one fsync instead of waiting for one
each, and each still applies whole or not at all, in the order it was queued.

The guarantees are unchanged. ``BEGIN IMMEDIATE`` takes the database write lock across
processes before anything is read, validation is :mod:`agentbus.core.validation` (pure
Python, run on the writer thread inside the transaction), and everything else (listings,
history, tokens, budgets, purge) stays on the SQLAlchemy engines of
:class:`~agentbus.store.sql.SQLStore`, which share the same database file and locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

try:
    import fcntl
except ImportError:  # not on Windows: SQLite's busy handler alone orders the writers
    fcntl = None  # type: ignore[assignment]

from agentbus.core import validation as v
from agentbus.core.errors import BackendUnavailable, BadRequest, ReadSetExpired
from agentbus.core.model import (
    CommitResult,
    Epoch,
    RangeRead,
    SessionRef,
    Shard,
    ShardMeta,
    StoredOutcome,
)
from agentbus.store.base import CommitOutcome, CommitRequest, outcome_body
from agentbus.store.sql import SQLStore

T = TypeVar("T")

_EPOCH_PK = "tenant = ? AND space = ? AND subject = ? AND session = ?"
_META = "key, version, deleted, seq, updated_by, updated_at"

LOCK_EPOCH = (
    "INSERT INTO readset_epochs (tenant, space, subject, session, started_at, n, overflow, gen) "
    "VALUES (?, ?, ?, ?, ?, 0, 0, 0) "
    "ON CONFLICT (tenant, space, subject, session) DO UPDATE SET gen = gen RETURNING n, overflow"
)
ENTRY_KNOWN = f"SELECT 1 FROM readset_entries WHERE {_EPOCH_PK} AND kind = ? AND ident = ?"
SET_OVERFLOW = f"UPDATE readset_epochs SET overflow = 1 WHERE {_EPOCH_PK}"
ADD_ENTRY = (
    "INSERT INTO readset_entries (tenant, space, subject, session, kind, ident, prefix, start_after, end_at, version) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
COUNT_ENTRY = f"UPDATE readset_epochs SET n = n + 1, gen = gen + 1 WHERE {_EPOCH_PK}"
READ_SHARD = (
    "SELECT version, value, deleted, seq, updated_by, updated_at FROM shards WHERE tenant = ? AND space = ? AND key = ?"
)
LOCK_SPACE = (
    "INSERT INTO spaces (tenant, space, seq, created_at) VALUES (?, ?, 0, ?) "
    "ON CONFLICT (tenant, space) DO UPDATE SET seq = seq RETURNING seq"
)
LOAD_IDEM = (
    "SELECT fingerprint, status, body, created_at FROM idempotency "
    "WHERE tenant = ? AND space = ? AND subject = ? AND idem_key = ?"
)
LOAD_EPOCH = f"SELECT started_at, overflow, gen FROM readset_epochs WHERE {_EPOCH_PK}"
LOAD_ENTRIES = f"SELECT kind, ident, version, prefix, start_after, end_at FROM readset_entries WHERE {_EPOCH_PK}"
CHANGED_SINCE = f"SELECT {_META} FROM shards WHERE tenant = ? AND space = ? AND seq > ?"
SET_SEQ = "UPDATE spaces SET seq = ? WHERE tenant = ? AND space = ?"
UPSERT_SHARD = (
    "INSERT INTO shards (tenant, space, key, version, value, deleted, seq, updated_by, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, space, key) DO UPDATE SET "
    "version = excluded.version, value = excluded.value, deleted = excluded.deleted, seq = excluded.seq, "
    "updated_by = excluded.updated_by, updated_at = excluded.updated_at"
)
ADD_VERSION = (
    "INSERT INTO shard_versions (tenant, space, key, version, value, deleted, seq, updated_by, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
ADD_COMMIT = (
    "INSERT INTO commits (tenant, space, seq, commit_id, subject, session, at, writes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
DROP_ENTRIES = f"DELETE FROM readset_entries WHERE {_EPOCH_PK}"
DROP_EPOCH = f"DELETE FROM readset_epochs WHERE {_EPOCH_PK}"
STORE_IDEM = (
    "INSERT INTO idempotency (tenant, space, subject, idem_key, fingerprint, status, body, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, space, subject, idem_key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, status = excluded.status, body = excluded.body, "
    "created_at = excluded.created_at"
)

_TRANSIENT = ("database is locked", "database is busy", "disk i/o error")
BUSY_RETRIES = 4
# At most this many queued transactions share one SQLite transaction (and its fsync):
# enough to drain a burst, short enough that the write lock is not held for long.
MAX_GROUP = 64


@dataclass(slots=True)
class _Job:
    """One queued write transaction: ``fn(conn, *args)``, answered on ``future``'s loop."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    durable: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_Outcome = tuple[bool, Any]  # (True, value) or (False, exception)


class SQLiteStore(SQLStore):
    """:class:`SQLStore` on SQLite, with reads and commits on one writer thread."""

    _jobs: queue.SimpleQueue[_Job | None] | None = None
    _writer: threading.Thread | None = None
    _conn: sqlite3.Connection | None = None
    _turn_fd: int | None = None

    async def start(self) -> None:
        database = make_url(self.url).database
        if not database or database == ":memory:" or "mode=memory" in self.url:
            # Each connection would get its own empty database: reads, commits and the
            # readiness probe would not even see each other.
            raise BadRequest(
                "AGENTBUS_STORE: an in-memory SQLite database is not supported; name a file, "
                "e.g. sqlite:///./agentbus.db"
            )
        await super().start()
        self._path = database
        self._jobs = queue.SimpleQueue()
        # A daemon: a store never closed must not keep the interpreter from exiting (close()
        # lets the thread finish what is queued, then closes its connection).
        self._writer = threading.Thread(
            target=self._write_forever, args=(self._jobs,), name="agentbus-sqlite-writer", daemon=True
        )
        self._writer.start()
        from agentbus.store.sqlite_budget import SQLiteBudgetStore

        self.budgets = SQLiteBudgetStore(self)

    async def close(self) -> None:
        jobs, self._jobs = self._jobs, None
        writer, self._writer = self._writer, None
        if jobs is not None and writer is not None:
            jobs.put(None)  # after everything queued so far
            await asyncio.to_thread(writer.join)
        await super().close()

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        fd, self._turn_fd = self._turn_fd, None
        if fd is not None:
            os.close(fd)

    def _connection(self) -> sqlite3.Connection:
        """The writer thread's connection, opened on first use (on that thread)."""
        if self._conn is None:
            assert self._path is not None
            # The busy timeout is set at connect, before the first PRAGMA: switching the
            # journal mode takes a lock too, and without a busy handler a busy database
            # fails it at once.
            conn = sqlite3.connect(
                self._path,
                timeout=self.settings.sqlite_busy_timeout_ms / 1000.0,
                isolation_level=None,
                cached_statements=64,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.settings.sqlite_synchronous}")
            self._conn = conn
            if fcntl is not None and self._turn_fd is None:
                try:
                    self._turn_fd = os.open(self._path + "-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
                except OSError:
                    self._turn_fd = None  # e.g. a read-only directory: SQLite's busy handler alone
        return self._conn

    async def _run(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
        """Run ``fn(conn, *args)`` as one write transaction on the writer thread.

        ``durable=False`` commits without its own fsync (``synchronous=NORMAL`` for this
        transaction only) when the store is set to ``FULL`` or ``EXTRA``: other connections
        see it at once, an application crash cannot lose it, and the next durable commit
        of any process (one WAL file, one fsync) makes it durable too; only an OS crash or
        power loss before then loses it. For a model call's reservation and settle (the
        call's usage record follows within ``accounting.LINGER_S``, durably, and fsyncs them
        with it; a settle lost in an OS crash leaves a reservation the sweeper releases)
        and timeline events (observability). An fsync costs ~0.2-0.8 ms here, and queued
        transactions of the whole process wait for it.
        """
        jobs = self._jobs
        assert jobs is not None, "the store is not started"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        jobs.put(_Job(fn, args, durable, loop, future))
        return await future

    def _write_forever(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        """The writer thread: takes what is queued, up to MAX_GROUP, and runs it as one
        transaction; stops at the None that close() queues, then closes its connection."""
        try:
            stop = False
            while not stop:
                first = jobs.get()
                if first is None:
                    break
                group = [first]
                while len(group) < MAX_GROUP:
                    try:
                        nxt = jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    group.append(nxt)
                _answer(group, self._execute(group))
        finally:
            self._close_conn()

    def _execute(self, group: list[_Job]) -> list[_Outcome]:
        if len(group) == 1:
            job = group[0]
            try:
                return [(True, self._in_tx(job.fn, job.args, job.durable))]
            except BaseException as exc:  # handed to the caller's await
                return [(False, exc)]
        durable = any(job.durable for job in group)
        try:
            return self._in_tx(_grouped, (group,), durable)
        except BaseException as exc:  # the transaction failed: so did every job in it
            return [(False, exc)] * len(group)

    def _in_tx(self, fn: Callable[..., T], args: tuple[Any, ...], durable: bool = True) -> T:
        """Retries a transaction that found the database busy (every such attempt rolled back
        whole, so nothing is applied twice): a busy timeout does not cover every case, e.g.
        several processes opening a WAL database at once, which can answer "database is
        locked" without waiting."""
        for attempt in range(BUSY_RETRIES):
            try:
                return self._in_tx_once(fn, args, durable)
            except BackendUnavailable:
                if attempt == BUSY_RETRIES - 1:
                    raise
                time.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable")

    def _in_tx_once(self, fn: Callable[..., T], args: tuple[Any, ...], durable: bool = True) -> T:
        try:
            conn = self._connection()
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc
        if durable or self.settings.sqlite_synchronous not in ("FULL", "EXTRA"):
            return self._in_tx_turn(conn, fn, args)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise _mapped(exc) from exc
        try:
            return self._in_tx_turn(conn, fn, args)
        finally:
            if self._conn is conn:
                try:
                    conn.execute(f"PRAGMA synchronous={self.settings.sqlite_synchronous}")
                except sqlite3.Error:
                    # Never leave a connection that would commit durable writes unsynced.
                    self._close_conn()

    def _in_tx_turn(self, conn: sqlite3.Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._writer_turn():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _mapped(exc) from exc
            try:
                out = fn(conn, *args)
                conn.execute("COMMIT")
                return out
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    # The transaction is gone (e.g. the file vanished): start over next time.
                    self._close_conn()
                if isinstance(exc, sqlite3.Error):
                    raise _mapped(exc) from exc
                raise

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """The writer threads of all processes on this database take turns through an
        ``flock`` on a file beside it. Why: SQLite's own busy handler polls with sleeps of up
        to 100 ms, so two processes committing constantly (``--workers 2``) handed the write
        lock back and forth with long gaps (p99 0.65 s at 32 agents); a blocked ``flock``
        is woken by the kernel the moment the lock is free. SQLite's lock stays what makes
        a transaction exclusive; writes through the SQLAlchemy engine do not take the turn
        and simply meet SQLite's lock as before."""
        if self._turn_fd is None:
            yield
            return
        fcntl.flock(self._turn_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    async def append_trace_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """On the writer thread (one C-level executemany): through SQLAlchemy + aiosqlite the
        timeline's batches cost the event loop far more, and their write transaction met
        the writer thread's at SQLite's lock anyway."""
        await self._run(_add_trace_rows, rows, durable=False)

    # ------------------------------------------------------------------ reads
    async def read(self, ref: SessionRef, key: str) -> Shard | None:
        return await self._run(self._read_sync, ref, key, self.now())

    def _read_sync(self, conn: sqlite3.Connection, ref: SessionRef, key: str, now: float) -> Shard | None:
        row = conn.execute(READ_SHARD, (ref.tenant, ref.space, key)).fetchone()
        self._record_sync(conn, ref, "p", key, int(row[0]) if row else 0, now)
        if row is None or row[2]:
            return None
        version, value, _, seq, updated_by, updated_at = row
        meta = ShardMeta(
            key=key, version=int(version), deleted=False, seq=int(seq), updated_by=updated_by, updated_at=updated_at
        )
        return Shard(meta=meta, value_json=value)

    def _record_sync(
        self, conn: sqlite3.Connection, ref: SessionRef, kind: str, ident: str, version: int, now: float
    ) -> None:
        """The delivery-log entry of one read (same rules as ``SQLStore._record``)."""
        pk = (ref.tenant, ref.space, ref.subject, ref.session)
        n, overflow = conn.execute(LOCK_EPOCH, (*pk, now)).fetchone()
        if overflow:
            return
        if n >= self.settings.readset_max_entries:
            # Full: a key already recorded needs no entry; a new one cannot be recorded.
            if conn.execute(ENTRY_KNOWN, (*pk, kind, ident)).fetchone() is None:
                conn.execute(SET_OVERFLOW, pk)
            return
        if conn.execute(ADD_ENTRY, (*pk, kind, ident, None, None, None, version)).rowcount == 1:
            conn.execute(COUNT_ENTRY, pk)

    # ------------------------------------------------------------------ commit
    async def commit(self, ref: SessionRef, req: CommitRequest) -> CommitOutcome:
        outcome = await self._run(self._commit_sync, ref, req, self.now())
        if isinstance(outcome, ReadSetExpired):
            # Raised only now, after the transaction that ended the epoch has committed.
            raise outcome
        return outcome

    def _commit_sync(
        self, conn: sqlite3.Connection, ref: SessionRef, req: CommitRequest, now: float
    ) -> CommitOutcome | ReadSetExpired:
        pk = (ref.tenant, ref.space, ref.subject, ref.session)
        (seq,) = conn.execute(LOCK_SPACE, (ref.tenant, ref.space, now)).fetchone()
        if req.idempotency_key:
            rec = conn.execute(LOAD_IDEM, (ref.tenant, ref.space, ref.subject, req.idempotency_key)).fetchone()
            if rec is not None and rec[3] >= now - self.settings.idempotency_ttl_s:
                return CommitOutcome(stored=StoredOutcome(fingerprint=rec[0], status=rec[1], body=json.loads(rec[2])))
        epoch = _load_epoch(conn, pk)
        try:
            v.check_epoch(epoch, now=now, ttl_s=self.settings.readset_ttl_s)
        except ReadSetExpired as exc:
            _drop_epoch(conn, pk)
            return exc
        guards = v.build_guards(epoch, req.explicit_reads, req.writes)
        keys = sorted(guards.keys | {w.key for w in req.writes})
        heads: dict[str, ShardMeta | None] = dict.fromkeys(keys)
        marks = ",".join("?" * len(keys))
        sql = f"SELECT {_META} FROM shards WHERE tenant = ? AND space = ? AND key IN ({marks})"
        for r in conn.execute(sql, (ref.tenant, ref.space, *keys)):
            heads[r[0]] = _meta(r)
        changed: list[ShardMeta] = []
        floor = guards.min_range_seq
        if floor is not None and floor < seq:
            changed = [_meta(r) for r in conn.execute(CHANGED_SINCE, (ref.tenant, ref.space, floor))]
        conflicts = v.find_conflicts(guards, heads, changed)
        if conflicts:
            outcome = CommitOutcome(conflicts=conflicts)
        else:
            new_seq = seq + 1
            versions = v.next_versions(req.writes, heads)
            commit_id = v.new_commit_id()
            conn.execute(SET_SEQ, (new_seq, ref.tenant, ref.space))
            rows = [
                (
                    ref.tenant,
                    ref.space,
                    w.key,
                    versions[w.key],
                    None if w.delete else w.value_json,
                    w.delete,
                    new_seq,
                    ref.subject,
                    now,
                )
                for w in req.writes
            ]
            conn.executemany(UPSERT_SHARD, rows)
            conn.executemany(ADD_VERSION, rows)
            log_writes = [{"key": w.key, "version": versions[w.key], "deleted": w.delete} for w in req.writes]
            conn.execute(
                ADD_COMMIT,
                (ref.tenant, ref.space, new_seq, commit_id, ref.subject, ref.session, now, json.dumps(log_writes)),
            )
            outcome = CommitOutcome(result=CommitResult(commit_id=commit_id, seq=new_seq, versions=versions))
        if epoch is not None:
            _drop_epoch(conn, pk)
        if req.idempotency_key:
            status, body = outcome_body(outcome)
            conn.execute(
                STORE_IDEM,
                (
                    ref.tenant,
                    ref.space,
                    ref.subject,
                    req.idempotency_key,
                    req.fingerprint or "",
                    status,
                    json.dumps(body),
                    now,
                ),
            )
        return outcome


ADD_TRACE_ROWS = (
    "INSERT INTO trace_events (tenant, space, ts, agent, session, kind, trace_id, span_id, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _add_trace_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(ADD_TRACE_ROWS, rows)


def _load_epoch(conn: sqlite3.Connection, pk: tuple[str, ...]) -> Epoch | None:
    hdr = conn.execute(LOAD_EPOCH, pk).fetchone()
    if hdr is None:
        return None
    epoch = Epoch(started_at=hdr[0], overflow=bool(hdr[1]), generation=int(hdr[2]))
    for kind, ident, version, prefix, start_after, end_at in conn.execute(LOAD_ENTRIES, pk):
        if kind == "p":
            epoch.points[ident] = int(version)
        else:
            epoch.ranges.append(RangeRead(prefix or "", start_after, end_at, int(version)))
    return epoch


def _drop_epoch(conn: sqlite3.Connection, pk: tuple[str, ...]) -> None:
    conn.execute(DROP_ENTRIES, pk)
    conn.execute(DROP_EPOCH, pk)


def _meta(r: Any) -> ShardMeta:
    return ShardMeta(
        key=r[0], version=int(r[1]), deleted=bool(r[2]), seq=int(r[3]), updated_by=r[4], updated_at=float(r[5])
    )


def _grouped(conn: sqlite3.Connection, group: list[_Job]) -> list[_Outcome]:
    """Several jobs in one transaction, each in a savepoint: a job that raises is rolled
    back alone and gets its exception; the others commit together."""
    out: list[_Outcome] = []
    for job in group:
        conn.execute("SAVEPOINT job")
        try:
            value = job.fn(conn, *job.args)
        except Exception as exc:
            # If the transaction itself is broken this raises, and the whole group fails.
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            out.append((False, _mapped(exc) if isinstance(exc, sqlite3.Error) else exc))
        else:
            conn.execute("RELEASE job")
            out.append((True, value))
    return out


def _answer(group: list[_Job], outcomes: list[_Outcome]) -> None:
    """Hand each job its outcome on its loop: one wake-up per loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, _Outcome]]] = {}
    for job, outcome in zip(group, outcomes, strict=True):
        by_loop.setdefault(job.loop, []).append((job, outcome))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_futures, answers)
        except RuntimeError:
            pass  # that loop is closed: nobody waits for these answers any more


def _settle_futures(answers: list[tuple[_Job, _Outcome]]) -> None:
    for job, (ok, value) in answers:
        if job.future.cancelled():
            continue  # the caller left; the transaction ran (or failed) all the same
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _mapped(exc: sqlite3.Error) -> Exception:
    """Busy/locked/I/O trouble is retryable (503); anything else is a bug and stays an error."""
    if any(s in str(exc).lower() for s in _TRANSIENT):
        return BackendUnavailable(f"storage backend unavailable ({type(exc).__name__}); retry shortly")
    return exc
