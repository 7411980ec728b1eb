"""Bad input (SPEC "Errors"): every malformed request gets the right 4xx in the one error
shape, never a 500 or a stack trace, and writes nothing.

One agentbus process per backend, with small limits, serves the whole module; every case
uses a fresh space, so "writes nothing" is checked as "the space still has no commit log".
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import BACKENDS, Server, module_server

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
LIMITS = {
    "AGENTBUS_MAX_VALUE_BYTES": "100",
    "AGENTBUS_MAX_BODY_BYTES": "2048",
    "AGENTBUS_MAX_WRITES_PER_COMMIT": "4",
    "AGENTBUS_MAX_READS_PER_COMMIT": "4",
    "AGENTBUS_MAX_KEY_LENGTH": "64",
    "AGENTBUS_MAX_LIST_LIMIT": "50",
}
STACK_TRACE_MARKERS = ("Traceback", 'File "', "line ", "Error:", "site-packages")


@pytest.fixture(scope="module", params=BACKENDS)
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One agentbus process per backend, with small limits, for the whole module."""
    yield from module_server("bad-input", request, tmp_path_factory, env=LIMITS)


@pytest.fixture(scope="module")
def http(bus: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bus.url, headers={"X-Agent-Id": "fuzzer"}, timeout=TIMEOUT) as c:
        yield c


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape {"error": {type, code, message, retryable, ...}} and no stack trace."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    for field in ("type", "code", "message"):
        assert isinstance(err.get(field), str) and err[field], err
    assert isinstance(err.get("retryable"), bool), err
    assert err["retryable"] is False  # bad input does not get better by retrying
    if code is not None:
        assert err["code"] == code, err
    for marker in STACK_TRACE_MARKERS:
        assert marker not in resp.text, resp.text
    return err  # type: ignore[no-any-return]


def assert_nothing_written(http: httpx.Client, space: str) -> None:
    """No commit was applied: the first successful commit creates the space's log."""
    assert_error(http.get(f"/v1/spaces/{space}/log"), 404, "space_not_found")


def w(key: str = "k", **fields: Any) -> dict[str, Any]:
    return {"key": key, "value": 1, **fields}


def raw(text: str) -> bytes:
    return text.encode()


# (id, body: bytes = raw request body, else JSON-encoded, status, code)
BAD_COMMITS: list[tuple[str, Any, int, str]] = [
    ("malformed-json", b'{"writes": [', 400, "malformed_json"),
    ("not-json", b"hello", 400, "malformed_json"),
    ("trailing-garbage", b'{"writes":[{"key":"k","value":1}]} x', 400, "malformed_json"),
    ("single-quotes", b"{'writes': []}", 400, "malformed_json"),
    ("body-is-a-list", [{"writes": [w()]}], 422, "validation_error"),
    ("body-is-a-string", "writes", 422, "validation_error"),
    ("body-is-null", None, 422, "validation_error"),
    ("writes-missing", {}, 422, "validation_error"),
    ("writes-null", {"writes": None}, 422, "validation_error"),
    ("writes-not-a-list", {"writes": w()}, 422, "validation_error"),
    ("write-not-an-object", {"writes": ["k"]}, 422, "validation_error"),
    ("empty-writes", {"writes": []}, 422, "validation_error"),
    ("key-missing", {"writes": [{"value": 1}]}, 422, "validation_error"),
    ("key-not-a-string", {"writes": [{"key": 5, "value": 1}]}, 422, "validation_error"),
    ("key-null", {"writes": [{"key": None, "value": 1}]}, 422, "validation_error"),
    ("expected-version-negative", {"writes": [w(expected_version=-1)]}, 422, "validation_error"),
    ("expected-version-fraction", {"writes": [w(expected_version=1.5)]}, 422, "validation_error"),
    ("expected-version-beyond-64-bit", {"writes": [w(expected_version=2**64)]}, 422, "validation_error"),
    (
        "read-version-beyond-64-bit",
        {"writes": [w()], "reads": [{"key": "r", "version": 2**63}]},
        422,
        "validation_error",
    ),
    ("expected-version-object", {"writes": [w(expected_version={"v": 1})]}, 422, "validation_error"),
    ("delete-not-a-bool", {"writes": [{"key": "k", "delete": [True]}]}, 422, "validation_error"),
    ("reads-not-a-list", {"writes": [w()], "reads": {"k": 1}}, 422, "validation_error"),
    ("read-version-negative", {"writes": [w()], "reads": [{"key": "r", "version": -1}]}, 422, "validation_error"),
    ("read-version-missing", {"writes": [w()], "reads": [{"key": "r"}]}, 422, "validation_error"),
    ("read-key-missing", {"writes": [w()], "reads": [{"version": 1}]}, 422, "validation_error"),
    ("unknown-top-level-field", {"writes": [w()], "force": True}, 422, "validation_error"),
    ("unknown-write-field", {"writes": [w(force=True)]}, 422, "validation_error"),
    ("misspelled-field", {"writes": [{"key": "k", "valeu": 1}]}, 422, "validation_error"),
    ("unknown-read-field", {"writes": [w()], "reads": [{"key": "r", "version": 0, "at": 1}]}, 422, "validation_error"),
    ("value-and-delete", {"writes": [w(delete=True)]}, 422, "validation_error"),
    ("null-value-and-delete", {"writes": [{"key": "k", "value": None, "delete": True}]}, 422, "validation_error"),
    ("neither-value-nor-delete", {"writes": [{"key": "k"}]}, 422, "validation_error"),
    ("delete-false-without-value", {"writes": [{"key": "k", "delete": False}]}, 422, "validation_error"),
    ("duplicate-keys", {"writes": [w("k"), w("j"), w("k")]}, 422, "duplicate_write"),
    ("duplicate-key-write-and-delete", {"writes": [w("k"), {"key": "k", "delete": True}]}, 422, "duplicate_write"),
    ("key-empty", {"writes": [w("")]}, 422, "invalid_key"),
    ("key-with-space", {"writes": [w("a b")]}, 422, "invalid_key"),
    ("key-with-braces", {"writes": [w("a{b}")]}, 422, "invalid_key"),
    ("key-with-quote", {"writes": [w('a"b')]}, 422, "invalid_key"),
    ("key-with-pipe", {"writes": [w("a|b")]}, 422, "invalid_key"),
    ("key-with-nul", {"writes": [w("a\x00b")]}, 422, "invalid_key"),
    ("key-non-ascii", {"writes": [w("ключ")]}, 422, "invalid_key"),
    ("key-too-long", {"writes": [w("k" * 65)]}, 422, "invalid_key"),
    ("key-is-history", {"writes": [w("history")]}, 422, "invalid_key"),
    ("key-ends-in-history", {"writes": [w("a/b/history")]}, 422, "invalid_key"),
    ("second-key-invalid", {"writes": [w("ok"), w("not ok")]}, 422, "invalid_key"),
    ("read-key-invalid", {"writes": [w()], "reads": [{"key": "a b", "version": 0}]}, 422, "invalid_key"),
    ("too-many-writes", {"writes": [w(f"k{i}") for i in range(5)]}, 422, "too_many_writes"),
    (
        "too-many-reads",
        {"writes": [w()], "reads": [{"key": f"r{i}", "version": 0} for i in range(5)]},
        422,
        "too_many_reads",
    ),
    ("value-too-large", {"writes": [w("small"), w("big", value="x" * 101)]}, 413, "value_too_large"),
    ("nested-value-too-large", {"writes": [w(value={"a": ["x" * 30] * 3})]}, 413, "value_too_large"),
    ("int-beyond-64-bit", {"writes": [w(value=2**70)]}, 422, "invalid_value"),
    ("lone-surrogate", raw('{"writes":[{"key":"k","value":"\\ud800"}]}'), 422, "invalid_value"),
    ("too-deeply-nested", raw('{"writes":[{"key":"k","value":' + "[" * 300 + "]" * 300 + "}]}"), 422, "invalid_value"),
]

# Wrong JSON types must not be coerced (strict models) and bodies must be RFC 8259 JSON.
BAD_COMMITS_STRICT: list[tuple[str, Any, int, str]] = [
    ("expected-version-string", {"writes": [w(expected_version="0")]}, 422, "validation_error"),
    ("expected-version-bool", {"writes": [w(expected_version=True)]}, 422, "validation_error"),
    ("expected-version-float", {"writes": [w(expected_version=0.0)]}, 422, "validation_error"),
    (
        "read-version-string",
        {"writes": [w()], "reads": [{"key": "r", "version": "0"}]},
        422,
        "validation_error",
    ),
    ("delete-string", {"writes": [{"key": "k", "delete": "yes"}]}, 422, "validation_error"),
    ("delete-int", {"writes": [{"key": "k", "delete": 1}]}, 422, "validation_error"),
    ("invalid-utf8", b'{"writes":[{"key":"k","value":"\xff\xfe"}]}', 400, "malformed_json"),
    ("nan", raw('{"writes":[{"key":"k","value":NaN}]}'), 400, "malformed_json"),
    ("infinity", raw('{"writes":[{"key":"k","value":-Infinity}]}'), 400, "malformed_json"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code"),
    [
        *(pytest.param(*c, id=c[0]) for c in BAD_COMMITS),
        *(pytest.param(*c, id=c[0]) for c in BAD_COMMITS_STRICT),
    ],
)
def test_bad_commit_body(http: httpx.Client, space: str, case: str, body: Any, status: int, code: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = http.post(f"/v1/spaces/{space}/commit", content=content, headers={"content-type": "application/json"})
    err = assert_error(resp, status, code)
    assert err["type"] == "invalid_request"
    assert_nothing_written(http, space)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Idempotency-Key": "x" * 257}, 422, "validation_error"),
        ({"X-Agent-Id": "bad agent"}, 422, "invalid_agent_id"),
        ({"X-Agent-Id": "a" * 129}, 422, "invalid_agent_id"),
        ({"X-Agent-Session": "bad session"}, 422, "invalid_session"),
        ({"X-Agent-Session": "s/1"}, 422, "invalid_session"),
    ],
    ids=["idempotency-key-too-long", "agent-id-space", "agent-id-too-long", "session-space", "session-slash"],
)
def test_bad_commit_headers(http: httpx.Client, space: str, headers: dict[str, str], status: int, code: str) -> None:
    resp = http.post(f"/v1/spaces/{space}/commit", json={"writes": [w()]}, headers=headers)
    assert_error(resp, status, code)
    assert_nothing_written(http, space)


@pytest.mark.parametrize(
    "bad_space", ["-starts-with-dash", ".hidden", "has space", "x" * 129, "a{b}", "ünï"], ids=lambda s: s[:20]
)
def test_invalid_space_name(http: httpx.Client, bad_space: str) -> None:
    for resp in (
        http.post(f"/v1/spaces/{bad_space}/commit", json={"writes": [w()]}),
        http.get(f"/v1/spaces/{bad_space}/shards/k"),
        http.get(f"/v1/spaces/{bad_space}/shards"),
        http.get(f"/v1/spaces/{bad_space}/log"),
        http.get(f"/v1/spaces/{bad_space}/readset"),
        http.get(f"/v1/spaces/{bad_space}/events"),
    ):
        assert_error(resp, 422, "invalid_space")


@pytest.mark.parametrize("where", ["key", "space"])
def test_trailing_newline_in_names_is_refused(http: httpx.Client, space: str, where: str) -> None:
    if where == "key":
        resp = http.post(f"/v1/spaces/{space}/commit", json={"writes": [w("k\n")]})
        assert_error(resp, 422, "invalid_key")
        assert_nothing_written(http, space)
    else:
        assert_error(http.post(f"/v1/spaces/{space}%0A/commit", json={"writes": [w()]}), 422, "invalid_space")


def test_body_over_max_body_bytes_is_413(http: httpx.Client, space: str) -> None:
    big = json.dumps({"writes": [w(f"k{i}", value="x" * 90) for i in range(30)]}).encode()
    assert len(big) > 2048
    resp = http.post(f"/v1/spaces/{space}/commit", content=big, headers={"content-type": "application/json"})
    assert_error(resp, 413, "body_too_large")
    # The same limit holds for a body that is not JSON at all.
    resp = http.post(f"/v1/spaces/{space}/commit", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert_error(resp, 413, "body_too_large")
    assert_nothing_written(http, space)


def test_chunked_body_over_max_body_bytes_is_413(http: httpx.Client, space: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"writes":['
        for i in range(40):
            yield json.dumps(w(f"k{i}", value="x" * 90)).encode() + b","
        yield json.dumps(w("last")).encode() + b"]}"

    resp = http.post(f"/v1/spaces/{space}/commit", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert_error(resp, 413, "body_too_large")
    assert_nothing_written(http, space)


def test_chunked_body_over_max_body_bytes_is_refused_without_500(http: httpx.Client, space: str) -> None:
    """Whatever the status, an oversized chunked body is a clean 4xx
    and applies nothing."""

    def chunks() -> Iterator[bytes]:
        yield b'{"writes":['
        for i in range(40):
            yield json.dumps(w(f"k{i}", value="x" * 90)).encode() + b","
        yield json.dumps(w("last")).encode() + b"]}"

    resp = http.post(f"/v1/spaces/{space}/commit", content=chunks(), headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500
    assert_error(resp, resp.status_code)
    assert_nothing_written(http, space)
    # A small chunked body is fine.
    ok = http.post(
        f"/v1/spaces/{space}/commit",
        content=iter([b'{"writes":[', json.dumps(w("small")).encode(), b"]}"]),
        headers={"content-type": "application/json"},
    )
    assert ok.status_code == 200, ok.text


def test_listing_without_limit_respects_a_small_max_list_limit(http: httpx.Client, space: str) -> None:
    resp = http.get(f"/v1/spaces/{space}/shards")
    assert resp.status_code == 200, resp.text


def cursor_of(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


# (id, path under the space, query params, headers, status, code)
BAD_GETS: list[tuple[str, str, dict[str, Any], dict[str, str], int, str]] = [
    ("key-with-space", "/shards/a%20b", {}, {}, 422, "invalid_key"),
    ("key-with-braces", "/shards/a%7Bb%7D", {}, {}, 422, "invalid_key"),
    ("key-too-long", "/shards/" + "k" * 65, {}, {}, 422, "invalid_key"),
    ("key-empty", "/shards/", {}, {}, 422, "invalid_key"),
    ("key-non-ascii", "/shards/%D0%BA", {}, {}, 422, "invalid_key"),
    ("history-key-invalid", "/shards/a%20b/history", {}, {}, 422, "invalid_key"),
    ("prefix-invalid", "/shards", {"prefix": "a b"}, {}, 422, "invalid_key"),
    ("list-limit-too-large", "/shards", {"limit": 51}, {}, 422, "limit_too_large"),
    ("list-limit-zero", "/shards", {"limit": 0}, {}, 422, "validation_error"),
    ("list-limit-not-int", "/shards", {"limit": "many"}, {}, 422, "validation_error"),
    ("cursor-not-base64", "/shards", {"cursor": "a", "limit": 10}, {}, 422, "invalid_cursor"),
    ("cursor-not-utf8", "/shards", {"cursor": cursor_of(b"\xff\xfe"), "limit": 10}, {}, 422, "invalid_cursor"),
    (
        "cursor-other-prefix",
        "/shards",
        {"prefix": "p/", "cursor": cursor_of(b"q/x"), "limit": 10},
        {},
        422,
        "invalid_cursor",
    ),
    ("history-limit-too-large", "/shards/k/history", {"limit": 1001}, {}, 422, "validation_error"),
    ("history-limit-zero", "/shards/k/history", {"limit": 0}, {}, 422, "validation_error"),
    ("history-before-version-zero", "/shards/k/history", {"before_version": 0}, {}, 422, "validation_error"),
    ("log-after-negative", "/log", {"after": -1}, {}, 422, "validation_error"),
    ("log-after-not-int", "/log", {"after": "x"}, {}, 422, "validation_error"),
    ("log-limit-too-large", "/log", {"limit": 1001}, {}, 422, "validation_error"),
    ("events-bad-last-event-id", "/events", {}, {"Last-Event-ID": "abc"}, 422, "invalid_last_event_id"),
    ("events-float-last-event-id", "/events", {}, {"Last-Event-ID": "1.5"}, 422, "invalid_last_event_id"),
    ("events-negative-last-event-id", "/events", {}, {"Last-Event-ID": "-1"}, 422, "invalid_last_event_id"),
    ("events-huge-last-event-id", "/events", {}, {"Last-Event-ID": str(2**64)}, 422, "invalid_last_event_id"),
    ("log-after-beyond-64-bit", "/log", {"after": 2**63}, {}, 422, "validation_error"),
    (
        "history-before-version-beyond-64-bit",
        "/shards/k/history",
        {"before_version": 2**63},
        {},
        422,
        "validation_error",
    ),
    ("events-after-negative", "/events", {"after": -1}, {}, 422, "validation_error"),
    ("readset-bad-session", "/readset", {}, {"X-Agent-Session": "a b"}, 422, "invalid_session"),
    ("read-bad-agent-id", "/shards/k", {}, {"X-Agent-Id": "a/b"}, 422, "invalid_agent_id"),
]


@pytest.mark.parametrize(
    ("case", "path", "params", "headers", "status", "code"), [pytest.param(*c, id=c[0]) for c in BAD_GETS]
)
def test_bad_get(
    http: httpx.Client,
    space: str,
    case: str,
    path: str,
    params: dict[str, Any],
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    resp = http.get(f"/v1/spaces/{space}{path}", params=params, headers=headers)
    assert_error(resp, status, code)


@pytest.mark.parametrize(
    "path",
    ["/nope", "/v1", "/v1/nope", "/v1/spaces/{space}/nope", "/v1/spaces/{space}/shardz/k", "/v2/spaces/{space}/log"],
)
def test_unknown_route_is_404_in_the_error_shape(http: httpx.Client, space: str, path: str) -> None:
    for method in ("GET", "POST"):
        err = assert_error(http.request(method, path.format(space=space), json={}), 404, "route_not_found")
        assert err["type"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/commit"),
        ("GET", "/commit"),
        ("DELETE", "/commit"),
        ("PUT", "/shards/k"),
        ("POST", "/shards/k"),
        ("DELETE", "/shards/k"),
        ("PATCH", "/shards"),
        ("POST", "/readset"),
        ("POST", "/log"),
        ("DELETE", "/shards/k/history"),
        ("POST", "/events"),
    ],
)
def test_wrong_method_is_405_in_the_error_shape(http: httpx.Client, space: str, method: str, path: str) -> None:
    resp = http.request(method, f"/v1/spaces/{space}{path}", json={"writes": [w()]})
    err = assert_error(resp, 405)
    assert err["type"] == "invalid_request"
    assert_nothing_written(http, space)


# --------------------------------------------------------------------------- fuzzing

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
field_names = st.sampled_from(["key", "value", "delete", "expected_version", "version", "writes", "reads", "x"])
key_like = st.one_of(st.sampled_from(["k", "a/b", "", "history", "a b", "k" * 70]), st.text(max_size=6), json_leaf)
write_like = st.one_of(
    st.fixed_dictionaries(
        {"key": key_like},
        optional={"value": json_any, "delete": json_any, "expected_version": json_any, "x": json_any},
    ),
    st.dictionaries(field_names, json_any, max_size=4),
    json_any,
)
body_like = st.one_of(
    st.fixed_dictionaries(
        {"writes": st.one_of(st.lists(write_like, max_size=5), json_any)},
        optional={
            "reads": st.one_of(st.lists(st.dictionaries(field_names, json_any, max_size=3), max_size=3), json_any)
        },
    ),
    json_any,
)


@settings(max_examples=30, deadline=None)
@given(body=body_like)
def test_fuzzed_commit_bodies_never_500(http: httpx.Client, body: Any) -> None:
    space = f"fz-{uuid.uuid4().hex[:12]}"
    resp = http.post(f"/v1/spaces/{space}/commit", json=body)
    assert resp.status_code in (200, 400, 409, 413, 422), (resp.status_code, resp.text)
    if resp.status_code == 200:
        assert set(resp.json()) == {"commit_id", "seq", "versions"}
    elif resp.status_code == 409:  # a well-formed commit whose expected_version did not match
        assert resp.json()["error"]["type"] == "conflict"
    else:
        assert_error(resp, resp.status_code)
        assert_nothing_written(http, space)


@settings(max_examples=20, deadline=None)
@given(
    key=st.text(min_size=1, max_size=12),
    prefix=st.text(max_size=6),
    cursor=st.text(max_size=10),
    limit=st.one_of(st.integers(-5, 2000), st.text(max_size=4)),
)
def test_fuzzed_reads_never_500(http: httpx.Client, key: str, prefix: str, cursor: str, limit: Any) -> None:
    space = "fz-reads"
    key = quote(key, safe="/")
    for resp in (
        http.get(f"/v1/spaces/{space}/shards/{key}"),
        http.get(f"/v1/spaces/{space}/shards/{key}/history"),
        http.get(f"/v1/spaces/{space}/shards", params={"prefix": prefix, "cursor": cursor, "limit": limit}),
    ):
        assert resp.status_code < 500, (resp.status_code, resp.text)
        if resp.status_code != 200:
            assert resp.status_code in (400, 404, 405, 422), resp.text
            err = resp.json()["error"]
            assert {"type", "code", "message", "retryable"} <= set(err)
            for marker in STACK_TRACE_MARKERS:
                assert marker not in resp.text
