"""``AgentbusMemory``: an AutoGen ``Memory`` whose entries are shards of an agentbus space.

Every entry is one shard ``<prefix><time_ns>-<random>`` (so a listing is chronological)
with value ``{"content", "mime_type", "metadata"}``; text and JSON content are stored as
they are, bytes and images as base64 (``"encoding": "base64"`` / ``"image"``). Agents that
share the space and prefix share the memory; any HTTP client can read it too.

The memory uses its own session of the client's agent (``<session>:memory``), so its reads
never enter the read set that the agent's own commits (e.g. through the tools) are
validated against, and it clears that read set after each query.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

from agentbus_sdk import DELETE, AgentbusError, AsyncClient, Client, ConflictError, Write
from autogen_core import CancellationToken, Image
from autogen_core.memory import Memory, MemoryContent, MemoryMimeType, MemoryQueryResult, UpdateContextResult
from autogen_core.model_context import ChatCompletionContext
from autogen_core.models import SystemMessage

from agentbus_autogen.tools import call


def _encode(content: MemoryContent) -> dict[str, Any]:
    mime = content.mime_type.value if isinstance(content.mime_type, MemoryMimeType) else str(content.mime_type)
    out: dict[str, Any] = {"mime_type": mime, "metadata": content.metadata}
    c = content.content
    if isinstance(c, Image):
        out.update(content=c.to_base64(), encoding="image")
    elif isinstance(c, bytes):
        out.update(content=base64.b64encode(c).decode(), encoding="base64")
    else:
        out["content"] = c
    return out


def _decode(value: Any) -> MemoryContent:
    if not isinstance(value, dict) or "content" not in value:  # a shard someone wrote by hand
        return MemoryContent(
            content=value if isinstance(value, str | dict) else json.dumps(value), mime_type="text/plain"
        )
    c = value["content"]
    if value.get("encoding") == "image":
        c = Image.from_base64(c)
    elif value.get("encoding") == "base64":
        c = base64.b64decode(c)
    mime = value.get("mime_type") or "text/plain"
    try:
        mime = MemoryMimeType(mime)
    except ValueError:
        pass
    return MemoryContent(content=c, mime_type=mime, metadata=value.get("metadata"))


def _text(content: MemoryContent) -> str:
    c = content.content
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return json.dumps(c, ensure_ascii=False, default=str)
    return ""


def _score(text: str, query: str) -> float:
    """Share of the query's words found in the entry (case-insensitive): lexical, not semantic."""
    words = [w for w in query.lower().split() if w]
    if not words:
        return 1.0
    low = text.lower()
    return sum(1 for w in words if w in low) / len(words)


class AgentbusMemory(Memory):
    """Shared AutoGen memory in an agentbus space.

    Args:
        client: an :class:`agentbus_sdk.AsyncClient` (or a sync ``Client``, run in threads).
        space: the space holding the entries.
        prefix: key prefix of this memory's entries (non-empty, ends with ``/``).
        name: the memory's name (default: the prefix).
        context_limit: ``update_context`` adds at most this many of the newest entries.
        context_query: if true, ``update_context`` adds only entries matching the last
            message's words (by :meth:`query`), instead of all entries.
    """

    component_type = "memory"

    def __init__(
        self,
        client: AsyncClient | Client,
        space: str,
        *,
        prefix: str = "memory/",
        name: str | None = None,
        context_limit: int | None = 20,
        context_query: bool = False,
        max_attempts: int = 8,
    ) -> None:
        if not prefix or not prefix.endswith("/"):
            raise ValueError("prefix must be non-empty and end with '/'")
        base = client.space(space)
        session = f"{base.session[:100]}:memory" if base.session else "memory"
        self._space = base.with_session(session)
        self._client = client
        self._prefix = prefix
        self._name = name or prefix.rstrip("/")
        self.context_limit = context_limit
        self.context_query = context_query
        self.max_attempts = max_attempts

    @property
    def name(self) -> str:
        return self._name

    @property
    def space(self) -> Any:
        """The SDK ``Space`` (in the memory's own session) holding the entries."""
        return self._space

    # ------------------------------------------------------------------ storage
    async def _entries(self) -> list[tuple[str, MemoryContent]]:
        """All entries, oldest first, as ``(key, content)``."""
        try:
            infos = await call(self._space.list, self._prefix)
            sem = asyncio.Semaphore(8)

            async def get(key: str) -> Any:
                async with sem:
                    return await call(self._space.get, key)

            shards = await asyncio.gather(*(get(i.key) for i in infos))
        finally:
            try:
                await call(self._space.clear_readset)
            except AgentbusError:
                pass
        out: list[tuple[str, MemoryContent]] = []
        for shard in shards:
            if shard is not None:
                content = _decode(shard.value)
                meta = dict(content.metadata or {})
                meta.setdefault("agentbus_key", shard.key)
                meta.setdefault("updated_by", shard.updated_by)
                out.append((shard.key, content.model_copy(update={"metadata": meta})))
        return out

    async def add(self, content: MemoryContent, cancellation_token: CancellationToken | None = None) -> None:
        """Store ``content`` as a new shard (create-only, so two agents never overwrite each other)."""
        key = f"{self._prefix}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        await call(self._space.commit, [Write(key, _encode(content), expected_version=0)])

    async def query(
        self,
        query: str | MemoryContent = "",
        cancellation_token: CancellationToken | None = None,
        **kwargs: Any,
    ) -> MemoryQueryResult:
        """Entries containing the query's words, best match first (``metadata["score"]``);
        an empty query returns every entry in chronological order. ``k=`` limits the count."""
        q = query if isinstance(query, str) else _text(query)
        k = kwargs.get("k") or kwargs.get("limit")
        scored: list[tuple[float, int, MemoryContent]] = []
        for n, (_, content) in enumerate(await self._entries()):
            s = _score(_text(content), q)
            if s > 0:
                meta = {**(content.metadata or {}), "score": s}
                scored.append((s, n, content.model_copy(update={"metadata": meta})))
        if q.strip():
            scored.sort(key=lambda t: (-t[0], t[1]))
        results = [c for _, _, c in scored]
        return MemoryQueryResult(results=results[:k] if k else results)

    async def update_context(self, model_context: ChatCompletionContext) -> UpdateContextResult:
        """Add the memories to ``model_context`` as one system message (like ``ListMemory``)."""
        if self.context_query:
            messages = await model_context.get_messages()
            last = messages[-1].content if messages else ""
            res = await self.query(last if isinstance(last, str) else "")
            chosen = res.results
        else:
            chosen = [c for _, c in await self._entries()]
        if self.context_limit is not None:
            chosen = chosen[-self.context_limit :] if not self.context_query else chosen[: self.context_limit]
        if chosen:
            lines = [f"{i}. {_text(m) or m.mime_type}" for i, m in enumerate(chosen, 1)]
            order = "best match first" if self.context_query else "in chronological order"
            text = f"\nRelevant memory content ({order}):\n" + "\n".join(lines) + "\n"
            await model_context.add_message(SystemMessage(content=text))
        return UpdateContextResult(memories=MemoryQueryResult(results=chosen))

    async def clear(self) -> None:
        """Delete every entry under the prefix, atomically; redone if an agent adds one meanwhile."""
        for attempt in range(1, self.max_attempts + 1):
            infos = await call(self._space.list, self._prefix)
            if not infos:
                await call(self._space.clear_readset)
                return
            try:
                await call(self._space.commit, {i.key: DELETE for i in infos})
                return
            except ConflictError:
                if attempt == self.max_attempts:
                    raise
                await asyncio.sleep(0.02 * attempt)

    async def close(self) -> None:
        """Nothing to release: the client belongs to the caller (close it yourself)."""
