"""Several bus processes over one store: two independent servers, and one server with two
uvicorn workers. Clients spread their requests over the processes (one agent's read and its
commit may hit different processes: the delivery log lives in the store), so every guarantee
must come from the backend, never from a process-local lock. Runs on SQLite too (the file is
shared; BEGIN IMMEDIATE serializes writers across processes)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, Server, make_store
from tests.history import (
    Agent,
    History,
    Write,
    assert_consistent,
    fetch_state,
    random_workload,
    run_increments,
    run_workload,
)

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(60.0, connect=10.0)
TOPOLOGIES = {"2servers": {"n": 2, "workers": 1}, "2workers": {"n": 1, "workers": 2}}


@pytest.fixture(
    scope="module",
    params=[(b, t) for b in BACKENDS for t in TOPOLOGIES],
    ids=[f"{b}-{t}" for b in BACKENDS for t in TOPOLOGIES],
)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``server_factory(n=2)`` or ``server_factory(workers=2)``, shared by this module's tests."""
    backend, topology = request.param
    tmp = tmp_path_factory.mktemp(f"multiprocess-{backend}-{topology}")
    store = make_store(backend, request, tmp)
    env = {"AGENTBUS_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}", "AGENTBUS_AUTH": "false"}
    srv = Server(store=store, env=env, log_dir=tmp)
    try:
        srv.start(TOPOLOGIES[topology]["n"], workers=TOPOLOGIES[topology]["workers"])
        yield srv
    finally:
        srv.stop()


def run(coro: Coroutine[Any, Any, Any], timeout: float = 300.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def clients(n: int) -> list[httpx.AsyncClient]:
    """Several connection pools, so a multi-worker server sees many distinct connections."""
    return [
        httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))
        for _ in range(n)
    ]


def test_lost_update_across_processes(cluster: Server, space: str) -> None:
    """32 clients each make one successful read-increment-commit of one shard (retrying on
    409), every request rotating over the processes: an agent's read and its commit often hit
    different processes, so the delivery log in the store is the only guard. (The
    expected_version variant runs in test_concurrency; its validation is the same step.)"""
    n_clients, per_client = 32, 1

    async def main() -> None:
        pools = clients(4)
        try:
            history = History()
            setup = Agent(pools[0], cluster.urls, space, "setup", history=history)
            assert (await setup.commit([Write("counter", 0, expected_version=0)])).status == 200
            res = await run_increments(
                pools, [cluster.urls], space, clients=n_clients, per_client=per_client, mode="readset"
            )
            n = n_clients * per_client
            assert res.successes == n
            assert set(res.conflict_codes) <= {"stale_read"}
            for url in cluster.urls:  # every process sees the same head
                r = await pools[0].get(f"{url}/v1/spaces/{space}/shards/counter", headers={"X-Agent-Id": "observer"})
                assert (r.json()["value"], r.json()["version"]) == (n, n + 1)
            state = await fetch_state(pools[0], cluster.url, space)
            assert len(state.log) == n + 1
            assert [e["value"] for e in state.histories["counter"]] == list(range(n + 1))
            history.txns += res.history.txns
            history.reads += res.history.reads
            assert_consistent(history, state, unique_values=False)
        finally:
            for p in pools:
                await p.aclose()

    run(main())


def test_write_skew_across_processes(cluster: Server, space: str) -> None:
    """X (on one process) and Y (on another) both read A and B, then write B and A at once:
    exactly one commits."""
    rounds = 20

    async def main() -> None:
        pools = clients(2)
        try:
            history = History()
            setup = Agent(pools[0], cluster.url, space, "setup", history=history)
            txn = await setup.commit([Write(f"r{i}/{k}", f"init-{i}-{k}") for i in range(rounds) for k in "ab"])
            assert txn.status == 200
            urls = cluster.urls

            async def one(i: int) -> None:
                x = Agent(pools[0], urls[0], space, f"x{i}", history=history)
                y = Agent(pools[1], urls[-1], space, f"y{i}", history=history)
                a, b = f"r{i}/a", f"r{i}/b"
                await asyncio.gather(x.read(a), y.read(b), x.read(b), y.read(a))
                tx, ty = await asyncio.gather(x.commit([Write(b, f"x-{i}")]), y.commit([Write(a, f"y-{i}")]))
                assert sorted([tx.status or 0, ty.status or 0]) == [200, 409], (
                    tx.status,
                    tx.body,
                    tx.error,
                    ty.status,
                    ty.body,
                    ty.error,
                )

            await asyncio.gather(*(one(i) for i in range(rounds)))
            assert_consistent(history, await fetch_state(pools[0], cluster.url, space))
        finally:
            for p in pools:
                await p.aclose()

    run(main())


def test_idempotency_across_processes(cluster: Server, space: str) -> None:
    """One Idempotency-Key sent 20 times at once, spread over the processes: applied once."""

    async def main() -> None:
        pools = clients(4)
        try:
            body = {"writes": [{"key": "a", "value": "once"}, {"key": "b", "value": "once-b"}]}
            headers = {"X-Agent-Id": "idem", "Idempotency-Key": uuid.uuid4().hex}
            urls = cluster.urls
            resps = await asyncio.gather(
                *(
                    pools[i % len(pools)].post(
                        f"{urls[i % len(urls)]}/v1/spaces/{space}/commit", json=body, headers=headers
                    )
                    for i in range(20)
                )
            )
            assert {r.status_code for r in resps} == {200}, [r.text for r in resps]
            assert len({r.content for r in resps}) == 1
            assert sum(r.headers.get("idempotent-replayed") != "true" for r in resps) == 1
            state = await fetch_state(pools[0], cluster.url, space)
            assert len(state.log) == 1
            assert state.log[0]["commit_id"] == resps[0].json()["commit_id"]
            assert [e["value"] for e in state.histories["a"]] == ["once"]
        finally:
            for p in pools:
                await p.aclose()

    run(main())


@pytest.mark.parametrize("seed", [1, 2])
def test_random_workload_across_processes(cluster: Server, space: str, seed: int) -> None:
    """A randomized multi-agent workload (reads, listings, commits, deletes) whose agents
    rotate over the processes; the recorded history must be serializable."""
    workload = random_workload(random.Random(seed), clients=8, keys=4, ops=10)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            history = await run_workload(http, cluster.urls, space, workload)
            assert_consistent(history, await fetch_state(http, cluster.url, space, keys=workload.keys))

    run(main())
