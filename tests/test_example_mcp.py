"""examples/mcp_session.py runs with one command (its own server, or one given by --url)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mcp_session.py"
ADMIN = "ab_mcp-example-admin-token-0000000000000000000000"


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: no update lost" in out.stdout
    assert "alice's commit is refused (409 stale_read)" in out.stdout
    return out


def test_mcp_example_starts_its_own_server() -> None:
    out = run_example()
    assert "started a local agentbus" in out.stdout
    assert "plan: stale_read, she read v1, now v2 by bob" in out.stdout


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_mcp_example_against_a_dev_server(server: Any) -> None:
    out = run_example("--url", server.url)
    assert "started a local agentbus" not in out.stdout
    assert "v3 by alice" in out.stdout


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_mcp_example_with_a_token(server_factory: Any) -> None:
    srv = server_factory(auth="true", bootstrap_admin_token=ADMIN)
    r = httpx.post(
        f"{srv.url}/v1/admin/tokens",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"subject": "example-agent"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    out = run_example("--url", srv.url, env={"AGENTBUS_TOKEN": r.json()["token"]})
    # One principal, two MCP sessions: still two read sets, still a conflict.
    assert "alice is default/example-agent" in out.stdout
    assert "now v2 by example-agent" in out.stdout
