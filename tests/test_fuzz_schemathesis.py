"""Fuzz the live server's OpenAPI contract with schemathesis: every operation, authenticated.

A real agentbus process (auth on, S-Bus routes on) is fuzzed through ``/openapi.json`` with
an admin token, so every route is reachable past authentication. For each generated request:

* no 500 (and no other 5xx except a well-formed, retryable 502/503/504: the broker has no
  model endpoint configured here, and "upstream unavailable" is the right answer then);
* every 4xx/5xx body is the one error shape ``{"error":{"type","code","message","retryable"}}``
  (S-Bus routes may answer in S-Bus's shape ``{"error": "<Name>", "detail", ...}``);
* no stack trace in any body.

Response-schema conformance is not checked: FastAPI documents ``422`` as its own
``HTTPValidationError``, which agentbus deliberately replaces with the error shape.

Random generation rarely draws the values that break storage layers (integers past 64 bits,
non-finite numbers, NUL characters), so ``test_boundary_values`` also walks the same document
and sends each such value in every parameter and body field, on every backend.

Bounded: ``AGENTBUS_FUZZ_EXAMPLES`` examples per operation (default 25) and a wall-clock
budget ``AGENTBUS_FUZZ_BUDGET_S`` (default 60 s, shared out per operation) after which the
remaining examples are not sent. ``AGENTBUS_FUZZ_BACKENDS`` (default ``sqlite``) picks the
backends schemathesis fuzzes, e.g. ``sqlite,postgres``. A failure prints a curl command that
reproduces it.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from agentbus.migrate import upgrade
from tests.conftest import BACKENDS, Server

EXAMPLES = int(os.environ.get("AGENTBUS_FUZZ_EXAMPLES", "25"))
BUDGET_S = float(os.environ.get("AGENTBUS_FUZZ_BUDGET_S", "60"))
FUZZ_BACKENDS = [b for b in os.environ.get("AGENTBUS_FUZZ_BACKENDS", "sqlite").split(",") if b]
SBUS_PATHS = ("/shard", "/shards", "/commit", "/session", "/stats", "/health", "/admin/")
TIMEOUT_S = 15.0


@dataclass
class Target:
    backend: str
    url: str
    headers: dict[str, str]
    token_id: str
    """The admin token's id: the fuzzer learns ids from responses and must not revoke its own."""
    budget_per_operation: float
    started: dict[str, float] = field(default_factory=dict)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def over_budget(self, label: str) -> bool:
        now = time.monotonic()
        return now - self.started.setdefault(label, now) > self.budget_per_operation


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"fuzz-{backend}")
    if backend == "sqlite":
        store = f"sqlite:///{tmp / 'agentbus.db'}"
    elif backend == "postgres":
        store = request.getfixturevalue("pg_database")
    else:
        store = str(request.getfixturevalue("redis_url"))
    upgrade(store)
    admin = "ab_" + secrets.token_urlsafe(32)
    env = {
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": admin,
        "AGENTBUS_DEFAULT_TENANT": f"fuzz-{uuid.uuid4().hex[:8]}",
        "AGENTBUS_REDIS_PREFIX": f"fz{uuid.uuid4().hex[:8]}",
        "AGENTBUS_AUTH_FAIL_LIMIT": "1000000",
        "AGENTBUS_SBUS_COMPAT": "true",
    }
    srv = Server(store=store, env=env, log_dir=tmp).start()
    n_operations = sum(
        1 for ops in httpx.get(f"{srv.url}/openapi.json", timeout=TIMEOUT_S).json()["paths"].values() for _ in ops
    )
    headers = {"Authorization": f"Bearer {admin}"}
    token_id = httpx.get(f"{srv.url}/v1/whoami", headers=headers, timeout=TIMEOUT_S).json()["token_id"]
    target = Target(backend, srv.url, headers, token_id, BUDGET_S / max(1, n_operations))
    try:
        yield target
    finally:
        srv.stop()
        summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(target.statuses.items()))
        print(f"\nfuzzed {backend}: {sum(target.statuses.values())} requests ({summary})")


@pytest.fixture(scope="module")
def api_schema(fuzz_target: Target) -> Any:
    if fuzz_target.backend not in FUZZ_BACKENDS:
        pytest.skip(f"schemathesis fuzzes {FUZZ_BACKENDS} (AGENTBUS_FUZZ_BACKENDS); boundary values run here")
    return schemathesis.openapi.from_url(f"{fuzz_target.url}/openapi.json", timeout=TIMEOUT_S)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _pytest9_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis' lazy schemas rename ``node._nodeid``, an attribute pytest 9 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def is_sbus(path: str) -> bool:
    return not path.startswith("/v1/") and path.startswith(SBUS_PATHS)


def check_error_body(path: str, status: int, body: Any, repro: str) -> None:
    """The one error shape (or S-Bus's on S-Bus routes); a 5xx must say it is retryable."""
    assert isinstance(body, dict), f"{status} without a JSON object body\n{repro}"
    err = body.get("error")
    if is_sbus(path) and isinstance(err, str):
        assert isinstance(body.get("detail"), str) and isinstance(body.get("code"), str), f"{body}\n{repro}"
        fields = body
    else:
        assert set(body) == {"error"} and isinstance(err, dict), f"not the error shape: {body}\n{repro}"
        for name, typ in (("type", str), ("code", str), ("message", str), ("retryable", bool)):
            assert isinstance(err.get(name), typ), f"error.{name} missing or not {typ.__name__}: {body}\n{repro}"
        fields = err
    if status >= 500:
        assert fields.get("retryable") is True, f"{status} not marked retryable: {body}\n{repro}"


def send_stream(case: Any, target: Target) -> tuple[int, str, bytes]:
    """An event stream never ends: read its head (and the body only of an error)."""
    kw = case.as_transport_kwargs(base_url=target.url, headers=target.headers)
    with httpx.stream(
        kw["method"], kw["url"], params=kw.get("params"), headers=kw.get("headers"), timeout=TIMEOUT_S
    ) as r:
        body = r.read() if r.status_code != 200 else b""
        return r.status_code, r.headers.get("content-type", ""), body


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_openapi_fuzz(case: Any, fuzz_target: Target) -> None:
    if fuzz_target.over_budget(case.operation.label):
        return  # this operation's share of the time budget is spent: the remaining examples are not sent
    path = case.operation.path
    if fuzz_target.token_id in str(case.path_parameters):
        return  # revoking the fuzzer's own token would turn every later request into a 401
    repro = case.as_curl_command(headers=fuzz_target.headers)
    if path.endswith("/events"):
        status, ctype, raw = send_stream(case, fuzz_target)
    else:
        response = case.call(base_url=fuzz_target.url, headers=fuzz_target.headers, timeout=TIMEOUT_S)
        status, ctype, raw = response.status_code, response.headers.get("content-type", [""])[0], response.content
    fuzz_target.statuses[case.operation.label, status] += 1
    text = raw.decode("utf-8", "replace")
    assert status != 401, f"the fuzzer's admin token stopped working: {text[:300]}\n{repro}"
    assert status != 500, f"500 from {case.operation.label}: {text[:500]}\n{repro}"
    assert status < 500 or status in (502, 503, 504), f"{status} from {case.operation.label}: {text[:500]}\n{repro}"
    assert "Traceback" not in text, f"stack trace in a response\n{repro}"
    if status >= 400:
        assert ctype.startswith("application/json"), f"{status} error with content-type {ctype!r}\n{repro}"
        check_error_body(path, status, orjson.loads(raw), repro)


# --------------------------------------------------------------------------- boundary values from the schema

PLACEHOLDER = "__agentbus_fuzz_value__"
EXTREMES: dict[str, list[str]] = {
    # JSON text of the value (also used verbatim in query strings)
    "integer": [str(2**63), str(2**64 + 1), str(10**40), str(-(2**63) - 1)],
    "number": ["1e400", "-1e400"],
    "string": [json.dumps("a\x00b"), json.dumps("\u202e\ufffd\U0001f600")],
}
SAFE_PATH = {"space": "fz", "key": "k", "token_id": "tok_0000000000000000"}
VALID_BODY: dict[str, dict[str, Any]] = {
    "POST /v1/admin/tokens": {
        "kind": "agent",
        "scopes": ["bus:read"],
        "budgets": {"max_tokens": 1000, "max_cost": 1.0, "window_s": 60.0},
    },
    # OpenAI bodies are free-form in the schema; these are the fields the broker reads.
    "POST /v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "k"}], "max_tokens": 1},
    "POST /v1/completions": {"model": "m", "prompt": "k", "max_tokens": 1},
    "POST /v1/embeddings": {"model": "m", "input": "k"},
}
"""Where a schema-derived body would be refused for a reason the schema does not state."""


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        schema = resolve(spec, options[0]) if options else {}
    return schema


def kind_of(spec: dict[str, Any], schema: dict[str, Any]) -> str:
    return str(resolve(spec, schema).get("type", "any"))


def instance(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A value of ``schema`` with every property present (so each one can be varied)."""
    schema = resolve(spec, schema)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: instance(spec, v) for k, v in props.items()} if props else {"k": "v"}
    if kind == "array":
        return [instance(spec, schema.get("items", {}))]
    if kind == "integer":
        return max(0, int(schema.get("minimum", 0)))
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return False
    if "enum" in schema:
        return schema["enum"][0]
    return "k"


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        yield path, "integer"
    elif isinstance(value, float):
        yield path, "number"
    elif isinstance(value, str):
        yield path, "string"


def with_leaf(value: Any, path: tuple[Any, ...]) -> Any:
    out = copy.deepcopy(value)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = PLACEHOLDER
    return out


@dataclass
class Probe:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: str | None = None

    def curl(self, target: Target) -> str:
        url = httpx.URL(target.url + self.path, params=self.params)
        data = f" -H 'Content-Type: application/json' -d {json.dumps(self.body)}" if self.body is not None else ""
        return f"curl -X {self.method} '{url}' -H 'Authorization: Bearer <admin>'{data}"


def probes(spec: dict[str, Any]) -> Iterator[Probe]:
    for template, ops in spec["paths"].items():
        path = template
        for name, safe in SAFE_PATH.items():
            path = path.replace("{" + name + "}", safe)
        for method, op in ops.items():
            method = method.upper()
            body_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            base = instance(spec, body_schema) if body_schema is not None else None
            if isinstance(base, dict):
                if base == {"k": "v"}:
                    base = {}
                base.update(VALID_BODY.get(f"{method} {template}", {}))
            base_text = json.dumps(base) if base is not None else None
            for param in op.get("parameters", []):
                if param["in"] != "query":
                    continue
                for value in EXTREMES.get(kind_of(spec, param.get("schema", {})), []):
                    raw = json.loads(value) if value.startswith('"') else value
                    yield Probe(method, path, {param["name"]: raw}, base_text)
            if base is None:
                continue
            for leaf, kind in leaves(base):
                template_text = json.dumps(with_leaf(base, leaf))
                for value in EXTREMES[kind]:
                    yield Probe(method, path, {}, template_text.replace(json.dumps(PLACEHOLDER), value))


def send_probe(target: Target, probe: Probe) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    headers = {**target.headers, "Content-Type": "application/json"}
    timeout = httpx.Timeout(TIMEOUT_S, read=3.0 if probe.path.endswith("/events") else TIMEOUT_S)
    try:
        with httpx.stream(
            probe.method,
            target.url + probe.path,
            params=probe.params,
            content=probe.body,
            headers=headers,
            timeout=timeout,
        ) as r:
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    for _ in r.iter_raw():
                        pass
                except httpx.ReadTimeout:
                    return None  # the stream is alive and waiting for commits
                return "the event stream ended or broke instead of waiting for commits"
            raw = r.read()
    except httpx.RemoteProtocolError as exc:
        return f"connection broken: {exc}"
    except httpx.ReadTimeout:
        if probe.path.endswith("/events"):
            return None  # no head within the short stream timeout: a slow machine, not a finding
        raise
    status = r.status_code
    text = raw.decode("utf-8", "replace")
    if status == 401:
        return f"the admin token was refused: {text[:200]}"
    if status == 500 or (status >= 500 and status not in (502, 503, 504)):
        return f"{status}: {text[:300]}"
    if "Traceback" in text:
        return "stack trace in the response"
    if status >= 400:
        try:
            check_error_body(probe.path, status, json.loads(raw), "")
        except (AssertionError, ValueError) as exc:
            return f"{status} body not in the error shape: {exc}"
    return None


def test_boundary_values(fuzz_target: Target) -> None:
    spec = httpx.get(f"{fuzz_target.url}/openapi.json", timeout=TIMEOUT_S).json()
    failures: list[str] = []
    sent = 0
    for probe in probes(spec):
        sent += 1
        problem = send_probe(fuzz_target, probe)
        if problem is not None:
            failures.append(f"{probe.method} {probe.path}: {problem}\n    {probe.curl(fuzz_target)}")
    assert sent > 50, f"only {sent} boundary probes: is the OpenAPI document complete?"
    assert not failures, f"{len(failures)} of {sent} boundary probes failed:\n" + "\n".join(failures)
