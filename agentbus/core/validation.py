"""Read-set reconstruction and commit validation: the one place these rules live.

Every backend calls :func:`build_guards` and :func:`find_conflicts`; the backend's only job
is to observe the state those guards name and apply the writes *atomically* with that
observation. Keeping the rules here means SQLite, PostgreSQL and Redis cannot disagree on
what a conflict is (the Redis Lua script repeats the yes/no check for atomicity, and the
test-suite cross-checks it against this module).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from agentbus.core.errors import Conflict, ReadSetExpired
from agentbus.core.model import (
    ConflictItem,
    Epoch,
    Guards,
    PointGuard,
    RangeRead,
    ShardMeta,
    WriteOp,
)

# Conflicts are reported in this order; the 409's top-level code is the first one's kind.
_KIND_ORDER = {"write_conflict": 0, "stale_read": 1, "phantom": 2}


def check_epoch(epoch: Epoch | None, *, now: float, ttl_s: float) -> None:
    """Refuse to validate a read set that is no longer complete.

    An epoch older than its TTL, or one that hit the entry bound, may have lost reads; a
    commit validated against it could pass although the agent saw stale data.
    """
    if epoch is None:
        return
    if epoch.overflow:
        raise ReadSetExpired(
            "the read set of this session exceeded its maximum number of entries; "
            "clear it (DELETE .../readset), re-read what you need and commit again",
            code="read_set_overflow",
        )
    if now - epoch.started_at > ttl_s:
        raise ReadSetExpired(
            f"the read set of this session is older than its TTL ({ttl_s:g}s); "
            "re-read the shards you depend on and commit again",
            code="read_set_expired",
        )


def build_guards(
    epoch: Epoch | None,
    explicit_reads: Mapping[str, int],
    writes: Iterable[WriteOp],
) -> Guards:
    """Reconstruct the read set (delivery log union explicit reads, explicit wins) as guards."""
    points: dict[str, int] = dict(epoch.points) if epoch else {}
    points.update(explicit_reads)
    guards = [PointGuard(k, v, "read") for k, v in sorted(points.items())]
    guards += [PointGuard(w.key, w.expected_version, "expect") for w in writes if w.expected_version is not None]
    ranges = tuple(epoch.ranges) if epoch else ()
    return Guards(points=tuple(guards), ranges=ranges)


def current_version(meta: ShardMeta | None) -> int:
    return meta.version if meta is not None else 0


def point_ok(guard: PointGuard, meta: ShardMeta | None) -> bool:
    """A read guard holds if nothing was committed to the key since; an expected version of
    0 means "must not exist" and also accepts a tombstone."""
    if guard.kind == "expect" and guard.version == 0:
        return meta is None or meta.deleted
    return current_version(meta) == guard.version


def find_conflicts(
    guards: Guards,
    heads: Mapping[str, ShardMeta | None],
    changed: Iterable[ShardMeta] = (),
) -> list[ConflictItem]:
    """Every violated guard, one item per (key, kind).

    ``heads`` maps each guarded key to its current head (None = never written);
    ``changed`` holds at least every head whose seq is above ``guards.min_range_seq``.
    """
    found: dict[tuple[str, str], ConflictItem] = {}
    for g in guards.points:
        meta = heads.get(g.key)
        if point_ok(g, meta):
            continue
        kind = "write_conflict" if g.kind == "expect" else "stale_read"
        found[(g.key, kind)] = _item(g.key, kind, g.version, meta)
    stale_keys = {k for k, _ in found}
    for meta in changed:
        if meta.key in stale_keys:
            continue
        for r in guards.ranges:
            if meta.seq > r.seq and r.contains(meta.key):
                found[(meta.key, "phantom")] = _item(meta.key, "phantom", None, meta)
                break
    return sorted(found.values(), key=lambda c: (_KIND_ORDER[c.kind], c.key))


def _item(key: str, kind: str, read_version: int | None, meta: ShardMeta | None) -> ConflictItem:
    return ConflictItem(
        key=key,
        kind=kind,  # type: ignore[arg-type]
        read_version=read_version,
        current_version=current_version(meta),
        committed_by=meta.updated_by if meta else None,
        commit_seq=meta.seq if meta else None,
    )


def conflict_error(conflicts: list[ConflictItem]) -> Conflict:
    first = conflicts[0]
    keys = ", ".join(sorted({c.key for c in conflicts}))
    messages = {
        "write_conflict": "expected_version does not match the current version",
        "stale_read": "a shard you read was changed by another commit",
        "phantom": "a shard was created, changed or deleted under a prefix you listed",
    }
    return Conflict(
        f"commit rejected: {messages[first.kind]} ({keys}); re-read and retry",
        code=first.kind,
        conflicts=[c.to_json() for c in conflicts],
    )


def next_versions(writes: Iterable[WriteOp], heads: Mapping[str, ShardMeta | None]) -> dict[str, int]:
    """Versions grow by exactly one per committed write; a delete is a version too."""
    return {w.key: current_version(heads.get(w.key)) + 1 for w in writes}


def new_commit_id() -> str:
    return uuid.uuid4().hex


def fingerprint(payload: Any) -> str:
    """Identifies a request body, so one Idempotency-Key cannot be reused for another body."""
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def range_from_listing(prefix: str, start_after: str | None, keys: list[str], has_more: bool, seq: int) -> RangeRead:
    """The range a listing page covered: up to its last key if more pages follow."""
    end_at = keys[-1] if has_more and keys else None
    return RangeRead(prefix=prefix, start_after=start_after, end_at=end_at, seq=seq)
