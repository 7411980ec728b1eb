"""Two agents share state through agentbus's MCP server, with the official MCP client.

Each agent is an MCP session on ``/mcp`` (streamable HTTP). The script lists the tools,
creates a plan, lets both agents read it, lets bob commit first and shows the conflict
alice's stale commit gets (as an MCP tool error with every conflicting key), then alice
re-reads and commits again. Nothing is silently overwritten.

    .venv/bin/python examples/mcp_session.py                  # starts a throwaway local server
    .venv/bin/python examples/mcp_session.py --url http://127.0.0.1:8080           # dev-mode server
    AGENTBUS_TOKEN=ab_... .venv/bin/python examples/mcp_session.py --url https://bus.example

With a token both agents act as the token's principal, each in its own MCP session (so each
still has its own read set); without one (a dev-mode server) they are named by X-Agent-Id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """A dev-mode agentbus (no tokens, loopback only) on a fresh SQLite file; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AGENTBUS_AUTH": "false", "AGENTBUS_STORE": f"sqlite:///{tmp}/agentbus.db"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentbus.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"agentbus exited with {proc.returncode}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("agentbus did not start within 60 s")
                time.sleep(0.1)
            print(f"started a local agentbus at {url}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.asynccontextmanager
async def mcp_session(url: str, agent: str, token: str | None) -> AsyncIterator[Client]:
    """One MCP session on ``url``/mcp, as ``agent`` (dev mode) or as the token's principal."""
    headers = {"Authorization": f"Bearer {token}"} if token else {"X-Agent-Id": agent}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=120.0)) as http:
        # mode="legacy": the initialize handshake gives every client its own MCP session
        # (and so its own read set); 2026-07-28 clients are sessionless, see agentbus/mcp/README.md.
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http), mode="legacy") as client:
            yield client


async def tool(client: Client, name: str, **args: Any) -> tuple[bool, dict[str, Any]]:
    """Call a tool; (ok, structured result). A failed call is data for the agent, not an exception."""
    res = await client.call_tool(name, args)
    return not res.is_error, res.structured_content or {}


async def commit_plan(client: Client, space: str, steps: list[str], **write: Any) -> tuple[bool, dict[str, Any]]:
    return await tool(client, "commit", space=space, writes=[{"key": "plan", "value": {"steps": steps}, **write}])


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="agentbus base URL (default: start a local one)")
    ap.add_argument("--token", default=os.environ.get("AGENTBUS_TOKEN"), help="bearer token (default AGENTBUS_TOKEN)")
    ap.add_argument("--space", default=f"mcp-demo-{uuid.uuid4().hex[:6]}")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url.rstrip("/") if args.url else stack.enter_context(local_server())
        return await demo(url, args.token, args.space)


async def demo(url: str, token: str | None, space: str) -> int:
    async with mcp_session(url, "alice", token) as alice, mcp_session(url, "bob", token) as bob:
        tools = (await alice.list_tools()).tools
        print(f"tools: {', '.join(t.name for t in tools)}")
        me = (await tool(alice, "whoami"))[1]
        print(f"alice is {me['tenant']}/{me['subject']}, read set session {me['session']}")

        ok, plan = await tool(alice, "read_shard", space=space, key="plan")
        print(f"alice reads plan: exists={plan['exists']} version={plan['version']}")
        ok, res = await commit_plan(alice, space, ["design"], expected_version=0)
        assert ok, res
        print(f"alice creates plan -> version {res['versions']['plan']}")

        # Both read version 1; bob commits first.
        _, a_view = await tool(alice, "read_shard", space=space, key="plan")
        _, b_view = await tool(bob, "read_shard", space=space, key="plan")
        ok, res = await commit_plan(bob, space, [*b_view["value"]["steps"], "build"])
        assert ok, res
        print(f"bob adds 'build' -> version {res['versions']['plan']}")

        # Alice's commit is based on version 1: refused, with the details.
        ok, res = await commit_plan(alice, space, [*a_view["value"]["steps"], "test"])
        if ok:
            print("FAILED: a stale commit went through")
            return 1
        err = res["error"]
        print(f"alice's commit is refused ({res['status']} {err['code']}):")
        for c in err["conflicts"]:
            print(
                f"  {c['key']}: {c['kind']}, she read v{c['read_version']}, now v{c['current_version']} "
                f"by {c['committed_by']}"
            )

        # Re-read, redo, commit.
        _, fresh = await tool(alice, "read_shard", space=space, key="plan")
        ok, res = await commit_plan(alice, space, [*fresh["value"]["steps"], "test"])
        assert ok, res
        print(f"alice re-reads and adds 'test' -> version {res['versions']['plan']}")

        _, hist = await tool(bob, "history", space=space, key="plan")
        for v in reversed(hist["versions"]):
            print(f"  v{v['version']} by {v['updated_by']}: {json.dumps(v['value'])}")
        final = hist["versions"][0]["value"]["steps"]
        good = final == ["design", "build", "test"]
        print("OK: no update lost" if good else f"FAILED: final plan {final}")
        return 0 if good else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
