"""The commit/read shortcut (agentbus.api.fast) answers exactly as FastAPI's routed path.

Two apps on two fresh stores get the same requests in the same order, one with
``fast_paths`` on and one with it off; status, headers that matter and bodies must match
(commit ids and timestamps are random or clock-dependent and are compared by shape only).
A table of hand-picked edge cases covers the hand-offs to FastAPI, and Hypothesis throws
arbitrary JSON bodies and headers at both.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentbus.app import create_app
from agentbus.auth.bootstrap import issue_token
from agentbus.migrate import upgrade
from agentbus.settings import Settings

VOLATILE = {"commit_id", "updated_at", "at", "started_at"}


def normalize(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("<volatile>" if k in VOLATILE else normalize(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    return obj


def summary(r: httpx.Response) -> tuple[Any, ...]:
    try:
        body: Any = normalize(r.json())
    except ValueError:
        body = r.content
    keep = ("content-type", "etag", "idempotent-replayed", "www-authenticate", "retry-after", "content-security-policy")
    return r.status_code, {h: r.headers.get(h) for h in keep}, body


class Pair:
    """The same app twice: fast paths on and off, each on its own SQLite store."""

    def __init__(self, fast: httpx.AsyncClient, slow: httpx.AsyncClient, apps: list[Any]) -> None:
        self.fast = fast
        self.slow = slow
        self.apps = apps

    async def same(self, method: str, url: str, **kw: Any) -> httpx.Response:
        a = await self.fast.request(method, url, **kw)
        b = await self.slow.request(method, url, **kw)
        assert summary(a) == summary(b), f"{method} {url} {kw}"
        return a


@contextlib.asynccontextmanager
async def pair(tmp: Path, **extra: Any) -> AsyncIterator[Pair]:
    apps = []
    for fast in (True, False):
        store = f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.db'}"
        await asyncio.to_thread(upgrade, store)
        # No MCP: its task group would outlive the Hypothesis test's event-loop turns.
        settings_ = {"auth": False, "trace_flush_s": 60.0, "max_body_bytes": 4096, "mcp_enabled": False, **extra}
        apps.append(create_app(Settings(store=store, fast_paths=fast, **settings_)))
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(
                await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://t", timeout=20))
            )
        yield Pair(clients[0], clients[1], apps)


def test_fast_path_is_taken(tmp_path: Path) -> None:
    """Guards the comparisons below against comparing the routed path with itself."""

    async def go() -> None:
        async with pair(tmp_path) as p:
            stacks: list[list[str]] = []
            store = p.apps[0].state.store
            real_commit = store.commit

            async def spy(*a: Any, **kw: Any) -> Any:
                stacks.append([f.function for f in inspect.stack()])
                return await real_commit(*a, **kw)

            store.commit = spy
            r = await p.fast.post("/v1/spaces/s/commit", json={"writes": [{"key": "k", "value": 1}]})
            assert r.status_code == 200
            assert "_commit" in stacks[0] and "strict_handler" not in stacks[0], stacks[0]
            # Whitespace after the JSON: orjson would take it, but the body is handed over
            # only when orjson or the model refuses it; a JSON array is refused by the model.
            r = await p.fast.post("/v1/spaces/s/commit", json=[{"writes": [{"key": "k", "value": 2}]}])
            assert r.status_code == 422
            assert len(stacks) == 1  # FastAPI answered without a store call

    asyncio.run(go())


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/v1/spaces/s/shards/k", {"headers": {"X-Agent-Id": "a"}}),  # absent: 404
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": {"x": [1, 2.5, None, "é"]}}]}}),
    ("GET", "/v1/spaces/s/shards/k", {"headers": {"X-Agent-Id": "a"}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 2}]}, "headers": {"X-Agent-Id": "a"}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 3, "expected_version": 1}]}}),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "k", "delete": True}], "reads": [{"key": "k", "version": 2}]}},
    ),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 1, "delete": True}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k"}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": []}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "a", "value": 1}, {"key": "a", "value": 2}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 1, "extra": 1}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 1, "expected_version": True}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 1, "expected_version": 2**63}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 1, "expected_version": 2**70}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "bad key!", "value": 1}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": "x" * 5000}]}}),
    ("POST", "/v1/spaces/bad%20space/commit", {"json": {"writes": [{"key": "k", "value": 1}]}}),
    ("POST", "/v1/spaces/s/commit", {"content": b'{"writes": [{"key": "k", "value": NaN}]}'}),
    ("POST", "/v1/spaces/s/commit", {"content": b'{"writes": [{"key": "k", "value": 1e400}]}'}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 2**70}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": [2**64, -(2**63) - 1]}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": [2**63 - 1, -(2**63)]}]}}),
    ("POST", "/v1/spaces/s/commit", {"content": b'{"writes": [{"key": "k", "value": "\\ud800"}]}'}),
    ("POST", "/v1/spaces/s/commit", {"content": b'{"writes": [{"key": "k", "value": 1}], "writes": []}'}),
    ("POST", "/v1/spaces/s/commit", {"content": b"\xff\xfe"}),
    ("POST", "/v1/spaces/s/commit", {"content": b""}),
    ("POST", "/v1/spaces/s/commit", {"content": b"[]"}),
    ("POST", "/v1/spaces/s/commit", {"content": b"{" * 10_000}),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"content": b'{"writes": [{"key": "k", "value": 1}]}', "headers": {"Content-Type": "text/plain"}},
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "i", "value": 1}]}, "headers": {"Idempotency-Key": "x" * 257}},
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "i", "value": 1}]}, "headers": {"Idempotency-Key": "k1"}},
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "i", "value": 1}]}, "headers": {"Idempotency-Key": "k1"}},
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "i", "value": 9}]}, "headers": {"Idempotency-Key": "k1"}},
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {
            "json": {"writes": [{"key": "i", "value": 1}]},
            "headers": [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        },
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "k", "value": 1}]}, "headers": {"X-Agent-Id": "b@d!"}},
    ),
    (
        "POST",
        "/v1/spaces/s/commit",
        {"json": {"writes": [{"key": "k", "value": 1}]}, "headers": {"X-Agent-Session": "?"}},
    ),
    ("GET", "/v1/spaces/s/shards/i", {"headers": {"X-Agent-Id": "a", "X-Agent-Session": "s2"}}),
    ("GET", "/v1/spaces/s/shards/i/history", {}),
    ("GET", "/v1/spaces/s/shards/nested/key/history", {}),
    ("GET", "/v1/spaces/s/shards/history", {}),
    ("GET", "/v1/spaces/s/shards/", {}),
    ("GET", "/v1/spaces//shards/k", {}),
    ("GET", "/v1/spaces/s/shards/" + "k" * 600, {}),
    ("GET", "/v1/spaces/s/shards/a%2Fb", {}),
    ("HEAD", "/v1/spaces/s/shards/i", {}),
    ("PUT", "/v1/spaces/s/commit", {"json": {}}),
    ("POST", "/v1/spaces/s/x/commit", {"json": {"writes": [{"key": "k", "value": 1}]}}),
    ("POST", "/v1/spaces/s/commit", {"json": {"writes": [{"key": "k", "value": 1}]}, "headers": {"X-Agent-Id": "z"}}),
]


def test_edge_cases_answer_alike(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            for method, url, kw in CASES:
                if "content" in kw and isinstance(kw.get("headers", {}), dict):
                    # Raw bodies are JSON bodies too (without the header FastAPI reads bytes).
                    kw = {**kw, "headers": {"Content-Type": "application/json", **kw.get("headers", {})}}
                await p.same(method, url, **kw)
            # State ended alike, too.
            log_a = (await p.fast.get("/v1/spaces/s/log")).json()
            log_b = (await p.slow.get("/v1/spaces/s/log")).json()
            assert normalize(log_a) == normalize(log_b) and log_a["commits"]

    asyncio.run(go())


def test_chunked_and_oversized_bodies_answer_alike(tmp_path: Path) -> None:
    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 7):
            yield data[i : i + 7]

    async def go() -> None:
        async with pair(tmp_path) as p:
            ok = json.dumps({"writes": [{"key": "c", "value": list(range(50))}]}).encode()
            big = json.dumps({"writes": [{"key": "c", "value": "y" * 5000}]}).encode()
            for body in (ok, big):
                for headers in ({"Content-Type": "application/json"}, {}):
                    a = await p.fast.post("/v1/spaces/s/commit", content=chunks(body), headers=headers)
                    b = await p.slow.post("/v1/spaces/s/commit", content=chunks(body), headers=headers)
                    assert summary(a) == summary(b)
                    if headers:
                        assert a.status_code == (200 if body is ok else 413)

    asyncio.run(go())


def test_auth_errors_answer_alike(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path, auth=True) as p:
            tokens: dict[str, str] = {}
            for app_ in p.apps:
                store = app_.state.store
                for name, scopes, spaces in (
                    ("reader", ["bus:read"], None),
                    ("writer", ["bus:read", "bus:write"], None),
                    ("fenced", ["bus:read", "bus:write"], ["other"]),
                ):
                    plain, rec = issue_token(
                        tenant="default", subject=name, scopes=scopes, spaces=spaces, token=f"ab_{name}_" + "x" * 40
                    )
                    await store.put_token(rec)
                    tokens[name] = plain
            commit = {"json": {"writes": [{"key": "k", "value": 1}]}}
            for who in (None, "reader", "writer", "fenced", "bogus"):
                headers = {"Authorization": f"Bearer {tokens.get(who, 'ab_nope')}"} if who else {}
                await p.same("POST", "/v1/spaces/s/commit", headers=headers, **commit)
                await p.same("GET", "/v1/spaces/s/shards/k", headers=headers)
                await p.same("POST", "/v1/spaces/s/commit", headers=headers, content=b"{bad json")

    asyncio.run(go())


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
write = st.fixed_dictionaries(
    {"key": st.sampled_from(["a", "b", "c/d", "", "bad key", 5])},
    optional={
        "value": json_any,
        "delete": st.sampled_from([True, False, 1, None]),
        "expected_version": st.sampled_from([0, 1, 2, 3, -1, None, "1", 1.0, 2**62, 2**62 + 1]),
        "junk": json_any,
    },
)
read = st.fixed_dictionaries(
    {"key": st.sampled_from(["a", "b", "zz", None])}, optional={"version": st.sampled_from([0, 1, 2, -1, "x"])}
)
body = st.one_of(
    st.fixed_dictionaries(
        {"writes": st.lists(write, max_size=3)}, optional={"reads": st.lists(read, max_size=2), "x": json_any}
    ),
    json_any,
)


def test_random_bodies_answer_alike(tmp_path: Path) -> None:
    statuses: set[int] = set()
    loop = asyncio.new_event_loop()
    cm = pair(tmp_path)
    p = loop.run_until_complete(cm.__aenter__())
    try:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            b=body,
            agent=st.sampled_from(["a", "b"]),
            idem=st.sampled_from([None, "k1", "k2"]),
            read_first=st.sampled_from([None, "a", "b"]),
            ctype=st.sampled_from(["application/json", "application/json", "Application/JSON; charset=UTF-8", None]),
        )
        # Random bodies are mostly refused: these make sure 200s through the shortcut (with
        # and without a charset) and a hand-over (422) are always among the examples.
        @example(
            b={"writes": [{"key": "a", "value": 1}]}, agent="a", idem=None, read_first=None, ctype="application/json"
        )
        @example(
            b={"writes": [{"key": "b", "value": [1]}]},
            agent="b",
            idem="k1",
            read_first="b",
            ctype="Application/JSON; charset=UTF-8",
        )
        @example(b={"writes": [{"key": "a"}]}, agent="a", idem=None, read_first=None, ctype="application/json")
        def check(b: Any, agent: str, idem: str | None, read_first: str | None, ctype: str | None) -> None:
            headers = {"X-Agent-Id": agent, **({"Idempotency-Key": idem} if idem else {})}
            if ctype:
                headers["Content-Type"] = ctype
            content = json.dumps(b).encode()

            async def one() -> None:
                if read_first:
                    await p.same("GET", f"/v1/spaces/hyp/shards/{read_first}", headers={"X-Agent-Id": agent})
                r = await p.same("POST", "/v1/spaces/hyp/commit", content=content, headers=headers)
                statuses.add(r.status_code)

            loop.run_until_complete(one())

        check()
        assert {200, 422} <= statuses, statuses  # the shortcut and the hand-over both ran
    finally:
        loop.run_until_complete(cm.__aexit__(None, None, None))
        loop.close()


# --------------------------------------------------------------------------- broker routes

BROKER_VOLATILE = {"id", "created", "commit_id", "updated_at"}


def broker_summary(r: httpx.Response) -> tuple[Any, ...]:
    status, headers, body = summary(r)
    if isinstance(body, dict):
        body = {k: ("<volatile>" if k in BROKER_VOLATILE else v) for k, v in body.items()}
    elif isinstance(body, bytes) and headers.get("content-type", "").startswith("text/event-stream"):
        body = [line for line in body.split(b"\n") if line.startswith(b"data:")][-1:]  # [DONE]
    return status, headers, body


def test_broker_routes_answer_alike(tmp_path: Path) -> None:
    from tests.upstream import FakeUpstream

    up = FakeUpstream("up-fast", models=["m"], completion_words=3).start()
    try:
        endpoints = json.dumps([up.endpoint()])

        async def go() -> None:
            async with pair(tmp_path, broker_endpoints=endpoints) as p:
                chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                cases: list[tuple[str, dict[str, Any]]] = [
                    ("/v1/chat/completions", {"json": chat}),
                    ("/v1/chat/completions", {"json": {**chat, "stream": True}}),
                    ("/v1/completions", {"json": {"model": "m", "prompt": "hi", "max_tokens": 2}}),
                    ("/v1/chat/completions", {"json": {**chat, "model": "nope"}}),
                    ("/v1/chat/completions", {"json": {"messages": []}}),
                    ("/v1/chat/completions", {"json": {"model": "m", "messages": "x"}}),
                    ("/v1/chat/completions", {"json": [chat]}),
                    ("/v1/chat/completions", {"json": "text"}),
                    ("/v1/chat/completions", {"content": b"{not json"}),
                    ("/v1/chat/completions", {"content": b'{"model": "m", "messages": [], "t": NaN}'}),
                    ("/v1/chat/completions", {"content": b'{"model": "m", "messages": [], "n": 1e999}'}),
                    ("/v1/chat/completions", {"content": b""}),
                    ("/v1/chat/completions", {"content": json.dumps(chat).encode(), "ctype": "text/plain"}),
                    ("/v1/chat/completions", {"content": json.dumps(chat).encode(), "ctype": None}),
                    ("/v1/embeddings", {"json": {"model": "m", "input": "x"}}),
                ]
                for path, kw in cases:
                    ctype = kw.pop("ctype", "application/json")
                    headers = {"X-Agent-Id": "a", **({"Content-Type": ctype} if ctype else {})}
                    a = await p.fast.post(path, headers=headers, **kw)
                    b = await p.slow.post(path, headers=headers, **kw)
                    assert broker_summary(a) == broker_summary(b), (path, kw, a.text, b.text)
                # Every model call reached the upstream once per app.
                assert len(up.requests) % 2 == 0 and up.requests
                # And the fast app's calls did take the shortcut.
                stacks: list[list[str]] = []
                broker_ = p.apps[0].state.broker
                real_call = broker_.call

                async def spy(*a: Any, **kw: Any) -> Any:
                    stacks.append([f.function for f in inspect.stack()])
                    return await real_call(*a, **kw)

                broker_.call = spy
                r = await p.fast.post("/v1/chat/completions", json=chat, headers={"X-Agent-Id": "a"})
                assert r.status_code == 200 and "_broker" in stacks[0], stacks

        asyncio.run(go())
    finally:
        up.stop()
