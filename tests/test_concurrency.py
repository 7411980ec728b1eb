"""Concurrency over real HTTP: lost updates, write skew, cross-shard stale reads, phantoms and
idempotency, each on every backend (one server per backend, a fresh space per test)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, Server, module_server
from tests.history import (
    Agent,
    History,
    Write,
    assert_consistent,
    fetch_state,
    run_increments,
)

TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@pytest.fixture(scope="module", params=BACKENDS)
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One agentbus process per backend for the whole module (tests use unique spaces)."""
    yield from module_server("concurrency", request, tmp_path_factory)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 300.0) -> Any:
    """Run a test coroutine with a hard bound, so nothing can hang."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def client(connections: int = 64) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=TIMEOUT, limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    )


async def create(http: httpx.AsyncClient, url: str, space: str, values: dict[str, Any], history: History) -> None:
    agent = Agent(http, url, space, "setup", history=history)
    txn = await agent.commit([Write(k, v, expected_version=0) for k, v in values.items()])
    assert txn.status == 200, txn.body


async def get(http: httpx.AsyncClient, url: str, space: str, key: str) -> httpx.Response:
    return await http.get(f"{url}/v1/spaces/{space}/shards/{key}", headers={"X-Agent-Id": "observer"})


# --------------------------------------------------------------------------- lost update
@pytest.mark.parametrize("mode", ["readset", "expected"])
def test_lost_update(bus: Server, space: str, mode: str) -> None:
    """32 clients make 2 (delivery log) or 1 (expected_version) successful read-increment-
    commits each on one shard, retrying on 409: the counter ends at exactly the number of
    successful commits, with one version each."""
    clients, per_client = 32, (2 if mode == "readset" else 1)

    async def main() -> None:
        async with client() as http:
            history = History()
            await create(http, bus.url, space, {"counter": 0}, history)
            res = await run_increments([http], [bus.url], space, clients=clients, per_client=per_client, mode=mode)
            history.txns += res.history.txns
            history.reads += res.history.reads
            n = clients * per_client
            assert res.successes == n
            committed = [t for t in res.history.txns if t.status == 200]
            assert len(committed) == n
            # The delivery log alone guards "readset" commits; expected_version guards the others.
            want_code = "stale_read" if mode == "readset" else "write_conflict"
            assert set(res.conflict_codes) <= {want_code}, res.conflict_codes
            r = await get(http, bus.url, space, "counter")
            assert r.status_code == 200
            assert r.json()["value"] == n
            assert r.json()["version"] == n + 1  # + the create
            assert r.headers["etag"] == f'"{n + 1}"'
            # Every acknowledged increment has its own version, and they are exactly 2..n+1.
            assert sorted(t.body["versions"]["counter"] for t in committed) == list(range(2, n + 2))
            state = await fetch_state(http, bus.url, space)
            assert len(state.log) == n + 1
            assert [e["value"] for e in state.histories["counter"]] == list(range(n + 1))
            assert_consistent(history, state, unique_values=False)

    run(main())


# --------------------------------------------------------------------------- write skew
def test_write_skew_never_both_commit(bus: Server, space: str) -> None:
    """X reads A and B and writes B; Y reads A and B and writes A. With both reads done before
    either commit, exactly one may commit (the other's read is stale); in free-running rounds
    both may commit only serially. Run many rounds in parallel to vary the interleavings."""
    rounds, free_rounds = 50, 10

    async def main() -> None:
        async with client() as http:
            history = History()
            await create(
                http, bus.url, space, {f"r{i}/{k}": f"init-{i}-{k}" for i in range(rounds) for k in "ab"}, history
            )

            async def barrier_round(i: int) -> None:
                x = Agent(http, bus.url, space, f"x{i}", history=history)
                y = Agent(http, bus.url, space, f"y{i}", history=history)
                a, b = f"r{i}/a", f"r{i}/b"
                await asyncio.gather(x.read(a), x.read(b), y.read(a), y.read(b))
                tx, ty = await asyncio.gather(x.commit([Write(b, f"x-{i}")]), y.commit([Write(a, f"y-{i}")]))
                statuses = sorted([tx.status or 0, ty.status or 0])
                assert statuses == [200, 409], (
                    f"round {i}: {tx.status} {tx.body} {tx.error} / {ty.status} {ty.body} {ty.error}"
                )
                winner, loser, won_key = (tx, ty, b) if tx.status == 200 else (ty, tx, a)
                assert loser.conflict_code == "stale_read", loser.body
                assert [c["key"] for c in loser.conflicts] == [won_key], loser.body
                c = loser.conflicts[0]
                assert (c["kind"], c["read_version"], c["current_version"]) == ("stale_read", 1, 2)
                assert c["committed_by"] == winner.client

            async def free_round(i: int) -> None:
                rng = random.Random(i)
                a, b = f"r{i}/a", f"r{i}/b"

                async def agent(name: str, write_key: str) -> tuple[Agent, Any]:
                    ag = Agent(http, bus.url, space, f"{name}{i}f", history=history)
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    await ag.read(a)
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    await ag.read(b)
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    return ag, await ag.commit([Write(write_key, f"{name}-{i}-free")])

                (_, tx), (_, ty) = await asyncio.gather(agent("x", b), agent("y", a))
                assert 200 in (tx.status, ty.status), (tx.body, ty.body)
                if tx.status == ty.status == 200:
                    # Only legal if one read the other's write (a serial order exists).
                    x_saw_y = any(r.key == a and r.value == f"y-{i}-free" for r in tx.reads)
                    y_saw_x = any(r.key == b and r.value == f"x-{i}-free" for r in ty.reads)
                    assert x_saw_y or y_saw_x, f"round {i}: write skew, both committed on the same snapshot"

            for start in range(0, rounds, 10):
                await asyncio.gather(*(barrier_round(i) for i in range(start, start + 10)))
            for start in range(0, free_rounds, 10):
                await asyncio.gather(*(free_round(i) for i in range(start, start + 10)))
            assert_consistent(history, await fetch_state(http, bus.url, space))

    run(main())


# --------------------------------------------------------------------------- stale read
def test_cross_shard_stale_read(bus: Server, space: str) -> None:
    """An agent that read X may not commit Y after someone else committed X."""

    async def main() -> None:
        async with client() as http:
            history = History()
            await create(http, bus.url, space, {"x": "x-1", "y": "y-1"}, history)
            agent = Agent(http, bus.url, space, "reader", history=history)
            other = Agent(http, bus.url, space, "other", history=history)
            assert (await agent.read("x")).version == 1
            assert (await other.commit([Write("x", "x-2")])).status == 200
            txn = await agent.commit([Write("y", "from-reader")])
            assert txn.status == 409
            assert txn.conflict_code == "stale_read"
            assert txn.body["error"]["retryable"] is True
            assert txn.conflicts == [
                {
                    "key": "x",
                    "kind": "stale_read",
                    "read_version": 1,
                    "current_version": 2,
                    "committed_by": "other",
                    "commit_seq": 2,
                }
            ]
            r = await get(http, bus.url, space, "y")
            assert (r.json()["version"], r.json()["value"]) == (1, "y-1")
            assert_consistent(history, await fetch_state(http, bus.url, space))

    run(main())


def test_cross_shard_stale_read_under_load(bus: Server, space: str) -> None:
    """12 agents read X and commit their own Y_i while a writer keeps committing X: every
    accepted commit read the X that was current when it committed, every rejected one names X."""

    async def main() -> None:
        async with client() as http:
            history = History()
            await create(http, bus.url, space, {"x": "x-0"}, history)
            stop = asyncio.Event()

            async def writer() -> None:
                w = Agent(http, bus.url, space, "writer", history=history)
                for n in range(1, 200):
                    if stop.is_set():
                        return
                    assert (await w.commit([Write("x", f"x-{n}")])).status == 200
                    await asyncio.sleep(0.002)

            async def reader(i: int) -> list[int | None]:
                ag = Agent(http, bus.url, space, f"reader{i}", history=history)
                out: list[int | None] = []
                for n in range(4):
                    await ag.read("x")
                    await asyncio.sleep(random.uniform(0, 0.005))
                    txn = await ag.commit([Write(f"y{i}", f"y{i}-{n}")])
                    out.append(txn.status)
                    if txn.status == 409:
                        assert txn.conflict_code == "stale_read"
                        assert {c["key"] for c in txn.conflicts} == {"x"}, txn.body
                return out

            w = asyncio.create_task(writer())
            results = await asyncio.gather(*(reader(i) for i in range(12)))
            stop.set()
            await w
            assert all(s in (200, 409) for r in results for s in r)
            assert_consistent(history, await fetch_state(http, bus.url, space))

    run(main())


# --------------------------------------------------------------------------- phantoms
def test_phantom_under_concurrency(bus: Server, space: str) -> None:
    """An agent lists p/; another creates, changes or deletes a shard under p/; the first
    agent's commit is rejected with 409 phantom naming that shard. 20 pairs run at once, then
    20 free-running pairs whose accepted commits must have seen an unchanged range."""
    pairs = 20

    async def main() -> None:
        async with client() as http:
            history = History()
            await create(http, bus.url, space, {f"p{i}/a": f"init-{i}" for i in range(2 * pairs)}, history)

            async def pair(i: int) -> None:
                lister = Agent(http, bus.url, space, f"lister{i}", history=history)
                other = Agent(http, bus.url, space, f"other{i}", history=history)
                listed = await lister.list(f"p{i}/")
                assert listed == {f"p{i}/a": 1}
                change = ["create", "update", "delete"][i % 3]
                target = f"p{i}/new" if change == "create" else f"p{i}/a"
                w = Write(target, delete=True) if change == "delete" else Write(target, f"{change}-{i}")
                assert (await other.commit([w])).status == 200
                txn = await lister.commit([Write(f"q{i}", f"lister-{i}")])
                assert txn.status == 409, (change, txn.body)
                assert txn.conflict_code == "phantom", txn.body
                assert [(c["key"], c["kind"]) for c in txn.conflicts] == [(target, "phantom")], txn.body
                assert (await get(http, bus.url, space, f"q{i}")).status_code == 404

            async def free_pair(i: int) -> None:
                lister = Agent(http, bus.url, space, f"lister{i}", history=history)
                other = Agent(http, bus.url, space, f"other{i}", history=history)

                async def list_and_commit() -> None:
                    await lister.list(f"p{i}/")
                    await asyncio.sleep(random.uniform(0, 0.005))
                    txn = await lister.commit([Write(f"q{i}", f"lister-{i}")])
                    assert txn.status in (200, 409)
                    if txn.status == 409:
                        assert txn.conflict_code == "phantom"

                async def create_one() -> None:
                    await asyncio.sleep(random.uniform(0, 0.005))
                    assert (await other.commit([Write(f"p{i}/new", f"new-{i}")])).status == 200

                await asyncio.gather(list_and_commit(), create_one())

            await asyncio.gather(*(pair(i) for i in range(pairs)))
            await asyncio.gather(*(free_pair(i) for i in range(pairs, 2 * pairs)))
            assert_consistent(history, await fetch_state(http, bus.url, space))

    run(main())


# --------------------------------------------------------------------------- idempotency
@pytest.mark.parametrize("outcome", [200, 409])
def test_idempotency_concurrent(bus: Server, space: str, outcome: int) -> None:
    """One commit with one Idempotency-Key sent 20 times at once: applied at most once, and
    every response (200, or 409 when the read set is stale) is identical."""

    async def main() -> None:
        async with client() as http:
            history = History()
            await create(http, bus.url, space, {"src": "s-1"}, history)
            agent = Agent(http, bus.url, space, "idem", history=history)
            await agent.read("src")
            if outcome == 409:
                assert (
                    await Agent(http, bus.url, space, "spoiler", history=history).commit([Write("src", "s-2")])
                ).status == 200
            key = uuid.uuid4().hex
            body = {"writes": [{"key": "dst", "value": "applied-once"}, {"key": "src2", "value": "also-once"}]}
            url = f"{bus.url}/v1/spaces/{space}/commit"
            headers = {"X-Agent-Id": "idem", "Idempotency-Key": key}
            resps = await asyncio.gather(*(http.post(url, json=body, headers=headers) for _ in range(20)))
            assert {r.status_code for r in resps} == {outcome}, [r.text for r in resps]
            assert len({r.content for r in resps}) == 1, {r.content for r in resps}
            fresh = [r for r in resps if r.headers.get("idempotent-replayed") != "true"]
            assert len(fresh) == 1, "exactly one request may execute; the others replay it"
            state = await fetch_state(http, bus.url, space)
            applied = [c for c in state.log if {w["key"] for w in c["writes"]} == {"dst", "src2"}]
            if outcome == 200:
                assert len(applied) == 1
                assert applied[0]["commit_id"] == resps[0].json()["commit_id"]
                assert [e["value"] for e in state.histories["dst"]] == ["applied-once"]
            else:
                assert applied == []
                assert "dst" not in state.histories
                assert resps[0].json()["error"]["code"] == "stale_read"
            # A later retry with the same key still replays, without applying again.
            again = await http.post(url, json=body, headers=headers)
            assert (again.status_code, again.content) == (outcome, resps[0].content)
            assert again.headers.get("idempotent-replayed") == "true"
            assert len((await fetch_state(http, bus.url, space)).log) == len(state.log)

    run(main())
