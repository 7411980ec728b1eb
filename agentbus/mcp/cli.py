"""``agentbus mcp``: the MCP server over stdio, against a running agentbus."""

from __future__ import annotations

import typer


def mcp_command(
    url: str = typer.Option(
        "http://127.0.0.1:8080", "--url", envvar="AGENTBUS_URL", help="Base URL of the agentbus to talk to."
    ),
    token: str = typer.Option(
        None,
        "--token",
        envvar="AGENTBUS_TOKEN",
        show_default=False,
        help="Bearer token to act with (default AGENTBUS_TOKEN). Prefer the environment: arguments are visible "
        "to other local users.",
    ),
    agent_id: str = typer.Option(
        None,
        "--agent-id",
        envvar="AGENTBUS_AGENT_ID",
        show_default=False,
        help="Dev mode only (server with AGENTBUS_AUTH=false): the agent id to act as (X-Agent-Id).",
    ),
    session: str = typer.Option(
        None,
        "--session",
        show_default=False,
        help="X-Agent-Session of every call (default mcp-<random>: one read set per server process).",
    ),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for one bus or model call."),
) -> None:
    """Serve the bus (read, list, commit, history, ...) and the broker (chat, complete) as MCP tools over
    stdio, for MCP clients that launch servers as commands. Streamable-HTTP clients use /mcp on the server."""
    import anyio

    from agentbus.mcp.server import run_stdio

    async def main() -> None:
        await run_stdio(url, token=token, agent_id=agent_id, session=session, timeout_s=timeout)

    anyio.run(main)
