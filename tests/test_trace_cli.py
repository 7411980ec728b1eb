"""``agentbus trace`` and ``agentbus top`` against a live server (a uvicorn subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Server, module_server
from tests.upstream import FakeUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("up-cli", models=["m"], completion_words=3).start()
    yield up
    up.stop()


@pytest.fixture(scope="module", params=["sqlite"])
def srv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[Server]:
    env = {"AGENTBUS_TRACE_FLUSH_S": "0.1", "AGENTBUS_BROKER_ENDPOINTS": json.dumps([upstream.endpoint()])}
    yield from module_server("tracecli", request, tmp_path_factory, env=env)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "AGENTBUS_TOKEN": ""}
    return subprocess.run(
        [sys.executable, "-m", "agentbus.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def traffic(srv: Server, space: str) -> dict[str, Any]:
    base = f"{srv.url}/v1/spaces/{space}"
    a, b = {"X-Agent-Id": "alice"}, {"X-Agent-Id": "bob"}
    httpx.get(f"{base}/shards/plan", headers=a)
    httpx.get(f"{base}/shards/plan", headers=b)
    win = httpx.post(f"{base}/commit", json={"writes": [{"key": "plan", "value": 1}]}, headers=a).json()
    lost = httpx.post(f"{base}/commit", json={"writes": [{"key": "plan", "value": 2}]}, headers=b)
    assert lost.status_code == 409
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, headers={**a, "X-Agent-Space": space}, timeout=20)
    assert r.status_code == 200
    deadline = time.monotonic() + 15
    while len(httpx.get(f"{base}/trace").json()["events"]) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    return win  # type: ignore[no-any-return]


def test_trace_json(srv: Server, space: str) -> None:
    win = traffic(srv, space)
    out = cli("trace", space, "--url", srv.url, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    kinds = [e["kind"] for e in data["events"]]
    assert kinds == ["read", "read", "commit", "conflict", "model_call"]
    conflict = data["events"][3]
    assert conflict["conflicts"][0]["committed_by"] == "alice"
    assert conflict["conflicts"][0]["commit_seq"] == win["seq"]
    assert data["next"] == data["events"][-1]["id"]
    assert data["events"][4]["input_tokens"] == 2 and data["events"][4]["output_tokens"] == 3

    limited = json.loads(cli("trace", space, "--url", srv.url, "--json", "--limit", "2").stdout)
    assert len(limited["events"]) == 2


def test_trace_rich_timeline(srv: Server, space: str) -> None:
    win = traffic(srv, space)
    out = cli("trace", space, "--url", srv.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5
    conflict = next(line for line in lines if "conflict" in line)
    assert "bob" in conflict and "plan" in conflict and f"won by alice seq {win['seq']}" in conflict
    assert "stale_read" in conflict
    assert any("model_call" in line and "2→3 tok" in line for line in lines)
    assert "seq 1 plan→v1" in next(line for line in lines if " commit " in line)


def test_trace_errors_are_clean(srv: Server) -> None:
    out = cli("trace", "bad space!", "--url", srv.url)
    assert out.returncode == 1 and "422" in out.stderr and "Traceback" not in out.stderr
    out = cli("trace", "x", "--url", "http://127.0.0.1:9")
    assert out.returncode == 1 and "cannot reach" in out.stderr


def test_top_json(srv: Server, space: str) -> None:
    traffic(srv, space)
    out = cli("top", "--url", srv.url, "--json", "--interval", "0.3")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    (row,) = [s for s in snap["spaces"] if s["space"] == space]
    assert row["commits"] == 1 and row["conflicts"] == 1 and row["commits_per_s"] == 0
    (alice,) = [p for p in snap["principals"] if p["subject"] == "alice"]
    assert alice["calls"] >= 1 and alice["input_tokens"] >= 2 and alice["output_tokens"] >= 3
    assert snap["interval_s"] > 0

    once = cli("top", "--url", srv.url, "--once", "--interval", "0.1")
    assert once.returncode == 0, once.stderr
    assert space in once.stdout and "alice" in once.stdout


def test_trace_follow_json_lines(srv: Server, space: str) -> None:
    traffic(srv, space)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentbus.cli",
            "trace",
            space,
            "--url",
            srv.url,
            "--json",
            "--follow",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(5)]
        assert [e["kind"] for e in first][-1] == "model_call"
        r = httpx.post(
            f"{srv.url}/v1/spaces/{space}/commit",
            json={"writes": [{"key": "late", "value": 1}]},
            headers={"X-Agent-Id": "z"},
        )
        assert r.status_code == 200
        late = json.loads(proc.stdout.readline())  # blocks until the poll sees it
        assert late["kind"] == "commit" and late["agent"] == "z" and late["versions"] == {"late": 1}
    finally:
        proc.terminate()
        proc.wait(10)
