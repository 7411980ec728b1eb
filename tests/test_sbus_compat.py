"""S-Bus compatibility routes against real servers on every backend.

The request/response shapes asserted here are the reference server's (sbus-server, see
agentbus/api/SBUS_COMPAT.md); the semantics are agentbus's core, reached through S-Bus numbering
(S-Bus version = agentbus version - 1).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Server


def start(server_factory: Any, n: int = 1, **env: str) -> Server:
    """A server with S-Bus routes on, in a tenant of its own (PostgreSQL tests share a database)."""
    return server_factory(n, sbus_compat="true", default_tenant=f"t{uuid.uuid4().hex[:10]}", **env)  # type: ignore[no-any-return]


@pytest.fixture
def sbus(server_factory: Any) -> Iterator[httpx.Client]:
    srv = start(server_factory)
    with httpx.Client(base_url=srv.url, timeout=10) as client:
        yield client


def create(c: httpx.Client, key: str, content: str = "init", goal_tag: str = "goal") -> dict[str, Any]:
    r = c.post("/shard", json={"key": key, "content": content, "goal_tag": goal_tag})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def read(c: httpx.Client, key: str, agent: str | None = None) -> httpx.Response:
    return c.get(f"/shard/{key}", params={"agent_id": agent} if agent else None)


def commit(
    c: httpx.Client, key: str, expected: int, delta: str, agent: str, read_set: list[dict[str, Any]] | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"key": key, "expected_version": expected, "delta": delta, "agent_id": agent}
    if read_set is not None:
        body["read_set"] = read_set
    return c.post("/commit/v2", json=body)


def assert_agentbus_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err, dict) and err["type"] == "invalid_request" and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- create / read / commit
def test_versions_start_at_zero_and_map_to_agentbus(sbus: httpx.Client) -> None:
    made = create(sbus, "plan", content="v0 text", goal_tag="write the plan")
    assert made["key"] == "plan" and made["version"] == 0
    assert made["content"] == "v0 text" and made["goal_tag"] == "write the plan"
    assert made["id"] == hashlib.sha256(b"v0 text").hexdigest()
    assert made["owner"] is None and made["delta_log_depth"] == 0
    assert made["attempt_count"] == 0 and made["conflict_count"] == 0
    assert made["created_at"].endswith("Z") and made["updated_at"].endswith("Z")

    got = read(sbus, "plan", "alice").json()
    assert got["version"] == 0 and got["content"] == "v0 text"

    r = commit(sbus, "plan", 0, "v1 text", "alice")
    assert r.status_code == 200, r.text
    assert r.json() == {"new_version": 1, "shard_id": made["id"]}

    # /commit is S-Bus's v1 route; it accepts the expected_ver / content aliases.
    r = sbus.post("/commit", json={"key": "plan", "expected_ver": 1, "content": "v2 text", "agent_id": "bob"})
    assert r.status_code == 200, r.text
    assert r.json()["new_version"] == 2

    got = read(sbus, "plan").json()
    assert got["version"] == 2 and got["content"] == "v2 text"
    assert got["goal_tag"] == "write the plan", "a commit keeps the goal_tag"
    assert got["id"] == made["id"] and got["created_at"] == made["created_at"]
    assert got["delta_log_depth"] == 2 and got["updated_by"] == "bob"
    assert got["attempt_count"] == 2

    # The same shard through v1: space "sbus", agentbus version = S-Bus version + 1.
    v1 = sbus.get("/v1/spaces/sbus/shards/plan", headers={"X-Agent-Id": "ops"}).json()
    assert v1["version"] == 3
    assert v1["value"]["content"] == "v2 text" and v1["value"]["goal_tag"] == "write the plan"


def test_create_existing_shard_is_409(sbus: httpx.Client) -> None:
    create(sbus, "dup")
    r = sbus.post("/shard", json={"key": "dup", "content": "again", "goal_tag": "g"})
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "ShardAlreadyExists" and "dup" in body["detail"]
    assert read(sbus, "dup").json()["content"] == "init"


def test_missing_shard_is_404_sbus_shape(sbus: httpx.Client) -> None:
    r = read(sbus, "nope", "alice")
    assert r.status_code == 404
    assert r.json()["error"] == "ShardNotFound" and r.json()["detail"] == "shard not found: key=nope"

    r = commit(sbus, "nope", 0, "x", "alice")
    assert r.status_code == 404 and r.json()["error"] == "ShardNotFound", r.text

    create(sbus, "x")
    r = commit(sbus, "x", 0, "x1", "alice", read_set=[{"key": "ghost", "version_at_read": 0}])
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "ShardNotFound" and r.json()["key"] == "ghost"
    assert read(sbus, "x").json()["version"] == 0, "a refused commit applies nothing"


# --------------------------------------------------------------------------- conflicts
def test_version_mismatch(sbus: httpx.Client) -> None:
    create(sbus, "doc")
    assert commit(sbus, "doc", 0, "alice's", "alice").status_code == 200
    r = commit(sbus, "doc", 0, "bob's", "bob")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "VersionMismatch"
    assert body["detail"] == "version mismatch on key=doc: expected=0 found=1"
    assert body["code"] == "write_conflict" and body["retryable"] is True
    assert body["key"] == "doc" and body["expected_version"] == 0 and body["current_version"] == 1
    [item] = body["conflicts"]
    assert item["key"] == "doc" and item["kind"] == "write_conflict"
    assert item["read_version"] == 0 and item["current_version"] == 1 and item["committed_by"] == "alice"
    assert read(sbus, "doc").json()["content"] == "alice's"
    assert read(sbus, "doc").json()["conflict_count"] == 1


def test_cross_shard_stale_via_delivery_log(sbus: httpx.Client) -> None:
    create(sbus, "X")
    create(sbus, "Y")
    assert read(sbus, "X", "A").status_code == 200
    assert read(sbus, "Y", "A").status_code == 200
    assert commit(sbus, "Y", 0, "B changed Y", "B").status_code == 200

    r = commit(sbus, "X", 0, "A's X, built on the old Y", "A")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "CrossShardStale"
    assert body["detail"] == "cross-shard stale read: key=Y version_at_read=0 current_version=1"
    assert body["key"] == "Y" and body["version_at_read"] == 0 and body["current_version"] == 1
    assert body["code"] == "stale_read" and body["retryable"] is True
    assert [
        (c["key"], c["kind"], c["read_version"], c["current_version"], c["committed_by"]) for c in body["conflicts"]
    ] == [("Y", "stale_read", 0, 1, "B")]
    assert read(sbus, "X").json()["version"] == 0

    # The 409 ended A's read set; after re-reading Y the same commit goes through.
    assert read(sbus, "Y", "A").json()["version"] == 1
    r = commit(sbus, "X", 0, "A's X, built on the new Y", "A")
    assert r.status_code == 200, r.text
    assert r.json()["new_version"] == 1


def test_cross_shard_stale_via_explicit_read_set(sbus: httpx.Client) -> None:
    create(sbus, "X")
    create(sbus, "Y")
    assert commit(sbus, "Y", 0, "Y1", "B").status_code == 200
    r = commit(sbus, "X", 0, "X1", "A", read_set=[{"key": "Y", "version_at_read": 0}])
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "CrossShardStale"
    assert (r.json()["key"], r.json()["version_at_read"], r.json()["current_version"]) == ("Y", 0, 1)

    # Current read_set passes; a read_set entry naming the target is ignored (as S-Bus does).
    r = commit(
        sbus, "X", 0, "X1", "A", read_set=[{"key": "Y", "version_at_read": 1}, {"key": "X", "version_at_read": 7}]
    )
    assert r.status_code == 200, r.text
    assert r.json()["new_version"] == 1


def test_cross_shard_stale_reported_before_version_mismatch(sbus: httpx.Client) -> None:
    create(sbus, "X")
    create(sbus, "Y")
    assert commit(sbus, "X", 0, "X1", "B").status_code == 200
    assert commit(sbus, "Y", 0, "Y1", "B").status_code == 200
    r = commit(sbus, "X", 0, "X1'", "A", read_set=[{"key": "Y", "version_at_read": 0}])
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "CrossShardStale", "S-Bus checks the read set before the target"
    assert {(c["key"], c["kind"]) for c in body["conflicts"]} == {("X", "write_conflict"), ("Y", "stale_read")}


def test_target_is_judged_by_expected_version_only(sbus: httpx.Client) -> None:
    create(sbus, "X")
    assert read(sbus, "X", "A").json()["version"] == 0
    assert commit(sbus, "X", 0, "B's", "B").status_code == 200
    assert read(sbus, "X", "A").json()["version"] == 1
    r = commit(sbus, "X", 1, "A's, after re-reading", "A")
    assert r.status_code == 200, r.text
    assert r.json()["new_version"] == 2


def test_delivery_log_is_shared_by_bus_processes(server_factory: Any) -> None:
    srv = start(server_factory, n=2)
    one, two = (httpx.Client(base_url=u, timeout=10) for u in srv.urls)
    with one, two:
        create(one, "X")
        create(two, "Y")
        assert read(one, "Y", "A").status_code == 200
        assert commit(two, "Y", 0, "Y1", "B").status_code == 200
        r = commit(two, "X", 0, "X1", "A")
        assert r.status_code == 409 and r.json()["error"] == "CrossShardStale", r.text


def test_read_without_agent_records_nothing(sbus: httpx.Client) -> None:
    """An oracle/harness read without agent_id must not enter anyone's delivery log."""
    create(sbus, "X")
    create(sbus, "Y")
    assert read(sbus, "Y").status_code == 200
    assert sbus.get("/shards").status_code == 200
    assert commit(sbus, "Y", 0, "Y1", "B").status_code == 200
    r = commit(sbus, "X", 0, "X1", "anonymous")
    assert r.status_code == 200, r.text


def test_read_of_missing_shard_is_recorded_as_absent(sbus: httpx.Client) -> None:
    """agentbus semantics (documented difference): an agent that saw a shard absent conflicts
    when it was created before the agent commits."""
    create(sbus, "X")
    assert read(sbus, "later", "A").status_code == 404
    create(sbus, "later")
    r = commit(sbus, "X", 0, "X1", "A")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "CrossShardStale" and body["key"] == "later"
    assert body["version_at_read"] is None and body["current_version"] == 0


def test_listing_by_a_named_agent_is_a_range_read(sbus: httpx.Client) -> None:
    create(sbus, "task/1")
    create(sbus, "X")
    listed = sbus.get("/shards", params={"agent_id": "A"}).json()
    assert sorted(listed["shards"]) == ["X", "task/1"] and listed["count"] == 2
    create(sbus, "task/2")
    r = commit(sbus, "X", 0, "X1", "A")
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "CrossShardStale" and r.json()["code"] == "phantom"
    assert r.json()["key"] == "task/2"


def test_session_starts_a_fresh_delivery_log(sbus: httpx.Client) -> None:
    create(sbus, "X")
    create(sbus, "Y")
    read(sbus, "X", "A")
    read(sbus, "Y", "A")
    assert commit(sbus, "Y", 0, "Y1", "B").status_code == 200
    r = sbus.post("/session", json={"agent_id": "A"})
    assert r.status_code == 200 and r.json() == {"agent_id": "A", "status": "created"}
    assert commit(sbus, "X", 0, "X1", "A").status_code == 200


def test_expired_delivery_log_is_410(server_factory: Any) -> None:
    srv = start(server_factory, readset_ttl_s="1")
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        create(c, "X")
        create(c, "Y")
        read(c, "Y", "A")
        time.sleep(1.3)
        r = commit(c, "X", 0, "X1", "A")
        assert r.status_code == 410, r.text
        body = r.json()
        assert body["error"] == "SessionExpired" and body["detail"].startswith("session expired for agent 'A'")
        assert body["retryable"] is True and body["code"] == "read_set_expired"
        assert read(c, "X").json()["version"] == 0
        # The expired log is gone; the retry validates a fresh one.
        assert commit(c, "X", 0, "X1", "A").status_code == 200


# --------------------------------------------------------------------------- list / stats / health / reset
def test_list_stats_and_health(sbus: httpx.Client) -> None:
    assert sbus.get("/shards").json() == {"shards": [], "count": 0}
    create(sbus, "a")
    create(sbus, "b")
    assert commit(sbus, "a", 0, "a1", "A").status_code == 200
    assert commit(sbus, "a", 1, "a2", "A").status_code == 200
    assert commit(sbus, "a", 0, "late", "B").status_code == 409
    assert commit(sbus, "b", 0, "b1", "C", read_set=[{"key": "a", "version_at_read": 0}]).status_code == 409
    read(sbus, "b", "D")

    listed = sbus.get("/shards").json()
    assert sorted(listed["shards"]) == ["a", "b"] and listed["count"] == 2

    s = sbus.get("/stats").json()
    assert s["total_shards"] == 2 and s["total_commits"] == 2
    assert s["total_conflicts"] == 1 and s["cross_shard_stale"] == 1
    assert s["total_attempts"] == 3 and s["scr"] == pytest.approx(1 / 3)
    assert s["delivery_log"] == {"agents": 1, "deliveries": 1}
    assert s["space"] == "sbus" and s["space_seq"] == 4  # 2 creations + 2 commits
    assert "total_conflicts" in s["per_process"]

    h = sbus.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    ah = sbus.get("/admin/health").json()
    assert ah["status"] == "ok" and ah["total_shards"] == 2 and ah["total_commits"] == 2
    assert ah["total_conflicts"] == 1


def test_admin_reset_restarts_numbering(sbus: httpx.Client) -> None:
    create(sbus, "X", content="old")
    create(sbus, "Y")
    assert commit(sbus, "X", 0, "old1", "A").status_code == 200
    assert commit(sbus, "X", 0, "stale", "B").status_code == 409
    read(sbus, "Y", "A")

    r = sbus.post("/admin/reset")
    assert r.status_code == 200, r.text
    assert r.json() == {"cleared": 2, "space": "sbus.1"}

    assert sbus.get("/shards").json() == {"shards": [], "count": 0}
    assert read(sbus, "X").status_code == 404
    s = sbus.get("/stats").json()
    assert (s["total_shards"], s["total_commits"], s["total_conflicts"], s["space"]) == (0, 0, 0, "sbus.1")

    # Same key, numbering from 0 again, and A's delivery log from before the reset is gone.
    assert create(sbus, "X", content="new")["version"] == 0
    create(sbus, "Y")
    r = commit(sbus, "X", 0, "new1", "A")
    assert r.status_code == 200 and r.json()["new_version"] == 1, r.text

    assert sbus.post("/admin/reset").json() == {"cleared": 2, "space": "sbus.2"}


def test_admin_reset_needs_a_loopback_client_in_dev_mode(tmp_path: Any) -> None:
    """The one in-process test: only an ASGI client can pretend to be remote."""
    from fastapi.testclient import TestClient

    from agentbus.app import create_app
    from agentbus.settings import Settings
    from tests.conftest import migrate

    url = f"sqlite:///{tmp_path / 'agentbus.db'}"
    migrate(url)
    app = create_app(Settings(store=url, sbus_compat=True, auth=False))  # type: ignore[call-arg]
    with TestClient(app, client=("203.0.113.7", 5000)) as remote:
        r = remote.post("/admin/reset")
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "admin_loopback_only"


# --------------------------------------------------------------------------- v1 interplay
def test_v1_values_are_readable_through_sbus(sbus: httpx.Client) -> None:
    h = {"X-Agent-Id": "v1agent"}
    writes = [{"key": "text", "value": "plain string"}, {"key": "obj", "value": {"n": 1}}]
    r = sbus.post("/v1/spaces/sbus/commit", json={"writes": writes}, headers=h)
    assert r.status_code == 200, r.text
    text = read(sbus, "text").json()
    assert text["content"] == "plain string" and text["goal_tag"] == "" and text["version"] == 0
    assert text["id"] == hashlib.sha256(b"plain string").hexdigest()
    obj = read(sbus, "obj").json()
    assert obj["content"] == '{"n":1}'
    r = commit(sbus, "obj", 0, "now text", "A")
    assert r.status_code == 200 and r.json() == {"new_version": 1, "shard_id": obj["id"]}
    v1 = sbus.get("/v1/spaces/sbus/shards/obj", headers=h).json()
    assert v1["version"] == 2 and v1["value"]["content"] == "now text"


# --------------------------------------------------------------------------- bad input
BAD_INPUT: list[tuple[str, Any, int, str | None]] = [
    ("/shard", {"content": "c", "goal_tag": "g"}, 422, "validation_error"),
    ("/shard", {"key": "has space", "content": "c"}, 422, "invalid_key"),
    ("/shard", {"key": "k", "content": 5}, 422, "validation_error"),
    ("/shard", [], 422, "validation_error"),
    ("/commit/v2", {"key": "k", "expected_version": -1, "delta": "d", "agent_id": "a"}, 422, "validation_error"),
    ("/commit/v2", {"key": "k", "expected_version": "0", "delta": "d", "agent_id": "a"}, 422, "validation_error"),
    ("/commit/v2", {"key": "k", "expected_version": 2**64, "delta": "d", "agent_id": "a"}, 422, "validation_error"),
    ("/commit/v2", {"key": "k", "expected_version": 0, "delta": "d"}, 422, "validation_error"),
    ("/commit/v2", {"key": "k", "expected_version": 0, "delta": "d", "agent_id": "a b"}, 422, "invalid_agent_id"),
    ("/commit", {"key": "k", "expected_version": 0, "delta": "d", "agent_id": "a", "read_set": {}}, 422, None),
    (
        "/commit/v2",
        {"key": "k", "expected_version": 0, "delta": "d", "agent_id": "a", "read_set": [{"key": "y"}]},
        422,
        "validation_error",
    ),
    (
        "/commit/v2",
        {
            "key": "k",
            "expected_version": 0,
            "delta": "d",
            "agent_id": "a",
            "read_set": [{"key": "a b", "version_at_read": 0}],
        },
        422,
        "invalid_key",
    ),
    ("/session", {}, 422, "validation_error"),
    ("/session", {"agent_id": "bad/agent"}, 422, "invalid_agent_id"),
]


def test_bad_input_is_a_clear_4xx(sbus: httpx.Client) -> None:
    """One server for every case (a server per case costs more than the checks)."""
    create(sbus, "k")
    for path, body, status, code in BAD_INPUT:
        r = sbus.post(path, json=body)
        try:
            assert_agentbus_error(r, status, code)
        except AssertionError as exc:
            raise AssertionError(f"POST {path} {body!r}: {exc}") from None
    r = sbus.post("/commit/v2", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_agentbus_error(r, 400, "malformed_json")
    assert_agentbus_error(read(sbus, "bad key"), 422, "invalid_key")
    assert_agentbus_error(read(sbus, "k", agent="no spaces allowed"), 422, "invalid_agent_id")
    assert read(sbus, "k").json()["version"] == 0, "no bad request changed anything"


def test_too_large_delta_is_413(server_factory: Any) -> None:
    srv = start(server_factory, max_value_bytes="512")
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        create(c, "k")
        r = commit(c, "k", 0, "x" * 600, "A")
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "DeltaTooLarge" and r.json()["limit"] == 512
        r = c.post("/shard", json={"key": "big", "content": "x" * 600, "goal_tag": ""})
        assert r.status_code == 413 and r.json()["error"]["code"] == "value_too_large", r.text


def test_routes_are_off_by_default(server: Server) -> None:
    r = httpx.post(f"{server.url}/shard", json={"key": "k", "content": "c", "goal_tag": "g"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
