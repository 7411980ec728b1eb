"""What goes over the wire: writes the caller builds, and typed views of what the server answers.

Requests are small frozen dataclasses (positional construction reads well in agent code:
``Write("plan", value)``); responses are pydantic models that ignore fields they do not
know, so a newer server never breaks an older SDK.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DELETE",
    "Budget",
    "BudgetScope",
    "CommitEvent",
    "CommitResult",
    "Conflict",
    "Identity",
    "RangeRead",
    "Read",
    "ReadSet",
    "Shard",
    "ShardInfo",
    "ShardVersion",
    "SpaceInfo",
    "Write",
    "WrittenKey",
    "normalize_writes",
]


class _Delete:
    """Type of :data:`DELETE`: one instance, compared by identity."""

    _instance: _Delete | None = None

    def __new__(cls) -> _Delete:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DELETE"

    def __reduce__(self) -> str:
        return "DELETE"


DELETE: Final = _Delete()
"""Use as a value in ``commit({...})`` to delete that key (a tombstone version)."""

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Write:
    """One write of a commit: a new value for ``key`` or (``delete=True``) a tombstone.

    ``expected_version`` makes the write conditional on the shard's current version
    (0 = the key must not exist yet), independent of what this session read.
    ``value`` may be any JSON value, ``None`` (JSON null) included; it is required unless
    ``delete`` is set.
    """

    key: str
    value: Any = _UNSET
    delete: bool = False
    expected_version: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError("a write needs a non-empty string key")
        if self.value is DELETE:  # Write(key, DELETE) reads like the mapping form
            object.__setattr__(self, "value", _UNSET)
            object.__setattr__(self, "delete", True)
        if self.delete and self.value is not _UNSET:
            raise ValueError(f"write of {self.key!r} has both a value and delete=True")
        if not self.delete and self.value is _UNSET:
            raise ValueError(f"write of {self.key!r} needs a value (any JSON, None included) or delete=True")
        ev = self.expected_version
        if ev is not None and (isinstance(ev, bool) or not isinstance(ev, int) or ev < 0):
            raise ValueError(f"expected_version of {self.key!r} must be an int >= 0 or None")

    def to_json(self) -> dict[str, Any]:
        """The wire form (``{"key", "value"} | {"key", "delete": true}`` plus ``expected_version``)."""
        out: dict[str, Any] = {"key": self.key}
        if self.delete:
            out["delete"] = True
        else:
            out["value"] = self.value
        if self.expected_version is not None:
            out["expected_version"] = self.expected_version
        return out


@dataclass(frozen=True, slots=True)
class Read:
    """An explicit read-set entry: "I based this commit on ``key`` at ``version``" (0 = absent).

    Sent in ``commit(reads=...)``; it wins over what the server's delivery log recorded for
    that key, which lets a caller commit against versions it obtained some other way.
    """

    key: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "version": self.version}


def normalize_writes(writes: Mapping[str, Any] | Iterable[Write]) -> list[Write]:
    """``{key: value | DELETE}`` or an iterable of :class:`Write` -> a list of writes."""
    if isinstance(writes, Mapping):
        return [Write(k, delete=True) if v is DELETE else Write(k, v) for k, v in writes.items()]
    out = list(writes)
    for w in out:
        if not isinstance(w, Write):
            raise TypeError(f"writes must be a mapping or Write objects, got {type(w).__name__}")
    return out


def normalize_reads(reads: Mapping[str, int] | Iterable[Read] | None) -> list[Read]:
    if reads is None:
        return []
    if isinstance(reads, Mapping):
        return [Read(k, v) for k, v in reads.items()]
    return list(reads)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Shard(_Model):
    """A shard as read: its value and the version this read recorded in your read set."""

    key: str
    version: int
    value: Any = None
    updated_by: str | None = None
    updated_at: float | None = None


class ShardInfo(_Model):
    """A listing entry (no value): enough to decide what to read."""

    key: str
    version: int
    updated_by: str | None = None
    updated_at: float | None = None


class ShardVersion(_Model):
    """One entry of a shard's history; a delete is a version too (``deleted=True``, value None)."""

    version: int
    deleted: bool = False
    seq: int | None = None
    value: Any = None
    updated_by: str | None = None
    updated_at: float | None = None


class CommitResult(_Model):
    """A committed write set: its id, its position ``seq`` in the space log, and new versions."""

    commit_id: str
    seq: int
    versions: dict[str, int]
    replayed: bool = False
    """True when this outcome was replayed for a repeated ``Idempotency-Key`` (applied earlier)."""


class Conflict(_Model):
    """Why one key made a commit fail.

    ``kind``: ``stale_read`` (a shard you read changed), ``write_conflict`` (an
    ``expected_version`` did not match), ``phantom`` (something changed under a prefix you
    listed). ``committed_by``/``commit_seq`` name the commit that got there first.
    """

    key: str
    kind: str
    read_version: int | None = None
    current_version: int | None = None
    committed_by: str | None = None
    commit_seq: int | None = None


class WrittenKey(_Model):
    key: str
    version: int
    deleted: bool = False


class CommitEvent(_Model):
    """A commit from the space log (``Space.log``) or its event stream (``Space.events``)."""

    seq: int
    commit_id: str
    committed_by: str
    session: str = ""
    at: float
    writes: list[WrittenKey] = Field(default_factory=list)


class RangeRead(_Model):
    prefix: str
    start_after: str | None = None
    end_at: str | None = None
    seq: int


class ReadSet(_Model):
    """What the server will validate at your next commit in this session."""

    subject: str
    session: str = ""
    started_at: float | None = None
    expired: bool = False
    overflow: bool = False
    reads: list[Read] = Field(default_factory=list)
    ranges: list[RangeRead] = Field(default_factory=list)

    def versions(self) -> dict[str, int]:
        return {r.key: r.version for r in self.reads}


class SpaceInfo(_Model):
    space: str
    seq: int
    created_at: float | None = None


class Identity(_Model):
    """The principal behind the client's credentials (``GET /v1/whoami``)."""

    tenant: str
    subject: str
    kind: str
    scopes: list[str]
    spaces: list[str] | None = None
    session: str = ""
    token_id: str | None = None


class BudgetScope(_Model):
    """Limits, usage and what remains for one budget scope (``p:<tenant>/<subject>`` or ``t:<tenant>``).

    Kept as plain dicts: the set of counters grows with the broker, and ``None`` means unlimited.
    """

    limits: dict[str, Any]
    used: dict[str, Any]
    remaining: dict[str, Any]


class Budget(_Model):
    """``GET /v1/budget``: the caller's own and its tenant's budget scopes."""

    tenant: str
    subject: str
    scopes: dict[str, BudgetScope]

    @property
    def mine(self) -> BudgetScope:
        """The caller's own (principal) scope."""
        return self.scopes[f"p:{self.tenant}/{self.subject}"]

    @property
    def tenant_scope(self) -> BudgetScope:
        return self.scopes[f"t:{self.tenant}"]
