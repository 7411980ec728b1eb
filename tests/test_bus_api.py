"""State bus HTTP API semantics (SPEC "State bus HTTP API"), over real HTTP on every backend.

One agentbus process per backend serves the whole module (each test uses its own space);
only the read-set TTL test starts a server with its own settings.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, Server, module_server

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
MAX_ENTRIES = 25
CONFLICT_FIELDS = {"key", "kind", "read_version", "current_version", "committed_by", "commit_seq"}


@pytest.fixture(scope="module", params=BACKENDS)
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One agentbus process per backend for the whole module (tests use unique spaces)."""
    # Small enough for test_read_set_overflow_gives_410 to exceed cheaply; no other test
    # commits after recording more than 15 entries in one epoch.
    yield from module_server(
        "bus-api", request, tmp_path_factory, env={"AGENTBUS_READSET_MAX_ENTRIES": str(MAX_ENTRIES)}
    )


# --------------------------------------------------------------------------- helpers


def put(key: str, value: Any, expected_version: int | None = None) -> dict[str, Any]:
    w: dict[str, Any] = {"key": key, "value": value}
    if expected_version is not None:
        w["expected_version"] = expected_version
    return w


def rm(key: str, expected_version: int | None = None) -> dict[str, Any]:
    w: dict[str, Any] = {"key": key, "delete": True}
    if expected_version is not None:
        w["expected_version"] = expected_version
    return w


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape, with the given status (and code)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["retryable"], bool)
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in resp.text
    return err  # type: ignore[no-any-return]


def conflicts_of(resp: httpx.Response, code: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """A 409 in the conflict shape, as {(key, kind): item}; every item has every field."""
    err = assert_error(resp, 409, code)
    assert err["type"] == "conflict"
    assert err["retryable"] is True
    items = err["conflicts"]
    assert items, err
    for item in items:
        assert set(item) == CONFLICT_FIELDS, item
    found = {(c["key"], c["kind"]): c for c in items}
    assert len(found) == len(items), "one item per (key, kind)"
    assert err["code"] in {kind for _, kind in found}, "the top-level code is one of the conflict kinds"
    return found


class Scoped:
    """A shared client bound to one space and one caller's headers (clients are costly to
    create, so every agent of a module shares one connection pool)."""

    def __init__(self, client: httpx.Client, base: str, headers: dict[str, str]) -> None:
        self.client, self.base, self.headers = client, base, headers

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return self.client.request(method, self.base + path, headers={**self.headers, **(headers or {})}, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)


class Agent:
    """One agent (X-Agent-Id, optionally X-Agent-Session) talking to one space."""

    def __init__(self, client: httpx.Client, base_url: str, space: str, name: str, session: str | None = None) -> None:
        headers = {"X-Agent-Id": name}
        if session is not None:
            headers["X-Agent-Session"] = session
        self.name = name
        self.space = space
        self.http = Scoped(client, f"{base_url}/v1/spaces/{space}", headers)

    def read(self, key: str) -> httpx.Response:
        return self.http.get(f"/shards/{key}")

    def value(self, key: str) -> Any:
        r = self.read(key)
        assert r.status_code == 200, r.text
        return r.json()["value"]

    def version(self, key: str) -> int:
        r = self.read(key)
        assert r.status_code == 200, r.text
        return int(r.json()["version"])

    def commit(
        self,
        *writes: dict[str, Any],
        reads: list[dict[str, Any]] | None = None,
        idem: str | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {"writes": list(writes)}
        if reads is not None:
            body["reads"] = reads
        headers = {"Idempotency-Key": idem} if idem else None
        return self.http.post("/commit", json=body, headers=headers)

    def ok(self, *writes: dict[str, Any], **kw: Any) -> dict[str, Any]:
        r = self.commit(*writes, **kw)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def readset(self) -> dict[str, Any]:
        r = self.http.get("/readset")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def reads(self) -> dict[str, int]:
        return {e["key"]: e["version"] for e in self.readset()["reads"]}

    def list(self, **params: Any) -> dict[str, Any]:
        r = self.http.get("/shards", params=params)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def list_all(self, prefix: str = "", limit: int = 100) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        for _ in range(1000):
            params: dict[str, Any] = {"prefix": prefix, "limit": limit}
            if cursor:
                params["cursor"] = cursor
            page = self.list(**params)
            assert len(page["shards"]) <= limit
            out += page["shards"]
            cursor = page["next_cursor"]
            if cursor is None:
                return out
        raise AssertionError("pagination did not end")

    def history(self, key: str, **params: Any) -> list[dict[str, Any]]:
        r = self.http.get(f"/shards/{key}/history", params=params)
        assert r.status_code == 200, r.text
        assert r.json()["key"] == key
        return r.json()["versions"]  # type: ignore[no-any-return]

    def log(self, **params: Any) -> dict[str, Any]:
        r = self.http.get("/log", params=params)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


AgentFactory = Callable[..., Agent]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def agent(bus: Server, space: str, client: httpx.Client) -> AgentFactory:
    """``agent(name, session=None)``: an Agent in this test's space on the module's server."""

    def make(name: str = "alice", session: str | None = None) -> Agent:
        return Agent(client, bus.url, space, name, session)

    return make


def versions_of(a: Agent, key: str) -> list[int]:
    r = a.http.get(f"/shards/{key}/history")
    if r.status_code == 404:
        return []
    assert r.status_code == 200, r.text
    return [e["version"] for e in r.json()["versions"]]


# --------------------------------------------------------------------------- reads

JSON_VALUES: dict[str, Any] = {
    "obj": {"plan": {"steps": ["a", "b"], "done": False}, "n": 3, "nested": {"x": [1, {"y": None}]}},
    "arr": [1, "two", 3.5, None, True, [], {}],
    "str": 'héllo "wörld" \\ \n\t ✓ 😀 </script>',
    "empty-str": "",
    "int": 42,
    "neg": -7,
    "big": 9007199254740993,  # > 2**53: must not pass through a float
    "float": 0.1,
    "exp": 1.5e300,
    "true": True,
    "false": False,
    "null": None,
    "empty-obj": {},
    "empty-arr": [],
}


def same_json(a: Any, b: Any) -> bool:
    """Equality that also distinguishes 1 / 1.0 / True and key order-insensitive objects."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_read_returns_shard_with_etag_and_any_json_round_trips(agent: AgentFactory) -> None:
    writer, reader = agent("writer"), agent("reader")
    res = writer.ok(*[put(f"v/{name}", value) for name, value in JSON_VALUES.items()])
    assert res["versions"] == {f"v/{name}": 1 for name in JSON_VALUES}
    (entry,) = writer.log()["commits"]
    for name, value in JSON_VALUES.items():
        r = reader.read(f"v/{name}")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["etag"] == '"1"'
        body = r.json()
        assert set(body) == {"key", "version", "value", "updated_by", "updated_at"}
        assert body["key"] == f"v/{name}"
        assert body["version"] == 1
        assert body["updated_by"] == "writer"
        assert isinstance(body["updated_at"], float) and body["updated_at"] == entry["at"]
        assert same_json(body["value"], value), (name, body["value"])
    # A later version is visible with its own ETag and the new author.
    reader.ok(put("v/obj", {"changed": True}))
    r = writer.read("v/obj")
    assert r.headers["etag"] == '"2"'
    assert r.json()["version"] == 2 and r.json()["updated_by"] == "reader"
    assert r.json()["value"] == {"changed": True}


def test_missing_shard_is_404_and_recorded_as_read_as_absent(agent: AgentFactory) -> None:
    a, b = agent("alice"), agent("bob")
    err = assert_error(a.read("todo/1"), 404, "shard_not_found")
    assert err["type"] == "not_found" and err["retryable"] is False
    assert a.reads() == {"todo/1": 0}
    created = b.ok(put("todo/1", "bob's"))
    # alice decided based on "todo/1 does not exist": her commit must not pass.
    found = conflicts_of(a.commit(put("summary", "nothing to do")), "stale_read")
    assert found == {
        ("todo/1", "stale_read"): {
            "key": "todo/1",
            "kind": "stale_read",
            "read_version": 0,
            "current_version": 1,
            "committed_by": "bob",
            "commit_seq": created["seq"],
        }
    }
    assert_error(a.read("summary"), 404)
    # Absent-and-still-absent does not conflict.
    assert_error(a.read("todo/2"), 404)
    a.ok(put("summary", "ok"))


def test_first_delivered_version_is_validated_and_every_commit_ends_the_epoch(agent: AgentFactory) -> None:
    a, b = agent("alice"), agent("bob")
    a.ok(put("plan", "v1"))
    assert a.readset()["reads"] == []  # writing is not reading
    assert a.value("plan") == "v1"
    b_commit = b.ok(put("plan", "v2"))
    # Re-reading shows the new version, but the read set keeps the first one delivered.
    r = a.read("plan")
    assert (r.json()["version"], r.json()["value"], r.headers["etag"]) == (2, "v2", '"2"')
    assert a.reads() == {"plan": 1}
    found = conflicts_of(a.commit(put("plan", "v3 from alice")), "stale_read")
    assert found[("plan", "stale_read")]["read_version"] == 1
    assert found[("plan", "stale_read")]["current_version"] == 2
    assert found[("plan", "stale_read")]["commit_seq"] == b_commit["seq"]
    assert a.value("plan") == "v2"
    # The 409 ended the epoch: that read of v2 (above) starts a fresh read set...
    rs = a.readset()
    assert rs["reads"] == [{"key": "plan", "version": 2}] and rs["ranges"] == []
    # ...so alice can now commit on top of v2, and the 200 ends that epoch too.
    res = a.ok(put("plan", "v3 from alice"))
    assert res["versions"] == {"plan": 3}
    assert a.readset()["reads"] == [] and a.readset()["ranges"] == []
    # An emptied read set validates nothing: a concurrent change is no longer a conflict.
    b.ok(put("plan", "v4"))
    a.ok(put("other", 1))


def test_409_clears_the_read_set(agent: AgentFactory) -> None:
    a, b = agent("alice"), agent("bob")
    a.ok(put("k", 1))
    a.read("k")
    a.list(prefix="")
    b.ok(put("k", 2))
    conflicts_of(a.commit(put("x", 1)))
    rs = a.readset()
    assert rs["reads"] == [] and rs["ranges"] == []
    a.ok(put("x", 1))  # nothing stale is remembered


def test_delete_readset_clears_the_read_set(agent: AgentFactory) -> None:
    a, b = agent("alice"), agent("bob")
    a.ok(put("k", 1))
    a.read("k")
    a.read("missing")
    a.list(prefix="p/")
    rs = a.readset()
    assert {r["key"]: r["version"] for r in rs["reads"]} == {"k": 1, "missing": 0}
    assert [(r["prefix"], r["start_after"], r["end_at"]) for r in rs["ranges"]] == [("p/", None, None)]
    b.ok(put("k", 2), put("missing", 1), put("p/new", 1))
    r = a.http.delete("/readset")
    assert r.status_code == 204 and r.content == b""
    rs = a.readset()
    assert rs["reads"] == [] and rs["ranges"] == []
    assert a.ok(put("k", 3))["versions"] == {"k": 3}


def test_read_sets_are_per_agent_and_per_session(agent: AgentFactory) -> None:
    a_s1, a_s2, a_none, b = agent("alice", "s1"), agent("alice", "s2"), agent("alice"), agent("bob", "s1")
    a_s1.ok(put("k", 1))
    a_s1.read("k")
    assert a_s1.readset()["subject"] == "alice" and a_s1.readset()["session"] == "s1"
    assert a_s1.reads() == {"k": 1}
    assert a_s2.reads() == {} and a_none.reads() == {} and b.reads() == {}
    assert a_none.readset()["session"] == ""
    b.read("other")  # bob's read set has its own entries
    assert b.reads() == {"other": 0} and a_s1.reads() == {"k": 1}
    agent("carol").ok(put("k", 2))
    # Only the session that read k is refused.
    a_s2.ok(put("x", "s2"))
    a_none.ok(put("y", "none"))
    assert a_s1.reads() == {"k": 1}  # other sessions' commits did not end this epoch
    found = conflicts_of(a_s1.commit(put("z", "s1")), "stale_read")
    assert set(found) == {("k", "stale_read")}
    # Bob's read-as-absent of "other" is his alone, and still valid.
    assert b.ok(put("other", "bob"))["versions"] == {"other": 1}


# --------------------------------------------------------------------------- commit


def test_conflicting_commit_applies_nothing_and_lists_every_conflict(agent: AgentFactory) -> None:
    setup, a, b = agent("setup"), agent("alice"), agent("bob")
    seed = setup.ok(put("a", "a1"), put("b", "b1"), put("c", "c1"))
    assert a.value("a") == "a1"
    assert_error(a.read("m"), 404)
    ba = b.ok(put("a", "a2"))
    bm = b.ok(put("m", "m1"))
    log_before = a.log()["commits"]
    resp = a.commit(
        put("a", "mine"),
        put("b", "mine", expected_version=5),
        put("c", "mine", expected_version=0),
        put("d", "mine"),
        rm("m"),
    )
    found = conflicts_of(resp)
    assert found == {
        ("a", "stale_read"): {
            "key": "a",
            "kind": "stale_read",
            "read_version": 1,
            "current_version": 2,
            "committed_by": "bob",
            "commit_seq": ba["seq"],
        },
        ("m", "stale_read"): {
            "key": "m",
            "kind": "stale_read",
            "read_version": 0,
            "current_version": 1,
            "committed_by": "bob",
            "commit_seq": bm["seq"],
        },
        ("b", "write_conflict"): {
            "key": "b",
            "kind": "write_conflict",
            "read_version": 5,
            "current_version": 1,
            "committed_by": "setup",
            "commit_seq": seed["seq"],
        },
        ("c", "write_conflict"): {
            "key": "c",
            "kind": "write_conflict",
            "read_version": 0,
            "current_version": 1,
            "committed_by": "setup",
            "commit_seq": seed["seq"],
        },
    }
    # None of the five writes happened: values, versions, history and log are unchanged.
    obs = agent("observer")
    assert {k: obs.value(k) for k in "abcm"} == {"a": "a2", "b": "b1", "c": "c1", "m": "m1"}
    assert {k: versions_of(obs, k) for k in "abcdm"} == {
        "a": [2, 1],
        "b": [1],
        "c": [1],
        "d": [],
        "m": [1],
    }
    assert_error(obs.read("d"), 404)
    assert a.log()["commits"] == log_before
    # A refused commit consumes no seq.
    assert obs.ok(put("d", "obs"))["seq"] == bm["seq"] + 1


def test_commit_response_and_seq_per_space(agent: AgentFactory, bus: Server, client: httpx.Client) -> None:
    a, b = agent("alice"), agent("bob")
    results = [a.ok(put("x", 1)), b.ok(put("y", 1), put("z", 1)), a.ok(put("x", 2), rm("y")), b.ok(put("x", 3))]
    for res in results:
        assert set(res) == {"commit_id", "seq", "versions"}
        assert isinstance(res["commit_id"], str) and res["commit_id"]
    assert [r["seq"] for r in results] == [1, 2, 3, 4]
    assert len({r["commit_id"] for r in results}) == 4
    assert [r["versions"] for r in results] == [{"x": 1}, {"y": 1, "z": 1}, {"x": 2, "y": 2}, {"x": 3}]
    # Another space has its own seq.
    other = Agent(client, bus.url, f"{a.space}-other", "alice")
    assert other.ok(put("x", 1))["seq"] == 1
    assert a.ok(put("x", 4))["seq"] == 5
    log = a.log()["commits"]
    assert [(c["seq"], c["commit_id"]) for c in log[:4]] == [(r["seq"], r["commit_id"]) for r in results]


def test_expected_version_rules(agent: AgentFactory) -> None:
    a = agent("alice")
    assert a.ok(put("k", "v1", expected_version=0))["versions"] == {"k": 1}
    found = conflicts_of(a.commit(put("k", "again", expected_version=0)), "write_conflict")
    assert found[("k", "write_conflict")]["read_version"] == 0
    assert found[("k", "write_conflict")]["current_version"] == 1
    assert a.ok(put("k", "v2", expected_version=1))["versions"] == {"k": 2}
    for stale in (1, 3):
        found = conflicts_of(a.commit(put("k", "no", expected_version=stale)), "write_conflict")
        assert (found[("k", "write_conflict")]["read_version"], found[("k", "write_conflict")]["current_version"]) == (
            stale,
            2,
        )
    assert a.ok(rm("k", expected_version=2))["versions"] == {"k": 3}
    # A tombstone counts as "does not exist" for expected_version 0, and versions go on.
    assert a.ok(put("k", "reborn", expected_version=0))["versions"] == {"k": 4}
    found = conflicts_of(a.commit(put("never", 1, expected_version=1)), "write_conflict")
    assert found[("never", "write_conflict")] == {
        "key": "never",
        "kind": "write_conflict",
        "read_version": 1,
        "current_version": 0,
        "committed_by": None,
        "commit_seq": None,
    }
    assert versions_of(a, "k") == [4, 3, 2, 1]
    assert a.value("k") == "reborn"


def test_explicit_reads_are_validated_and_win_over_the_delivery_log(agent: AgentFactory) -> None:
    setup, a, b = agent("setup"), agent("alice"), agent("bob")
    setup.ok(put("k1", 1), put("k2", 1), put("k3", 1))
    # Delivered v1, then the agent explicitly declares it based its work on v2: explicit wins.
    assert a.version("k1") == 1
    b.ok(put("k1", 2))
    assert a.ok(put("out", "a"), reads=[{"key": "k1", "version": 2}])["seq"] > 0
    # An explicit read alone (nothing delivered) is validated.
    bk2 = b.ok(put("k2", 2))
    found = conflicts_of(a.commit(put("out", "b"), reads=[{"key": "k2", "version": 1}]), "stale_read")
    assert found == {
        ("k2", "stale_read"): {
            "key": "k2",
            "kind": "stale_read",
            "read_version": 1,
            "current_version": 2,
            "committed_by": "bob",
            "commit_seq": bk2["seq"],
        }
    }
    # Explicit also wins when it is the *older* claim: delivered v2 (current), declared v1.
    assert a.version("k1") == 2
    found = conflicts_of(a.commit(put("out", "c"), reads=[{"key": "k1", "version": 1}]), "stale_read")
    assert found[("k1", "stale_read")]["read_version"] == 1
    # Version 0 = "I saw it absent".
    a.ok(put("out", "d"), reads=[{"key": "nope", "version": 0}, {"key": "k3", "version": 1}])
    conflicts_of(a.commit(put("out", "e"), reads=[{"key": "k3", "version": 0}]), "stale_read")
    assert a.value("out") == "d"


def test_delete_is_a_tombstone_version(agent: AgentFactory) -> None:
    a, b = agent("alice"), agent("bob")
    assert a.ok(put("k", {"n": 1}))["versions"] == {"k": 1}
    assert a.ok(rm("k"))["versions"] == {"k": 2}
    assert_error(a.read("k"), 404, "shard_not_found")
    hist = a.history("k")
    assert [(h["version"], h["deleted"], h["value"]) for h in hist] == [(2, True, None), (1, False, {"n": 1})]
    assert [s["key"] for s in a.list()["shards"]] == []
    # Reading a tombstone is a read of "absent" that a re-creation invalidates.
    b.read("k")
    assert a.ok(put("k", {"n": 3}))["versions"] == {"k": 3}
    conflicts_of(b.commit(put("other", 1)), "stale_read")
    r = a.read("k")
    assert (r.json()["version"], r.json()["value"], r.headers["etag"]) == (3, {"n": 3}, '"3"')
    assert [h["version"] for h in a.history("k")] == [3, 2, 1]
    assert [s["key"] for s in a.list()["shards"]] == ["k"]


# --------------------------------------------------------------------------- listing

LIST_KEYS = ["p/a", "p/b", "p/B", "p/0", "p/a/x", "p/-", "p", "pz", "q/a", "p/del"]


def test_listing_prefix_order_and_pagination(agent: AgentFactory) -> None:
    a = agent("alice")
    a.ok(*[put(k, i) for i, k in enumerate(LIST_KEYS)])
    a.ok(put("p/b", "v2"), rm("p/del"))
    under_p = ["p/-", "p/0", "p/B", "p/a", "p/a/x", "p/b"]  # byte order; deleted p/del absent
    page = a.list(prefix="p/")
    assert [s["key"] for s in page["shards"]] == under_p
    assert page["next_cursor"] is None
    for s in page["shards"]:
        assert set(s) == {"key", "version", "updated_by", "updated_at"}
        assert s["updated_by"] == "alice"
    assert {s["key"]: s["version"] for s in page["shards"]}["p/b"] == 2
    assert {s["key"]: s["version"] for s in page["shards"]}["p/a"] == 1
    assert [s["key"] for s in a.list()["shards"]] == sorted(set(LIST_KEYS) - {"p/del"})
    assert [s["key"] for s in a.list(prefix="p")["shards"]] == ["p", *under_p, "pz"]
    assert [s["key"] for s in a.list(prefix="p/a")["shards"]] == ["p/a", "p/a/x"]
    assert a.list(prefix="nothing/")["shards"] == []
    # Pagination: every key exactly once, in order, for several page sizes.
    for limit in (1, 2, 4, 5, 6, 7):
        assert [s["key"] for s in a.list_all("p/", limit=limit)] == under_p, limit
    first = a.list(prefix="p/", limit=4)
    assert len(first["shards"]) == 4 and first["next_cursor"]
    second = a.list(prefix="p/", limit=4, cursor=first["next_cursor"])
    assert [s["key"] for s in second["shards"]] == ["p/a/x", "p/b"] and second["next_cursor"] is None


def test_listing_is_a_range_read_with_phantom_protection(agent: AgentFactory) -> None:
    setup, a, b = agent("setup"), agent("alice"), agent("bob")
    seed = setup.ok(put("p/a", 1), put("p/b", 1), put("q/x", 1))
    a.list(prefix="p/")
    (rr,) = a.readset()["ranges"]
    assert rr == {"prefix": "p/", "start_after": None, "end_at": None, "seq": seed["seq"]}

    # 1. Created under the prefix: a phantom.
    created = b.ok(put("p/new", 1))
    found = conflicts_of(a.commit(put("summary", 2)), "phantom")
    assert found == {
        ("p/new", "phantom"): {
            "key": "p/new",
            "kind": "phantom",
            "read_version": None,
            "current_version": 1,
            "committed_by": "bob",
            "commit_seq": created["seq"],
        }
    }
    assert_error(a.read("summary"), 404)

    # 2. An existing listed key changed (never point-read by alice).
    a.http.delete("/readset")
    a.list(prefix="p/")
    b.ok(put("p/a", 2))
    found = conflicts_of(a.commit(put("summary", 2)), "phantom")
    assert set(found) == {("p/a", "phantom")} and found[("p/a", "phantom")]["current_version"] == 2

    # 3. A listed key deleted.
    a.list(prefix="p/")
    deleted = b.ok(rm("p/b"))
    found = conflicts_of(a.commit(put("summary", 2)), "phantom")
    assert found[("p/b", "phantom")]["current_version"] == 2
    assert found[("p/b", "phantom")]["commit_seq"] == deleted["seq"]
    assert set(found) == {("p/b", "phantom")}

    # 4. Writes outside the prefix (including look-alikes) do not conflict.
    a.list(prefix="p/")
    b.ok(put("q/y", 1), put("p", 1), put("pz", 1), put("p-x", 1), put("q/x", 2))
    assert a.ok(put("summary", 2))["versions"] == {"summary": 1}

    # 5. Several phantoms at once are all reported.
    a.list(prefix="p/")
    b.ok(put("p/one", 1), put("p/two", 1), put("p/a", 3))
    found = conflicts_of(a.commit(put("summary", 3)), "phantom")
    assert set(found) == {("p/one", "phantom"), ("p/two", "phantom"), ("p/a", "phantom")}


def test_paginated_listing_covers_only_the_pages_read(agent: AgentFactory) -> None:
    setup, a, b = agent("setup"), agent("alice"), agent("bob")
    setup.ok(*[put(f"p/{c}", 1) for c in "abcd"])
    page1 = a.list(prefix="p/", limit=2)
    assert [s["key"] for s in page1["shards"]] == ["p/a", "p/b"]
    assert [(r["start_after"], r["end_at"]) for r in a.readset()["ranges"]] == [(None, "p/b")]
    b.ok(put("p/z", 1))  # beyond the page alice read
    a.ok(put("out", 1))

    a.list(prefix="p/", limit=2)
    b.ok(put("p/aa", 1))  # inside the first page's range
    found = conflicts_of(a.commit(put("out", 2)), "phantom")
    assert set(found) == {("p/aa", "phantom")}

    # p/ is now a, aa, b, c, d, z: read two of three pages, then a key lands past page 2.
    page1 = a.list(prefix="p/", limit=2)
    page2 = a.list(prefix="p/", limit=2, cursor=page1["next_cursor"])
    assert [s["key"] for s in page2["shards"]] == ["p/b", "p/c"]
    b.ok(put("p/y", 1))
    a.ok(put("out", 3))

    # The last page is open-ended: a key created after the last listed key is a phantom.
    keys = [s["key"] for s in a.list_all("p/", limit=2)]
    assert keys == ["p/a", "p/aa", "p/b", "p/c", "p/d", "p/y", "p/z"]
    b.ok(put("p/zz", 1))
    found = conflicts_of(a.commit(put("out", 4)), "phantom")
    assert set(found) == {("p/zz", "phantom")}


# --------------------------------------------------------------------------- idempotency


def test_idempotency_key_replays_and_applies_once(agent: AgentFactory) -> None:
    a = agent("alice")
    first = a.commit(put("k", {"n": 1}), put("j", 1), idem="req-1")
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    again = a.commit(put("k", {"n": 1}), put("j", 1), idem="req-1")
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert versions_of(a, "k") == [1] and versions_of(a, "j") == [1]
    assert [c["seq"] for c in a.log()["commits"]] == [first.json()["seq"]]
    # The same key with another body is refused, and applies nothing.
    reused = a.commit(put("k", {"n": 2}), idem="req-1")
    assert assert_error(reused, 422, "idempotency_key_reused")["type"] == "invalid_request"
    assert a.value("k") == {"n": 1} and versions_of(a, "k") == [1]
    assert len(a.log()["commits"]) == 1
    # A different key is a different request.
    assert a.ok(put("k", {"n": 1}), put("j", 1), idem="req-2")["versions"] == {"k": 2, "j": 2}
    # Keys are per agent: bob's "req-1" is his own request.
    bob = agent("bob").commit(put("k", {"n": 1}), put("j", 1), idem="req-1")
    assert bob.status_code == 200 and "idempotent-replayed" not in bob.headers
    assert bob.json()["versions"] == {"k": 3, "j": 3}


def test_idempotent_replay_of_a_409(agent: AgentFactory) -> None:
    a, b = agent("alice"), agent("bob")
    a.ok(put("k", 1))
    a.read("k")
    b.ok(put("k", 2))
    first = a.commit(put("out", 1), idem="try-1")
    conflicts_of(first, "stale_read")
    assert a.readset()["reads"] == []
    again = a.commit(put("out", 1), idem="try-1")
    assert again.status_code == 409
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert_error(a.read("out"), 404)
    # Proof that the replay was not a re-execution: the same body, freshly, now succeeds.
    assert a.ok(put("out", 1), idem="try-2")["versions"] == {"out": 1}


def test_concurrent_identical_idempotent_requests_apply_once(agent: AgentFactory, bus: Server, space: str) -> None:
    n = 10
    barrier = threading.Barrier(n)
    body = {"writes": [{"key": "once", "value": {"by": "retry storm"}}, {"key": "once/2", "value": 2}]}

    def send(_: int) -> httpx.Response:
        with httpx.Client(timeout=TIMEOUT, headers={"X-Agent-Id": "alice", "Idempotency-Key": "storm"}) as c:
            barrier.wait(10)
            return c.post(f"{bus.url}/v1/spaces/{space}/commit", json=body)

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(send, range(n)))
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    obs = agent("observer")
    assert versions_of(obs, "once") == [1] and versions_of(obs, "once/2") == [1]
    assert len(obs.log()["commits"]) == 1


# --------------------------------------------------------------------------- history and log


def test_history_and_log(agent: AgentFactory, bus: Server, client: httpx.Client) -> None:
    a, b = agent("alice", "task-1"), agent("bob")
    results = [(a if i % 2 else b).ok(put("k", {"i": i})) for i in range(1, 6)]
    multi = a.ok(put("m/1", "x"), rm("k"))
    hist = a.history("k")
    assert [h["version"] for h in hist] == [6, 5, 4, 3, 2, 1]
    assert hist[0]["deleted"] is True and hist[0]["value"] is None and hist[0]["seq"] == multi["seq"]
    for h in hist[1:]:
        assert set(h) == {"version", "deleted", "seq", "updated_by", "updated_at", "value"}
        i = h["version"]
        assert h["value"] == {"i": i} and h["deleted"] is False
        assert h["updated_by"] == ("alice" if i % 2 else "bob")
        assert h["seq"] == results[i - 1]["seq"]
    assert [h["version"] for h in a.history("k", limit=2)] == [6, 5]
    assert [h["version"] for h in a.history("k", limit=2, before_version=4)] == [3, 2]
    assert [h["version"] for h in a.history("k", before_version=2)] == [1]
    assert a.history("k", before_version=1) == []
    assert_error(a.http.get("/shards/unknown/history"), 404, "shard_not_found")

    log = a.log()
    commits = log["commits"]
    assert [c["seq"] for c in commits] == [1, 2, 3, 4, 5, 6]
    assert log["next_after"] == 6
    for c, res in zip(commits, [*results, multi], strict=True):
        assert set(c) >= {"seq", "commit_id", "committed_by", "session", "at", "writes"}
        assert c["commit_id"] == res["commit_id"]
    assert [(c["committed_by"], c["session"]) for c in commits] == [
        ("alice", "task-1"),
        ("bob", ""),
        ("alice", "task-1"),
        ("bob", ""),
        ("alice", "task-1"),
        ("alice", "task-1"),
    ]
    ats = [c["at"] for c in commits]
    assert ats == sorted(ats) and all(isinstance(t, float) for t in ats)
    assert commits[0]["writes"] == [{"key": "k", "version": 1, "deleted": False}]
    assert sorted(commits[-1]["writes"], key=lambda w: w["key"]) == [
        {"key": "k", "version": 6, "deleted": True},
        {"key": "m/1", "version": 1, "deleted": False},
    ]
    page = a.log(after=2, limit=2)
    assert [c["seq"] for c in page["commits"]] == [3, 4] and page["next_after"] == 4
    assert a.log(after=6) == {"commits": [], "next_after": 6}

    # Unknown space: the log says so; history of anything in it is 404 too.
    ghost = Agent(client, bus.url, f"{a.space}-ghost", "alice")
    assert_error(ghost.http.get("/log"), 404, "space_not_found")
    assert_error(ghost.http.get("/shards/k/history"), 404)
    spaces = client.get(f"{bus.url}/v1/spaces", headers={"X-Agent-Id": "alice"}).json()["spaces"]
    assert {s["space"]: s["seq"] for s in spaces}[a.space] == 6


# --------------------------------------------------------------------------- delivery-log bounds


def test_read_set_ttl_gives_410_and_clears_the_read_set(
    server_factory: Callable[..., Server], space: str, client: httpx.Client
) -> None:
    srv = server_factory(readset_ttl_s="1")
    a = Agent(client, srv.url, space, "alice")
    a.ok(put("k", 1))
    a.read("k")
    time.sleep(1.3)
    assert a.readset()["expired"] is True
    err = assert_error(a.commit(put("k", 2)), 410, "read_set_expired")
    assert err["type"] == "read_set_expired" and err["retryable"] is True
    assert a.readset()["reads"] == []  # cleared: the agent re-reads and goes on
    assert versions_of(a, "k") == [1]
    a.read("k")
    assert a.ok(put("k", 2))["versions"] == {"k": 2}


def test_read_set_overflow_gives_410(agent: AgentFactory) -> None:
    a = agent("alice")
    keys = [f"k{i:02d}" for i in range(MAX_ENTRIES + 1)]
    a.ok(put("k00", 1))
    for key in keys[:MAX_ENTRIES]:
        a.read(key)
    assert a.readset()["overflow"] is False
    a.read(keys[MAX_ENTRIES])  # one entry too many
    rs = a.readset()
    assert rs["overflow"] is True and rs["expired"] is True
    err = assert_error(a.commit(put("k00", 2)), 410, "read_set_overflow")
    assert err["type"] == "read_set_expired" and err["retryable"] is True
    assert a.readset()["reads"] == [] and versions_of(a, "k00") == [1]
    # Re-reading keys already in a full read set needs no new entry.
    for key in [*keys[:MAX_ENTRIES], "k00", "k01"]:
        a.read(key)
    assert a.readset()["overflow"] is False
    assert a.ok(put("k00", 2))["versions"] == {"k00": 2}
    # A listing is an entry of the read set too.
    for key in keys[:MAX_ENTRIES]:
        a.read(key)
    a.list(prefix="k")
    assert_error(a.commit(put("k00", 3)), 410, "read_set_overflow")
    assert versions_of(a, "k00") == [2, 1]
