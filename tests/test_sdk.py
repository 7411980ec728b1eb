"""The Python SDK (``agentbus_sdk``) against real agentbus servers on every backend.

One dev-mode server and one auth-mode server per backend serve the module (tests use fresh
spaces). Faults the server cannot produce on demand - a response lost after the commit was
applied, a 503, an SSE stream cut mid-way - are injected by wrapping the real HTTP transport,
so the retry paths are exercised against the real server behind it. The wire models and the
error parser are also checked with Hypothesis against the server's own request models.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import agentbus_sdk as sdk
import httpx
import pytest
from agentbus_sdk import (
    DELETE,
    AsyncClient,
    AuthError,
    BadRequest,
    BudgetExceeded,
    Client,
    ConflictError,
    ConnectionFailed,
    ForbiddenError,
    NotFoundError,
    RateLimited,
    ReadSetExpired,
    Unavailable,
    UpstreamError,
    Write,
)
from agentbus_sdk._base import SSEDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentbus.api.bus import CommitIn
from tests.conftest import BACKENDS, Server, free_port, module_server

FAST = sdk.Backoff(initial=0.01, maximum=0.05)


@pytest.fixture(scope="module", params=BACKENDS)
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server("sdk", request, tmp_path_factory)


ADMIN = "ab_" + secrets.token_urlsafe(32)


@pytest.fixture(scope="module", params=BACKENDS)
def authbus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"AGENTBUS_AUTH": "true", "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": ADMIN, "AGENTBUS_AUTH_CACHE_TTL_S": "0"}
    yield from module_server("sdk-auth", request, tmp_path_factory, env=env)


def new_space() -> str:
    return f"sdk-{uuid.uuid4().hex[:12]}"


def client(server: Server, agent: str = "alice", **kw: Any) -> Client:
    return Client(server.url, agent_id=agent, backoff=FAST, **kw)


# --------------------------------------------------------------------------- CRUD and models


def test_crud_listing_history_log(bus: Server) -> None:
    name = new_space()
    with client(bus) as c:
        s = c.space(name)
        assert s.get("plan") is None  # 404 -> None (and recorded as read-as-absent)
        res = s.commit({"plan": {"steps": ["design"]}, "notes/a": "x", "notes/b": None})
        assert res.versions == {"plan": 1, "notes/a": 1, "notes/b": 1} and res.seq == 1 and not res.replayed
        shard = s.read("plan")
        assert (shard.key, shard.version, shard.value, shard.updated_by) == ("plan", 1, {"steps": ["design"]}, "alice")
        assert s.read("notes/b").value is None  # JSON null is a value, not a delete
        # reads and the listing are in the read set; clear it so the next commit is blind
        rs = s.readset()
        assert rs.versions() == {"plan": 1, "notes/b": 1} and rs.ranges == []
        s.clear_readset()
        assert s.readset().reads == []

        res = s.commit([Write("notes/a", DELETE), Write("plan", {"steps": []}, expected_version=1)])
        assert res.versions == {"notes/a": 2, "plan": 2}
        assert s.get("notes/a") is None
        with pytest.raises(NotFoundError) as ei:
            s.read("notes/a")
        assert ei.value.code == "shard_not_found" and ei.value.status == 404
        hist = s.history("notes/a")
        assert [(h.version, h.deleted, h.value) for h in hist] == [(2, True, None), (1, False, "x")]
        assert [h.version for h in s.history("notes/a", limit=1)] == [2]
        assert [h.version for h in s.history("notes/a", before_version=2)] == [1]

        s.clear_readset()
        many = {f"many/{i:03d}": i for i in range(150)}  # more than one default page (100)
        s.commit(many)
        listed = s.list("many/")
        assert [i.key for i in listed] == sorted(many) and all(i.version == 1 for i in listed)
        assert [i.key for i in s.list("many/", limit=7)] == sorted(many)[:7]
        assert [i.key for i in s.list("notes/")] == ["notes/b"]
        assert s.list("many/", limit=0) == [] and s.log(limit=0) == []

        log = s.log()
        assert [e.seq for e in log] == [1, 2, 3] and log[0].committed_by == "alice"
        assert [(w.key, w.version, w.deleted) for w in log[1].writes] == [("notes/a", 2, True), ("plan", 2, False)]
        assert [e.seq for e in s.log(after=1, limit=1)] == [2]
        assert name in {sp.space for sp in c.spaces()}
        me = c.whoami()
        assert (me.subject, me.tenant) == ("alice", "default")


def test_keys_with_special_characters_round_trip(bus: Server) -> None:
    with client(bus) as c:
        s = c.space(new_space())
        keys = ["a:b@c+d=e~f", "dir/sub/leaf", "x.y_z-1"]
        s.commit({k: k for k in keys})
        assert [s.read(k).value for k in keys] == keys


def test_typed_conflicts_list_every_key(bus: Server) -> None:
    name = new_space()
    with client(bus, "alice") as alice, client(bus, "bob") as bob:
        a, b = alice.space(name), bob.space(name)
        a.commit({"x": 1, "y": 1})
        a.clear_readset()
        b.read("x")
        b.read("y")
        b.list("p/")
        assert b.get("new") is None
        first = a.commit({"x": 2, "y": 2, "new": 0, "p/1": 1})
        with pytest.raises(ConflictError) as ei:
            b.commit({"z": 1})
        err = ei.value
        assert (err.status, err.type, err.retryable) == (409, "conflict", True)
        by_key = {c.key: c for c in err.conflicts}
        assert set(by_key) >= {"x", "y", "new"}
        x = by_key["x"]
        assert (x.kind, x.read_version, x.current_version, x.committed_by, x.commit_seq) == (
            "stale_read",
            1,
            2,
            "alice",
            first.seq,
        )
        assert by_key["new"].read_version == 0 and by_key["new"].current_version == 1
        assert any(c.kind == "phantom" for c in err.conflicts)
        assert set(err.keys) == set(by_key)
        # the 409 ended bob's epoch: a fresh read-modify-write goes through
        b.commit({"x": b.read("x").value + 1})
        # expected_version conflicts are typed too
        with pytest.raises(ConflictError) as ei:
            b.commit([Write("x", 0, expected_version=0)])
        assert ei.value.code == "write_conflict" and ei.value.conflicts[0].kind == "write_conflict"


def test_bad_input_is_a_typed_error_and_never_retried(bus: Server) -> None:
    calls = Counting(httpx.HTTPTransport())
    with Client(bus.url, agent_id="alice", transport=calls, backoff=FAST) as c:
        s = c.space(new_space())
        with pytest.raises(BadRequest) as ei:
            s.commit({"bad key!": 1})
        assert ei.value.status == 422 and not ei.value.retryable and ei.value.idempotency_key
        with pytest.raises(BadRequest):
            c.space("no spaces allowed").read("k")
        with pytest.raises(ValueError):
            Write("k")  # neither value nor delete
        with pytest.raises(ValueError):
            Write("k", 1, delete=True)
    assert calls.n == 2  # one request each: 4xx is never retried


# --------------------------------------------------------------------------- idempotent retries


class Counting(httpx.BaseTransport):
    """Forwards to a real transport, counting requests."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.n = inner, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.n += 1
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class Faulty(httpx.BaseTransport):
    """Forwards to the real server; the first ``lose`` matching requests reach the server
    (and are applied) but their responses are "lost" (ReadError); the first ``unavailable``
    matching requests get a synthetic 503 without reaching the server."""

    def __init__(self, match: Callable[[httpx.Request], bool], lose: int = 0, unavailable: int = 0) -> None:
        self.inner = httpx.HTTPTransport()
        self.match, self.lose, self.unavailable = match, lose, unavailable
        self.seen: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.match(request):
            return self.inner.handle_request(request)
        self.seen.append(request)
        if self.unavailable > 0:
            self.unavailable -= 1
            body = {"error": {"type": "unavailable", "code": "backend_unavailable", "message": "x", "retryable": True}}
            return httpx.Response(503, json=body)
        resp = self.inner.handle_request(request)
        if self.lose > 0:
            self.lose -= 1
            resp.read()
            resp.close()
            raise httpx.ReadError("connection reset (injected)", request=request)
        return resp

    def close(self) -> None:
        self.inner.close()


def is_commit(r: httpx.Request) -> bool:
    return r.method == "POST" and r.url.path.endswith("/commit")


def test_lost_commit_response_is_retried_with_the_same_key_and_applied_once(bus: Server) -> None:
    name = new_space()
    faulty = Faulty(is_commit, lose=2)
    with Client(bus.url, agent_id="alice", transport=faulty, backoff=FAST, retries=3) as c:
        s = c.space(name)
        res = s.commit({"counter": 1})
    assert len(faulty.seen) == 3
    assert len({r.headers["idempotency-key"] for r in faulty.seen}) == 1
    assert res.replayed and res.versions == {"counter": 1}
    with client(bus) as c:
        assert len(c.space(name).log()) == 1  # applied exactly once


def test_explicit_idempotency_key_replays_the_first_outcome(bus: Server) -> None:
    with client(bus) as c:
        s = c.space(new_space())
        first = s.commit({"k": 1}, idempotency_key="op-42")
        again = s.commit({"k": 1}, idempotency_key="op-42")
        assert (again.commit_id, again.seq, again.replayed) == (first.commit_id, first.seq, True)
        assert s.read("k").version == 1 and len(s.log()) == 1
        with pytest.raises(BadRequest) as ei:  # same key, different body
            s.commit({"k": 2}, idempotency_key="op-42")
        assert ei.value.code == "idempotency_key_reused"


def test_503_is_retried_for_reads_and_commits(bus: Server) -> None:
    faulty = Faulty(lambda r: True, unavailable=2)
    with Client(bus.url, agent_id="alice", transport=faulty, backoff=FAST, retries=2) as c:
        s = c.space(new_space())
        assert s.commit({"k": 1}).versions == {"k": 1}
        faulty.unavailable = 3
        with pytest.raises(Unavailable) as ei:
            s.read("k")
        assert ei.value.status == 503 and ei.value.retryable


def test_no_server_is_connection_failed_with_the_key_to_resend(bus: Server) -> None:
    with Client(f"http://127.0.0.1:{free_port()}", agent_id="a", backoff=FAST, retries=1, timeout=2) as c:
        with pytest.raises(ConnectionFailed) as ei:
            c.space("s").commit({"k": 1}, idempotency_key="resend-me")
    assert isinstance(ei.value, Unavailable) and ei.value.retryable and ei.value.status is None
    assert ei.value.idempotency_key == "resend-me"


# --------------------------------------------------------------------------- transactions


def test_transactions_commit_on_exit_and_discard_on_error(bus: Server) -> None:
    name = new_space()
    with client(bus) as c:
        s = c.space(name)
        with s.transaction() as tx:
            assert tx.get("a") is None
            tx.put("a", 1)
            tx.put("b", [1, 2])
            tx.delete("gone")  # deleting a missing key writes a tombstone
        assert tx.result is not None and tx.result.versions == {"a": 1, "b": 1, "gone": 1}
        with pytest.raises(RuntimeError, match="boom"), s.transaction() as tx2:
            tx2.read("a")
            tx2.put("a", 99)
            raise RuntimeError("boom")
        assert s.read("a").value == 1 and tx2.result is None
        assert tx2.space.readset().reads == []  # its read set was dropped
        with s.transaction() as tx3:  # read-only: nothing to commit
            tx3.list()
        assert tx3.result is None and tx3.space.readset().ranges == []
        with pytest.raises(RuntimeError):
            tx3.put("late", 1)


def test_transactions_of_one_client_have_separate_read_sets(bus: Server) -> None:
    name = new_space()
    with client(bus) as c, client(bus, "bob") as bob:
        s = c.space(name)
        s.commit({"x": 0, "y": 0})
        t1, t2 = s.transaction(), s.transaction()
        assert t1.session != t2.session
        t1.read("x")
        t2.read("y")
        bob.space(name).commit({"x": 1})  # invalidates t1 only
        t2.put("y", 1)
        assert t2.commit() is not None  # t1's stale read of x is not in t2's read set
        t1.put("x", 100)
        with pytest.raises(ConflictError) as ei:
            t1.commit()
        assert ei.value.keys == ["x"]


def test_transact_reruns_the_function_on_conflict(bus: Server) -> None:
    name = new_space()
    with client(bus) as c, client(bus, "bob") as bob:
        s = c.space(name)
        s.commit({"n": 0})
        runs: list[int] = []

        def incr(tx: sdk.Transaction) -> int:
            n = tx.read("n").value
            runs.append(n)
            if len(runs) == 1:  # someone else commits between our read and our commit
                bob.space(name).commit({"n": 10})
            tx.put("n", n + 1)
            return n + 1

        assert s.transact(incr) == 11
        assert runs == [0, 10] and s.read("n").value == 11

        def always_conflicts(tx: sdk.Transaction) -> None:
            tx.read("n")
            bob.space(name).commit({"n": uuid.uuid4().hex})
            tx.put("n", 0)

        with pytest.raises(ConflictError):
            s.transact(always_conflicts, max_attempts=3, backoff=FAST)


def test_retrying_loop_form(bus: Server) -> None:
    name = new_space()
    with client(bus) as c, client(bus, "bob") as bob:
        s = c.space(name)
        s.commit({"n": 0})
        numbers = []
        for attempt in s.retrying(max_attempts=5, backoff=FAST):
            with attempt as tx:
                n = tx.read("n").value
                if attempt.number == 1:
                    bob.space(name).commit({"n": 5})
                tx.put("n", n + 1)
            numbers.append((attempt.number, attempt.succeeded))
        assert numbers == [(1, False), (2, True)] and s.read("n").value == 6

        with pytest.raises(ConflictError):
            for attempt in s.retrying(max_attempts=2, backoff=FAST):
                with attempt as tx:
                    tx.read("n")
                    bob.space(name).commit({"n": uuid.uuid4().hex})
                    tx.put("n", 0)


def test_no_lost_updates_8_threads(bus: Server) -> None:
    name, threads, per = new_space(), 8, 5
    with Client(bus.url, agent_id="counter", timeout=60) as c:
        s = c.space(name)
        s.commit({"counter": 0})
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(per):
                    s.transact(lambda tx: tx.put("counter", tx.read("counter").value + 1), max_attempts=200)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not errors, errors
        final = s.read("counter")
        assert final.value == threads * per and final.version == threads * per + 1


def test_no_lost_updates_16_tasks_async(bus: Server) -> None:
    name, tasks, per = new_space(), 16, 3

    async def main() -> sdk.Shard:
        async with AsyncClient(bus.url, agent_id="acounter", timeout=60) as c:
            s = c.space(name)
            await s.commit({"counter": 0})

            async def incr(tx: sdk.AsyncTransaction) -> None:
                tx.put("counter", (await tx.read("counter")).value + 1)

            async def work() -> None:
                for _ in range(per):
                    await s.transact(incr, max_attempts=300)

            await asyncio.wait_for(asyncio.gather(*(work() for _ in range(tasks))), 120)
            return await s.read("counter")

    final = asyncio.run(main())
    assert final.value == tasks * per and final.version == tasks * per + 1


def test_async_client_basics(bus: Server) -> None:
    name = new_space()

    async def main() -> None:
        async with AsyncClient(bus.url, agent_id="alice", backoff=FAST) as a, AsyncClient(bus.url, agent_id="b") as b:
            sa, sb = a.space(name), b.space(name)
            assert await sa.get("k") is None
            await sa.commit({"k": 1, "l/1": True})
            await sb.read("k")
            await sa.commit({"k": 2})
            with pytest.raises(ConflictError) as ei:
                await sb.commit({"k": 3})
            assert ei.value.conflicts[0].committed_by == "alice"
            assert [i.key for i in await sa.list("l/")] == ["l/1"]
            assert [h.version for h in await sa.history("k")] == [2, 1]
            assert [e.seq for e in await sa.log()] == [1, 2]
            async for attempt in sa.retrying(backoff=FAST):
                async with attempt as tx:
                    tx.put("k", (await tx.read("k")).value + 1)
            assert (await sa.read("k")).value == 3
            async with sa.events() as events:
                seqs = [e.seq async for e, _ in _zip_range(events, 3)]
            assert seqs == [1, 2, 3] and events.last_event_id == 3
            assert (await a.whoami()).subject == "alice"
            with pytest.raises(NotFoundError):
                await sa.read("nope")

    asyncio.run(main())


async def _zip_range(it: Any, n: int) -> Any:
    i = 0
    async for x in it:
        yield x, i
        i += 1
        if i == n:
            return


# --------------------------------------------------------------------------- events


class CutStream(httpx.BaseTransport):
    """The first SSE connection is cut (ReadError) right after ``after_events`` events."""

    def __init__(self, after_events: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.after, self.cut_done = after_events, False
        self.last_event_ids: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if not request.url.path.endswith("/events"):
            return resp
        self.last_event_ids.append(request.headers.get("last-event-id"))
        if self.cut_done:
            return resp
        self.cut_done = True
        after = self.after

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                seen, buf = 0, b""
                for chunk in resp.stream:  # type: ignore[union-attr]
                    buf += chunk
                    while b"\n\n" in buf:
                        block, buf = buf.split(b"\n\n", 1)
                        yield block + b"\n\n"
                        seen += block.startswith(b"id:")
                        if seen == after:
                            raise httpx.ReadError("stream cut (injected)", request=request)

            def close(self) -> None:
                resp.close()

        return httpx.Response(resp.status_code, headers=resp.headers, stream=Cut(), request=request)

    def close(self) -> None:
        self.inner.close()


def test_events_reconnect_and_resume_without_gaps_or_repeats(bus: Server) -> None:
    name = new_space()
    cut = CutStream(after_events=2)
    with client(bus) as c:
        s = c.space(name)
        for i in range(5):
            s.commit({f"k{i}": i})
    with Client(bus.url, agent_id="listener", transport=cut, backoff=FAST) as c:
        with c.space(name).events() as events:
            got = [next(events).seq for _ in range(5)]
            assert events.last_event_id == 5
        assert got == [1, 2, 3, 4, 5]
        assert cut.last_event_ids == [None, "2"]  # reconnected with Last-Event-ID
        with c.space(name).events(last_event_id=3) as later:
            assert [next(later).seq for _ in range(2)] == [4, 5]


@pytest.mark.parametrize("bus", ["sqlite"], indirect=True, scope="module")
def test_events_survive_a_server_kill_and_restart(bus: Server) -> None:
    # The module's SQLite server is killed and restarted on its port: other tests are unaffected.
    srv = bus
    name = new_space()
    with client(srv) as c:
        c.space(name).commit({"a": 1})
        c.space(name).commit({"b": 2})
    with Client(srv.url, agent_id="listener", backoff=FAST) as c, c.space(name).events() as events:
        got = [next(events).seq, next(events).seq]
        srv.kill9()
        srv.restart()
        with client(srv) as w:
            w.space(name).commit({"c": 3})
        got.append(next(events).seq)  # reconnected to the new process, resumed after seq 2
    assert got == [1, 2, 3]


def test_events_stream_live_commits(bus: Server) -> None:
    name = new_space()
    with client(bus) as c:
        s = c.space(name)
        s.commit({"a": 1})
        got: list[sdk.CommitEvent] = []
        with s.events() as events:
            got.append(next(events))
            t = threading.Timer(0.2, lambda: client(bus, "bob").space(name).commit({"b": 2}))
            t.start()
            got.append(next(events))
            t.join()
        assert [(e.seq, e.committed_by, e.writes[0].key) for e in got] == [(1, "alice", "a"), (2, "bob", "b")]


def test_events_of_an_invalid_space_raise_not_retried(bus: Server) -> None:
    with client(bus) as c:
        with pytest.raises(BadRequest), c.space("bad name").events() as ev:
            next(ev)


# --------------------------------------------------------------------------- auth mode


def test_auth_tokens_and_typed_auth_errors(authbus: Server) -> None:
    uid = uuid.uuid4().hex[:8]
    with Client(authbus.url, token=ADMIN) as admin:

        def mint(subject: str, **body: Any) -> str:
            r = admin.request("POST", "/v1/admin/tokens", json={"subject": subject, "tenant": f"t{uid}", **body})
            return str(r.json()["token"])

        agent, reader = mint("planner"), mint("watcher", scopes=["bus:read"])
    name = new_space()
    with Client(authbus.url, token=agent, agent_id="spoofed", session="s1") as c:
        me = c.whoami()
        assert (me.subject, me.tenant, me.session) == ("planner", f"t{uid}", "s1")
        s = c.space(name)
        assert s.commit({"k": 1}).versions == {"k": 1}
        assert s.read("k").updated_by == "planner"  # the token names the agent, not X-Agent-Id
        assert s.readset().session == "s1"
        with s.transaction() as tx:
            tx.put("k", tx.read("k").value + 1)
        assert s.log()[-1].session.startswith("s1:tx-")
    with Client(authbus.url, token=reader) as r:
        assert r.space(name).read("k").value == 2
        with pytest.raises(ForbiddenError) as ei:
            r.space(name).commit({"k": 3})
        assert ei.value.status == 403 and ei.value.type == "permission"
    for bad in (None, "ab_" + "x" * 43):
        with Client(authbus.url, token=bad, retries=0) as nobody:
            with pytest.raises(AuthError) as ei2:
                nobody.space(name).read("k")
            assert ei2.value.status == 401 and not ei2.value.retryable
    # another tenant's space answers like a missing one
    with Client(authbus.url, token=ADMIN) as admin:
        with pytest.raises(NotFoundError):
            admin.space(name).log()


def test_openai_helper_is_configured_with_identity() -> None:
    c = Client("http://127.0.0.1:9/", token="tok-1", agent_id="planner", session="s7")
    oa = c.openai(space="demo")
    assert str(oa.base_url).rstrip("/") == "http://127.0.0.1:9/v1" and oa.api_key == "tok-1"
    assert {k: oa.default_headers[k] for k in ("X-Agent-Id", "X-Agent-Session", "X-Agent-Space")} == {
        "X-Agent-Id": "planner",
        "X-Agent-Session": "s7",
        "X-Agent-Space": "demo",
    }
    dev = Client("http://127.0.0.1:9").openai()
    assert dev.api_key == "dev" and "X-Agent-Space" not in dev.default_headers
    aoa = AsyncClient("http://127.0.0.1:9", token="t").openai(space="x")
    assert type(aoa).__name__ == "AsyncOpenAI" and aoa.default_headers["X-Agent-Space"] == "x"


def test_openai_errors_become_typed_errors() -> None:
    import openai

    body = {"error": {"type": "rate_limited", "code": "budget_exceeded", "message": "spent", "retryable": False}}
    raw = httpx.Response(429, json=body, request=httpx.Request("POST", "http://bus/v1/chat/completions"))

    class FakeAPIStatusError(Exception):  # openai's own response type differs between releases
        response = raw

    err = sdk.error_from_openai(FakeAPIStatusError())
    assert isinstance(err, BudgetExceeded) and err.message == "spent" and not err.retryable
    assert sdk.error_from_openai(ValueError()) is None
    assert sdk.error_from_openai(openai.APIConnectionError(request=raw.request)) is None  # type: ignore[arg-type]


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_URL", "http://bus.example:9000/")
    monkeypatch.setenv("AGENTBUS_TOKEN", "secret")
    monkeypatch.setenv("AGENTBUS_AGENT_ID", "env-agent")
    c = Client.from_env(retries=5)
    assert (c.config.base_url, c.config.token, c.config.agent_id, c.config.retries) == (
        "http://bus.example:9000",
        "secret",
        "env-agent",
        5,
    )
    assert c.http.headers["authorization"] == "Bearer secret" and c.http.headers["x-agent-id"] == "env-agent"
    assert AsyncClient.from_env(agent_id="other").config.agent_id == "other"


# --------------------------------------------------------------------------- models and parsing (Hypothesis)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
keys = st.text(alphabet="abcXYZ019._~:@+=/-", min_size=1, max_size=20)


@st.composite
def writes(draw: st.DrawFn) -> Write:
    key = draw(keys)
    ev = draw(st.none() | st.integers(0, 2**40))
    if draw(st.booleans()):
        return Write(key, delete=True, expected_version=ev)
    return Write(key, draw(json_values), expected_version=ev)


@settings(max_examples=200, deadline=None)
@given(st.lists(writes(), min_size=1, max_size=5), st.dictionaries(keys, st.integers(0, 2**40), max_size=3))
def test_write_models_are_what_the_server_accepts(ws: list[Write], reads: dict[str, int]) -> None:
    body = {"writes": [w.to_json() for w in ws], "reads": [sdk.Read(k, v).to_json() for k, v in reads.items()]}
    parsed = CommitIn.model_validate(body)  # the server's own strict request model
    for w, p in zip(ws, parsed.writes, strict=True):
        assert (p.key, p.delete, p.expected_version) == (w.key, w.delete, w.expected_version)
        if not w.delete:
            assert p.value == w.value
    # the mapping form means the same
    mapping = {w.key: (DELETE if w.delete else w.value) for w in ws}
    assert {w.key: w.to_json() for w in sdk._models.normalize_writes(mapping)} == {
        k: (Write(k, delete=True) if v is DELETE else Write(k, v)).to_json() for k, v in mapping.items()
    }


EXPECTED = {
    400: BadRequest,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    410: ReadSetExpired,
    413: BadRequest,
    422: BadRequest,
    502: UpstreamError,
    503: Unavailable,
    504: UpstreamError,
}
bodies = st.one_of(
    st.binary(max_size=50),
    st.builds(
        lambda err: httpx.Response(200, json={"error": err}).content,
        st.dictionaries(
            st.sampled_from(["type", "code", "message", "retryable", "retry_after_ms", "conflicts", "limit_kind"]),
            json_values | st.lists(st.fixed_dictionaries({"key": st.text(), "kind": st.text()}), max_size=2),
        ),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([*EXPECTED, 429, 500, 418]), bodies, st.sampled_from([None, "2", "soon"]))
def test_error_parser_never_fails_and_picks_the_class(status: int, body: bytes, retry_after: str | None) -> None:
    headers = {"Retry-After": retry_after} if retry_after else {}
    err = sdk.error_from_response(httpx.Response(status, content=body, headers=headers))
    assert isinstance(err, sdk.AgentbusError) and err.status == status and isinstance(err.message, str)
    if status in EXPECTED:
        assert type(err) is EXPECTED[status]
    elif status == 429:
        assert isinstance(err, RateLimited | BudgetExceeded)
    if isinstance(err, ConflictError):
        assert all(isinstance(c, sdk.Conflict) for c in err.conflicts)
    assert err.retry_after is None or err.retry_after >= 0


def test_budget_and_rate_limit_429s_are_told_apart() -> None:
    def resp(code: str, **extra: Any) -> httpx.Response:
        e = {"type": "rate_limited", "code": code, "message": "m", "retryable": False, **extra}
        return httpx.Response(429, json={"error": e})

    b = sdk.error_from_response(resp("budget_exceeded", limit_kind="tokens", scope="p:t/a"))
    assert isinstance(b, BudgetExceeded) and (b.limit_kind, b.scope, b.retry_after) == ("tokens", "p:t/a", None)
    r = sdk.error_from_response(resp("rate_limited", retry_after_ms=1500))
    assert isinstance(r, RateLimited) and r.retry_after == 1.5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 10**6), st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=30)),
        max_size=5,
    ),
    st.booleans(),
)
def test_sse_decoder_round_trip(events: list[tuple[int, str]], comments: bool) -> None:
    lines = ["retry: 1000", ""]
    for seq, data in events:
        if comments:
            lines.append(": keep-alive")
        lines += [f"id: {seq}", "event: commit", f"data: {data}", ""]
    dec = SSEDecoder()
    out = [ev for ev in (dec.feed(line) for line in lines) if ev is not None]
    assert out == [("commit", data, str(seq)) for seq, data in events]
    assert dec.retry_ms == 1000 and dec.last_event_id == (str(events[-1][0]) if events else None)
