"""LangChain tools over one agentbus space, for an agent's ``ToolNode`` (or ``bind_tools``).

``agentbus_tools(space, client)`` gives ``read_shard``, ``list_shards`` and ``commit_shard``.
They act as the client's agent (its token/``agent_id`` and session), so what the model
reads with ``read_shard``/``list_shards`` is what agentbus validates when it calls
``commit_shard``. Every outcome is returned as text the model can act on, a conflict
included (``CONFLICT: ...`` naming each key, who changed it and what to do); only
unexpected failures (auth, server down) raise.
"""

from __future__ import annotations

import json
from typing import Any

from agentbus_sdk import AgentbusError, Client, ConflictError, Write
from langchain_core.tools import BaseTool, StructuredTool


def _value_of(text: str) -> Any:
    """A model passes values as text: valid JSON is stored as that JSON, anything else as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def conflict_text(exc: ConflictError) -> str:
    """A 409 as instructions for a model."""
    lines = [f"CONFLICT: nothing was written. {exc.message}"]
    for c in exc.conflicts:
        who = f" by {c.committed_by}" if c.committed_by else ""
        if c.kind == "phantom":
            lines.append(f"- {c.key}: changed{who} under a prefix you listed (now v{c.current_version})")
        elif c.kind == "write_conflict":
            lines.append(f"- {c.key}: expected_version did not match; current version is v{c.current_version}{who}")
        else:
            lines.append(f"- {c.key}: you read v{c.read_version}, it is now v{c.current_version}{who}")
    lines.append("Read these keys again with read_shard, redo your change on the new values, then commit again.")
    return "\n".join(lines)


def agentbus_tools(space: str, client: Client) -> list[BaseTool]:
    """``[read_shard, list_shards, commit_shard]`` bound to ``space`` through ``client``."""
    sp = client.space(space)

    def read_shard(key: str) -> str:
        """Read one shard of shared state. Returns JSON {key, version, value, updated_by}, or says it does not exist."""
        try:
            shard = sp.get(key)
        except AgentbusError as exc:
            return f"ERROR: {exc}"
        if shard is None:
            return f"NOT FOUND: shard {key!r} does not exist (creating it is allowed)."
        return json.dumps(
            {"key": shard.key, "version": shard.version, "value": shard.value, "updated_by": shard.updated_by},
            ensure_ascii=False,
        )

    def list_shards(prefix: str = "") -> str:
        """List shard keys (with versions) whose key starts with prefix; '' lists the whole space."""
        try:
            infos = sp.list(prefix)
        except AgentbusError as exc:
            return f"ERROR: {exc}"
        if not infos:
            return f"no shards under prefix {prefix!r}"
        return "\n".join(f"{i.key} v{i.version} (by {i.updated_by})" for i in infos)

    def commit_shard(key: str, value: str = "", delete: bool = False, expected_version: int | None = None) -> str:
        """Write one shard (value: JSON text, or plain text) or delete it (delete=true).

        The commit is refused if a shard you read since your last commit was changed by
        someone else; then read again and redo. expected_version (optional) additionally
        requires the shard to be at that version (0 = must not exist yet)."""
        write = (
            Write(key, delete=True, expected_version=expected_version)
            if delete
            else Write(key, _value_of(value), expected_version=expected_version)
        )
        try:
            res = sp.commit([write])
        except ConflictError as exc:
            return conflict_text(exc)
        except AgentbusError as exc:
            return f"ERROR: {exc}"
        action = "deleted" if delete else "wrote"
        return f"OK: {action} {key!r}, now version {res.versions.get(key)} (commit seq {res.seq})"

    return [
        StructuredTool.from_function(read_shard, name="read_shard"),
        StructuredTool.from_function(list_shards, name="list_shards"),
        StructuredTool.from_function(commit_shard, name="commit_shard"),
    ]


__all__ = ["agentbus_tools", "conflict_text"]
