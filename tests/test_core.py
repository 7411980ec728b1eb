"""Pure unit tests of agentbus.core (no I/O): read-set guards, conflict detection, epochs,
versions, ranges and names, checked against small reference models written here.

The main property test replays a random history of commits, reads and (paginated) listings
in a toy store and compares :func:`find_conflicts` with the *semantic* definition of a
conflict: "something this agent read or listed was written after it was delivered".
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agentbus.core import validation as v
from agentbus.core.errors import (
    AgentbusError,
    BackendUnavailable,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ReadSetExpired,
    ValidationFailed,
)
from agentbus.core.model import ConflictItem, Epoch, Guards, PointGuard, RangeRead, ShardMeta, WriteOp
from agentbus.core.names import (
    check_key,
    check_prefix,
    check_session,
    check_space,
    check_value_size,
    decode_cursor,
    encode_cursor,
)

KIND_ORDER = {"write_conflict": 0, "stale_read": 1, "phantom": 2}


def meta(key: str, version: int, *, deleted: bool = False, seq: int = 1, by: str = "x") -> ShardMeta:
    return ShardMeta(key=key, version=version, deleted=deleted, seq=seq, updated_by=by, updated_at=float(seq))


# --------------------------------------------------------------------------- a toy store


@dataclass
class World:
    """A space: heads of shards and the commit history (which keys each seq wrote)."""

    heads: dict[str, ShardMeta] = field(default_factory=dict)
    seq: int = 0
    written: dict[int, set[str]] = field(default_factory=dict)

    def commit(self, writes: dict[str, bool], who: str) -> None:
        self.seq += 1
        for key, delete in writes.items():
            self.heads[key] = meta(key, self.version(key) + 1, deleted=delete, seq=self.seq, by=who)
        self.written[self.seq] = set(writes)

    def version(self, key: str) -> int:
        return self.heads[key].version if key in self.heads else 0

    def live(self, key: str) -> bool:
        return key in self.heads and not self.heads[key].deleted

    def written_after(self, key: str, seq: int) -> bool:
        return any(key in keys for s, keys in self.written.items() if s > seq)

    def list_page(self, prefix: str, start_after: str | None, limit: int) -> tuple[list[str], bool]:
        keys = sorted(k for k in self.heads if self.live(k) and k.startswith(prefix))
        if start_after is not None:
            keys = [k for k in keys if k > start_after]
        return keys[:limit], len(keys) > limit


# Few, overlapping keys so that prefixes, pages and conflicts interact often.
KEYS = ["a", "a/1", "a/2", "a/b/1", "a/b/2", "ab", "b", "b/1", "b/2", "c"]
PREFIXES = ["", "a", "a/", "a/b/", "b/", "z/"]
AGENTS = ["me", "other1", "other2"]

commit_action = st.tuples(
    st.just("commit"),
    st.dictionaries(st.sampled_from(KEYS), st.booleans(), min_size=1, max_size=4),
    st.sampled_from(AGENTS[1:]),
)
read_action = st.tuples(st.just("read"), st.sampled_from(KEYS))
list_action = st.tuples(
    st.just("list"), st.sampled_from(PREFIXES), st.integers(1, 4), st.integers(1, 4)
)  # prefix, page size, pages read
actions = st.lists(st.one_of(commit_action, read_action, list_action), max_size=25)


def expected_conflicts(
    world: World,
    first_read_at: dict[str, int],
    first_read_version: dict[str, int],
    explicit: dict[str, int],
    writes: list[WriteOp],
    ranges: list[RangeRead],
) -> dict[tuple[str, str], int | None]:
    """(key, kind) -> read_version, from the meaning of each guard, not from the code."""
    out: dict[tuple[str, str], int | None] = {}
    for key in set(first_read_at) | set(explicit):
        if key in explicit:
            # An explicit read claims "I saw this version": stale unless it is the current one.
            if explicit[key] != world.version(key):
                out[(key, "stale_read")] = explicit[key]
        elif world.written_after(key, first_read_at[key]):
            # A delivered read is stale iff anything was committed to the key after it.
            out[(key, "stale_read")] = first_read_version[key]
    for w in writes:
        if w.expected_version is None:
            continue
        bad = world.live(w.key) if w.expected_version == 0 else w.expected_version != world.version(w.key)
        if bad:
            out[(w.key, "write_conflict")] = w.expected_version
    point_conflicts = {k for k, _ in out}
    for key in world.heads:
        if key in point_conflicts:
            continue
        if any(r.contains(key) and world.written_after(key, r.seq) for r in ranges):
            out[(key, "phantom")] = None
    return out


@settings(max_examples=300, deadline=None)
@given(
    history=actions,
    explicit_choice=st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), st.integers(0, 4)), max_size=3),
    write_choice=st.dictionaries(
        st.sampled_from(KEYS),
        st.tuples(st.booleans(), st.one_of(st.none(), st.none(), st.integers(0, 4), st.just(-1))),
        min_size=1,
        max_size=4,
    ),
    superset_changed=st.booleans(),
)
def test_find_conflicts_matches_semantic_model(
    history: list[tuple], explicit_choice: dict, write_choice: dict, superset_changed: bool
) -> None:
    world = World()
    epoch = Epoch(started_at=0.0)
    first_read_at: dict[str, int] = {}
    range_idents: set[str] = set()
    for action in history:
        if action[0] == "commit":
            world.commit(action[1], action[2])
        elif action[0] == "read":
            key = action[1]
            if key not in epoch.points:  # the store keeps the first delivered version
                epoch.points[key] = world.version(key)
                first_read_at[key] = world.seq
        else:
            _, prefix, limit, pages = action
            start_after = None
            for _ in range(pages):
                seq_before = world.seq
                keys, has_more = world.list_page(prefix, start_after, limit)
                rr = v.range_from_listing(prefix, start_after, keys, has_more, seq_before)
                if rr.ident not in range_idents:  # first seq recorded for a range is kept
                    range_idents.add(rr.ident)
                    epoch.ranges.append(rr)
                if not has_more:
                    break
                start_after = keys[-1]
    # Explicit reads: None means "claim the current version", else an arbitrary claim.
    explicit = {k: (world.version(k) if ver is None else ver) for k, ver in explicit_choice.items()}
    writes = []
    for key, (delete, exp) in write_choice.items():
        # -1 stands for "the correct expected version"
        expected = world.version(key) if exp == -1 else exp
        writes.append(WriteOp(key, None if delete else "1", delete, expected))

    guards = v.build_guards(epoch, explicit, writes)
    heads = {k: world.heads.get(k) for k in guards.keys | {w.key for w in writes}}
    floor = guards.min_range_seq
    if superset_changed:
        changed = list(world.heads.values())  # a backend may pass more than needed
    else:
        changed = [m for m in world.heads.values() if floor is not None and m.seq > floor]
    found = v.find_conflicts(guards, heads, changed)

    expected = expected_conflicts(world, first_read_at, dict(epoch.points), explicit, writes, epoch.ranges)
    assert {(c.key, c.kind): c.read_version for c in found} == expected
    assert len(found) == len(expected)  # one item per (key, kind)
    assert found == sorted(found, key=lambda c: (KIND_ORDER[c.kind], c.key))
    for c in found:
        head = world.heads.get(c.key)
        assert c.current_version == world.version(c.key)
        assert c.committed_by == (head.updated_by if head else None)
        assert c.commit_seq == (head.seq if head else None)
    # The commit would apply iff there is no conflict, and versions then grow by one.
    if not found:
        nv = v.next_versions(writes, heads)
        assert nv == {w.key: world.version(w.key) + 1 for w in writes}


# --------------------------------------------------------------------------- point guards


@pytest.mark.parametrize(
    ("kind", "version", "head", "ok"),
    [
        ("read", 0, None, True),  # read as absent, still absent
        ("read", 0, meta("k", 1), False),  # read as absent, created since
        ("read", 1, meta("k", 1), True),
        ("read", 1, meta("k", 2), False),
        ("read", 2, meta("k", 2, deleted=True), True),  # read the tombstone (404), still deleted
        ("read", 0, meta("k", 2, deleted=True), False),  # created and deleted since: versions moved
        ("read", 3, meta("k", 2), False),  # a version from the future is not current either
        ("expect", 0, None, True),  # must not exist
        ("expect", 0, meta("k", 1), False),
        ("expect", 0, meta("k", 4, deleted=True), True),  # a tombstone counts as not existing
        ("expect", 4, meta("k", 4, deleted=True), True),
        ("expect", 1, meta("k", 1), True),
        ("expect", 1, meta("k", 2), False),
        ("expect", 1, None, False),
    ],
)
def test_point_ok_table(kind: str, version: int, head: ShardMeta | None, ok: bool) -> None:
    assert v.point_ok(PointGuard("k", version, kind), head) is ok  # type: ignore[arg-type]


@given(
    kind=st.sampled_from(["read", "expect"]),
    version=st.integers(0, 6),
    head=st.one_of(st.none(), st.builds(lambda ver, d: meta("k", ver, deleted=d), st.integers(1, 6), st.booleans())),
)
def test_point_ok_reference(kind: str, version: int, head: ShardMeta | None) -> None:
    exists = head is not None and not head.deleted
    current = head.version if head else 0
    if kind == "expect" and version == 0:
        expected = not exists
    else:
        expected = current == version
    assert v.point_ok(PointGuard("k", version, kind), head) is expected  # type: ignore[arg-type]


def test_find_conflicts_reports_every_key_with_details() -> None:
    guards = v.build_guards(
        Epoch(started_at=0, points={"r1": 1, "r2": 0, "ok": 3}),
        {},
        [WriteOp("w1", "1", expected_version=0), WriteOp("w2", "1", expected_version=2), WriteOp("new", "1")],
    )
    heads = {
        "r1": meta("r1", 2, seq=7, by="bob"),
        "r2": meta("r2", 1, seq=8, by="carol"),
        "ok": meta("ok", 3, seq=2),
        "w1": meta("w1", 5, seq=6, by="dan"),
        "w2": None,
        "new": None,
    }
    found = v.find_conflicts(guards, heads)
    assert [c.to_json() for c in found] == [
        {
            "key": "w1",
            "kind": "write_conflict",
            "read_version": 0,
            "current_version": 5,
            "committed_by": "dan",
            "commit_seq": 6,
        },
        {
            "key": "w2",
            "kind": "write_conflict",
            "read_version": 2,
            "current_version": 0,
            "committed_by": None,
            "commit_seq": None,
        },
        {
            "key": "r1",
            "kind": "stale_read",
            "read_version": 1,
            "current_version": 2,
            "committed_by": "bob",
            "commit_seq": 7,
        },
        {
            "key": "r2",
            "kind": "stale_read",
            "read_version": 0,
            "current_version": 1,
            "committed_by": "carol",
            "commit_seq": 8,
        },
    ]
    err = v.conflict_error(found)
    assert isinstance(err, Conflict)
    assert err.status == 409 and err.retryable is True
    body = err.to_body()["error"]
    assert body["type"] == "conflict"
    assert body["code"] == "write_conflict"  # the first kind in report order
    assert body["conflicts"] == [c.to_json() for c in found]
    assert "r1" in body["message"] and "w2" in body["message"]


def test_same_key_can_be_stale_and_write_conflict() -> None:
    guards = v.build_guards(Epoch(started_at=0, points={"k": 1}), {}, [WriteOp("k", "1", expected_version=1)])
    found = v.find_conflicts(guards, {"k": meta("k", 2)})
    assert {(c.key, c.kind) for c in found} == {("k", "write_conflict"), ("k", "stale_read")}


def test_phantoms_from_ranges() -> None:
    ranges = [RangeRead("p/", None, None, seq=5)]
    guards = Guards(points=(), ranges=tuple(ranges))
    changed = [
        meta("p/new", 1, seq=6, by="bob"),  # created under the prefix after the listing
        meta("p/old", 3, seq=5),  # last written at the listing's seq: seen by it
        meta("p/gone", 2, deleted=True, seq=9),  # deleted after the listing
        meta("q/x", 1, seq=7),  # outside the prefix
        meta("p", 1, seq=7),  # "p" does not start with "p/"
    ]
    found = v.find_conflicts(guards, {}, changed)
    assert [(c.key, c.kind, c.read_version, c.current_version) for c in found] == [
        ("p/gone", "phantom", None, 2),
        ("p/new", "phantom", None, 1),
    ]
    assert v.conflict_error(found).code == "phantom"


def test_point_conflict_hides_phantom_of_same_key() -> None:
    epoch = Epoch(started_at=0, points={"p/a": 1}, ranges=[RangeRead("p/", None, None, seq=1)])
    guards = v.build_guards(epoch, {}, [])
    head = meta("p/a", 2, seq=2)
    found = v.find_conflicts(guards, {"p/a": head}, [head])
    assert [(c.key, c.kind) for c in found] == [("p/a", "stale_read")]


# --------------------------------------------------------------------------- build_guards


@given(
    points=st.dictionaries(st.sampled_from(KEYS), st.integers(0, 5), max_size=5),
    explicit=st.dictionaries(st.sampled_from(KEYS), st.integers(0, 5), max_size=5),
    expects=st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), st.integers(0, 5)), max_size=5),
    with_epoch=st.booleans(),
)
def test_build_guards_reference(
    points: dict[str, int], explicit: dict[str, int], expects: dict[str, int | None], with_epoch: bool
) -> None:
    ranges = [RangeRead("a/", None, "a/2", 3), RangeRead("", "b", None, 4)]
    epoch = Epoch(started_at=0, points=dict(points), ranges=list(ranges)) if with_epoch else None
    writes = [WriteOp(k, "1", expected_version=e) for k, e in expects.items()]
    guards = v.build_guards(epoch, explicit, writes)

    merged = {**(points if with_epoch else {}), **explicit}  # explicit wins per key
    reads = [(g.key, g.version) for g in guards.points if g.kind == "read"]
    assert sorted(reads) == sorted(merged.items())
    assert len({k for k, _ in reads}) == len(reads)  # one read guard per key
    expect = [(g.key, g.version) for g in guards.points if g.kind == "expect"]
    assert sorted(expect) == sorted((k, e) for k, e in expects.items() if e is not None)
    assert list(guards.ranges) == (ranges if with_epoch else [])
    assert guards.keys == set(merged) | {k for k, e in expects.items() if e is not None}
    assert guards.min_range_seq == (3 if with_epoch else None)
    if with_epoch:
        assert epoch is not None and epoch.points == points  # the epoch itself is not modified


def test_explicit_read_wins_over_delivery_log_both_ways() -> None:
    head = {"k": meta("k", 2)}
    older_delivered = v.build_guards(Epoch(started_at=0, points={"k": 1}), {"k": 2}, [])
    assert v.find_conflicts(older_delivered, head) == []
    newer_delivered = v.build_guards(Epoch(started_at=0, points={"k": 2}), {"k": 1}, [])
    (c,) = v.find_conflicts(newer_delivered, head)
    assert (c.kind, c.read_version, c.current_version) == ("stale_read", 1, 2)


# --------------------------------------------------------------------------- ranges


@given(
    prefix=st.sampled_from(["", "a", "a/", "b/c"]),
    start_after=st.one_of(st.none(), st.sampled_from(KEYS)),
    end_at=st.one_of(st.none(), st.sampled_from(KEYS)),
    key=st.sampled_from([*KEYS, "", "a/", "a/0", "a/zz", "b/c", "b/cd", "zz"]),
)
def test_range_contains_reference(prefix: str, start_after: str | None, end_at: str | None, key: str) -> None:
    rr = RangeRead(prefix, start_after, end_at, 0)
    # Reference: the keys a listing page delivered are the prefix's keys strictly after
    # start_after, up to and including end_at, in byte order.
    universe = sorted({*KEYS, "", "a/", "a/0", "a/zz", "b/c", "b/cd", "zz"})
    lo = universe.index(start_after) + 1 if start_after is not None else 0
    hi = universe.index(end_at) + 1 if end_at is not None else len(universe)
    expected = key in [k for k in universe[lo:hi] if k.startswith(prefix)]
    assert rr.contains(key) is expected


key_text = st.text(alphabet="ab/-0Z", min_size=1, max_size=5)


@settings(max_examples=300)
@given(
    keys=st.sets(key_text, max_size=25),
    prefix=st.sampled_from(["", "a", "a/", "b/", "ab"]),
    limit=st.integers(1, 6),
    probes=st.lists(key_text, max_size=15),
)
def test_paginated_listing_ranges_partition_the_prefix(
    keys: set[str], prefix: str, limit: int, probes: list[str]
) -> None:
    """Listing page by page: every key under the prefix (listed or not, e.g. created later)
    falls in exactly one page's range, and no key outside the prefix falls in any."""
    live = sorted(k for k in keys if k.startswith(prefix))
    pages: list[tuple[list[str], RangeRead]] = []
    start_after: str | None = None
    while True:
        rest = [k for k in live if start_after is None or k > start_after]
        page, has_more = rest[:limit], len(rest) > limit
        pages.append((page, v.range_from_listing(prefix, start_after, page, has_more, seq=len(pages))))
        if not has_more:
            break
        start_after = page[-1]
    assert [k for page, _ in pages for k in page] == live
    for page, rr in pages:
        assert all(rr.contains(k) for k in page)
    assert pages[-1][1].end_at is None  # the last page is open-ended: later keys are covered
    for probe in [*keys, *probes]:
        hits = sum(rr.contains(probe) for _, rr in pages)
        assert hits == (1 if probe.startswith(prefix) else 0), probe


def test_range_from_listing_bounds() -> None:
    assert v.range_from_listing("p/", None, ["p/a", "p/b"], True, 4) == RangeRead("p/", None, "p/b", 4)
    assert v.range_from_listing("p/", "p/b", ["p/c"], False, 5) == RangeRead("p/", "p/b", None, 5)
    assert v.range_from_listing("p/", None, [], False, 0) == RangeRead("p/", None, None, 0)
    # A range's identity distinguishes pages and prefixes (it keys the first recorded seq).
    idents = {
        RangeRead("p/", None, None, 0).ident,
        RangeRead("p/", None, "p/b", 0).ident,
        RangeRead("p/", "p/b", None, 0).ident,
        RangeRead("p", None, None, 0).ident,
    }
    assert len(idents) == 4
    assert RangeRead("p/", None, None, 1).ident == RangeRead("p/", None, None, 9).ident


# --------------------------------------------------------------------------- epochs


@given(
    started=st.floats(0, 1e6),
    age=st.floats(0, 100),
    ttl=st.floats(0.5, 50),
    overflow=st.booleans(),
)
def test_check_epoch_reference(started: float, age: float, ttl: float, overflow: bool) -> None:
    now = started + age
    assume(now - started != ttl)  # the boundary itself is covered below
    epoch = Epoch(started_at=started, overflow=overflow)
    if overflow:
        with pytest.raises(ReadSetExpired) as exc:
            v.check_epoch(epoch, now=now, ttl_s=ttl)
        assert exc.value.code == "read_set_overflow"  # overflow is reported even if also old
    elif now - started > ttl:
        with pytest.raises(ReadSetExpired) as exc:
            v.check_epoch(epoch, now=now, ttl_s=ttl)
        assert exc.value.code == "read_set_expired"
    else:
        v.check_epoch(epoch, now=now, ttl_s=ttl)


def test_check_epoch_edges() -> None:
    v.check_epoch(None, now=1e9, ttl_s=1)  # no read set: nothing to expire
    v.check_epoch(Epoch(started_at=100.0), now=101.0, ttl_s=1.0)  # exactly the TTL is still valid
    with pytest.raises(ReadSetExpired) as exc:
        v.check_epoch(Epoch(started_at=100.0), now=101.001, ttl_s=1.0)
    err = exc.value
    assert (err.status, err.retryable, err.type) == (410, True, "read_set_expired")
    assert err.to_body()["error"]["code"] == "read_set_expired"


# --------------------------------------------------------------------------- versions


@given(
    heads=st.dictionaries(
        st.sampled_from(KEYS),
        st.one_of(st.none(), st.tuples(st.integers(1, 100), st.booleans())),
        max_size=6,
    ),
    deletes=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_next_versions_reference(heads: dict, deletes: list[bool]) -> None:
    head_meta = {k: (meta(k, h[0], deleted=h[1]) if h else None) for k, h in heads.items()}
    writes = [WriteOp(k, None if d else "1", d) for k, d in zip(head_meta, deletes, strict=False)]
    got = v.next_versions(writes, head_meta)
    # One more than the head's version; a tombstone is a version, a missing key is version 0.
    assert got == {k: (heads[k][0] if heads[k] else 0) + 1 for k in head_meta}


def test_versions_never_reused_across_create_delete_recreate() -> None:
    world = World()
    seen = []
    for delete in (False, True, False, True, False):
        op = WriteOp("k", None if delete else "1", delete)
        nv = v.next_versions([op], dict(world.heads))["k"]
        world.commit({"k": delete}, "me")
        assert world.version("k") == nv
        seen.append(nv)
    assert seen == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- names, cursors, errors

KEY_CHARS = string.ascii_letters + string.digits + "._~:@+=/-"


@given(st.text(alphabet=KEY_CHARS + " {}\"'\\%?#é\t\n", max_size=12))
def test_check_key_reference(key: str) -> None:
    valid = (
        1 <= len(key) <= 10 and all(ch in KEY_CHARS for ch in key) and key != "history" and not key.endswith("/history")
    )
    if valid:
        assert check_key(key, max_len=10) == key
    else:
        with pytest.raises(ValidationFailed) as exc:
            check_key(key, max_len=10)
        assert exc.value.code == "invalid_key" and exc.value.status == 422


@pytest.mark.parametrize(
    "check",
    [
        lambda: check_key("a\n", max_len=10),
        lambda: check_space("sp\n"),
        lambda: check_session("s\n"),
    ],
    ids=["key", "space", "session"],
)
def test_trailing_newline_is_rejected(check) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationFailed):
        check()


def test_check_key_examples() -> None:
    for ok in ("a", "a/b/c", "history/x", "x/historyy", "x-history", "A.b_c~d:e@f+g=h-i", "k" * 512):
        assert check_key(ok, max_len=512) == ok
    for bad in ("", "k" * 513, "a b", "a{b", "ключ", "history", "a/history", "a\x00b", 'a"b', "a|b"):
        with pytest.raises(ValidationFailed):
            check_key(bad, max_len=512)
    assert check_prefix("", max_len=4) == ""
    with pytest.raises(ValidationFailed):
        check_prefix("a b", max_len=4)


def test_pipe_never_in_keys_so_range_idents_are_unambiguous() -> None:
    # RangeRead.ident joins fields with "|"; that is only sound if no key can contain it.
    with pytest.raises(ValidationFailed):
        check_key("a|b", max_len=10)


def test_check_space_and_session() -> None:
    for ok in ("s", "sp-1", "A.b_c-d", "9" * 128):
        assert check_space(ok) == ok
    for bad in ("", "-x", ".x", "a b", "a/b", "x" * 129, "a{b}", "é"):
        with pytest.raises(ValidationFailed) as exc:
            check_space(bad)
        assert exc.value.code == "invalid_space"
    assert check_session("") == ""
    assert check_session("task-1:a@b") == "task-1:a@b"
    for bad in ("a b", "x" * 129, "a/b"):
        with pytest.raises(ValidationFailed):
            check_session(bad)


def test_check_value_size() -> None:
    check_value_size(100, key="k", max_bytes=100)
    with pytest.raises(PayloadTooLarge) as exc:
        check_value_size(101, key="k", max_bytes=100)
    body = exc.value.to_body()["error"]
    assert exc.value.status == 413
    assert body["code"] == "value_too_large" and body["limit"] == 100 and body["key"] == "k"


@given(st.text(alphabet=KEY_CHARS, min_size=1, max_size=40))
def test_cursor_roundtrip(key: str) -> None:
    cursor = encode_cursor(key)
    assert set(cursor) <= set(string.ascii_letters + string.digits + "-_")  # URL-safe, unpadded
    assert decode_cursor(cursor) == key


@given(st.text(max_size=20))
def test_decode_cursor_only_raises_validation_failed(garbage: str) -> None:
    try:
        decoded = decode_cursor(garbage)
    except ValidationFailed as exc:
        assert exc.code == "invalid_cursor"
    else:
        assert isinstance(decoded, str)


def test_fingerprint_ignores_key_order_but_not_content() -> None:
    a = {"writes": [{"key": "k", "value": {"x": 1, "y": 2}}], "reads": []}
    b = {"reads": [], "writes": [{"value": {"y": 2, "x": 1}, "key": "k"}]}
    c = {"writes": [{"key": "k", "value": {"x": 1, "y": 3}}], "reads": []}
    assert v.fingerprint(a) == v.fingerprint(b)
    assert v.fingerprint(a) != v.fingerprint(c)


def test_commit_ids_are_unique() -> None:
    ids = {v.new_commit_id() for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize(
    ("err", "status", "retryable"),
    [
        (ValidationFailed("m"), 422, False),
        (NotFound("m"), 404, False),
        (PayloadTooLarge("m"), 413, False),
        (ReadSetExpired("m"), 410, True),
        (BackendUnavailable("m", retry_after_ms=1500), 503, True),
        (Conflict("m", code="stale_read", conflicts=[]), 409, True),
    ],
)
def test_error_shape(err: AgentbusError, status: int, retryable: bool) -> None:
    body = err.to_body()
    assert set(body) == {"error"}
    e = body["error"]
    assert {"type", "code", "message", "retryable"} <= set(e)
    assert (err.status, e["retryable"], e["message"]) == (status, retryable, "m")
    assert all(isinstance(e[f], str) for f in ("type", "code", "message"))
    assert ("retry_after_ms" in e) == (err.retry_after_ms is not None)


def test_conflict_item_json_fields() -> None:
    item = ConflictItem("k", "phantom", None, 3, "bob", 9)
    assert item.to_json() == {
        "key": "k",
        "kind": "phantom",
        "read_version": None,
        "current_version": 3,
        "committed_by": "bob",
        "commit_seq": 9,
    }


@pytest.mark.parametrize("bad", ["!!!", "a b", "%%%%", "zz", "AAAA"])
def test_garbage_cursors_are_refused(bad: str) -> None:
    from agentbus.core.errors import ValidationFailed
    from agentbus.core.names import decode_cursor

    with pytest.raises(ValidationFailed):
        decode_cursor(bad)
