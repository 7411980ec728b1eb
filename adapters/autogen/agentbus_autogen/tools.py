"""AutoGen ``FunctionTool``s over one agentbus space: ``read_shard``, ``list_shards``, ``commit_shard``.

They act as the client's agent (token/``agent_id`` and session), so what the model reads
with ``read_shard``/``list_shards`` is what agentbus validates when it calls
``commit_shard``. Outcomes come back as text for the model, a conflict included
(``CONFLICT: ...`` with each key, who changed it, and what to do next).

``client`` may be an :class:`agentbus_sdk.AsyncClient` (preferred: AutoGen is async) or a
sync :class:`agentbus_sdk.Client` (its calls then run in a worker thread).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from typing import Annotated, Any

from agentbus_sdk import AgentbusError, AsyncClient, Client, ConflictError, Write
from autogen_core.tools import FunctionTool


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await an async SDK method; run a sync one in a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


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


def agentbus_tools(space: str, client: AsyncClient | Client) -> list[FunctionTool]:
    """``[read_shard, list_shards, commit_shard]`` bound to ``space`` through ``client``."""
    sp = client.space(space)

    async def read_shard(key: Annotated[str, "the shard key, e.g. 'plan' or 'notes/alice'"]) -> str:
        try:
            shard = await call(sp.get, key)
        except AgentbusError as exc:
            return f"ERROR: {exc}"
        if shard is None:
            return f"NOT FOUND: shard {key!r} does not exist (creating it is allowed)."
        return json.dumps(
            {"key": shard.key, "version": shard.version, "value": shard.value, "updated_by": shard.updated_by},
            ensure_ascii=False,
        )

    async def list_shards(prefix: Annotated[str, "key prefix; '' lists the whole space"] = "") -> str:
        try:
            infos = await call(sp.list, prefix)
        except AgentbusError as exc:
            return f"ERROR: {exc}"
        if not infos:
            return f"no shards under prefix {prefix!r}"
        return "\n".join(f"{i.key} v{i.version} (by {i.updated_by})" for i in infos)

    async def commit_shard(
        key: Annotated[str, "the shard key to write or delete"],
        value: Annotated[str, "the new value: JSON text, or plain text"] = "",
        delete: Annotated[bool, "true to delete the shard instead of writing it"] = False,
        expected_version: Annotated[int | None, "optional: require this current version (0 = must not exist)"] = None,
    ) -> str:
        write = (
            Write(key, delete=True, expected_version=expected_version)
            if delete
            else Write(key, _value_of(value), expected_version=expected_version)
        )
        try:
            res = await call(sp.commit, [write])
        except ConflictError as exc:
            return conflict_text(exc)
        except AgentbusError as exc:
            return f"ERROR: {exc}"
        action = "deleted" if delete else "wrote"
        return f"OK: {action} {key!r}, now version {res.versions.get(key)} (commit seq {res.seq})"

    return [
        FunctionTool(
            read_shard,
            name="read_shard",
            description="Read one shard of shared state: JSON {key, version, value, updated_by}, or NOT FOUND.",
        ),
        FunctionTool(
            list_shards,
            name="list_shards",
            description="List shard keys (with versions and last writer) whose key starts with prefix.",
        ),
        FunctionTool(
            commit_shard,
            name="commit_shard",
            description=(
                "Write (or delete) one shard. Refused with CONFLICT if a shard you read since your last "
                "commit was changed by someone else: then read again, redo the change, commit again."
            ),
        ),
    ]
