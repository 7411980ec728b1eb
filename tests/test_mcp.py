"""The MCP server, driven by the official MCP client against real agentbus processes.

* streamable HTTP at ``/mcp``: tools, read/commit roundtrip (every backend), one read set per
  MCP session, conflicts as tool errors with every conflicting key, 401 in the one error
  shape, scopes enforced by the bus, sessions bound to the credential that opened them;
* stdio: ``agentbus mcp --url ...`` spawned by the MCP client's stdio transport;
* the broker's chat/completions through the ``chat`` and ``complete`` tools (fake upstream).

Servers are module-scoped (a start is the expensive part); tests use unique spaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from agentbus.app import create_app
from agentbus.settings import Settings
from tests.conftest import BACKENDS, ROOT, Server, dev_env, make_store, module_server
from tests.llama import MODEL_NAME as LLAMA_MODEL
from tests.llama import llama_server  # noqa: F401 - fixture
from tests.upstream import FakeUpstream

TOOLS = {"whoami", "read_shard", "list_shards", "commit", "history", "commit_log", "readset", "chat", "complete"}
AGENTBUS_BIN = str(Path(sys.executable).parent / "agentbus")


# --------------------------------------------------------------------------- helpers


@asynccontextmanager
async def connect(
    server: Server | str,
    *,
    token: str | None = None,
    agent: str | None = None,
    mode: str = "legacy",
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Client]:
    """An MCP client over streamable HTTP to ``/mcp`` of ``server``."""
    url = server if isinstance(server, str) else server.url
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    if agent:
        h["X-Agent-Id"] = agent
    async with httpx2.AsyncClient(headers=h, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client:
            yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured content."""
    res = await client.call_tool(tool, args)
    assert not res.is_error, f"{tool} failed: {text(res)}"
    assert isinstance(res.structured_content, dict), res
    # The text content carries the same data for clients that read only text.
    assert json.loads(text(res)) == res.structured_content
    return res.structured_content


async def fail(client: Client, tool: str, status: int, code: str | None = None, **args: Any) -> dict[str, Any]:
    """Call a tool that must fail with the bus error ``status``; the error object."""
    res = await client.call_tool(tool, args)
    assert res.is_error, f"{tool} should have failed: {res.structured_content}"
    data = res.structured_content
    assert isinstance(data, dict) and data["status"] == status, f"{tool}: {data}"
    err = data["error"]
    for name, typ in (("type", str), ("code", str), ("message", str), ("retryable", bool)):
        assert isinstance(err.get(name), typ), err
    if code is not None:
        assert err["code"] == code, err
    assert err["message"] in text(res)
    return err  # type: ignore[no-any-return]


def text(res: CallToolResult) -> str:
    return "".join(getattr(c, "text", "") for c in res.content)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def new_space() -> str:
    return f"mcp-{uuid.uuid4().hex[:10]}"


def http_commit(server: Server, space: str, agent: str, writes: dict[str, Any], **headers: str) -> httpx.Response:
    body = {"writes": [{"key": k, "value": v} for k, v in writes.items()]}
    return httpx.post(
        f"{server.url}/v1/spaces/{space}/commit", json=body, headers={"X-Agent-Id": agent, **headers}, timeout=10
    )


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("fake-mcp", models=["fake-model"], completion_words=4).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def dev(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[Server]:
    """A dev-mode server (X-Agent-Id names the caller) on SQLite; its broker's one endpoint is
    the fake upstream."""
    tmp = tmp_path_factory.mktemp("mcp-dev")
    env = {**dev_env(), "AGENTBUS_BROKER_ENDPOINTS": json.dumps([upstream.endpoint()])}
    srv = Server(store=make_store("sqlite", request, tmp), env=env, log_dir=tmp).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def anybus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if request.param == "sqlite":
        yield request.getfixturevalue("dev")
    else:
        yield from module_server("mcp-any", request, tmp_path_factory)


class Sec:
    """An auth-mode server and a way to mint tokens on it."""

    def __init__(self, server: Server, admin: str) -> None:
        self.server = server
        self.admin = admin

    @property
    def url(self) -> str:
        return self.server.url

    def mint(self, subject: str, **body: Any) -> str:
        r = httpx.post(
            f"{self.url}/v1/admin/tokens",
            headers={"Authorization": f"Bearer {self.admin}"},
            json={"subject": subject, **body},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


@pytest.fixture(scope="module")
def sec(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sec]:
    tmp = tmp_path_factory.mktemp("mcp-auth")
    admin = "ab_" + secrets.token_urlsafe(32)
    env = {
        **dev_env(),
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": admin,
        "AGENTBUS_AUTH_CACHE_TTL_S": "0",
        "AGENTBUS_AUTH_FAIL_LIMIT": "1000000",  # these tests fail authentication on purpose, often
    }
    srv = Server(store=make_store("sqlite", request, tmp), env=env, log_dir=tmp).start()
    try:
        yield Sec(srv, admin)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- streamable HTTP


def test_lists_tools_with_schemas(dev: Server) -> None:
    async def go() -> None:
        async with connect(dev, agent="lister") as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(tools) == TOOLS
            for t in tools.values():
                assert t.description and len(t.description) > 40, t.name
                assert t.input_schema["type"] == "object"
            assert tools["commit"].input_schema["required"] == ["space", "writes"]
            assert tools["read_shard"].annotations is not None and tools["read_shard"].annotations.read_only_hint
            assert not (tools["commit"].annotations and tools["commit"].annotations.read_only_hint)

    run(go())


def test_read_commit_roundtrip(anybus: Server) -> None:
    space = new_space()

    async def go() -> None:
        async with connect(anybus, agent="writer") as c:
            absent = await call(c, "read_shard", space=space, key="plan")
            assert absent == {"space": space, "key": "plan", "exists": False, "version": 0, "value": None}
            done = await call(
                c,
                "commit",
                space=space,
                writes=[
                    {"key": "plan", "value": {"steps": ["a"]}, "expected_version": 0},
                    {"key": "notes/x", "value": "hello"},
                ],
            )
            assert done["versions"] == {"plan": 1, "notes/x": 1} and done["seq"] >= 1 and done["commit_id"]
            got = await call(c, "read_shard", space=space, key="plan")
            assert got["exists"] and got["version"] == 1 and got["value"] == {"steps": ["a"]}
            assert got["updated_by"] == "writer"
            listing = await call(c, "list_shards", space=space, prefix="notes/")
            assert [(s["key"], s["version"]) for s in listing["shards"]] == [("notes/x", 1)]
            await call(c, "commit", space=space, writes=[{"key": "plan", "value": {"steps": ["a", "b"]}}])
            await call(c, "commit", space=space, writes=[{"key": "notes/x", "delete": True}])
            hist = await call(c, "history", space=space, key="plan")
            assert [v["version"] for v in hist["versions"]] == [2, 1]
            assert hist["versions"][0]["value"] == {"steps": ["a", "b"]}
            gone = await call(c, "read_shard", space=space, key="notes/x")
            assert gone["exists"] is False
            log = await call(c, "commit_log", space=space)
            assert len(log["commits"]) == 3

    run(go())
    # The same shard, seen through plain HTTP: one bus, one store.
    r = httpx.get(f"{anybus.url}/v1/spaces/{space}/shards/plan", headers={"X-Agent-Id": "auditor"}, timeout=10)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["updated_by"] == "writer"


def test_each_mcp_session_has_its_own_read_set(dev: Server) -> None:
    space = new_space()
    assert http_commit(dev, space, "setup", {"k": 1}).status_code == 200

    async def go() -> None:
        async with connect(dev, agent="alice") as a, connect(dev, agent="alice") as b:
            me_a, me_b = await call(a, "whoami"), await call(b, "whoami")
            assert me_a["subject"] == me_b["subject"] == "alice"
            assert me_a["session"].startswith("mcp-") and me_b["session"].startswith("mcp-")
            assert me_a["session"] != me_b["session"]
            await call(a, "read_shard", space=space, key="k")
            assert (await call(b, "readset", space=space))["reads"] == []
            assert (await call(a, "readset", space=space))["reads"] == [{"key": "k", "version": 1}]
            # B (same agent, other session) reads and commits k: A's read set is untouched ...
            await call(b, "read_shard", space=space, key="k")
            await call(b, "commit", space=space, writes=[{"key": "k", "value": 2}])
            assert (await call(a, "readset", space=space))["reads"] == [{"key": "k", "version": 1}]
            # ... and now stale: A's commit is refused.
            err = await fail(a, "commit", 409, space=space, writes=[{"key": "k", "value": 3}])
            assert err["conflicts"][0]["kind"] == "stale_read"
            # The conflict ended A's epoch; a fresh read-modify-write goes through.
            assert (await call(a, "readset", space=space))["reads"] == []
            cur = await call(a, "read_shard", space=space, key="k")
            done = await call(a, "commit", space=space, writes=[{"key": "k", "value": cur["value"] + 1}])
            assert done["versions"] == {"k": 3}
            # clear=true discards the read set.
            await call(a, "read_shard", space=space, key="k")
            assert (await call(a, "readset", space=space, clear=True))["reads"] == []

    run(go())


def test_conflict_is_a_tool_error_with_every_conflicting_key(dev: Server) -> None:
    space = new_space()
    assert http_commit(dev, space, "setup", {"a": 0, "b": 0}).status_code == 200

    async def go() -> None:
        async with connect(dev, agent="agent-a") as a, connect(dev, agent="agent-b") as b:
            for key in ("a", "b", "c"):
                await call(a, "read_shard", space=space, key=key)
            await call(a, "list_shards", space=space, prefix="d/")
            await call(
                b,
                "commit",
                space=space,
                writes=[{"key": "a", "value": 1}, {"key": "b", "value": 1}, {"key": "c", "value": "new"}],
            )
            await call(b, "commit", space=space, writes=[{"key": "d/1", "value": "phantom"}])
            err = await fail(
                a, "commit", 409, space=space, writes=[{"key": "a", "value": "mine"}, {"key": "e", "value": 1}]
            )
            assert err["type"] == "conflict" and err["retryable"] is True
            by_key = {c["key"]: c for c in err["conflicts"]}
            assert {"a", "b", "c"} <= set(by_key), err
            for key in ("a", "b"):
                assert by_key[key]["kind"] == "stale_read"
                assert (by_key[key]["read_version"], by_key[key]["current_version"]) == (1, 2)
                assert by_key[key]["committed_by"] == "agent-b"
            assert (by_key["c"]["read_version"], by_key["c"]["current_version"]) == (0, 1)
            assert any(c["kind"] == "phantom" for c in err["conflicts"]), err
            # Nothing was applied.
            e = await call(b, "read_shard", space=space, key="e")
            assert e["exists"] is False

    run(go())


def test_expected_version_conflict(dev: Server) -> None:
    space = new_space()

    async def go() -> None:
        async with connect(dev, agent="cas") as c:
            await call(c, "commit", space=space, writes=[{"key": "x", "value": 1, "expected_version": 0}])
            err = await fail(c, "commit", 409, space=space, writes=[{"key": "x", "value": 2, "expected_version": 0}])
            assert err["conflicts"][0]["kind"] == "write_conflict"
            # Explicit reads are validated like recorded ones.
            err = await fail(
                c, "commit", 409, space=space, writes=[{"key": "y", "value": 1}], reads=[{"key": "x", "version": 0}]
            )
            assert (err["conflicts"][0]["key"], err["conflicts"][0]["read_version"]) == ("x", 0)
            # An idempotency key makes a retried commit return the first outcome, applied once.
            once = {"space": space, "writes": [{"key": "z", "value": "once"}], "idempotency_key": "retry-1"}
            first, again = await call(c, "commit", **once), await call(c, "commit", **once)
            assert first == again and first["versions"] == {"z": 1}

    run(go())


def test_bus_errors_are_tool_errors_not_crashes(dev: Server) -> None:
    space = new_space()

    async def go() -> None:
        async with connect(dev, agent="clumsy") as c:
            await fail(c, "read_shard", 422, space="bad space!", key="k")
            await fail(c, "commit", 422, space=space, writes=[{"key": "k"}])  # neither value nor delete
            await fail(c, "commit", 422, "duplicate_write", space=space, writes=[{"key": "k", "value": 1}] * 2)
            await fail(c, "history", 404, space=space, key="never")
            await fail(c, "read_shard", 422, space=space, key="")
            # Arguments that break the tool's own schema are tool errors too.
            res = await c.call_tool("commit", {"space": space, "writes": []})
            assert res.is_error
            # The session still works.
            await call(c, "commit", space=space, writes=[{"key": "k", "value": None}])
            assert (await call(c, "read_shard", space=space, key="k"))["value"] is None

    run(go())


def test_sessionless_protocol_and_explicit_session(dev: Server) -> None:
    """2026-07-28 clients (no MCP session) get the read set ``mcp`` unless they name one."""
    space = new_space()

    async def go() -> None:
        async with connect(dev, agent="modern", mode="auto") as c:
            assert (await call(c, "whoami"))["session"] == "mcp"
            await call(c, "read_shard", space=space, key="k")
            assert (await call(c, "readset", space=space))["reads"] == [{"key": "k", "version": 0}]
        async with connect(dev, agent="modern", mode="auto", headers={"X-Agent-Session": "task-7"}) as c:
            assert (await call(c, "whoami"))["session"] == "task-7"
            assert (await call(c, "readset", space=space))["reads"] == []
        async with connect(dev, agent="modern", headers={"X-Agent-Session": "task-7"}) as c:  # legacy too
            assert (await call(c, "whoami"))["session"] == "task-7"

    run(go())
    # An explicit session is the same read set plain HTTP callers get with that header.
    r = httpx.get(
        f"{dev.url}/v1/spaces/{space}/readset", headers={"X-Agent-Id": "modern", "X-Agent-Session": "mcp"}, timeout=10
    )
    assert r.json()["reads"] == [{"key": "k", "version": 0}]


def test_stateless_mode_serves_any_worker(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """AGENTBUS_MCP_STATELESS: no MCP sessions, so two uvicorn workers can share a client; read sets
    live in the store, so a read served by one worker conflicts a commit served by the other."""
    env = {**dev_env(), "AGENTBUS_MCP_STATELESS": "true"}
    srv = Server(store=make_store("sqlite", request, tmp_path), env=env, log_dir=tmp_path).start(workers=2)
    space = new_space()
    try:

        async def go() -> None:
            async with connect(srv, agent="w") as c, connect(srv, agent="w", headers={"X-Agent-Session": "s2"}) as d:
                assert (await call(c, "whoami"))["session"] == "mcp"
                for i in range(10):
                    cur = await call(c, "read_shard", space=space, key="n")
                    done = await call(c, "commit", space=space, writes=[{"key": "n", "value": i}])
                    assert done["versions"]["n"] == cur["version"] + 1
                await call(c, "read_shard", space=space, key="n")
                await call(d, "commit", space=space, writes=[{"key": "n", "value": "other"}])
                err = await fail(c, "commit", 409, space=space, writes=[{"key": "n", "value": "late"}])
                assert err["conflicts"][0]["kind"] == "stale_read"

        run(go())
    finally:
        srv.stop()


def test_dev_mode_refuses_foreign_hosts(dev: Server) -> None:
    """No tokens in dev mode: a request with a non-loopback Host (DNS rebinding) is refused."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    headers = {"Accept": "application/json, text/event-stream", "X-Agent-Id": "x"}
    r = httpx.post(f"{dev.url}/mcp", json=init, headers={**headers, "Host": "evil.example"}, timeout=10)
    assert r.status_code in (400, 403, 421), r.text
    r = httpx.post(f"{dev.url}/mcp", json=init, headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers.get("mcp-session-id"), r.text


# --------------------------------------------------------------------------- identity


def raw_initialize(url: str, token: str | None) -> httpx.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    headers = {"Accept": "application/json, text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{url}/mcp", json=body, headers=headers, timeout=10)


def assert_401(r: httpx.Response, code: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and err["code"] == code and err["type"] and err["retryable"] is False


def test_unauthenticated_mcp_requests_get_401(sec: Sec) -> None:
    assert_401(raw_initialize(sec.url, None), "missing_token")
    assert_401(raw_initialize(sec.url, "ab_" + secrets.token_urlsafe(32)), "invalid_token")
    for method in ("GET", "DELETE"):
        assert_401(httpx.request(method, f"{sec.url}/mcp", timeout=10), "missing_token")
    # With auth on, X-Agent-Id names nobody.
    r = httpx.post(f"{sec.url}/mcp", json={}, headers={"X-Agent-Id": "admin"}, timeout=10)
    assert_401(r, "missing_token")

    async def go() -> None:
        with pytest.raises(Exception):  # noqa: B017 - the SDK's error type for an HTTP 401 varies by era
            async with connect(sec.url) as c:
                await c.list_tools()

    run(go())


def test_identity_and_scopes_come_from_the_token(sec: Sec) -> None:
    space = new_space()
    writer = sec.mint("mcp-writer")
    reader = sec.mint("mcp-reader", scopes=["bus:read"])

    async def go() -> None:
        async with connect(sec.url, token=writer, agent="spoofed") as w, connect(sec.url, token=reader) as r:
            me = await call(w, "whoami")
            assert me["subject"] == "mcp-writer" and me["session"].startswith("mcp-")
            await call(w, "commit", space=space, writes=[{"key": "k", "value": 1}])
            got = await call(r, "read_shard", space=space, key="k")
            assert got["updated_by"] == "mcp-writer"
            err = await fail(r, "commit", 403, "missing_scope", space=space, writes=[{"key": "k", "value": 2}])
            assert err["type"] == "permission"
            await fail(r, "chat", 403, "missing_scope", model="m", prompt="hi")
            assert (await call(r, "read_shard", space=space, key="k"))["version"] == 1

    run(go())


def test_a_session_belongs_to_the_credential_that_opened_it(sec: Sec) -> None:
    alice, mallory = sec.mint("mcp-alice"), sec.mint("mcp-mallory")
    r = raw_initialize(sec.url, alice)
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    headers = {
        "Accept": "application/json, text/event-stream",
        "Mcp-Session-Id": sid,
        "MCP-Protocol-Version": "2025-11-25",
    }
    hijack = httpx.post(
        f"{sec.url}/mcp", json=listing, headers={**headers, "Authorization": f"Bearer {mallory}"}, timeout=10
    )
    assert hijack.status_code == 404, hijack.text


MALFORMED = ["Bearer", "Basic YWRtaW46YWRtaW4=", "Token {admin}", "{admin}", "Bearer{admin}", "Bearer not-a-token"]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_every_mcp_method_is_protected_and_audited(sec: Sec, method: str) -> None:
    """What tests/test_auth.py's route matrix checks for ``{GET,POST,DELETE} /mcp``."""
    import time

    def send(auth: str | None) -> httpx.Response:
        headers = {"Authorization": auth} if auth is not None else {}
        return httpx.request(method, f"{sec.url}/mcp", headers=headers, timeout=10)

    assert_401(send(None), "missing_token")
    for header in MALFORMED:
        assert_401(send(header.format(admin=sec.admin)), "invalid_token")
    subject = f"victim-{method.lower()}-{uuid.uuid4().hex[:6]}"
    revoked = sec.mint(subject)
    admin = {"Authorization": f"Bearer {sec.admin}"}
    who = httpx.get(f"{sec.url}/v1/whoami", headers={"Authorization": f"Bearer {revoked}"}, timeout=10).json()
    assert httpx.delete(f"{sec.url}/v1/admin/tokens/{who['token_id']}", headers=admin, timeout=10).status_code < 300
    assert_401(send(f"Bearer {revoked}"), "token_revoked")
    expired = sec.mint(subject + "-x", expires_in_s=1)
    time.sleep(1.2)
    assert_401(send(f"Bearer {expired}"), "token_expired")
    events = httpx.get(f"{sec.url}/v1/admin/audit?limit=200", headers=admin, timeout=10).json()["events"]
    denied = {(e["subject"], e["target"]) for e in events if e["action"] == "auth.denied"}
    assert (subject, f"{method} /mcp") in denied and (subject + "-x", f"{method} /mcp") in denied
    # A valid token gets through to MCP (which then wants a proper MCP request).
    r = send(f"Bearer {sec.mint(subject + '-ok', scopes=['bus:read'])}")
    assert r.status_code not in (401, 403) and r.status_code < 500, r.text
    # Other methods: 405 in the one error shape.
    r = httpx.put(f"{sec.url}/mcp", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "http_405"


# --------------------------------------------------------------------------- stdio


def stdio_params(url: str, *args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=AGENTBUS_BIN,
        args=["mcp", "--url", url, *args],
        env={**os.environ, **(env or {})},
        cwd=str(ROOT),
    )


def test_stdio_read_commit_and_conflict(dev: Server) -> None:
    space = new_space()

    async def go() -> None:
        async with Client(stdio_params(dev.url, "--agent-id", "stdio-agent")) as c:
            assert {t.name for t in (await c.list_tools()).tools} == TOOLS
            me = await call(c, "whoami")
            assert me["subject"] == "stdio-agent" and me["session"].startswith("mcp-")
            assert (await call(c, "read_shard", space=space, key="doc"))["exists"] is False
            await call(c, "commit", space=space, writes=[{"key": "doc", "value": "v1"}])
            got = await call(c, "read_shard", space=space, key="doc")
            assert got["value"] == "v1" and got["updated_by"] == "stdio-agent"
            # Someone else commits between our read and our commit.
            assert http_commit(dev, space, "other", {"doc": "theirs"}).status_code == 200
            err = await fail(c, "commit", 409, space=space, writes=[{"key": "doc", "value": "v2"}])
            (conflict,) = err["conflicts"]
            assert (conflict["key"], conflict["kind"], conflict["committed_by"]) == ("doc", "stale_read", "other")
            assert (conflict["read_version"], conflict["current_version"]) == (1, 2)

    run(go())


def test_stdio_with_a_token_from_the_environment(sec: Sec) -> None:
    token = sec.mint("mcp-stdio", scopes=["bus:read"])
    space = new_space()

    async def go() -> None:
        async with Client(stdio_params(sec.url, env={"AGENTBUS_TOKEN": token})) as c:
            assert (await call(c, "whoami"))["subject"] == "mcp-stdio"
            await fail(c, "commit", 403, "missing_scope", space=space, writes=[{"key": "k", "value": 1}])
        async with Client(stdio_params(sec.url, env={"AGENTBUS_TOKEN": ""})) as c:
            await fail(c, "whoami", 401, "missing_token")

    run(go())


def test_stdio_reports_an_unreachable_bus_as_a_tool_error(dev: Server) -> None:
    async def go() -> None:
        async with Client(stdio_params("http://127.0.0.1:9", "--agent-id", "lost")) as c:
            err = await fail(c, "read_shard", 503, "bus_unreachable", space="s", key="k")
            assert err["retryable"] is True

    run(go())


# --------------------------------------------------------------------------- broker


def test_chat_and_complete_through_the_broker(dev: Server, upstream: FakeUpstream) -> None:
    async def go() -> None:
        async with connect(dev, agent="thinker") as c:
            before = len(upstream.requests)
            out = await call(c, "chat", model="fake-model", prompt="plan the next step", system="be brief")
            assert out["content"] == "w0 w1 w2 w3" and out["finish_reason"] == "stop"
            assert out["usage"]["completion_tokens"] == 4 and out["model"] == "fake-model"
            sent = upstream.requests[before]["body"]
            assert sent["messages"] == [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "plan the next step"},
            ]
            assert sent["max_tokens"] == 256 and sent["stream"] is False
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
            out = await call(c, "chat", model="fake-model", messages=msgs, max_tokens=5, temperature=0)
            assert out["content"] == "w0 w1 w2 w3"
            assert upstream.requests[-1]["body"]["messages"] == msgs
            done = await call(c, "complete", model="fake-model", prompt="Once upon a time", max_tokens=8)
            assert done["text"] == "w0 w1 w2 w3" and upstream.requests[-1]["path"] == "/v1/completions"
            await fail(c, "chat", 422, "missing_messages", model="fake-model")
            err = await fail(c, "chat", 404, model="no-such-model", prompt="hi")
            assert err["type"]

    run(go())


def test_broker_upstream_failure_is_a_tool_error(dev: Server, upstream: FakeUpstream) -> None:
    async def go() -> None:
        try:
            async with connect(dev, agent="thinker") as c:
                for mode in ("error400", "garbage"):
                    upstream.mode = mode
                    for tool in ("chat", "complete"):
                        res = await c.call_tool(tool, {"model": "fake-model", "prompt": "hi"})
                        assert res.is_error and res.structured_content["status"] >= 400, (mode, res)
                        assert res.structured_content["error"]["message"], res
        finally:
            upstream.mode = "ok"

    run(go())


def test_complete_with_a_real_model(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    llama_server: str,  # noqa: F811
) -> None:
    """The ``complete`` tool end to end: MCP -> agentbus broker -> llama.cpp with a tiny real model."""
    tmp = tmp_path_factory.mktemp("mcp-llama")
    endpoint = {"name": "llama", "base_url": llama_server, "models": [LLAMA_MODEL], "timeout_s": 120}
    env = {**dev_env(), "AGENTBUS_BROKER_ENDPOINTS": json.dumps([endpoint])}
    srv = Server(store=make_store("sqlite", request, tmp), env=env, log_dir=tmp).start()
    try:

        async def go() -> None:
            async with connect(srv, agent="poet") as c:
                out = await call(c, "complete", model=LLAMA_MODEL, prompt="The capital of France is", max_tokens=8)
                assert isinstance(out["text"], str) and out["text"].strip()
                assert 0 < out["usage"]["completion_tokens"] <= 8 and out["endpoint"] == "llama"

        run(go())
    finally:
        srv.stop()


# --------------------------------------------------------------------------- settings


def test_mcp_can_be_turned_off() -> None:
    def paths(**kw: Any) -> set[str]:
        app = create_app(Settings(store="sqlite:///unused.db", **kw))
        return {getattr(r, "path", "") for r in app.routes}

    assert "/mcp" in paths()
    assert "/mcp" not in paths(mcp_enabled=False)


def test_in_process_app_runs_and_stops_the_mcp_endpoint(tmp_path: Path) -> None:
    """The app's lifespan runs the MCP session manager (TestClient: another event loop and
    thread) and shuts it down with a session still open."""
    from fastapi.testclient import TestClient

    from tests.conftest import migrate

    url = f"sqlite:///{tmp_path / 'agentbus.db'}"
    migrate(url)
    app = create_app(Settings(store=url, auth=False))
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/mcp", json=init, headers={"Accept": "application/json, text/event-stream"})
        assert r.status_code == 200 and r.headers["mcp-session-id"], r.text
        assert "agentbus" in r.text
