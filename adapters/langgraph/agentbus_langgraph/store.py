"""``AgentbusStore``: a LangGraph ``BaseStore`` whose items are agentbus shards.

Mapping (see :mod:`agentbus_langgraph.keys`): one store instance works in one agentbus
*space*; an item ``(namespace, key)`` is the shard ``<root><label_1>/.../<label_n>/<key>``
whose value is the item's JSON object. ``Item.updated_at`` is the shard's ``updated_at``;
agentbus keeps only the time of the last write, so ``Item.created_at`` is the same time.

Conflicts: every ``get``/``search``/``list_namespaces`` goes through agentbus, which records
what this agent (client identity + session) saw. A ``put``/``delete`` is a commit, and the
bus refuses it with :class:`agentbus_sdk.ConflictError` when anything read since the
previous commit of that session was changed by someone else meanwhile (a listing also
guards against shards appearing or vanishing under its prefix). Nothing is applied then,
and the read set is cleared: re-read and redo. :meth:`AgentbusStore.transact` runs that
loop for a graph node, in a session of its own and with all the node's writes committed
atomically.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from agentbus_sdk import DELETE, AgentbusError, AsyncClient, Client, ConflictError, ReadSetExpired
from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)

from agentbus_langgraph.keys import namespace_prefix, shard_key, split_key

T = TypeVar("T")

# The op planner (AgentbusStore._plan) yields requests that a sync or async driver performs:
# ("get", key), ("get_many", keys), ("list", prefix, limit), ("commit", {key: value | None}).


def _timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if isinstance(value, str):
        try:
            return _timestamp(float(value))
        except ValueError:
            return _timestamp(datetime.fromisoformat(value))
    return datetime.now(tz=UTC)


def _as_dict(value: Any) -> dict[str, Any]:
    """Item values are JSON objects; a shard someone wrote with another type is wrapped as ``{"value": v}``."""
    return dict(value) if isinstance(value, Mapping) else {"value": value}


def _compare(item_value: Any, filter_value: Any) -> bool:
    """Filter semantics of LangGraph's stores: nested dict match, ``$eq/$ne/$gt/$gte/$lt/$lte``."""
    if isinstance(filter_value, dict):
        if any(k.startswith("$") for k in filter_value):
            return all(_operator(item_value, op, arg) for op, arg in filter_value.items())
        if not isinstance(item_value, dict):
            return False
        return all(_compare(item_value.get(k), v) for k, v in filter_value.items())
    if isinstance(filter_value, list | tuple):
        return (
            isinstance(item_value, list | tuple)
            and len(item_value) == len(filter_value)
            and all(_compare(a, b) for a, b in zip(item_value, filter_value, strict=True))
        )
    return bool(item_value == filter_value)


def _operator(value: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return bool(value == arg)
    if op == "$ne":
        return bool(value != arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        try:
            a, b = float(value), float(arg)
        except (TypeError, ValueError):
            return False
        return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]
    raise ValueError(f"unsupported filter operator: {op}")


def _matches_filter(value: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    return not flt or all(_compare(value.get(k), v) for k, v in flt.items())


def _keyword_score(value: dict[str, Any], query: str) -> float:
    """Share of the query's words found in the item's JSON text (case-insensitive). Lexical, not semantic."""
    words = [w for w in query.lower().split() if w]
    if not words:
        return 1.0
    text = json.dumps(value, ensure_ascii=False, default=str).lower()
    return sum(1 for w in words if w in text) / len(words)


def _namespace_matches(cond: MatchCondition, ns: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(ns) < len(path):
        return False
    pairs = (
        zip(ns, path, strict=False) if cond.match_type == "prefix" else zip(reversed(ns), reversed(path), strict=False)
    )
    return all(p == "*" or n == p for n, p in pairs)


class AgentbusStore(BaseStore):
    """LangGraph long-term memory in an agentbus space, with agentbus conflict detection.

    Args:
        client: a sync :class:`agentbus_sdk.Client` (its ``agent_id``/token and ``session``
            are the identity under which reads are recorded). Used by ``get``/``put``/....
        space: the agentbus space every item lives in.
        root: a key prefix for all items (e.g. ``"memory/"``, must be empty or end in
            ``/``), so a space can hold other shards besides this store's.
        aclient: an :class:`agentbus_sdk.AsyncClient` for ``aget``/``aput``/...; give it the
            same identity and session as ``client`` so sync and async reads share one read
            set. Without it the async methods run the sync ones in a worker thread.
        query: what ``search(query=...)`` does: ``"keyword"`` (default) keeps items whose
            JSON text contains at least one query word, ranked by the share of words found
            (``SearchItem.score``); ``"error"`` raises ``NotImplementedError``. There is no
            vector index: this store does not embed anything.
    """

    supports_ttl = False

    def __init__(
        self,
        client: Client | None,
        space: str,
        *,
        root: str = "",
        aclient: AsyncClient | None = None,
        query: str = "keyword",
        max_attempts: int = 8,
    ) -> None:
        if client is None and aclient is None:
            raise ValueError("AgentbusStore needs a Client, an AsyncClient, or both")
        if root and not root.endswith("/"):
            raise ValueError("root must be empty or end with '/'")
        if query not in ("keyword", "error"):
            raise ValueError("query must be 'keyword' or 'error'")
        self.client = client
        self.aclient = aclient
        self.space_name = space
        self.root = root
        self.query_mode = query
        self.max_attempts = max_attempts

    @classmethod
    def connect(
        cls,
        base_url: str,
        space: str,
        *,
        agent_id: str | None = None,
        token: str | None = None,
        session: str | None = None,
        **kwargs: Any,
    ) -> AgentbusStore:
        """A store with a sync and an async client sharing one identity and session
        (closed by :meth:`close` / :meth:`aclose`)."""
        common: dict[str, Any] = {"token": token, "agent_id": agent_id, "session": session}
        return cls(Client(base_url, **common), space, aclient=AsyncClient(base_url, **common), **kwargs)

    def close(self) -> None:
        """Close the sync client (clients you passed in are yours to close; this is for :meth:`connect`)."""
        if self.client is not None:
            self.client.close()

    async def aclose(self) -> None:
        """Close both clients."""
        if self.aclient is not None:
            await self.aclient.aclose()
        self.close()

    # ------------------------------------------------------------------ BaseStore
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        if self.client is None:
            raise RuntimeError("this AgentbusStore has only an AsyncClient: use the async methods (aget, aput, ...)")
        space = self.client.space(self.space_name)
        return _drive_sync(self._plan(list(ops)), _SyncIO(space))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        ops = list(ops)
        if self.aclient is None:
            return await asyncio.to_thread(self.batch, ops)
        return await _drive_async(self._plan(ops), _AsyncIO(self.aclient.space(self.space_name)))

    # ------------------------------------------------------------------ transactions
    def transact(
        self,
        fn: Callable[[BaseStore], T],
        *,
        max_attempts: int | None = None,
        on_conflict: Callable[[AgentbusError, int], Any] | None = None,
    ) -> T:
        """Run ``fn(tx)`` as one agentbus transaction, redoing it on a conflict.

        ``tx`` is a ``BaseStore`` whose reads are recorded in a fresh session of this
        store's agent (so concurrent nodes sharing this store do not mix their read sets)
        and whose puts/deletes are buffered (later reads in ``fn`` see them) and committed
        together when ``fn`` returns. If that commit conflicts, ``fn`` runs again with a
        new session; after ``max_attempts`` the last ``ConflictError`` is raised. ``fn``
        must be safe to run more than once: compute from what it reads through ``tx``.
        ``on_conflict(error, attempt)`` is called before each re-run (e.g. to log it).
        """
        if self.client is None:
            raise RuntimeError("transact needs a sync Client; use atransact")
        attempts = max_attempts or self.max_attempts
        for attempt in range(1, attempts + 1):
            space = self.client.space(self.space_name)
            space = space.with_session(_tx_session(space.session))
            io = _SyncIO(space)
            tx = _TxStore(self, sync_io=io)
            committed = False
            try:
                result = fn(tx)
                committed = True  # a commit ends the epoch whether it succeeds or conflicts
                if tx.pending:
                    _drive_sync(self._commit_plan(tx.pending), io)
                return result
            except (ConflictError, ReadSetExpired) as exc:
                if attempt == attempts:
                    raise
                if on_conflict is not None:
                    on_conflict(exc, attempt)
                time.sleep(_backoff(attempt))
            finally:
                if not (committed and tx.pending):
                    _quietly(space.clear_readset)
        raise AssertionError("unreachable")

    async def atransact(
        self,
        fn: Callable[[BaseStore], Awaitable[T]],
        *,
        max_attempts: int | None = None,
        on_conflict: Callable[[AgentbusError, int], Any] | None = None,
    ) -> T:
        """Async :meth:`transact`: ``await fn(tx)``, with ``tx.aget``/``tx.aput``/... inside."""
        if self.aclient is None:
            raise RuntimeError("atransact needs an AsyncClient (AgentbusStore(..., aclient=...))")
        attempts = max_attempts or self.max_attempts
        for attempt in range(1, attempts + 1):
            space = self.aclient.space(self.space_name)
            space = space.with_session(_tx_session(space.session))
            io = _AsyncIO(space)
            tx = _TxStore(self, async_io=io)
            committed = False
            try:
                result = await fn(tx)
                committed = True
                if tx.pending:
                    await _drive_async(self._commit_plan(tx.pending), io)
                return result
            except (ConflictError, ReadSetExpired) as exc:
                if attempt == attempts:
                    raise
                if on_conflict is not None:
                    on_conflict(exc, attempt)
                await asyncio.sleep(_backoff(attempt))
            finally:
                if not (committed and tx.pending):
                    try:
                        await space.clear_readset()
                    except AgentbusError:
                        pass
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the op planner
    # One implementation of the semantics, as a generator that yields I/O requests; the
    # sync and async drivers perform them. Reads see the batch's earlier puts: consecutive
    # puts are committed (atomically, last one per key wins) before the next read.
    def _plan(self, ops: list[Op], overlay: dict[str, Any] | None = None) -> Generator[Any, Any, list[Result]]:
        results: list[Result] = [None] * len(ops)
        pending: dict[str, Any] = {}
        for i, op in enumerate(ops):
            if isinstance(op, PutOp):
                key = shard_key(self.root, op.namespace, op.key)
                (pending if overlay is None else overlay)[key] = None if op.value is None else dict(op.value)
                continue
            if pending and overlay is None:
                yield from self._commit_plan(pending)
                pending = {}
            if isinstance(op, GetOp):
                results[i] = yield from self._get_plan(op, overlay)
            elif isinstance(op, SearchOp):
                results[i] = yield from self._search_plan(op, overlay)
            elif isinstance(op, ListNamespacesOp):
                results[i] = yield from self._list_namespaces_plan(op, overlay)
            else:
                raise ValueError(f"unknown store operation: {type(op).__name__}")
        if pending:
            yield from self._commit_plan(pending)
        return results

    def _commit_plan(self, writes: dict[str, Any]) -> Generator[Any, Any, None]:
        yield ("commit", writes)

    def _item(self, shard: Any, namespace: tuple[str, ...], key: str) -> Item:
        ts = _timestamp(getattr(shard, "updated_at", None))
        return Item(value=_as_dict(shard.value), key=key, namespace=namespace, created_at=ts, updated_at=ts)

    def _get_plan(self, op: GetOp, overlay: dict[str, Any] | None) -> Generator[Any, Any, Item | None]:
        key = shard_key(self.root, op.namespace, op.key)
        if overlay is not None and key in overlay:
            value = overlay[key]
            now = datetime.now(tz=UTC)
            return (
                None
                if value is None
                else Item(value=value, key=op.key, namespace=op.namespace, created_at=now, updated_at=now)
            )
        shard = yield ("get", key)
        return None if shard is None else self._item(shard, tuple(op.namespace), op.key)

    def _search_plan(self, op: SearchOp, overlay: dict[str, Any] | None) -> Generator[Any, Any, list[SearchItem]]:
        if op.query and self.query_mode == "error":
            raise NotImplementedError(
                "AgentbusStore has no semantic index: search(query=...) is not supported (query='error' mode)"
            )
        prefix = namespace_prefix(self.root, tuple(op.namespace_prefix))
        narrow = not op.filter and not op.query and not overlay
        infos = yield ("list", prefix, max(1, op.offset + op.limit) if narrow else None)
        keys = [i.key for i in infos if split_key(self.root, i.key) is not None]
        shards: dict[str, Any] = {}
        fetched = yield ("get_many", [k for k in keys if overlay is None or k not in overlay])
        shards.update(zip([k for k in keys if overlay is None or k not in overlay], fetched, strict=True))
        now = datetime.now(tz=UTC)
        candidates: list[SearchItem] = []
        for k in sorted(set(keys) | {k for k in (overlay or {}) if k.startswith(prefix)}):
            parsed = split_key(self.root, k)
            if parsed is None:
                continue
            ns, item_key = parsed
            if overlay is not None and k in overlay:
                if overlay[k] is None:
                    continue
                value, created, updated = overlay[k], now, now
            else:
                shard = shards.get(k)
                if shard is None:  # deleted between the listing and the read
                    continue
                value = _as_dict(shard.value)
                created = updated = _timestamp(getattr(shard, "updated_at", None))
            if not _matches_filter(value, op.filter):
                continue
            score = None
            if op.query:
                score = _keyword_score(value, op.query)
                if score == 0:
                    continue
            candidates.append(
                SearchItem(namespace=ns, key=item_key, value=value, created_at=created, updated_at=updated, score=score)
            )
        if op.query:
            candidates.sort(key=lambda it: -(it.score or 0.0))  # stable: key order among equal scores
        return candidates[op.offset : op.offset + op.limit]

    def _list_namespaces_plan(
        self, op: ListNamespacesOp, overlay: dict[str, Any] | None
    ) -> Generator[Any, Any, list[tuple[str, ...]]]:
        conditions = tuple(op.match_conditions or ())
        # List only below the fixed leading labels of a prefix condition.
        fixed: list[str] = []
        for cond in conditions:
            if cond.match_type == "prefix":
                for label in cond.path:
                    if label == "*":
                        break
                    fixed.append(label)
                break
        infos = yield ("list", namespace_prefix(self.root, tuple(fixed)), None)
        keys = {i.key for i in infos}
        if overlay:
            keys |= {k for k, v in overlay.items() if v is not None}
            keys -= {k for k, v in overlay.items() if v is None}
        found: set[tuple[str, ...]] = set()
        for k in keys:
            parsed = split_key(self.root, k)
            if parsed is None or not parsed[0]:
                continue
            ns = parsed[0]
            if all(_namespace_matches(c, ns) for c in conditions):
                found.add(ns if op.max_depth is None else ns[: op.max_depth])
        return sorted(found)[op.offset : op.offset + op.limit]


class _TxStore(BaseStore):
    """The ``tx`` of :meth:`AgentbusStore.transact`: reads go to the bus in the
    transaction's session, writes are buffered in ``pending`` until the commit."""

    def __init__(self, parent: AgentbusStore, *, sync_io: _SyncIO | None = None, async_io: _AsyncIO | None = None):
        self.parent = parent
        self.sync_io = sync_io
        self.async_io = async_io
        self.pending: dict[str, Any] = {}

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        if self.sync_io is None:
            raise RuntimeError("inside atransact use the async methods (aget, aput, ...)")
        return _drive_sync(self.parent._plan(list(ops), self.pending), self.sync_io)

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        if self.async_io is None:
            return await asyncio.to_thread(self.batch, ops)
        return await _drive_async(self.parent._plan(list(ops), self.pending), self.async_io)


# ---------------------------------------------------------------------- I/O drivers
class _SyncIO:
    def __init__(self, space: Any) -> None:
        self.space = space

    def __call__(self, req: tuple[Any, ...]) -> Any:
        kind = req[0]
        if kind == "get":
            return self.space.get(req[1])
        if kind == "get_many":
            return [self.space.get(k) for k in req[1]]
        if kind == "list":
            return self.space.list(req[1], limit=req[2])
        if kind == "commit":
            return self.space.commit(_writes(req[1]))
        raise AssertionError(kind)


class _AsyncIO:
    def __init__(self, space: Any, concurrency: int = 8) -> None:
        self.space = space
        self.sem = asyncio.Semaphore(concurrency)

    async def _get(self, key: str) -> Any:
        async with self.sem:
            return await self.space.get(key)

    async def __call__(self, req: tuple[Any, ...]) -> Any:
        kind = req[0]
        if kind == "get":
            return await self.space.get(req[1])
        if kind == "get_many":
            return list(await asyncio.gather(*(self._get(k) for k in req[1])))
        if kind == "list":
            return await self.space.list(req[1], limit=req[2])
        if kind == "commit":
            return await self.space.commit(_writes(req[1]))
        raise AssertionError(kind)


def _writes(pending: dict[str, Any]) -> dict[str, Any]:
    """LangGraph's ``value=None`` is a delete; for agentbus ``None`` would be a JSON null."""
    return {k: DELETE if v is None else v for k, v in pending.items()}


def _drive_sync(gen: Generator[Any, Any, T], io: Callable[[Any], Any]) -> T:
    try:
        req = next(gen)
        while True:
            req = gen.send(io(req))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _drive_async(gen: Generator[Any, Any, T], io: Callable[[Any], Awaitable[Any]]) -> T:
    try:
        req = next(gen)
        while True:
            req = gen.send(await io(req))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _backoff(attempt: int) -> float:
    return min(1.0, 0.02 * 2**attempt) * (0.5 + random.random())


def _tx_session(base: str | None) -> str:
    """A fresh session per transaction attempt: its read set is its own (``X-Agent-Session`` syntax)."""
    suffix = f"lg-tx-{uuid.uuid4().hex[:16]}"
    return f"{base[:90]}:{suffix}" if base else suffix


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except AgentbusError:
        pass
