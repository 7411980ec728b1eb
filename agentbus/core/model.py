"""Plain domain values shared by the API, every backend and the tests.

Frozen dataclasses, no I/O: a backend builds them from rows or Redis hashes and the core
reasons about them without knowing where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ConflictKind = Literal["stale_read", "write_conflict", "phantom"]


@dataclass(frozen=True, slots=True)
class SessionRef:
    """Whose read set: the delivery log is kept per (tenant, space, subject, session)."""

    tenant: str
    space: str
    subject: str
    session: str = ""


@dataclass(frozen=True, slots=True)
class ShardMeta:
    """The current head of one shard. ``deleted`` heads are tombstones: absent, but versioned."""

    key: str
    version: int
    deleted: bool
    seq: int
    updated_by: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class Shard:
    """A head with its value as raw JSON text: backends and the API never re-encode it."""

    meta: ShardMeta
    value_json: str


@dataclass(frozen=True, slots=True)
class RangeRead:
    """A listing delivered to an agent: keys with ``prefix`` in (start_after, end_at].

    ``seq`` is the space's commit seq observed *before* the listing ran, so any commit not
    reflected in the listing has a larger seq and is caught (at worst a false positive).
    """

    prefix: str
    start_after: str | None
    end_at: str | None
    seq: int

    def contains(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        if self.start_after is not None and key <= self.start_after:
            return False
        return not (self.end_at is not None and key > self.end_at)

    @property
    def ident(self) -> str:
        """Stable identity within an epoch (the first seq recorded for a range is kept). "|" never occurs in keys."""
        return f"{self.prefix}|{self.start_after or ''}|{self.end_at or ''}"


@dataclass(slots=True)
class Epoch:
    """One read-set transaction of a session, as stored by a backend."""

    started_at: float
    points: dict[str, int] = field(default_factory=dict)
    ranges: list[RangeRead] = field(default_factory=list)
    overflow: bool = False
    generation: int = 0


@dataclass(frozen=True, slots=True)
class WriteOp:
    """``value_json`` is the value already encoded as JSON text (None for a delete)."""

    key: str
    value_json: str | None = None
    delete: bool = False
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class PointGuard:
    """``version`` must still be the key's current version (0 = never written)."""

    key: str
    version: int
    kind: Literal["read", "expect"]


@dataclass(frozen=True, slots=True)
class Guards:
    points: tuple[PointGuard, ...]
    ranges: tuple[RangeRead, ...]

    @property
    def keys(self) -> set[str]:
        return {g.key for g in self.points}

    @property
    def min_range_seq(self) -> int | None:
        return min((r.seq for r in self.ranges), default=None)


@dataclass(frozen=True, slots=True)
class ConflictItem:
    key: str
    kind: ConflictKind
    read_version: int | None
    current_version: int
    committed_by: str | None
    commit_seq: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "read_version": self.read_version,
            "current_version": self.current_version,
            "committed_by": self.committed_by,
            "commit_seq": self.commit_seq,
        }


@dataclass(frozen=True, slots=True)
class CommitResult:
    commit_id: str
    seq: int
    versions: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"commit_id": self.commit_id, "seq": self.seq, "versions": self.versions}


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """One entry of a space's commit log."""

    seq: int
    commit_id: str
    subject: str
    session: str
    at: float
    writes: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "commit_id": self.commit_id,
            "committed_by": self.subject,
            "session": self.session,
            "at": self.at,
            "writes": self.writes,
        }


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """What an ``Idempotency-Key`` replays: the first outcome of that request, 200 or 409."""

    fingerprint: str
    status: int
    body: dict[str, Any]
