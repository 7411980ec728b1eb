"""Security tests: identity, scopes, tenants, allow-lists, audit, bootstrap, limits, headers, CLI.

Every test here runs against real agentbus processes with ``AGENTBUS_AUTH=true`` and is
written so that it fails if the protection it names is removed or weakened:

* The route matrix enumerates the routes of ``create_app`` at collection time. A route that
  is neither in :data:`PUBLIC` (with the reason it is public) nor in :data:`ROUTES` (with
  the scope it needs) fails the suite, so a new endpoint cannot ship unprotected by
  accident. Each protected route is probed with no token, malformed headers, an unknown, a
  revoked and an expired token, a token lacking exactly its scope (all of these must be
  refused without side effects) and a token holding only its scope (must get through).
* Tenants and space allow-lists: a foreign space answers exactly like a space that does not
  exist, and nothing of it leaks.
* Spoofing: with auth on, ``X-Agent-Id`` and S-Bus ``agent_id`` name nobody, so no one can
  read, commit or clear read sets as another agent.

Most tests share one server per backend (module scope: a server start is the expensive
part); tests that need other settings start their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount

from agentbus.app import create_app
from agentbus.migrate import upgrade
from agentbus.settings import Settings
from tests.conftest import BACKENDS, PG_ADMIN_URL, ROOT, Server

TIMEOUT = httpx.Timeout(15.0)
TOKEN_RE = re.compile(r"\bab_[A-Za-z0-9_-]{43}\b")

# --------------------------------------------------------------------------- the route table

PUBLIC: dict[str, str] = {
    "GET /healthz": "liveness probe for orchestrators; says only 'ok'",
    "GET /readyz": "readiness probe for orchestrators; says whether the backend answers",
    "GET /health": "S-Bus liveness (S-Bus clients probe it without credentials); says only 'ok'",
    "GET /openapi.json": "the API contract; contains no data",
    "GET /docs": "static Swagger UI page; every call it makes needs a token",
    "GET /docs/oauth2-redirect": "static helper page of the Swagger UI",
    "GET /redoc": "static ReDoc page; contains no data",
    "GET /metrics": "Prometheus counters, no shard data; open only on a loopback bind or in dev mode "
    "(else AGENTBUS_METRICS_TOKEN or a traces:read token)",
    "GET /ui": "static operator page; contains no data, every call it makes needs a token",
    "GET /ui/static/{name}": "fixed set of static assets of the operator page (JS, CSS); no data",
}
"""Routes answered without a token, and why that is safe."""


@dataclass(frozen=True)
class RouteSpec:
    scope: str | None
    """The scope the route demands; None = any valid token."""
    body: Callable[[Sec, str], Any] | None = None
    """JSON body for a probe (valid, so only identity can make the request fail)."""
    after_denied: Callable[[Sec, str], None] | None = None
    """Checks that a refused request (of probe ``case``) changed nothing."""


def _commit_body(sec: Sec, case: str) -> Any:
    return {"writes": [{"key": "k1", "value": {"probe": case}}]}


def _commit_left_nothing(sec: Sec, case: str) -> None:
    # Revoked, expired and scope-less probe tokens belong to tenant A: a commit that got
    # through would have created this space there.
    r = sec.get(f"/v1/spaces/{sec.probe_space(case)}/log", sec.tok["reader"])
    assert_error(r, 404, "space_not_found")


def _token_body(sec: Sec, case: str) -> Any:
    return {"subject": f"probe-{case}", "tenant": sec.ta, "kind": "admin", "scopes": ["admin"]}


def _no_token_created(sec: Sec, case: str) -> None:
    listed = sec.get(f"/v1/admin/tokens?tenant={sec.ta}", sec.admin).json()["tokens"]
    assert not [t for t in listed if t["subject"] == f"probe-{case}"], "a refused request created a token"


def _victim_still_valid(sec: Sec, case: str) -> None:
    assert sec.get("/v1/whoami", sec.tok["victim"]).status_code == 200, "a refused request revoked a token"


def _chat(case: str) -> Any:
    return {"model": "m", "messages": [{"role": "user", "content": case}], "max_tokens": 1}


def _sbus_shard_body(sec: Sec, case: str) -> Any:
    return {"key": f"probe-{case}", "content": "x", "goal_tag": "g"}


def _no_sbus_shard(sec: Sec, case: str) -> None:
    r = sec.get(f"/shard/probe-{case}", sec.tok["reader"])
    assert r.status_code == 404, r.text


def _sbus_commit_body(sec: Sec, case: str) -> Any:
    key = "sb-none" if case == "right_scope" else "sb-k"  # the positive probe must not change fixtures
    return {"key": key, "expected_version": 0, "delta": f"probe-{case}", "agent_id": "x"}


def _sbus_shard_unchanged(sec: Sec, case: str) -> None:
    r = sec.get("/shard/sb-k", sec.tok["reader"])
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "init", "a refused S-Bus commit changed a shard"


def _no_sbus_reset(sec: Sec, case: str) -> None:
    assert sec.get("/stats", sec.tok["reader"]).json()["space"] == "sbus", "a refused request reset S-Bus"


ROUTES: dict[str, RouteSpec] = {
    # state bus v1
    "GET /v1/spaces": RouteSpec("bus:read"),
    "GET /v1/spaces/{space}/shards/{key}/history": RouteSpec("bus:read"),
    "GET /v1/spaces/{space}/shards/{key}": RouteSpec("bus:read"),
    "GET /v1/spaces/{space}/shards": RouteSpec("bus:read"),
    "POST /v1/spaces/{space}/commit": RouteSpec("bus:write", _commit_body, _commit_left_nothing),
    "GET /v1/spaces/{space}/readset": RouteSpec("bus:read"),
    "DELETE /v1/spaces/{space}/readset": RouteSpec("bus:read"),
    "GET /v1/spaces/{space}/log": RouteSpec("bus:read"),
    "GET /v1/spaces/{space}/events": RouteSpec("bus:read"),
    # operator views
    "GET /v1/spaces/{space}/trace": RouteSpec("traces:read"),
    "GET /v1/usage": RouteSpec("traces:read"),
    # MCP: any valid token opens a session; each tool call is then checked by the bus itself
    "GET /mcp": RouteSpec(None),
    "POST /mcp": RouteSpec(None),
    "DELETE /mcp": RouteSpec(None),
    # identity and admin
    "GET /v1/whoami": RouteSpec(None),
    "POST /v1/admin/tokens": RouteSpec("admin", _token_body, _no_token_created),
    "GET /v1/admin/tokens": RouteSpec("admin"),
    "DELETE /v1/admin/tokens/{token_id}": RouteSpec("admin", None, _victim_still_valid),
    "GET /v1/admin/audit": RouteSpec("traces:read"),
    # model broker (no endpoints configured here: an authorized call gets a clean 4xx/503)
    "POST /v1/chat/completions": RouteSpec("broker:invoke", lambda sec, case: _chat(case)),
    "POST /v1/completions": RouteSpec("broker:invoke", lambda sec, case: {"model": "m", "prompt": case}),
    "POST /v1/embeddings": RouteSpec("broker:invoke", lambda sec, case: {"model": "m", "input": case}),
    "GET /v1/models": RouteSpec("broker:invoke"),
    "GET /v1/budget": RouteSpec("broker:invoke"),
    # S-Bus compatibility (AGENTBUS_SBUS_COMPAT=true)
    "POST /shard": RouteSpec("bus:write", _sbus_shard_body, _no_sbus_shard),
    "GET /shard/{key}": RouteSpec("bus:read"),
    "GET /shards": RouteSpec("bus:read"),
    "POST /commit": RouteSpec("bus:write", _sbus_commit_body, _sbus_shard_unchanged),
    "POST /commit/v2": RouteSpec("bus:write", _sbus_commit_body, _sbus_shard_unchanged),
    "POST /session": RouteSpec("bus:read", lambda sec, case: {"agent_id": "x"}),
    "GET /stats": RouteSpec("bus:read"),
    "GET /admin/health": RouteSpec("bus:read"),
    "POST /admin/reset": RouteSpec("admin", None, _no_sbus_reset),
}
"""Every protected route and the scope it needs."""

SPACE_ROUTES = [r for r in ROUTES if "{space}" in r]


def _walk(routes: Any, prefix: str = "") -> Iterator[str]:
    for r in routes:
        inner = getattr(r, "original_router", None)  # FastAPI >= 0.16x includes routers lazily
        if inner is not None:
            ctx = getattr(r, "include_context", None)
            yield from _walk(inner.routes, prefix + (getattr(ctx, "prefix", "") or ""))
        elif isinstance(r, Mount):
            if r.routes:
                yield from _walk(r.routes, prefix + r.path)
            else:
                yield f"* {prefix}{r.path}"  # a mounted app (e.g. /mcp) must be listed too
        else:
            path = re.sub(r":\w+}", "}", prefix + r.path)
            for method in sorted(getattr(r, "methods", None) or ["*"]):
                if method != "HEAD":
                    yield f"{method} {path}"


def app_routes() -> list[str]:
    """Every route of the app with auth on and every optional router enabled."""
    app = create_app(Settings(auth=True, sbus_compat=True, store="sqlite:///unused.db"))
    return sorted(set(_walk(app.routes)))


ALL_ROUTES = app_routes()
PROTECTED = [r for r in ALL_ROUTES if r not in PUBLIC]
CASES = ["no_token", "malformed", "unknown", "revoked", "expired", "wrong_scope", "right_scope"]
MATRIX = [
    pytest.param(route, case, id=f"{route}-{case}")
    for route in PROTECTED
    for case in CASES
    if not (case == "wrong_scope" and ROUTES.get(route, RouteSpec("?")).scope is None)
]

# --------------------------------------------------------------------------- helpers


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``r`` is ``status`` with the one error shape (and the headers that status needs)."""
    where = f"{r.request.method} {r.request.url.path}"
    assert r.status_code == status, f"{where}: expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), f"{where}: {r.headers}"
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: not the error shape: {body}"
    err = body["error"]
    assert isinstance(err, dict), f"{where}: {body}"
    for name, typ in (("type", str), ("code", str), ("message", str), ("retryable", bool)):
        assert isinstance(err.get(name), typ), f"{where}: error.{name} missing or not {typ.__name__}: {err}"
    assert "Traceback" not in r.text and 'File "' not in r.text, f"{where}: stack trace in a response"
    if code is not None:
        assert err["code"] == code, f"{where}: expected code {code}, got {err}"
    if status == 401:
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), f"{where}: {r.headers}"
    if status == 429:
        assert int(r.headers["retry-after"]) >= 1 and err["retryable"] is True, f"{where}: {r.headers} {err}"
    return err


@dataclass
class Sec:
    """One auth-mode server per backend, its tokens and the data every test may rely on."""

    server: Server
    backend: str
    http: httpx.Client
    admin: str
    uid: str
    tok: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    subject: dict[str, str] = field(default_factory=dict)

    @property
    def admin_tenant(self) -> str:
        return f"adm-{self.uid}"

    @property
    def ta(self) -> str:
        return f"ta-{self.uid}"

    @property
    def tb(self) -> str:
        return f"tb-{self.uid}"

    @property
    def marker(self) -> str:
        """A value only tenant A ever stores: it must never appear in an answer to anyone else."""
        return f"secret-of-a-{self.uid}"

    @property
    def shared(self) -> str:
        """A space name both tenants use, each in its own namespace."""
        return f"shared-{self.uid}"

    @property
    def a_only(self) -> str:
        return f"aonly-{self.uid}"

    @property
    def allowed(self) -> str:
        return f"allowed-{self.uid}"

    @property
    def nowhere(self) -> str:
        return f"nowhere-{self.uid}"

    def probe_space(self, case: str) -> str:
        return f"m-{self.uid}-{case.replace('_', '-')}"

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One bounded request; an event stream is closed after its headers (body unread)."""
        req = self.http.build_request(method, path, json=json, headers={**bearer(token), **(headers or {})})
        r = self.http.send(req, stream=True)
        try:
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                r.read()
        finally:
            r.close()
        return r

    def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        return self.request("GET", path, token, headers=headers)

    def commit(self, token: str, space: str, writes: dict[str, Any], **headers: str) -> httpx.Response:
        body = {"writes": [{"key": k, "value": v} for k, v in writes.items()]}
        return self.request("POST", f"/v1/spaces/{space}/commit", token, json=body, headers=headers)

    def mint(self, name: str, *, tenant: str | None = None, **body: Any) -> str:
        subject = body.pop("subject", re.sub(r"[^A-Za-z0-9._@-]", "-", f"{name}-{self.uid}"))
        r = self.request(
            "POST", "/v1/admin/tokens", self.admin, json={"subject": subject, "tenant": tenant or self.ta, **body}
        )
        assert r.status_code == 201, r.text
        self.tok[name], self.ids[name], self.subject[name] = r.json()["token"], r.json()["id"], subject
        return self.tok[name]

    def readset(self, token: str, space: str, **headers: str) -> list[dict[str, Any]]:
        r = self.get(f"/v1/spaces/{space}/readset", token, **headers)
        assert r.status_code == 200, r.text
        return r.json()["reads"]  # type: ignore[no-any-return]

    def audit(self, token: str, query: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        r = self.get(f"/v1/admin/audit?limit={limit}{query}", token)
        assert r.status_code == 200, r.text
        return r.json()["events"]  # type: ignore[no-any-return]

    def events(self, token: str, space: str, n: int) -> list[dict[str, Any]]:
        """The first ``n`` commit events of the space's event stream."""
        out: list[dict[str, Any]] = []
        with self.http.stream("GET", f"/v1/spaces/{space}/events?after=0", headers=bearer(token)) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    out.append(json.loads(line[5:]))
                    if len(out) >= n:
                        break
        return out


def store_url(backend: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'agentbus.db'}"
    elif backend == "postgres":
        url = request.getfixturevalue("pg_database")
    else:
        return str(request.getfixturevalue("redis_url"))  # a fresh AGENTBUS_REDIS_PREFIX isolates it
    upgrade(url)  # in-process: much cheaper than a CLI subprocess
    return url


def auth_env(uid: str, **extra: str) -> dict[str, str]:
    return {
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_AUTH_CACHE_TTL_S": "0",
        "AGENTBUS_REDIS_PREFIX": f"sec{uid}",
        **{f"AGENTBUS_{k.upper()}": v for k, v in extra.items()},
    }


@pytest.fixture(scope="module", params=BACKENDS)
def sec(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sec]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"auth-{backend}")
    uid = uuid.uuid4().hex[:8]
    admin = "ab_" + secrets.token_urlsafe(32)
    env = auth_env(
        uid,
        bootstrap_admin_token=admin,
        default_tenant=f"adm-{uid}",
        auth_fail_limit="1000000",  # the matrix fails auth hundreds of times from one address
        sbus_compat="true",
    )
    srv = Server(store=store_url(backend, request, tmp), env=env, log_dir=tmp).start()
    http = httpx.Client(base_url=srv.url, timeout=TIMEOUT)
    sec = Sec(server=srv, backend=backend, http=http, admin=admin, uid=uid)
    try:
        setup(sec)
        yield sec
    finally:
        http.close()
        srv.stop()


def setup(sec: Sec) -> None:
    expired = sec.mint("expired", kind="admin", expires_in_s=5)  # expires while the rest is set up
    expires_at = time.time() + 5
    assert sec.get("/v1/whoami", expired).status_code == 200  # valid until it expires
    sec.mint("revoked", kind="admin")
    assert sec.request("DELETE", f"/v1/admin/tokens/{sec.ids['revoked']}", sec.admin).status_code == 200
    sec.mint("victim")
    sec.mint("alice")
    sec.mint("carol")  # a second agent of tenant A
    sec.mint("reader", scopes=["bus:read"])
    sec.mint("op", kind="operator")
    sec.mint(
        "allow", spaces=[f"allowed-{sec.uid}"], scopes=["bus:read", "bus:write", "broker:invoke", "traces:read"]
    )
    sec.mint("bob", tenant=sec.tb)
    sec.mint("opb", tenant=sec.tb, kind="operator")
    # One token per scope holding everything else, and one holding only that scope.
    for scope in ("bus:read", "bus:write", "traces:read", "broker:invoke"):
        others = sorted({"bus:read", "bus:write", "broker:invoke", "traces:read"} - {scope})
        sec.mint(f"no {scope}", scopes=others)
        sec.mint(f"only {scope}", scopes=[scope])
    sec.mint("no admin", kind="operator", scopes=["bus:read", "bus:write", "broker:invoke", "traces:read"])
    sec.tok["only admin"] = sec.admin
    # Tenant A's data.
    alice = sec.tok["alice"]
    assert sec.commit(alice, sec.shared, {"doc/secret": {"m": sec.marker}, f"doc/hidden-{sec.uid}": 1}).is_success
    assert sec.commit(alice, sec.a_only, {"k": sec.marker}).is_success
    assert sec.commit(alice, sec.allowed, {"k": "visible"}).is_success
    assert sec.get(f"/v1/spaces/{sec.shared}/shards/doc/secret", alice).status_code == 200  # alice's read set
    r = sec.request("POST", "/shard", alice, json={"key": "sb-k", "content": "init", "goal_tag": "g"})
    assert r.status_code == 201, r.text
    # Tenant B's own data under the same space name.
    assert sec.commit(sec.tok["bob"], sec.shared, {"b/own": "bob-value"}).is_success
    time.sleep(max(0.0, expires_at - time.time() + 0.3))


# --------------------------------------------------------------------------- 1. the route matrix


def test_every_route_is_classified() -> None:
    """A new route must be added to PUBLIC (with a reason) or ROUTES (with its scope)."""
    unlisted = [r for r in PROTECTED if r not in ROUTES]
    assert not unlisted, f"routes without a security classification: {unlisted}"
    stale = [r for r in [*ROUTES, *PUBLIC] if r not in ALL_ROUTES]
    assert not stale, f"classified routes the app no longer has: {stale}"
    assert len(PROTECTED) >= 20  # the enumeration itself works (routers are walked)


def fill(sec: Sec, route: str, case: str) -> tuple[str, str, Any]:
    method, template = route.split(" ", 1)
    spec = ROUTES[route]
    token_id = "tok_0000000000000000" if case == "right_scope" else sec.ids["victim"]
    path = template.replace("{space}", sec.probe_space(case)).replace("{key}", "k1").replace("{token_id}", token_id)
    return method, path, spec.body(sec, case) if spec.body else None


def assert_audited(sec: Sec, tenant: str, action: str, target: str, subject: str) -> None:
    events = sec.audit(sec.admin, f"&tenant={tenant}", limit=50)
    hits = [e for e in events if (e["action"], e["target"], e["subject"]) == (action, target, subject)]
    assert hits, f"denied request {target} by {subject} is not in the audit log"


MALFORMED = [
    "",
    "Bearer",
    "Basic YWRtaW46YWRtaW4=",
    "Token {admin}",
    "{admin}",
    "Bearer{admin}",
    "Bearer not-an-agentbus-token",
]


@pytest.mark.parametrize(("route", "case"), MATRIX)
def test_route_matrix(sec: Sec, route: str, case: str) -> None:
    assert route in ROUTES, f"{route} is not classified (see test_every_route_is_classified)"
    spec = ROUTES[route]
    method, path, body = fill(sec, route, case)

    def send(token: str | None = None, **headers: str) -> httpx.Response:
        return sec.request(method, path, token, json=body, headers=headers)

    if case == "no_token":
        assert_error(send(), 401, "missing_token")
    elif case == "malformed":
        for header in MALFORMED:
            value = header.format(admin=sec.admin)
            r = send(Authorization=value)
            assert_error(r, 401, "missing_token" if value == "" else "invalid_token")
    elif case == "unknown":
        assert_error(send("ab_" + secrets.token_urlsafe(32)), 401, "invalid_token")
        assert_error(send(sec.admin[:-1] + ("A" if sec.admin[-1] != "A" else "B")), 401, "invalid_token")
        assert_error(send(sec.admin + " extra"), 401, "invalid_token")
    elif case == "revoked":
        assert_error(send(sec.tok["revoked"]), 401, "token_revoked")
        assert_audited(sec, sec.ta, "auth.denied", f"{method} {path}", sec.subject["revoked"])
    elif case == "expired":
        assert_error(send(sec.tok["expired"]), 401, "token_expired")
        assert_audited(sec, sec.ta, "auth.denied", f"{method} {path}", sec.subject["expired"])
    elif case == "wrong_scope":
        name = "no admin" if spec.scope == "admin" else f"no {spec.scope}"
        err = assert_error(send(sec.tok[name]), 403, "missing_scope")
        assert err["type"] == "permission"
        assert_audited(sec, sec.ta, "access.denied", f"{method} {path}", sec.subject[name])
    else:
        token = sec.tok["alice"] if spec.scope is None else sec.tok[f"only {spec.scope}"]
        r = send(token)
        body_text = "" if r.headers.get("content-type", "").startswith("text/event-stream") else r.text
        assert r.status_code not in (401, 403), f"{route} refused a token holding {spec.scope}: {body_text}"
        assert r.status_code != 500, body_text
        if r.status_code >= 400 and " /v1/" in route:
            assert_error(r, r.status_code)
        return
    if spec.after_denied is not None:
        spec.after_denied(sec, case)


def test_auth_is_checked_before_input_validation(sec: Sec) -> None:
    """An anonymous caller learns nothing from validation: bad input without a token is 401."""
    for route in PROTECTED:
        if not route.startswith(("POST /v1", "DELETE /v1", "GET /v1")):
            continue
        method, template = route.split(" ", 1)
        path = template.replace("{space}", "bad space!").replace("{key}", "bad key").replace("{token_id}", "x")
        r = sec.request(method, path + "?limit=-5", json={"unexpected": True} if method == "POST" else None)
        assert_error(r, 401, "missing_token")


# --------------------------------------------------------------------------- tenants and allow-lists

READ_ROUTES = [
    "GET /v1/spaces/{space}/shards/{key}",
    "GET /v1/spaces/{space}/shards/{key}/history",
    "GET /v1/spaces/{space}/shards",
    "GET /v1/spaces/{space}/readset",
    "GET /v1/spaces/{space}/log",
]


def assert_no_leak(sec: Sec, r: httpx.Response) -> None:
    text = r.text
    for secret in (sec.marker, f"hidden-{sec.uid}", sec.subject["alice"]):
        assert secret not in text, f"{r.request.url.path} leaked {secret!r} of tenant A: {text[:300]}"


def normalized(r: httpx.Response, space: str) -> tuple[int, str]:
    """Status and body with the space name and the read-set start time taken out."""
    text = r.text.replace(space, "<space>")
    try:
        body = json.loads(text)
    except ValueError:
        return r.status_code, text
    if isinstance(body, dict):
        body.pop("started_at", None)
    return r.status_code, json.dumps(body, sort_keys=True)


@pytest.mark.parametrize("route", READ_ROUTES)
def test_foreign_space_is_indistinguishable_from_a_missing_one(sec: Sec, route: str) -> None:
    """Tenant B asking for a space only tenant A has gets exactly what a missing space gives."""
    bob = sec.tok["bob"]
    template = route.split(" ", 1)[1].replace("{key}", "k")
    foreign = sec.get(template.replace("{space}", sec.a_only), bob)
    missing = sec.get(template.replace("{space}", sec.nowhere), bob)
    assert normalized(foreign, sec.a_only) == normalized(missing, sec.nowhere)
    assert_no_leak(sec, foreign)
    if foreign.status_code >= 400:
        assert_error(foreign, 404)
    if route.endswith(("/log", "/history", "/{key}")):
        assert foreign.status_code == 404


def test_other_tenant_sees_only_its_own_namespace(sec: Sec) -> None:
    """Both tenants use one space name; tenant B sees its own data there and nothing of A's."""
    bob, sp = sec.tok["bob"], sec.shared
    assert sec.readset(bob, sp) == []  # alice's reads there are hers
    assert_error(sec.get(f"/v1/spaces/{sp}/shards/doc/secret", bob), 404, "shard_not_found")
    assert_error(sec.get(f"/v1/spaces/{sp}/shards/doc/secret/history", bob), 404, "shard_not_found")
    listing = sec.get(f"/v1/spaces/{sp}/shards?prefix=", bob)
    assert [s["key"] for s in listing.json()["shards"]] == ["b/own"]
    log = sec.get(f"/v1/spaces/{sp}/log", bob)
    assert [c["committed_by"] for c in log.json()["commits"]] == [sec.subject["bob"]]
    spaces = [s["space"] for s in sec.get("/v1/spaces", bob).json()["spaces"]]
    assert sp in spaces and sec.a_only not in spaces and sec.allowed not in spaces
    (event,) = sec.events(bob, sp, 1)
    assert event["committed_by"] == sec.subject["bob"]
    for r in (listing, log, sec.get("/v1/spaces", bob), sec.get(f"/v1/spaces/{sp}/readset", bob)):
        assert_no_leak(sec, r)
    # Tenant A's view is untouched by all of that.
    keys = sorted(s["key"] for s in sec.get(f"/v1/spaces/{sp}/shards", sec.tok["alice"]).json()["shards"])
    assert keys == sorted(["doc/secret", f"doc/hidden-{sec.uid}"])


def test_other_tenant_commits_never_touch_tenant_a(sec: Sec) -> None:
    bob, alice = sec.tok["bob"], sec.tok["alice"]
    before = sec.get(f"/v1/spaces/{sec.a_only}/log", alice).json()
    # Same space name, same key, "must not exist": it does not, in tenant B's namespace.
    body = {"writes": [{"key": "k", "value": "bob-overwrite", "expected_version": 0}]}
    r = sec.request("POST", f"/v1/spaces/{sec.a_only}/commit", bob, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["versions"] == {"k": 1}
    r = sec.request("POST", f"/v1/spaces/{sec.a_only}/commit", bob, json={"writes": [{"key": "k", "delete": True}]})
    assert r.status_code == 200, r.text
    shard = sec.get(f"/v1/spaces/{sec.a_only}/shards/k", alice).json()
    assert (shard["version"], shard["value"], shard["updated_by"]) == (1, sec.marker, sec.subject["alice"])
    assert sec.get(f"/v1/spaces/{sec.a_only}/log", alice).json() == before
    # Clearing "its" read set in the shared space leaves tenant A's read set alone.
    assert sec.request("DELETE", f"/v1/spaces/{sec.shared}/readset", bob).status_code == 204
    assert {"key": "doc/secret", "version": 1} in sec.readset(alice, sec.shared)


@pytest.mark.parametrize("route", SPACE_ROUTES)
def test_space_allow_list(sec: Sec, route: str) -> None:
    """A space outside the token's allow-list is a 404 identical to a missing space; audited."""
    allow = sec.tok["allow"]
    method, template = route.split(" ", 1)
    body = _commit_body(sec, "allow") if method == "POST" else None

    def send(space: str) -> httpx.Response:
        return sec.request(method, template.replace("{space}", space).replace("{key}", "k"), allow, json=body)

    outside = send(sec.a_only)
    assert_error(outside, 404, "space_not_found")
    assert_no_leak(sec, outside)
    assert normalized(outside, sec.a_only) == normalized(send(sec.nowhere), sec.nowhere)
    inside = send(sec.allowed)
    assert inside.status_code < 400 or inside.json()["error"]["code"] != "space_not_found", inside.text
    denied = [
        e
        for e in sec.audit(sec.admin, f"&tenant={sec.ta}")
        if e["action"] == "access.denied" and e["subject"] == sec.subject["allow"] and sec.a_only in e["target"]
    ]
    assert denied and denied[0]["status"] == 404, "allow-list denial not audited"
    # Nothing was written through the refusal.
    log = sec.get(f"/v1/spaces/{sec.a_only}/log", sec.tok["alice"]).json()["commits"]
    assert all(c["committed_by"] == sec.subject["alice"] for c in log)


def test_allow_list_hides_spaces_from_listing(sec: Sec) -> None:
    spaces = [s["space"] for s in sec.get("/v1/spaces", sec.tok["allow"]).json()["spaces"]]
    assert spaces == [sec.allowed]
    assert sec.get(f"/v1/spaces/{sec.allowed}/shards/k", sec.tok["allow"]).json()["value"] == "visible"


# --------------------------------------------------------------------------- 2. spoofing and read-set poisoning


def fresh_space(sec: Sec, **writes: Any) -> str:
    space = f"sp-{uuid.uuid4().hex[:10]}"
    assert sec.commit(sec.tok["alice"], space, writes or {"k": 0}).is_success
    return space


def test_x_agent_id_is_ignored_for_reads(sec: Sec) -> None:
    alice, carol = sec.tok["alice"], sec.tok["carol"]
    sp = fresh_space(sec, k=1)
    r = sec.get(f"/v1/spaces/{sp}/shards/k", alice, **{"X-Agent-Id": sec.subject["carol"]})
    assert r.status_code == 200
    assert sec.readset(carol, sp) == []
    assert sec.readset(alice, sp) == [{"key": "k", "version": 1}]
    who = sec.get("/v1/whoami", alice, **{"X-Agent-Id": sec.subject["carol"]}).json()
    assert who["subject"] == sec.subject["alice"]
    rs = sec.get(f"/v1/spaces/{sp}/readset", alice, **{"X-Agent-Id": sec.subject["carol"]}).json()
    assert rs["subject"] == sec.subject["alice"]


def test_x_agent_id_is_ignored_for_commits(sec: Sec) -> None:
    alice = sec.tok["alice"]
    sp = fresh_space(sec, k=1)
    r = sec.commit(alice, sp, {"k": 2}, **{"X-Agent-Id": sec.subject["carol"]})
    assert r.status_code == 200, r.text
    log = sec.get(f"/v1/spaces/{sp}/log", alice).json()["commits"]
    assert [c["committed_by"] for c in log] == [sec.subject["alice"]] * 2
    assert sec.get(f"/v1/spaces/{sp}/shards/k", alice).json()["updated_by"] == sec.subject["alice"]
    history = sec.get(f"/v1/spaces/{sp}/shards/k/history", alice).json()["versions"]
    assert {v["updated_by"] for v in history} == {sec.subject["alice"]}
    # Body fields cannot name a committer either.
    body = {"writes": [{"key": "k", "value": 3}], "committed_by": sec.subject["carol"]}
    assert_error(sec.request("POST", f"/v1/spaces/{sp}/commit", alice, json=body), 422)


def test_spoofed_reads_cannot_poison_another_agents_commit(sec: Sec) -> None:
    """If alice could record reads as carol, carol's next commit would fail as stale."""
    alice, carol = sec.tok["alice"], sec.tok["carol"]
    sp = fresh_space(sec, k=1, j=1)
    for session in ("", "s1"):
        headers = {"X-Agent-Id": sec.subject["carol"], "X-Agent-Session": session}
        assert sec.get(f"/v1/spaces/{sp}/shards/k", alice, **headers).status_code == 200
        assert sec.get(f"/v1/spaces/{sp}/shards?prefix=", alice, **headers).status_code == 200
    assert sec.commit(alice, sp, {"k": 2}).is_success  # k and the listing are now stale for alice
    r = sec.commit(carol, sp, {"j": 2})
    assert r.status_code == 200, f"carol's commit failed on reads she never made: {r.text}"
    r = sec.commit(carol, sp, {"j": 3}, **{"X-Agent-Session": "s1"})
    assert r.status_code == 200, r.text


def test_a_reader_cannot_clear_another_agents_read_set(sec: Sec) -> None:
    alice, carol = sec.tok["alice"], sec.tok["carol"]
    sp = fresh_space(sec, k=1)
    for session in ("", "work"):
        assert sec.get(f"/v1/spaces/{sp}/shards/k", carol, **{"X-Agent-Session": session}).status_code == 200
        headers = {"X-Agent-Id": sec.subject["carol"], "X-Agent-Session": session}
        assert sec.request("DELETE", f"/v1/spaces/{sp}/readset", sec.tok["reader"], headers=headers).status_code == 204
        assert sec.request("DELETE", f"/v1/spaces/{sp}/readset", alice, headers=headers).status_code == 204
        assert sec.readset(carol, sp, **{"X-Agent-Session": session}) == [{"key": "k", "version": 1}]
    # A commit with explicit reads only ever concerns the committer's own read set.
    body = {"writes": [{"key": "x", "value": 1}], "reads": [{"key": "k", "version": 1}]}
    assert sec.request("POST", f"/v1/spaces/{sp}/commit", alice, json=body).status_code == 200
    assert sec.readset(carol, sp) == [{"key": "k", "version": 1}]


def test_sessions_separate_tasks_of_one_principal_only(sec: Sec) -> None:
    alice, carol = sec.tok["alice"], sec.tok["carol"]
    sp = fresh_space(sec, k=1)
    s1 = {"X-Agent-Session": "task-1"}
    assert sec.get(f"/v1/spaces/{sp}/shards/k", alice, **s1).status_code == 200
    assert sec.readset(alice, sp, **s1) == [{"key": "k", "version": 1}]
    assert sec.readset(alice, sp, **{"X-Agent-Session": "task-2"}) == []
    assert sec.readset(alice, sp) == []
    assert sec.readset(carol, sp, **s1) == []  # the same session name of another agent is another read set
    assert sec.commit(carol, sp, {"k": 2}, **s1).is_success
    assert sec.commit(alice, sp, {"other": 1}, **{"X-Agent-Session": "task-2"}).status_code == 200
    r = sec.commit(alice, sp, {"other": 2}, **s1)
    assert r.status_code == 409 and r.json()["error"]["code"] == "stale_read", r.text
    assert_error(sec.get(f"/v1/spaces/{sp}/readset", alice, **{"X-Agent-Session": "bad session!"}), 422)


def test_idempotency_keys_are_per_principal(sec: Sec) -> None:
    """Reusing another agent's Idempotency-Key neither replays its outcome nor blocks the caller."""
    alice, carol = sec.tok["alice"], sec.tok["carol"]
    sp = fresh_space(sec)
    key = {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"}
    first = sec.commit(alice, sp, {"a": 1}, **key)
    assert first.status_code == 200
    other = sec.commit(carol, sp, {"c": 1}, **key)
    assert other.status_code == 200, other.text
    assert "idempotent-replayed" not in other.headers
    assert other.json()["commit_id"] != first.json()["commit_id"]
    assert sec.get(f"/v1/spaces/{sp}/shards/c", carol).status_code == 200
    bob_r = sec.commit(sec.tok["bob"], sp, {"a": 1}, **key)
    assert bob_r.status_code == 200 and bob_r.json()["commit_id"] != first.json()["commit_id"]


def test_sbus_agent_id_names_a_session_of_the_caller_only(sec: Sec) -> None:
    """With auth on, S-Bus's agent_id (query or body) is only a session under the token's principal."""
    alice, carol = sec.tok["alice"], sec.tok["carol"]
    as_carol = {"X-Agent-Session": sec.subject["carol"]}
    as_alice = {"X-Agent-Session": sec.subject["alice"]}
    key = f"sbk-{uuid.uuid4().hex[:8]}"
    assert sec.request("POST", "/shard", alice, json={"key": key, "content": "c0"}).status_code == 201
    assert sec.get(f"/shard/{key}?agent_id={sec.subject['carol']}", alice).status_code == 200
    space = sec.get("/stats", alice).json()["space"]
    assert sec.readset(carol, space) == [] and sec.readset(carol, space, **as_carol) == []
    assert {"key": key, "version": 1} in sec.readset(alice, space, **as_carol)
    # Carol "starting a session for alice" touches only carol's own read sets.
    assert sec.get(f"/shard/{key}?agent_id={sec.subject['alice']}", alice).status_code == 200
    session = sec.request("POST", "/session", carol, json={"agent_id": sec.subject["alice"]})
    assert session.status_code == 200, session.text
    assert {"key": key, "version": 1} in sec.readset(alice, space, **as_alice), "carol cleared alice's read set"
    body = {"key": key, "expected_version": 0, "delta": "c1", "agent_id": sec.subject["carol"]}
    r = sec.request("POST", "/commit/v2", alice, json=body)
    assert r.status_code == 200, r.text
    log = sec.get(f"/v1/spaces/{space}/log?limit=1000", alice).json()["commits"]
    assert log[-1]["committed_by"] == sec.subject["alice"]
    assert sec.get(f"/shard/{key}", carol).json()["content"] == "c1"


# --------------------------------------------------------------------------- 3. admin API and audit


def test_only_admin_manages_tokens(sec: Sec) -> None:
    for name in ("alice", "op", "no admin"):
        token = sec.tok[name]
        assert_error(sec.request("POST", "/v1/admin/tokens", token, json={"subject": "x"}), 403, "missing_scope")
        assert_error(sec.get("/v1/admin/tokens", token), 403, "missing_scope")
        r = sec.request("DELETE", f"/v1/admin/tokens/{sec.ids['victim']}", token)
        assert_error(r, 403, "missing_scope")
    assert sec.get("/v1/whoami", sec.tok["victim"]).status_code == 200


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"scopes": ["bus:read", "root"]}, "invalid_scope"),
        ({"scopes": ["admin"]}, "invalid_scope"),
        ({"kind": "operator", "scopes": ["admin", "traces:read"]}, "invalid_scope"),
        ({"kind": "superuser"}, "invalid_kind"),
        ({"subject": "not valid!"}, "invalid_agent_id"),
        ({"tenant": "no/slashes"}, "invalid_space"),
        ({"spaces": ["ok", "bad space"]}, "invalid_space"),
        ({"expires_in_s": 0}, None),
        ({"expires_in_s": -5}, None),
        ({"token": "ab_" + "x" * 43}, None),  # nobody chooses their own secret
        ({"hash": "0" * 64}, None),
        ({"id": "tok_0000000000000001"}, None),
    ],
)
def test_invalid_token_requests_are_422(sec: Sec, body: dict[str, Any], code: str | None) -> None:
    subject = body.get("subject", f"bad-{uuid.uuid4().hex[:8]}")
    r = sec.request("POST", "/v1/admin/tokens", sec.admin, json={"tenant": sec.ta, **body, "subject": subject})
    assert_error(r, 422, code)
    listed = sec.get("/v1/admin/tokens", sec.admin).json()["tokens"]
    assert not [t for t in listed if t["subject"] == subject], "a refused request created a token"


def test_token_is_shown_once_and_never_listed(sec: Sec) -> None:
    r = sec.request("POST", "/v1/admin/tokens", sec.admin, json={"subject": f"once-{sec.uid}", "tenant": sec.ta})
    assert r.status_code == 201
    created = r.json()
    plain = created["token"]
    assert TOKEN_RE.fullmatch(plain) and "hash" not in created
    digest = hashlib.sha256(plain.encode()).hexdigest()
    for path in ("/v1/admin/tokens", f"/v1/admin/tokens?tenant={sec.ta}", "/v1/admin/audit?limit=1000"):
        listed = sec.get(path, sec.admin)
        assert plain not in listed.text and digest not in listed.text, f"{path} shows a token secret"
        assert plain[3:20] not in listed.text
    for t in sec.get("/v1/admin/tokens", sec.admin).json()["tokens"]:
        assert "token" not in t and "hash" not in t
    revoked = sec.request("DELETE", f"/v1/admin/tokens/{created['id']}", sec.admin)
    assert revoked.status_code == 200 and plain not in revoked.text and digest not in revoked.text
    assert revoked.json()["revoked_at"] is not None
    assert_error(sec.get("/v1/whoami", plain), 401, "token_revoked")
    assert_error(sec.request("DELETE", "/v1/admin/tokens/tok_doesnotexist", sec.admin), 404, "token_not_found")


def test_audit_records_admin_actions_and_denials(sec: Sec) -> None:
    t0 = time.time() - 1
    r = sec.request("POST", "/v1/admin/tokens", sec.admin, json={"subject": f"audited-{sec.uid}", "tenant": sec.ta})
    tid, plain = r.json()["id"], r.json()["token"]
    assert sec.request("DELETE", f"/v1/admin/tokens/{tid}", sec.admin).status_code == 200
    probe = f"/v1/spaces/audit-{sec.uid}/log"
    sec.get(probe, plain)  # revoked
    sec.get(probe, "ab_" + secrets.token_urlsafe(32))  # unknown
    sec.get(probe)  # missing
    sec.get(probe, sec.tok["no bus:read"])  # wrong scope
    t1 = time.time() + 1
    events = sec.audit(sec.admin)

    def find(action: str, **match: Any) -> dict[str, Any]:
        for e in events:
            if e["action"] == action and all(e.get(k) == v or e["detail"].get(k) == v for k, v in match.items()):
                assert t0 <= e["at"] <= t1, e
                return e
        raise AssertionError(f"no {action} {match} in the audit log: {events[:10]}")

    created = find("token.create", target=tid)
    assert (created["subject"], created["tenant"], created["status"]) == ("admin", sec.admin_tenant, 201)
    assert created["detail"]["subject"] == f"audited-{sec.uid}" and created["client"]
    assert find("token.revoke", target=tid)["subject"] == "admin"
    revoked = find("auth.denied", target=f"GET {probe}", reason="revoked_token")
    assert (revoked["tenant"], revoked["status"], revoked["detail"]["token_id"]) == (sec.ta, 401, tid)
    find("auth.denied", target=f"GET {probe}", reason="unknown_token")
    find("auth.denied", target=f"GET {probe}", reason="missing_token")
    scope = find("access.denied", target=f"GET {probe}")
    assert (scope["subject"], scope["tenant"], scope["status"]) == (sec.subject["no bus:read"], sec.ta, 403)
    assert plain not in json.dumps(events)


def test_denials_with_hostile_paths_are_audited(sec: Sec) -> None:
    """The path of a refused request is the caller's choice; it must not keep the refusal out of the log."""
    marker = f"hostile-{uuid.uuid4().hex[:8]}"
    assert_error(sec.get(f"/v1/spaces/{marker}%00x/log", "ab_" + secrets.token_urlsafe(32)), 401, "invalid_token")
    assert_error(sec.get(f"/v1/spaces/{marker}%00y/log", sec.tok["no bus:read"]), 403, "missing_scope")
    events = [e for e in sec.audit(sec.admin) if marker in e["target"]]
    assert {e["action"] for e in events} == {"auth.denied", "access.denied"}, f"denials not audited: {events}"


def test_operator_sees_only_its_tenants_audit(sec: Sec) -> None:
    sec.get("/v1/admin/tokens", sec.tok["alice"])  # denial in tenant A
    sec.get("/v1/admin/tokens", sec.tok["bob"])  # denial in tenant B
    for op, own, other in (("op", sec.ta, sec.tb), ("opb", sec.tb, sec.ta)):
        for query in ("", f"&tenant={other}", "&tenant="):
            events = sec.audit(sec.tok[op], query)
            assert events, f"{op} sees no events of its own tenant"
            assert {e["tenant"] for e in events} == {own}, f"{op} saw another tenant's audit events"
    everything = sec.audit(sec.admin)
    assert {sec.ta, sec.tb} <= {e["tenant"] for e in everything}
    assert {e["tenant"] for e in sec.audit(sec.admin, f"&tenant={sec.tb}")} == {sec.tb}
    assert_error(sec.get("/v1/admin/audit", sec.tok["alice"]), 403, "missing_scope")


# --------------------------------------------------------------------------- 6. headers, CORS, public routes

HEADER_PROBES = [
    ("GET", "/v1/whoami", True, None, 200),
    ("GET", "/v1/whoami", False, None, 401),
    ("GET", "/v1/no-such-route", False, None, 404),
    ("POST", "/v1/spaces/h/commit", True, {"writes": []}, 422),
    ("GET", "/v1/spaces/h/events", True, None, 200),
    ("GET", "/healthz", False, None, 200),
    ("GET", "/readyz", False, None, 200),
]


@pytest.mark.parametrize(("method", "path", "authed", "body", "status"), HEADER_PROBES)
def test_security_headers(sec: Sec, method: str, path: str, authed: bool, body: Any, status: int) -> None:
    r = sec.request(method, path, sec.admin if authed else None, json=body)
    assert r.status_code == status
    h = r.headers
    assert h.get("x-content-type-options") == "nosniff"
    assert h.get("x-frame-options") == "DENY"
    assert h.get("referrer-policy") == "no-referrer"
    assert "no-store" in h.get("cache-control", ""), f"{path}: cache-control {h.get('cache-control')!r}"
    csp = h.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp


def test_docs_are_framable_by_nobody(sec: Sec) -> None:
    r = sec.get("/docs")
    assert r.status_code == 200
    assert r.headers.get("x-frame-options") == "DENY" and r.headers.get("x-content-type-options") == "nosniff"


def test_public_routes_reveal_nothing(sec: Sec) -> None:
    """Probes answer without a token, so they must not describe the deployment."""
    store = sec.server.store
    host_or_path = store.split("://", 1)[1].rsplit("@", 1)[-1].split("?")[0]
    for path in ("/healthz", "/readyz", "/health"):
        r = sec.get(path)
        assert r.status_code == 200
        assert host_or_path not in r.text, f"{path} reveals the store location to anonymous callers: {r.text}"
        assert sec.admin not in r.text


def test_cors_is_closed_by_default(sec: Sec) -> None:
    origin = {"Origin": "http://evil.example"}
    pre = sec.request(
        "OPTIONS",
        "/v1/whoami",
        headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"},
    )
    assert "access-control-allow-origin" not in pre.headers
    assert pre.status_code >= 400
    r = sec.get("/v1/whoami", sec.admin, **origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# --------------------------------------------------------------------------- 7. CLI


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(sec: Sec, *args: str, in_process: bool = True) -> CliResult:
    """``agentbus ARGS`` on the server's store: in this process (an interpreter start costs
    seconds on a busy machine), or as ``python -m agentbus.cli`` for the real entry point."""
    env = {**sec.server.env, "AGENTBUS_STORE": sec.server.store}
    if not in_process:
        out = subprocess.run(
            [sys.executable, "-m", "agentbus.cli", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
            timeout=90,
        )
        return CliResult(out.returncode, out.stdout, out.stderr)
    from typer.testing import CliRunner

    from agentbus.cli import app

    res = CliRunner().invoke(app, list(args), env=env)
    return CliResult(res.exit_code, res.stdout, res.stderr)


def test_cli_token_lifecycle(sec: Sec) -> None:
    subject = f"cli-{sec.uid}"
    out = run_cli(sec, "token", "create", "--subject", subject, "--tenant", sec.ta, "--json", in_process=False)
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    plain, tid = created["token"], created["id"]
    who = sec.get("/v1/whoami", plain)
    assert who.status_code == 200 and (who.json()["subject"], who.json()["tenant"]) == (subject, sec.ta)
    assert set(who.json()["scopes"]) == {"bus:read", "bus:write", "broker:invoke"}

    listed = run_cli(sec, "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert plain not in listed.stdout and hashlib.sha256(plain.encode()).hexdigest() not in listed.stdout
    mine = [t for t in json.loads(listed.stdout) if t["id"] == tid]
    assert len(mine) == 1 and "token" not in mine[0] and "hash" not in mine[0]

    out = run_cli(sec, "token", "revoke", tid)
    assert out.returncode == 0, out.stderr
    assert_error(sec.get("/v1/whoami", plain), 401, "token_revoked")

    audit = run_cli(sec, "audit", "--json", "--limit", "1000")
    assert audit.returncode == 0, audit.stderr
    actions = {(e["action"], e["target"]) for e in json.loads(audit.stdout) if e["subject"].startswith("cli:")}
    assert {("token.create", tid), ("token.revoke", tid)} <= actions
    assert plain not in audit.stdout

    bad = run_cli(sec, "token", "create", "--subject", subject, "--scope", "admin")
    assert bad.returncode == 2 and "admin" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- 4. bootstrap (own stores)


@pytest.fixture
def fresh_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store: no admin token in it yet (the shared PostgreSQL test database has some)."""
    if backend != "postgres":
        yield store_url(backend, request, tmp_path)
        return
    import asyncpg

    name = f"agentbus_boot_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    request.getfixturevalue("pg_database")  # skips (or fails in CI) when PostgreSQL is down
    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        upgrade(url)
        yield url
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def printed_tokens(log_dir: Path) -> list[str]:
    return [t for log in sorted(log_dir.glob("server-*.log")) for t in TOKEN_RE.findall(log.read_text())]


def test_bootstrap_prints_a_generated_admin_token_once(fresh_store: str, tmp_path: Path) -> None:
    srv = Server(store=fresh_store, env=auth_env(uuid.uuid4().hex[:8]), log_dir=tmp_path)
    try:
        srv.start()
        (token,) = printed_tokens(tmp_path)
        who = httpx.get(f"{srv.url}/v1/whoami", headers=bearer(token), timeout=TIMEOUT)
        assert who.status_code == 200 and who.json()["kind"] == "admin" and "admin" in who.json()["scopes"]
        srv.stop()
        srv.start()  # a restart finds the admin and prints nothing new
        assert printed_tokens(tmp_path) == [token]
        assert httpx.get(f"{srv.url}/v1/whoami", headers=bearer(token), timeout=TIMEOUT).status_code == 200
    finally:
        srv.stop()


def test_configured_bootstrap_token(sec: Sec) -> None:
    """The shared server was started with AGENTBUS_BOOTSTRAP_ADMIN_TOKEN: it works, nothing was printed."""
    who = sec.get("/v1/whoami", sec.admin).json()
    assert who["kind"] == "admin" and who["tenant"] == sec.admin_tenant
    assert printed_tokens(sec.server.log_dir or Path("/nonexistent")) == []
    logs = "".join(p.read_text() for p in (sec.server.log_dir or Path()).glob("server-*.log"))
    assert sec.admin not in logs, "the configured admin token was written to the log"


# --------------------------------------------------------------------------- 5. failed-auth limit, open CORS


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sec]:
    """SQLite server with a tiny failed-auth limit and one allowed CORS origin (backend-independent features)."""
    tmp = tmp_path_factory.mktemp("edge")
    uid = uuid.uuid4().hex[:8]
    admin = "ab_" + secrets.token_urlsafe(32)
    url = f"sqlite:///{tmp / 'agentbus.db'}"
    upgrade(url)
    env = auth_env(uid, bootstrap_admin_token=admin, auth_fail_limit="5", cors_origins='["http://a.example"]')
    srv = Server(store=url, env=env, log_dir=tmp).start()
    http = httpx.Client(base_url=srv.url, timeout=TIMEOUT)
    try:
        yield Sec(server=srv, backend="sqlite", http=http, admin=admin, uid=uid)
    finally:
        http.close()
        srv.stop()


def peer(edge: Sec, address: str) -> httpx.Client:
    """A client connecting from another loopback address: a distinct peer, no headers involved."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=edge.server.url, timeout=TIMEOUT, transport=transport)


def test_failed_auth_rate_limit(edge: Sec) -> None:
    with peer(edge, "127.0.0.3") as client, peer(edge, "127.0.0.4") as other:
        for _ in range(5):
            assert_error(client.get("/v1/whoami", headers=bearer("ab_" + secrets.token_urlsafe(32))), 401)
        err = assert_error(client.get("/v1/whoami", headers=bearer("ab_x")), 429, "auth_rate_limited")
        assert err["type"] == "rate_limited" and err["retry_after_ms"] >= 1000
        assert_error(client.get("/v1/spaces"), 429, "auth_rate_limited")
        # Per client: another address is not affected.
        assert_error(other.get("/v1/whoami", headers=bearer("ab_" + secrets.token_urlsafe(32))), 401, "invalid_token")
    denied = [e for e in edge.audit(edge.admin) if e["client"] == "127.0.0.3"]
    assert len(denied) == 5, "every refused attempt before the limit is audited (and only those)"


def test_failed_auth_limit_does_not_lock_out_valid_tokens(edge: Sec) -> None:
    with peer(edge, "127.0.0.5") as client:
        for _ in range(6):
            client.get("/v1/whoami", headers=bearer("ab_" + secrets.token_urlsafe(32)))
        assert client.get("/v1/whoami", headers=bearer(edge.admin)).status_code == 200


def test_cors_open_for_a_configured_origin(edge: Sec) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = edge.request("OPTIONS", "/v1/spaces/c/commit", headers={"Origin": "http://a.example", **ask})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == "http://a.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert ok.headers.get("access-control-allow-credentials") != "true"
    evil = edge.request("OPTIONS", "/v1/spaces/c/commit", headers={"Origin": "http://evil.example", **ask})
    assert "access-control-allow-origin" not in evil.headers
    r = edge.get("/v1/whoami", edge.admin, Origin="http://a.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://a.example"
    r = edge.get("/v1/whoami", edge.admin, Origin="http://evil.example")
    assert "access-control-allow-origin" not in r.headers


def test_x_forwarded_for_cannot_evade_the_limit(edge: Sec) -> None:
    """Runs last on the edge server: afterwards 127.0.0.1 may be rate-limited there."""
    for i in range(6):
        r = edge.get("/v1/whoami", "ab_" + secrets.token_urlsafe(32), **{"X-Forwarded-For": f"198.51.100.{i}"})
    assert r.status_code == 429, r.text
