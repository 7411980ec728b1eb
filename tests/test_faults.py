"""Reliability under faults, each with many concurrent real clients whose history is
recorded and checked at the end (tests/history.py: zero anomalies, every acknowledged
commit present exactly once):

* PostgreSQL outage mid-load, through a TCP fault proxy (tests/faults.py) between agentbus
  and the shared PostgreSQL server, which is never restarted;
* Redis connections dropped mid-load: ``CLIENT KILL`` of exactly this test's connections,
  then an outage through the proxy;
* ``kill -9`` of one of two bus processes over one store: the other keeps serving;
* broker upstream faults under concurrent calls (hang, reset mid-response, garbage);
* idempotent retries turn lost acknowledgements into exactly-once commits.

During a backend fault the bus must answer 503 with ``retryable: true`` (never a 500, never
a request slower than the configured timeouts), and recover by itself afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.conftest import Server, dev_env, migrate
from tests.faults import FaultProxy, FaultyUpstream, Recorder, redis_kill_clients_of
from tests.history import Agent, History, UnexpectedResponse, Write, assert_consistent, fetch_state

pytestmark = pytest.mark.slow

KEYS = [f"k{i}" for i in range(8)]
CLIENTS = 12
# Each client retries a read or an idempotent commit this many times (0.05 s x attempt
# back-off: ~20 s in all), so a few seconds of outage end in an answer, not an error.
RETRIES = 28
# No request may take longer than this: Redis socket_timeout is 10 s; a refused or reset
# PostgreSQL connection fails at once. A hang would show up here.
MAX_REQUEST_S = 12.0
OUTAGE_S = 3.0
ACKS = 25  # acknowledged commits before a fault, and again after it


def run(coro: Coroutine[Any, Any, Any], timeout: float = 150.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def via(url: str, port: int) -> str:
    """``url`` with its port replaced (to go through a proxy)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = netloc[-1].rsplit(":", 1)[0]
    new = (netloc[0] + "@" if len(netloc) == 2 else "") + f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=new))


def port_of(url: str, default: int) -> int:
    return urlsplit(url).port or default


async def wait_for(pred: Callable[[], bool], limit_s: float, what: str) -> None:
    end = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the bus load
@dataclass
class Load:
    """Concurrent agents reading and committing multi-key transactions, all recorded."""

    http: httpx.AsyncClient
    urls: list[str]
    space: str
    history: History = field(default_factory=History)
    acked: list[tuple[float, str]] = field(default_factory=list)  # (time, url) of each 200 commit
    gave_up: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def acks_since(self, t: float) -> int:
        return sum(1 for at, _ in self.acked if at >= t)

    async def client(self, i: int) -> None:
        rng = random.Random(i)
        agent = Agent(self.http, self.urls, self.space, f"c{i}", history=self.history, retries=RETRIES)
        n = 0
        while not self.stop.is_set():
            keys = rng.sample(KEYS, 3)
            try:
                for k in keys[: rng.randint(0, 2)]:
                    await agent.read(k)
            except (httpx.TransportError, UnexpectedResponse) as exc:
                self.gave_up[f"read {type(exc).__name__}"] += 1
                await asyncio.sleep(0.05)
                continue
            n += 1
            writes = [Write(k, f"c{i}-{n}-{k}") for k in keys[: rng.randint(1, 2)]]
            # With an Idempotency-Key the agent retries 503s and transport errors itself.
            txn = await agent.commit(writes, idempotency_key=uuid.uuid4().hex)
            if txn.status == 200:
                # Which process answered: the agent rotated to the URL it used last.
                self.acked.append((time.monotonic(), agent.urls[agent._turn]))
            elif txn.status != 409:
                self.gave_up[f"commit {txn.status or txn.error}"] += 1
                await asyncio.sleep(0.05)

    async def run(self, clients: int = CLIENTS) -> None:
        await asyncio.gather(*(self.client(i) for i in range(clients)))

    async def check(self, url: str) -> None:
        state = await fetch_state(self.http, url, self.space, keys=KEYS)
        assert_consistent(self.history, state)
        acked = sum(t.status == 200 for t in self.history.txns)
        assert len(state.log) >= acked > 0


def assert_clean_5xx(rec: Recorder) -> None:
    bad = rec.bad_5xx()
    assert not bad, "5xx other than a retryable 503/504: " + "; ".join(
        f"{s.method} {s.url} -> {s.status} {s.body}" for s in bad[:5]
    )
    slow = max((s.duration for s in rec.seen), default=0.0)
    assert slow < MAX_REQUEST_S, f"a request took {slow:.1f} s (> {MAX_REQUEST_S} s): a hang"


async def outage_under_load(
    urls: list[str], space: str, fault: Callable[[], Coroutine[Any, Any, None]], *, check_url: str | None = None
) -> tuple[Load, Recorder, float, float]:
    """Run the load over ``urls``; after ACKS acknowledgements run ``fault()`` (returns when
    the fault is over), then wait for ACKS more acknowledgements; check the history (fetched
    from ``check_url``, default the first URL)."""
    rec = Recorder()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(transport=rec, limits=limits, timeout=httpx.Timeout(60.0, connect=10.0)) as http:
        load = Load(http, urls, space)
        task = asyncio.create_task(load.run())
        try:
            await wait_for(lambda: len(load.acked) >= ACKS or task.done(), 60, "acks before the fault")
            assert not task.done(), task.exception()
            t0 = time.monotonic()
            await fault()
            t1 = time.monotonic()
            await wait_for(lambda: load.acks_since(t1) >= ACKS or task.done(), 60, "acks after the fault")
            assert not task.done(), task.exception()
        finally:
            load.stop.set()
            await asyncio.wait_for(task, 90)
        try:
            await load.check(check_url or urls[0])
        except AssertionError:
            # What every attempt of the commits named in the report got, to see the cause.
            text = str(sys.exc_info()[1])
            for t in load.history.txns:
                if t.idempotency_key and re.search(re.escape(t.name) + r"(?!\d)", text):
                    print(f"attempts of {t.name} ({t.status}): {rec.attempts(t.idempotency_key)}")
            raise
    print(
        f"fault {t1 - t0:.1f} s; statuses before/during/after: {dict(rec.statuses(0, t0))} / "
        f"{dict(rec.statuses(t0, t1))} / {dict(rec.statuses(t1))}; acked {len(load.acked)}; "
        f"txns {len(load.history.txns)}; gave up {dict(load.gave_up)}; slowest request "
        f"{max(s.duration for s in rec.seen):.2f} s"
    )
    assert_clean_5xx(rec)
    return load, rec, t0, t1


async def readyz(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=MAX_REQUEST_S) as http:
        return await http.get(f"{url}/readyz")


def assert_503_shape(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["retryable"] is True and err["code"] == "backend_unavailable", err
    assert "Traceback" not in r.text


# --------------------------------------------------------------------------- PostgreSQL
@pytest.mark.postgres
def test_postgres_outage_mid_load(pg_database: str, tmp_path: Path, space: str) -> None:
    """PostgreSQL goes away for a few seconds (every connection reset, new ones refused)
    while 12 agents read and commit: 503 + retryable during the outage, recovery after,
    nothing acknowledged lost, the history serializable."""
    migrate(pg_database)
    with FaultProxy(port_of(pg_database, 5432)) as px:
        srv = Server(store=via(pg_database, px.port), env=dev_env(), log_dir=tmp_path).start()
        seen_during: list[httpx.Response] = []
        try:

            async def fault() -> None:
                with px.outage("refuse"):
                    t_end = time.monotonic() + OUTAGE_S
                    while time.monotonic() < t_end:
                        seen_during.append(await readyz(srv.url))
                        await asyncio.sleep(0.2)

            _, rec, t0, t1 = run(outage_under_load(srv.urls, space, fault))
            assert seen_during and all(r.status_code == 503 for r in seen_during[1:]), [
                r.status_code for r in seen_during
            ]
            for r in seen_during[1:]:
                assert_503_shape(r)
            during = rec.statuses(t0 + 0.3, t1 - 0.1)
            assert during[503] > 0, f"no 503 during the outage: {during}"
            assert during[500] == 0
            assert (run(readyz(srv.url))).status_code == 200
            assert px.stats["accepted_refuse"] > 0 and px.stats["reset_by_fault"] > 0
        finally:
            srv.stop()


def _pg_cluster() -> list[str] | None:
    """``pg_ctlcluster`` arguments of the local cluster serving 127.0.0.1:5432, if we may restart it."""
    import shutil

    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir() or os.geteuid() != 0:
        return None
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir() if (p / "main").is_dir())
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"] if versions else None


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restart_mid_load(pg_database: str, tmp_path: Path, space: str) -> None:
    """The real thing, not a proxy: the PostgreSQL server is restarted (fast shutdown, then
    start) while 12 agents read and commit through two bus processes. Requests answer 503
    (retryable) while it is down, never 500 or a hang; both processes recover on their own
    (stale pooled connections are dropped); nothing acknowledged is lost."""
    import subprocess

    from tests.conftest import unavailable

    cluster = _pg_cluster()
    if cluster is None:
        unavailable("a local PostgreSQL cluster this user may restart (pg_ctlcluster as root)")
    migrate(pg_database)
    srv = Server(store=pg_database, env=dev_env(), log_dir=tmp_path).start(2)
    try:

        async def fault() -> None:
            proc = await asyncio.create_subprocess_exec(*cluster, "restart", "-m", "fast")
            assert await asyncio.wait_for(proc.wait(), 60) == 0, "pg_ctlcluster restart failed"
            await asyncio.sleep(0.5)

        _, rec, t0, t1 = run(outage_under_load(srv.urls, space, fault))
        during = rec.statuses(t0, t1)
        assert during[503] > 0, f"no 503 while PostgreSQL restarted: {during}"
        assert rec.statuses(t0)[500] == 0
        for url in srv.urls:
            assert run(readyz(url)).status_code == 200
    finally:
        srv.stop()
        # Never leave the shared server down for the rest of the suite.
        if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]).returncode != 0:
            subprocess.run([*cluster, "start"], check=False)


# --------------------------------------------------------------------------- Redis
@pytest.mark.redis
def test_redis_connections_dropped_mid_load(redis_url: str, tmp_path: Path, space: str) -> None:
    """Redis drops this server's connections (CLIENT KILL, repeatedly), then becomes
    unreachable for a few seconds (proxy): 503 + retryable meanwhile, recovery, a clean
    history. A killed connection may lose the reply of a commit script that ran: the
    agents' Idempotency-Key retries must make that exactly once."""
    with FaultProxy(port_of(redis_url, 6379)) as px:
        srv = Server(store=via(redis_url, px.port), env=dev_env(), log_dir=tmp_path).start()
        killed: list[int] = []
        seen_during: list[httpx.Response] = []
        try:

            async def fault() -> None:
                # 1) CLIENT KILL of exactly this server's connections (the proxy's upstream
                #    side: Redis sees the proxy, and only this test's server uses it).
                end = time.monotonic() + OUTAGE_S
                while time.monotonic() < end:
                    killed.append(await asyncio.to_thread(redis_kill_clients_of, redis_url, os.getpid()))
                    await asyncio.sleep(0.25)
                # 2) Unreachable: every connection reset, new ones refused.
                with px.outage("refuse"):
                    t_end = time.monotonic() + OUTAGE_S
                    while time.monotonic() < t_end:
                        seen_during.append(await readyz(srv.url))
                        await asyncio.sleep(0.2)

            _, rec, t0, t1 = run(outage_under_load(srv.urls, space, fault))
            assert sum(killed) > 0, "CLIENT KILL found no connection of this server"
            assert seen_during and all(r.status_code == 503 for r in seen_during[1:]), [
                r.status_code for r in seen_during
            ]
            for r in seen_during[1:]:
                assert_503_shape(r)
            during = rec.statuses(t0, t1)
            assert during[503] > 0, f"no 503 during the faults: {during}"
            assert (run(readyz(srv.url))).status_code == 200
        finally:
            srv.stop()


# --------------------------------------------------------------------------- kill -9 of one process
@pytest.mark.postgres
def test_kill9_one_of_two_processes_the_other_keeps_serving(pg_database: str, tmp_path: Path, space: str) -> None:
    """Two bus processes over one PostgreSQL store; agents rotate over both. SIGKILL one
    mid-load: the survivor keeps answering (no 5xx from it, commits acknowledged by it
    after the kill), nothing acknowledged is lost, and the history is serializable.
    (tests/test_crash.py kills the only process and restarts it; this is the other case.)"""
    migrate(pg_database)
    srv = Server(store=pg_database, env=dev_env(), log_dir=tmp_path).start(2)
    survivor = srv.urls[1]
    killed_at: list[float] = []
    try:

        async def fault() -> None:
            killed_at.append(time.monotonic())
            await asyncio.to_thread(srv.kill9, 0)
            await asyncio.sleep(1.0)

        load, rec, _, _ = run(outage_under_load(srv.urls, space, fault, check_url=survivor))
        after = [s for s in rec.seen if s.t > killed_at[0] + 0.5 and s.url.startswith(survivor)]
        assert after, "no request reached the surviving process after the kill"
        assert not [s for s in after if s.status is None or s.status >= 500], Counter(s.status for s in after)
        assert sum(1 for at, u in load.acked if at > killed_at[0] and u == survivor) >= ACKS // 2
    finally:
        srv.stop()


# --------------------------------------------------------------------------- idempotent retries
def test_lost_acks_with_idempotency_keys_apply_exactly_once(tmp_path: Path) -> None:
    """A proxy between the clients and the bus resets ~25% of connections just as the
    answer starts, after the commit was applied. Plain-httpx clients that retry with the
    same Idempotency-Key get exactly one application per operation; the same clients
    without the key apply some operations twice (which shows the fault really hits after
    the commit)."""
    store = f"sqlite:///{tmp_path / 'agentbus.db'}"
    migrate(store)
    srv = Server(store=store, env=dev_env(), log_dir=tmp_path).start()
    clients, ops = 8, 12
    try:
        with FaultProxy(srv.ports[0], seed=7) as px:
            px.set_mode("drop_responses", drop_p=0.25)
            base = f"http://127.0.0.1:{px.port}"

            async def one(http: httpx.AsyncClient, space: str, i: int, n: int, idempotent: bool) -> int:
                body = {"writes": [{"key": "journal", "value": f"{i}-{n}"}, {"key": f"own/{i}", "value": f"{i}-{n}"}]}
                headers = {"X-Agent-Id": f"c{i}"}
                if idempotent:
                    headers["Idempotency-Key"] = uuid.uuid4().hex
                for attempt in range(40):
                    try:
                        r = await http.post(f"{base}/v1/spaces/{space}/commit", json=body, headers=headers)
                    except httpx.TransportError:
                        await asyncio.sleep(0.01 * attempt)
                        continue
                    if r.status_code == 503:
                        await asyncio.sleep(0.01 * attempt)
                        continue
                    assert r.status_code == 200, r.text
                    return attempt
                raise AssertionError(f"client {i} op {n}: no answer in 40 attempts")

            async def workload(space: str, idempotent: bool) -> tuple[int, dict[str, list[Any]]]:
                async with httpx.AsyncClient(timeout=30, transport=httpx.AsyncHTTPTransport(retries=0)) as http:

                    async def client(i: int) -> int:
                        return sum([await one(http, space, i, n, idempotent) for n in range(ops)])

                    retries = sum(await asyncio.gather(*(client(i) for i in range(clients))))
                keys = ["journal", *[f"own/{i}" for i in range(clients)]]
                async with httpx.AsyncClient(timeout=30) as direct:
                    state = await fetch_state(direct, srv.url, space, keys=keys)
                values = {k: [e["value"] for e in h] for k, h in state.histories.items()}
                return retries, values

            space = f"idem-{uuid.uuid4().hex[:8]}"
            retries, values = run(workload(space, True))
            want = sorted(f"{i}-{n}" for i in range(clients) for n in range(ops))
            assert retries > 0 and px.stats["dropped_response"] > 0
            assert sorted(values["journal"]) == want, "an operation was applied twice or not at all"
            for i in range(clients):
                assert values[f"own/{i}"] == [f"{i}-{n}" for n in range(ops)]

            control = f"ctl-{uuid.uuid4().hex[:8]}"
            _, ctl_values = run(workload(control, False))
            dupes = len(ctl_values["journal"]) - len(set(ctl_values["journal"]))
            assert dupes > 0, "without Idempotency-Key no retried commit was applied twice: the fault did not bite"
    finally:
        srv.stop()


async def fetch_journal(url: str, space: str) -> Any:
    async with httpx.AsyncClient(timeout=30) as http:
        return await fetch_state(http, url, space, keys=["journal"])


def test_sdk_client_retries_commits_exactly_once(tmp_path: Path) -> None:
    """The same lost-acknowledgement fault through agentbus_sdk.Client, which generates the
    Idempotency-Key and retries by itself: every commit applies exactly once, and the
    retried ones come back marked as replayed."""
    sdk = pytest.importorskip("agentbus_sdk")
    if not hasattr(getattr(sdk, "Client", None), "space"):
        pytest.skip("agentbus_sdk.Client with space().commit() does not exist yet")
    store = f"sqlite:///{tmp_path / 'agentbus.db'}"
    migrate(store)
    srv = Server(store=store, env=dev_env(), log_dir=tmp_path).start()
    try:
        with FaultProxy(srv.ports[0], seed=3) as px:
            px.set_mode("drop_responses", drop_p=0.3)
            space = f"sdk-{uuid.uuid4().hex[:8]}"
            ops = 20
            with sdk.Client(f"http://127.0.0.1:{px.port}", agent_id="sdk-agent", retries=10) as bus:
                sp = bus.space(space)
                results = [sp.commit({"journal": f"sdk-{n}"}) for n in range(ops)]
            assert px.stats["dropped_response"] > 0
            assert sum(r.replayed for r in results) > 0
            assert [r.versions["journal"] for r in results] == list(range(1, ops + 1))
            state = run(fetch_journal(srv.url, space))
            assert [e["value"] for e in state.histories["journal"]] == [f"sdk-{n}" for n in range(ops)]
    finally:
        srv.stop()


# --------------------------------------------------------------------------- broker upstream faults
class BrokerBox:
    def __init__(self, srv: Server, config: Path) -> None:
        self.srv = srv
        self.config = config
        self.http = httpx.Client(base_url=srv.url, timeout=30)

    def configure(self, cfg: dict[str, Any]) -> None:
        marker = f"cfg-{uuid.uuid4().hex[:8]}"
        cfg = {**cfg, "aliases": {marker: cfg["endpoints"][0]["models"][0]}}
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg))
        os.replace(tmp, self.config)
        deadline = time.monotonic() + 20
        while marker not in [m["id"] for m in self.http.get("/v1/models", headers={"X-Agent-Id": "op"}).json()["data"]]:
            assert time.monotonic() < deadline, "the broker did not load its new config"
            time.sleep(0.05)

    def used(self, agent: str) -> dict[str, Any]:
        r = self.http.get("/v1/budget", headers={"X-Agent-Id": agent})
        assert r.status_code == 200, r.text
        scopes = r.json()["scopes"]
        mine = [v for k, v in scopes.items() if k.startswith("p:") and k.endswith(f"/{agent}")]
        assert len(mine) == 1, scopes
        return mine[0]["used"]  # type: ignore[no-any-return]


def burst(url: str, agent: str, n: int, headers: dict[str, str] | None = None) -> list[tuple[httpx.Response, float]]:
    """``n`` concurrent chat calls; (response, seconds) each."""

    async def go() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def call(i: int) -> tuple[httpx.Response, float]:
                t0 = time.monotonic()
                body = {"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 2}
                r = await http.post("/v1/chat/completions", json=body, headers={"X-Agent-Id": agent, **(headers or {})})
                return r, time.monotonic() - t0

            return list(await asyncio.gather(*(call(i) for i in range(n))))

    return run(go(), 60)


def error_code(r: httpx.Response) -> tuple[int, str, bool]:
    err = r.json()["error"]
    assert "Traceback" not in r.text
    return r.status_code, err["code"], err["retryable"]


def test_broker_upstream_faults_under_concurrent_calls(tmp_path: Path) -> None:
    """Concurrent calls while the upstream hangs, resets mid-response or answers garbage:
    504 within the time budget, 502/503 or a retry to the other endpoint, 502 for garbage;
    no reservation is left behind and no failed attempt is charged; afterwards the broker
    serves normally. (tests/test_broker.py covers each fault for a single call.)"""
    store = f"sqlite:///{tmp_path / 'agentbus.db'}"
    migrate(store)
    config = tmp_path / "broker.yaml"
    bad, good = FaultyUpstream("bad").start(), FaultyUpstream("good").start()
    config.write_text(json.dumps({"endpoints": [good.endpoint()]}))
    env = {**dev_env(), "AGENTBUS_BROKER_CONFIG": str(config), "AGENTBUS_BROKER_RELOAD_S": "0.2"}
    srv = Server(store=store, env=env, log_dir=tmp_path).start()
    box = BrokerBox(srv, config)
    n = 8
    try:
        # Hang: every call ends in 504 within its 400 ms budget (+ scheduling slack), released.
        bad.mode = "hang"
        box.configure({"endpoints": [bad.endpoint(name="bad-hang")], "retry": {"attempts": 2, "backoff_ms": 1}})
        results = burst(srv.url, "hang", n, {"X-Timeout-Budget-Ms": "400"})
        for r, took in results:
            assert error_code(r)[0] == 504 and error_code(r)[2] is True, r.text
            assert took < 3.0, f"504 after {took:.1f} s on a 400 ms budget"
        used = box.used("hang")
        assert (used["tokens"], used["inflight"]) == (0, 0), used

        # Reset in the middle of the response: retried on the other endpoint ...
        bad.mode = "reset_mid"
        box.configure(
            {
                "endpoints": [bad.endpoint(name="bad-reset"), good.endpoint()],
                "routes": [{"name": "r", "targets": ["bad-reset"], "fallbacks": [good.name]}],
                "retry": {"attempts": 2, "backoff_ms": 1},
                "circuit": {"failures": 1000},
            }
        )
        results = burst(srv.url, "resetmid", n)
        assert [r.status_code for r, _ in results] == [200] * n, [r.text for r, _ in results]
        assert {r.headers["x-agentbus-endpoint"] for r, _ in results} == {good.name}
        assert bad.posts["reset_mid"] >= n
        used = box.used("resetmid")
        assert (used["tokens"], used["inflight"]) == (5 * n, 0), used  # only the served answers count
        # ... or, with nowhere else to go, a retryable 502/503.
        box.configure(
            {
                "endpoints": [bad.endpoint(name="bad-reset-only")],
                "retry": {"attempts": 1},
                "circuit": {"failures": 1000},
            }
        )
        for r, _ in burst(srv.url, "resetonly", n):
            status, code, retryable = error_code(r)
            assert status in (502, 503) and retryable, r.text
        assert box.used("resetonly")["inflight"] == 0

        # Garbage (200 with a non-JSON body): 502 with a clear error, nothing charged.
        bad.mode = "garbage"
        box.configure(
            {"endpoints": [bad.endpoint(name="bad-garbage")], "retry": {"attempts": 1}, "circuit": {"failures": 1000}}
        )
        for r, _ in burst(srv.url, "garbage", n):
            status, code, _ = error_code(r)
            assert (status, code) == (502, "upstream_invalid_response"), r.text
            assert r.json()["error"]["message"]
        used = box.used("garbage")
        assert (used["tokens"], used["inflight"]) == (0, 0), used

        # Afterwards: the same endpoint, healthy again, serves every call, exactly charged.
        bad.mode = "ok"
        box.configure({"endpoints": [bad.endpoint(name="bad-healed"), good.endpoint()]})
        results = burst(srv.url, "after", 2 * n)
        assert [r.status_code for r, _ in results] == [200] * (2 * n), [r.text for r, _ in results]
        used = box.used("after")
        assert (used["tokens"], used["inflight"]) == (5 * 2 * n, 0), used
        assert srv.procs[0].poll() is None
    finally:
        box.http.close()
        srv.stop()
        bad.stop()
        good.stop()


# --------------------------------------------------------------------------- reproducers of open bugs
# Each is strict: when the bug is fixed the test XPASSes, which fails the run until the
# marker is removed, so the reproducer becomes the regression test.


@pytest.mark.redis
def test_redis_dropped_pooled_connections_give_503_not_500(redis_url: str, tmp_path: Path) -> None:
    with FaultProxy(port_of(redis_url, 6379)) as px:
        srv = Server(store=via(redis_url, px.port), env=dev_env(), log_dir=tmp_path).start()
        try:

            async def burst() -> Counter[int]:
                async with httpx.AsyncClient(timeout=20) as http:
                    rs = await asyncio.gather(
                        *(
                            http.post(
                                f"{srv.url}/v1/spaces/drop/commit",
                                json={"writes": [{"key": f"k{i}", "value": i}]},
                                headers={"X-Agent-Id": f"a{i}"},
                            )
                            for i in range(32)
                        )
                    )
                return Counter(r.status_code for r in rs)

            assert run(burst())[200] == 32  # fills the connection pool
            px.reset_all()  # Redis drops them all (as CLIENT KILL or a Redis restart would)
            time.sleep(0.2)
            after = run(burst())
            assert after[500] == 0, f"after the drop: {dict(after)}"
        finally:
            srv.stop()


@pytest.mark.redis
def test_redis_unfinalized_409_is_not_reapplied_on_retry(redis_url: str) -> None:
    """The connection dies between the commit script (409, pending marker) and the finalize
    step, and the retry with the same Idempotency-Key comes after the marker expired: it must
    be refused again (validated against the same read set), never applied. The Redis
    mid-load test below reaches this state for real (CLIENT KILL); here it is forced."""
    from redis import exceptions as rexc

    from agentbus.core.errors import BackendUnavailable
    from agentbus.core.model import SessionRef, WriteOp
    from agentbus.settings import Settings
    from agentbus.store.base import CommitRequest
    from agentbus.store.redis import RedisStore

    async def body() -> None:
        store = RedisStore(Settings(redis_prefix=f"t{uuid.uuid4().hex[:8]}"), redis_url)
        await store.start()
        try:
            a, b = SessionRef("t", "unfinalized", "A"), SessionRef("t", "unfinalized", "B")
            put = lambda k, v: CommitRequest((WriteOp(k, json.dumps(v)),), {})  # noqa: E731
            assert (await store.commit(b, put("k", 1))).result is not None
            assert (await store.read(a, "k")) is not None  # A reads k v1
            assert (await store.commit(b, put("k", 2))).result is not None  # ... which B overwrites
            key = uuid.uuid4().hex
            stale = CommitRequest((WriteOp("other", '"based on k v1"'),), {}, key, "fp")
            real_finalize = store._finalize

            class Dies:  # the finalize call never reaches Redis
                sha = real_finalize.sha
                source = real_finalize.source

                def args(self, *_a: Any) -> Any:
                    raise rexc.ConnectionError("connection lost before finalize")

            store._finalize = Dies()  # type: ignore[assignment]
            with pytest.raises(BackendUnavailable):
                await store.commit(a, stale)
            store._finalize = real_finalize
            idem = store._idem_key(a, key)
            assert (await store.client.get(idem)).startswith(b"0|"), "expected the pending marker"
            await store.client.delete(idem)  # the marker expired
            again = await store.commit(a, stale)
            assert again.result is None, f"the stale commit was applied on retry: {again}"
            assert again.conflicts and again.conflicts[0].key == "k"
        finally:
            await store.close()

    run(body())


@pytest.mark.postgres
def test_postgres_partition_is_answered_within_timeouts(pg_database: str, tmp_path: Path) -> None:
    """A partition (packets neither answered nor refused) is a 503 within the configured
    connect/command timeouts, never a hang."""
    migrate(pg_database)
    with FaultProxy(port_of(pg_database, 5432)) as px:
        env = {**dev_env(), "AGENTBUS_DB_COMMAND_TIMEOUT_S": "3", "AGENTBUS_DB_CONNECT_TIMEOUT_S": "2"}
        srv = Server(store=via(pg_database, px.port), env=env, log_dir=tmp_path).start()
        try:

            async def commits(limit_s: float) -> list[int | str]:
                async with httpx.AsyncClient(timeout=limit_s) as http:

                    async def one(i: int) -> int | str:
                        try:
                            r = await http.post(
                                f"{srv.url}/v1/spaces/partition/commit",
                                json={"writes": [{"key": f"k{i}", "value": i}]},
                                headers={"X-Agent-Id": f"a{i}"},
                            )
                            return r.status_code
                        except httpx.TimeoutException as exc:
                            return type(exc).__name__

                    return list(await asyncio.gather(*(one(i) for i in range(4))))

            assert run(commits(20)) == [200] * 4
            px.set_mode("blackhole")  # packets are neither answered nor refused
            try:
                during = run(commits(MAX_REQUEST_S))
            finally:
                px.set_mode("pass")
                px.reset_all()
            assert set(during) <= {503}, f"during the partition: {during}"
        finally:
            srv.stop()
