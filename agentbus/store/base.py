"""The storage interface every backend implements.

A backend owns durability and atomicity, nothing else: which reads conflict is decided by
:mod:`agentbus.core.validation`. The contract each method must keep is in its docstring.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentbus.broker.budget import Amount, Charge, Counter, Denial, Limits
from agentbus.core import validation as v
from agentbus.core.model import (
    CommitRecord,
    CommitResult,
    ConflictItem,
    Epoch,
    SessionRef,
    Shard,
    ShardMeta,
    StoredOutcome,
    WriteOp,
)
from agentbus.settings import Settings


@dataclass(frozen=True, slots=True)
class CommitRequest:
    writes: tuple[WriteOp, ...]
    explicit_reads: dict[str, int]
    idempotency_key: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """Either ``result`` (applied) or ``conflicts`` (nothing applied); ``replayed`` marks an
    Idempotency-Key hit, whose ``stored`` outcome is returned verbatim."""

    result: CommitResult | None = None
    conflicts: list[ConflictItem] | None = None
    stored: StoredOutcome | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[ShardMeta]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    key: str
    version: int
    value_json: str | None
    deleted: bool
    seq: int
    updated_by: str
    updated_at: float


class Store(abc.ABC):
    budgets: BudgetStore

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def now(self) -> float:
        return time.time()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open pools; called once per process."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release pools."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`BackendUnavailable` if the backend cannot serve."""

    @abc.abstractmethod
    async def read(self, ref: SessionRef, key: str) -> Shard | None:
        """Return the head (None if never written or a tombstone) and record its version in
        the session's epoch, keeping the first version recorded for that key."""

    @abc.abstractmethod
    async def list(self, ref: SessionRef, prefix: str, start_after: str | None, limit: int) -> Listing:
        """List live shards under ``prefix`` after ``start_after`` and record the range read."""

    @abc.abstractmethod
    async def commit(self, ref: SessionRef, req: CommitRequest) -> CommitOutcome:
        """Atomically: replay an idempotent outcome, or check the epoch, validate guards and
        apply all writes or none; end the epoch either way; store the idempotent outcome."""

    @abc.abstractmethod
    async def get_epoch(self, ref: SessionRef) -> Epoch | None:
        """The session's current read set, for display."""

    @abc.abstractmethod
    async def clear_epoch(self, ref: SessionRef) -> None: ...

    @abc.abstractmethod
    async def space_exists(self, tenant: str, space: str) -> bool: ...

    @abc.abstractmethod
    async def history(
        self, tenant: str, space: str, key: str, before_version: int | None, limit: int
    ) -> list[HistoryEntry]:
        """Versions of one shard, newest first."""

    @abc.abstractmethod
    async def log(self, tenant: str, space: str, after_seq: int, limit: int) -> list[CommitRecord]:
        """Commits with seq > after_seq, oldest first. Seq order is visibility order."""

    @abc.abstractmethod
    async def list_spaces(self, tenant: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def reset(self, tenant: str) -> None:
        """Delete every space of a tenant (S-Bus /admin/reset, tests)."""


def outcome_body(outcome: CommitOutcome) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body an outcome produces (also what Idempotency-Key replays)."""
    if outcome.stored is not None:
        return outcome.stored.status, outcome.stored.body
    if outcome.result is not None:
        return 200, outcome.result.to_json()
    assert outcome.conflicts
    err = v.conflict_error(outcome.conflicts)
    return err.status, err.to_body()


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one model call between reserve and settle/release."""

    id: str
    scopes: tuple[str, ...]
    amount: Amount
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One broker call, for the operator views and `GET /v1/budget` history."""

    at: float
    tenant: str
    subject: str
    session: str
    model: str
    upstream_model: str
    endpoint: str
    route: str
    input_tokens: int
    output_tokens: int
    cost: float
    latency_ms: float
    ttft_ms: float | None
    outcome: str  # ok | error | denied
    status: int
    stream: bool

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class BudgetStore(abc.ABC):
    """Atomic budget accounting in the backend (SQL row locks or one Lua script).

    ``scopes`` maps a scope key (``t:<tenant>`` or ``p:<tenant>/<subject>``) to its limits.
    The arithmetic is :mod:`agentbus.broker.budget`; a backend makes roll + admit + reserve
    over all scopes one atomic step, so concurrent calls cannot overspend.
    """

    @abc.abstractmethod
    async def reserve(
        self, scopes: dict[str, Limits], amount: Amount, now: float, ttl_s: float
    ) -> Reservation | Denial:
        """All scopes admit ``amount`` and are charged, or none is and the first denial returns."""

    @abc.abstractmethod
    async def settle(self, reservation: Reservation, actual: Amount, now: float, *, release: bool = False) -> bool:
        """Swap the reservation for actual usage; ``release`` marks a failed call (see
        :func:`agentbus.broker.budget.settle`). Idempotent: returns False if the reservation
        was already settled or swept."""

    @abc.abstractmethod
    async def charge(self, scopes: dict[str, Limits], actual: Amount, now: float, *, release: bool = False) -> None:
        """Count one finished call's ``actual`` usage on every scope, atomically: what
        ``reserve`` + ``settle`` would leave, in one step. Only for scopes without limits
        (:func:`agentbus.broker.budget.unlimited`), which can never deny; it halves the
        backend writes of such calls."""

    @abc.abstractmethod
    async def counters(self, scopes: dict[str, Limits], now: float) -> dict[str, Counter]:
        """Current (rolled) counters, read-only."""

    @abc.abstractmethod
    async def sweep(self, now: float) -> int:
        """Release reservations past ``expires_at`` (their process died mid-call)."""

    @abc.abstractmethod
    async def record_usage(self, rec: UsageRecord) -> None: ...

    #: ``account`` applies a whole batch or nothing (one SQL transaction). When False the
    #: broker's accounting queue hands it one entry at a time, so a failure part-way through
    #: a batch cannot make a retry count the entries already written a second time.
    atomic_batches: bool = False

    async def account(self, charges: Sequence[Charge], records: Sequence[UsageRecord]) -> None:
        """Write counts of callers without limits and usage records (the broker's accounting
        queue, :mod:`agentbus.broker.accounting`)."""
        for c in charges:
            await self.charge(c.scopes, c.amount, c.at, release=c.release)
        for rec in records:
            await self.record_usage(rec)

    @abc.abstractmethod
    async def usage(
        self, tenant: str | None, subject: str | None, limit: int, before: float | None = None
    ) -> list[UsageRecord]:
        """Usage records, newest first."""

    @abc.abstractmethod
    async def reset_scope(self, scope: str) -> None:
        """Zero a scope's counters (admin action, tests)."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One entry of a space's timeline (a bus read/list/commit/conflict or a model call),
    derived from its span and kept in the backend for ``GET /v1/spaces/{space}/trace``.

    ``data`` holds the kind-specific fields (key, version, keys, conflicts, model, tokens, ...);
    ``id`` is the backend's opaque, increasing cursor (empty until stored)."""

    tenant: str
    space: str
    ts: float
    agent: str
    session: str
    kind: str  # read | list | commit | conflict | model_call
    trace_id: str
    span_id: str
    data: dict[str, Any]
    id: str = ""


class TraceStore(abc.ABC):
    """Timeline events in the backend, with bounded retention (age and count per space)."""

    def __init__(self, retention_s: float, max_per_space: int) -> None:
        self.retention_s = retention_s
        self.max_per_space = max_per_space

    @abc.abstractmethod
    async def append(self, events: list[TraceEvent]) -> None:
        """Store events (any spaces, any tenants) in the given order."""

    @abc.abstractmethod
    async def events(self, tenant: str, space: str, after: str | None, limit: int) -> list[TraceEvent]:
        """Events of one space stored after cursor ``after`` (None = from the oldest kept), oldest
        first. Raise :class:`ValidationFailed` for a cursor this backend never issued."""

    @abc.abstractmethod
    async def prune(self, now: float, spaces: set[tuple[str, str]] | None = None) -> int:
        """Drop events older than ``retention_s``, and beyond ``max_per_space`` in ``spaces``
        ((tenant, space) pairs; None = every space); returns how many."""
