"""Serializability of recorded histories.

First the checker in ``tests/history.py`` is shown to work: hand-made anomalous histories
(lost updates, stale reads, write skew, phantoms, partial or lost commits, ...) must each be
reported, and a clean one must not. Then Hypothesis drives randomized multi-agent workloads
(reads, listings with pagination, commits with puts/deletes/expected versions/explicit reads,
read-set clears, shared agent ids with separate sessions) against a real server on every
backend, and the checker verifies the recorded history against the server's log and shard
histories.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import BACKENDS, Server, make_store, module_server
from tests.history import (
    Agent,
    History,
    ListOp,
    ReadOp,
    ServerState,
    Txn,
    Workload,
    Write,
    assert_consistent,
    check,
    fetch_state,
    run_workload,
)

TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# --------------------------------------------------------------------------- hand-made histories
class Sim:
    """A tiny model of the server that applies whatever it is told (no validation), so a
    test can build the log and shard histories of an anomalous execution by hand."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.hist: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.history = History()
        self.n: dict[str, int] = defaultdict(int)

    def read(self, key: str, client: str = "") -> ReadOp:
        h = self.hist.get(key)
        op = ReadOp(key, None) if not h or h[-1]["deleted"] else ReadOp(key, h[-1]["version"], h[-1]["value"])
        if client:
            self.history.reads.append((client, op))
        return op

    def listing(self, prefix: str) -> ListOp:
        items = {
            k: h[-1]["version"]
            for k, h in sorted(self.hist.items())
            if k.startswith(prefix) and h and not h[-1]["deleted"]
        }
        return ListOp(prefix, None, None, items)

    def apply(self, client: str, writes: list[Write]) -> dict[str, Any]:
        seq = len(self.log) + 1
        versions = {}
        for w in writes:
            ver = len(self.hist[w.key]) + 1
            self.hist[w.key].append(
                {
                    "version": ver,
                    "deleted": w.delete,
                    "seq": seq,
                    "updated_by": client,
                    "updated_at": float(seq),
                    "value": None if w.delete else w.value,
                }
            )
            versions[w.key] = ver
        cid = f"commit-{seq}"
        self.log.append(
            {
                "seq": seq,
                "commit_id": cid,
                "committed_by": client,
                "session": "",
                "at": float(seq),
                "writes": [{"key": w.key, "version": versions[w.key], "deleted": w.delete} for w in writes],
            }
        )
        return {"commit_id": cid, "seq": seq, "versions": versions}

    def txn(
        self,
        client: str,
        reads: list[ReadOp],
        writes: list[Write],
        *,
        status: int | None = 200,
        lists: list[ListOp] | None = None,
        explicit: dict[str, int] | None = None,
        apply: bool | None = None,
    ) -> Txn:
        """Record a transaction; it is applied to the model if ``apply`` (default: status 200)."""
        self.n[client] += 1
        for r in reads:
            self.history.reads.append((client, r))
        for lst in lists or []:
            self.history.lists.append((client, lst))
        body: Any = None
        if apply if apply is not None else status == 200:
            body = self.apply(client, writes)
        if status == 409:
            body = {"error": {"type": "conflict", "code": "stale_read", "conflicts": []}}
        t = Txn(client, "", self.n[client], reads, list(lists or []), writes, dict(explicit or {}), None, status, body)
        self.history.txns.append(t)
        return t

    def state(self) -> ServerState:
        heads = {k: h[-1]["version"] for k, h in self.hist.items() if h and not h[-1]["deleted"]}
        return ServerState(log=list(self.log), histories={k: list(v) for k, v in self.hist.items()}, heads=heads)


def kinds(sim: Sim, state: ServerState | None = None, **kw: Any) -> set[str]:
    return {a.kind for a in check(sim.history, state or sim.state(), **kw)}


def seeded() -> Sim:
    sim = Sim()
    sim.txn("setup", [], [Write("a", "a0"), Write("b", "b0"), Write("p/1", "p1")])
    return sim


def test_checker_accepts_a_serial_history() -> None:
    sim = seeded()
    r = sim.read("a")
    sim.txn("t1", [r], [Write("a", "a1")])
    sim.txn("t2", [sim.read("a"), sim.read("b")], [Write("b", "b1"), Write("p/2", "p2")], lists=[sim.listing("p/")])
    sim.txn("t3", [sim.read("b")], [Write("a", "a-rejected")], status=409, apply=False)
    sim.txn("t4", [sim.read("p/1")], [Write("p/1", delete=True, expected_version=1)])
    sim.txn("t5", [sim.read("p/1")], [Write("p/1", "p1-again", expected_version=0)], lists=[sim.listing("p/")])
    assert check(sim.history, sim.state()) == []


def test_checker_reports_lost_update_by_stale_read() -> None:
    """Two clients read counter v1 and both commits are accepted: the second read was stale
    at its commit point, and ww + rw edges form a cycle."""
    sim = Sim()
    sim.txn("setup", [], [Write("counter", 0)])
    r1, r2 = sim.read("counter"), sim.read("counter")
    sim.txn("t1", [r1], [Write("counter", 1)])
    sim.txn("t2", [r2], [Write("counter", "1'")])
    found = check(sim.history, sim.state())
    assert {a.kind for a in found} == {"stale_read", "cycle"}, found
    assert any("t2#1" in a.message and "'counter' v1" in a.message for a in found)


def test_checker_reports_lost_update_overwritten_in_place() -> None:
    """Both increments acknowledged with the same version, but only one is in the store."""
    sim = Sim()
    sim.txn("setup", [], [Write("counter", 0)])
    sim.txn("t1", [sim.read("counter")], [Write("counter", "t1-value")])
    lost = sim.txn("t2", [sim.read("counter")], [Write("counter", "t2-value")], apply=False)
    lost.body = {"commit_id": "commit-2", "seq": 2, "versions": {"counter": 2}}  # the server's (false) ack
    assert {"lost_commit", "lost_write"} & kinds(sim)


def test_checker_reports_acknowledged_commit_missing_after_crash() -> None:
    sim = seeded()
    t = sim.txn("t1", [], [Write("a", "a1"), Write("b", "b1")])
    state = sim.state()
    state.log = state.log[:-1]
    state.histories = {k: [e for e in v if e["seq"] != t.seq] for k, v in state.histories.items()}
    state.heads = None
    assert "lost_commit" in kinds(sim, state)


def test_checker_reports_cross_shard_stale_read() -> None:
    """T read X v1, U committed X v2, then T's commit of Y was accepted: stale at T's commit
    point. (Serializable as T-before-U, so no cycle: the bus promises more, commit-order
    serializability, and the checker holds it to that.)"""
    sim = Sim()
    sim.txn("setup", [], [Write("x", "x0"), Write("y", "y0")])
    r = sim.read("x")
    sim.txn("u", [], [Write("x", "x1")])
    sim.txn("t", [r], [Write("y", "y-from-t")])
    found = check(sim.history, sim.state())
    assert [a.kind for a in found] == ["stale_read"], found
    assert "'x' v1" in found[0].message and "v2" in found[0].message


def test_checker_reports_write_skew() -> None:
    sim = seeded()
    xa, xb, ya, yb = sim.read("a"), sim.read("b"), sim.read("a"), sim.read("b")
    sim.txn("x", [xa, xb], [Write("b", "from-x")])
    sim.txn("y", [ya, yb], [Write("a", "from-y")])
    assert kinds(sim) == {"stale_read", "cycle"}


def test_checker_reports_phantom() -> None:
    sim = seeded()
    listing = sim.listing("p/")
    sim.txn("creator", [], [Write("p/new", "new")])
    sim.txn("lister", [], [Write("q", "q-from-lister")], lists=[listing])
    assert kinds(sim) == {"phantom"}
    # A deleted shard under the prefix is a phantom too.
    sim = seeded()
    listing = sim.listing("p/")
    sim.txn("deleter", [], [Write("p/1", delete=True)])
    sim.txn("lister", [], [Write("q", "q-from-lister")], lists=[listing])
    assert kinds(sim) == {"phantom"}


def test_checker_reports_absent_read_then_create() -> None:
    sim = seeded()
    r = sim.read("ghost")
    assert r.version is None
    sim.txn("creator", [], [Write("ghost", "boo")])
    sim.txn("t", [r], [Write("a", "a-from-t")])
    assert "stale_read" in kinds(sim)


def test_checker_reports_ignored_expected_version() -> None:
    sim = seeded()
    sim.txn("u", [], [Write("a", "a1")])
    sim.txn("t", [], [Write("a", "a-from-t", expected_version=1)])
    assert kinds(sim) == {"write_conflict"}


def test_checker_honours_explicit_reads() -> None:
    """Explicit reads win over the delivery log for their key (SPEC), in both directions."""
    sim = seeded()
    old = sim.read("a")
    sim.txn("u", [], [Write("a", "a1")])
    sim.txn("t", [old, sim.read("a")], [Write("b", "b-from-t")], explicit={"a": 2})
    assert check(sim.history, sim.state()) == []
    sim.txn("t", [], [Write("b", "b-again")], explicit={"a": 1})
    assert kinds(sim) == {"stale_read", "cycle"}


def test_checker_reports_aborted_write_visible_and_dirty_read() -> None:
    sim = seeded()
    sim.txn("t", [sim.read("a")], [Write("a", "should-not-exist")], status=409, apply=True)
    assert kinds(sim) >= {"aborted_write_visible", "foreign_commit"}
    sim = seeded()
    sim.txn("t", [sim.read("a")], [Write("a", "never-applied")], status=409)
    sim.history.reads.append(("reader", ReadOp("a", 2, "never-applied")))
    assert kinds(sim) == {"bad_read"}


def test_checker_reports_partial_commits() -> None:
    sim = seeded()
    sim.txn("t", [], [Write("a", "a1"), Write("b", "b1")])
    state = sim.state()
    state.histories["b"] = state.histories["b"][:-1]
    state.heads = None
    assert "partial_commit" in kinds(sim, state)
    # An in-flight commit (outcome unknown) that is half visible.
    sim = seeded()
    t = sim.txn("t", [], [Write("a", "a1"), Write("b", "b1")], status=None)
    sim.apply("t", [Write("a", "a1")])
    assert t.outcome == "unknown"
    assert "partial_commit" in kinds(sim)
    # ... whereas all-or-nothing is fine either way.
    sim = seeded()
    sim.txn("t", [], [Write("a", "a1"), Write("b", "b1")], status=None)
    sim.txn("t", [], [Write("a", "a2"), Write("b", "b2")], status=None, apply=True)
    assert check(sim.history, sim.state()) == []


def test_checker_reports_version_gaps_duplicates_and_head_mismatch() -> None:
    sim = seeded()
    sim.txn("t", [], [Write("a", "a1")])
    sim.txn("t", [], [Write("a", "a2")])
    state = sim.state()
    del state.histories["a"][1]
    assert "version_gap" in kinds(sim, state)
    state = sim.state()
    state.histories["a"][2] = {**state.histories["a"][2], "version": 2}
    assert "duplicate_version" in kinds(sim, state)
    state = sim.state()
    state.heads = {**(state.heads or {}), "a": 2}
    assert kinds(sim, state) == {"head_mismatch"}
    state = sim.state()
    state.log[1]["seq"] = 7
    assert "seq_gap" in kinds(sim, state)


def test_checker_requires_unique_values() -> None:
    sim = seeded()
    sim.txn("t", [], [Write("a", "same")])
    sim.txn("u", [], [Write("b", "same")])
    with pytest.raises(ValueError, match="unique"):
        check(sim.history, sim.state())
    assert check(sim.history, sim.state(), unique_values=False) == []


# --------------------------------------------------------------------------- real servers
@pytest.fixture(scope="module", params=BACKENDS)
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One agentbus process per backend, reused by every Hypothesis example (unique spaces)."""
    yield from module_server("serializability", request, tmp_path_factory)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 300.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    n_clients = draw(st.integers(2, 8), label="clients")
    n_keys = draw(st.integers(1, 6), label="keys")
    keys = [f"{'ab'[i % 2]}/{i}" for i in range(n_keys)]
    key = st.sampled_from(keys)
    op = st.one_of(
        st.tuples(st.just("read"), key),
        st.tuples(st.just("read"), key),
        st.tuples(st.just("list"), st.sampled_from(["", "a/", "b/", keys[0]]), st.sampled_from([1, 2, 100])),
        st.tuples(
            st.just("commit"),
            st.lists(
                st.tuples(key, st.sampled_from(["put", "put", "put", "delete"]), st.booleans()), min_size=1, max_size=3
            ),
            st.booleans(),
        ),
        st.tuples(
            st.just("commit"),
            st.lists(st.tuples(key, st.just("put"), st.just(False)), min_size=1, max_size=2),
            st.just(False),
        ),
        st.tuples(st.just("clear")),
        st.tuples(st.just("sleep"), st.integers(0, 3)),
    )
    plans = [draw(st.lists(op, min_size=1, max_size=10), label=f"plan{i}") for i in range(n_clients)]
    return Workload(keys=keys, plans=plans, shared_ids=draw(st.booleans()), prepopulate=draw(st.booleans()))


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(workload=workloads())
def test_random_workloads_are_serializable(bus: Server, workload: Workload) -> None:
    space = f"hy-{uuid.uuid4().hex[:12]}"

    async def main() -> History:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            history = await run_workload(http, bus.url, space, workload)
            assert_consistent(history, await fetch_state(http, bus.url, space, keys=workload.keys))
            return history

    history = run(main())
    outcomes = [t.status for t in history.txns]
    assert all(s in (200, 409) for s in outcomes), [(t.name, t.status, t.body) for t in history.txns]
    event(f"commits: {outcomes.count(200)} ok, {'some' if 409 in outcomes else 'no'} 409")


BROKEN_SERVER = """
# Injected by test_checker_catches_a_server_without_validation: read-set validation is off.
import agentbus.core.validation as validation

validation.find_conflicts = lambda guards, heads, changed=(): []
"""


@pytest.mark.parametrize("backend", ["sqlite"])
def test_checker_catches_a_server_without_validation(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any, space: str
) -> None:
    """Mutation check of the checker on real data: a server whose read-set validation is
    disabled (monkeypatched at interpreter start, no source change) lets write skew through,
    and the checker must say so. SQLite only: the SQL stores call the core's find_conflicts."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(BROKEN_SERVER)
    env = {"AGENTBUS_AUTH": "false", "PYTHONPATH": str(inject)}
    srv = Server(store=make_store(backend, request, tmp_path), env=env, log_dir=tmp_path)

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            history = History()
            setup = Agent(http, srv.url, space, "setup", history=history)
            assert (
                await setup.commit([Write(f"{k}{i}", f"init-{k}{i}") for i in range(5) for k in "ab"])
            ).status == 200
            for i in range(5):
                x = Agent(http, srv.url, space, "x", history=history)
                y = Agent(http, srv.url, space, "y", history=history)
                await asyncio.gather(x.read(f"a{i}"), x.read(f"b{i}"), y.read(f"a{i}"), y.read(f"b{i}"))
                tx, ty = await asyncio.gather(x.commit([Write(f"b{i}", f"x{i}")]), y.commit([Write(f"a{i}", f"y{i}")]))
                assert (tx.status, ty.status) == (200, 200), "the injected fault did not take effect"
            found = check(history, await fetch_state(http, srv.url, space))
            return sorted({a.kind for a in found})

    try:
        srv.start()
        assert run(main()) == ["cycle", "stale_read"]
    finally:
        srv.stop()
