"""Server-Sent Events of commits (GET /v1/spaces/{space}/events), on every backend.

Every stream is read with an HTTP read timeout and stops after the number of events it
expects, so a missing event fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, Server, module_server

READ_TIMEOUT = 15.0  # longer than the server's 15 s keep-alive is not needed: commits come sooner


@pytest.fixture(scope="module", params=BACKENDS)
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two agentbus processes per backend, sharing one store, for the whole module (tests
    use unique spaces)."""
    yield from module_server("events", request, tmp_path_factory, n=2)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One connection pool for the module (thread-safe; creating clients is costly)."""
    with httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0)) as c:
        yield c


def commit(http: httpx.Client, base: str, space: str, agent: str, *writes: dict[str, Any]) -> dict[str, Any]:
    r = http.post(f"{base}/v1/spaces/{space}/commit", json={"writes": list(writes)}, headers={"X-Agent-Id": agent})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def log(http: httpx.Client, base: str, space: str) -> list[dict[str, Any]]:
    r = http.get(f"{base}/v1/spaces/{space}/log", headers={"X-Agent-Id": "observer"})
    assert r.status_code == 200, r.text
    return r.json()["commits"]  # type: ignore[no-any-return]


def read_events(
    http: httpx.Client,
    base: str,
    space: str,
    n: int,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    on_event: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Open the stream, parse SSE until ``n`` events arrived (``on_event(i)`` after event i),
    and close it. Each field is kept as sent; ``data`` is decoded from JSON."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    timeout = httpx.Timeout(READ_TIMEOUT, connect=5.0)
    with http.stream(
        "GET",
        f"{base}/v1/spaces/{space}/events",
        params=params,
        headers={"X-Agent-Id": "listener", **(headers or {})},
        timeout=timeout,
    ) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert {"no-cache", "no-store"} & {v.strip() for v in resp.headers["cache-control"].split(",")}
        fields: dict[str, str] = {}
        for line in resp.iter_lines():
            assert time.monotonic() < deadline, f"stream too slow: got {events}"
            if line.startswith(":"):
                continue  # comment / keep-alive
            if line:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
                continue
            if "data" in fields:
                event: dict[str, Any] = dict(fields)
                event["data"] = json.loads(fields["data"])
                events.append(event)
                if on_event:
                    on_event(len(events))
                if len(events) >= n:
                    break
            fields = {}
    return events


def ids(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["id"]) for e in events]


def test_stream_replays_commits_with_ids_and_resumes(bus: Server, space: str, http: httpx.Client) -> None:
    url = bus.url
    commit(http, url, f"{space}-other", "zed", {"key": "noise", "value": 1})  # another space: never streamed
    c1 = commit(http, url, space, "alice", {"key": "k", "value": 1})
    c2 = commit(http, url, space, "bob", {"key": "j", "value": {"x": [1]}}, {"key": "k", "value": 2})
    c3 = commit(http, url, space, "alice", {"key": "j", "delete": True})
    commit(http, url, f"{space}-other", "zed", {"key": "noise", "value": 2})

    events = read_events(http, url, space, 3)
    assert ids(events) == [c1["seq"], c2["seq"], c3["seq"]] == [1, 2, 3]
    assert {e["event"] for e in events} == {"commit"}
    # Each event is the log entry of that commit: who, when, what.
    assert [e["data"] for e in events] == log(http, url, space)
    assert [e["data"]["commit_id"] for e in events] == [c1["commit_id"], c2["commit_id"], c3["commit_id"]]
    assert [e["data"]["committed_by"] for e in events] == ["alice", "bob", "alice"]
    assert sorted(events[1]["data"]["writes"], key=lambda w: w["key"]) == [
        {"key": "j", "version": 1, "deleted": False},
        {"key": "k", "version": 2, "deleted": False},
    ]
    assert events[2]["data"]["writes"] == [{"key": "j", "version": 2, "deleted": True}]

    # Resume: only commits after the last one seen, by Last-Event-ID or ?after=.
    assert ids(read_events(http, url, space, 2, headers={"Last-Event-ID": "1"})) == [2, 3]
    assert ids(read_events(http, url, space, 1, headers={"Last-Event-ID": "2"})) == [3]
    assert ids(read_events(http, url, space, 2, params={"after": 1})) == [2, 3]
    assert ids(read_events(http, url, space, 1, params={"after": 2})) == [3]
    # A reconnecting browser repeats the URL it first used: Last-Event-ID wins over ?after=.
    assert ids(read_events(http, url, space, 1, params={"after": 0}, headers={"Last-Event-ID": "2"})) == [3]


def test_stream_delivers_live_commits_in_order(bus: Server, space: str, http: httpx.Client) -> None:
    url = bus.url
    commit(http, url, space, "alice", {"key": "k", "value": 0})
    threads: list[threading.Thread] = []

    def after_event(i: int) -> None:
        # Once event i arrived, commit the next one from another client: the open stream
        # must deliver it without reconnecting.
        if i < 4:
            t = threading.Thread(target=commit, args=(http, url, space, f"agent{i}", {"key": "k", "value": i}))
            t.start()
            threads.append(t)

    events = read_events(http, url, space, 4, on_event=after_event)
    for t in threads:
        t.join(30)
    assert ids(events) == [1, 2, 3, 4]
    assert [e["data"]["committed_by"] for e in events] == ["alice", "agent1", "agent2", "agent3"]
    assert [e["data"]["writes"][0]["version"] for e in events] == [1, 2, 3, 4]
    # A stream opened at the head waits for the next commit, then delivers only it.
    t = threading.Timer(0.5, commit, args=(http, url, space, "late", {"key": "late", "value": 1}))
    t.start()
    try:
        (late,) = read_events(http, url, space, 1, headers={"Last-Event-ID": "4"})
    finally:
        t.join(30)
    assert late["id"] == "5" and late["data"]["committed_by"] == "late"


def test_stream_sees_commits_made_through_another_process(bus: Server, space: str, http: httpx.Client) -> None:
    listen, other = bus.urls
    assert listen != other

    def commit_elsewhere(i: int) -> None:
        if i < 3:  # after each event, the next commit goes through the *other* process
            commit(http, other, space, f"remote{i}", {"key": f"k{i}", "value": i})

    commit(http, other, space, "remote0", {"key": "k0", "value": 0})
    events = read_events(http, listen, space, 3, on_event=commit_elsewhere)
    assert ids(events) == [1, 2, 3]
    assert [e["data"]["committed_by"] for e in events] == ["remote0", "remote1", "remote2"]
    assert [e["data"] for e in events] == log(http, listen, space) == log(http, other, space)
    # And the other way round, resuming on the other process.
    commit(http, listen, space, "local", {"key": "k9", "value": 9})
    (ev,) = read_events(http, other, space, 1, headers={"Last-Event-ID": "3"})
    assert ev["id"] == "4" and ev["data"]["committed_by"] == "local"
