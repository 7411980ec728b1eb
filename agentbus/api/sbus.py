"""S-Bus compatibility routes (SPEC: "S-Bus compatibility"; reference shapes in agentbus/api/SBUS_COMPAT.md).

S-Bus clients and harnesses talk to these routes unchanged, but every request is served by
the same store and core guards as ``/v1``: a read through ``GET /shard/{key}?agent_id=`` is
recorded in that agent's delivery log exactly like a v1 read, and ``POST /commit`` is one
atomic ``Store.commit`` whose read set is the delivery log plus the S-Bus ``read_set``.

Translation rules kept in this one module, so they are applied the same way everywhere:

* Versions: S-Bus numbers a shard from 0 at creation, agentbus from 1, so
  ``sbus = agentbus - 1`` on the way out and ``agentbus = sbus + 1`` on the way in
  (``expected_version``, ``version_at_read``, ``new_version`` and every conflict field).
  Agentbus version 0 ("never existed") has no S-Bus number and is shown as ``null``.
* Space: S-Bus has none. All S-Bus shards of a tenant live in the space ``sbus``
  (after the n-th ``/admin/reset``: ``sbus.<n>``, see :func:`current_space`).
* Value: an S-Bus shard is stored as the JSON object ``{"content", "goal_tag", "shard_id",
  "created_at"}`` so ``goal_tag`` and the creation facts survive commits, which only carry
  the new ``content``. Shards written through v1 with any other value are still readable:
  a JSON string is the content, anything else is shown as its JSON text.
* Errors: S-Bus errors are ``{"error": "<Name>", "detail": "<text>"}``; agentbus adds its
  structured fields (``code``, ``retryable``, ``conflicts``...) next to them. Input that
  S-Bus itself has no error name for gets the ordinary agentbus error shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from agentbus.api.bus import json_response, settings_of, store_of
from agentbus.auth.principal import Principal, dev_principal, get_principal
from agentbus.core.errors import AgentbusError, Forbidden, ReadSetExpired, ValidationFailed
from agentbus.core.model import ConflictItem, SessionRef, ShardMeta, WriteOp
from agentbus.core.names import check_key, check_session, check_value_size
from agentbus.store.base import CommitRequest, HistoryEntry, Store

router = APIRouter(tags=["s-bus compatibility"])

SPACE = "sbus"
"""The space S-Bus routes use (generation 0); later generations are ``sbus.<n>``."""
META_SPACE = "sbus-meta"
"""Holds the ``generation`` shard whose *version* counts the ``/admin/reset`` calls."""
GENERATION_KEY = "generation"
INTERNAL_SESSION = "~sbus"
"""Session for writes that must not touch any agent's read set (shard creation, reset).
``~`` is not allowed in ``X-Agent-Session``, so no client can share this session."""
LISTER = "~sbus-lister"
"""Subject of listings made without an agent; ``~`` is not allowed in agent ids."""
MAX_VERSION = 2**62
"""S-Bus versions are u64; agentbus stores signed 64-bit integers and adds 1 on the way in."""

StrictVersion = Annotated[int, Field(strict=True, ge=0, le=MAX_VERSION)]


# --------------------------------------------------------------------------- request bodies
class CreateShardIn(BaseModel):
    """``POST /shard``. S-Bus ignores unknown fields, so this model does too."""

    model_config = ConfigDict(extra="ignore")

    key: str
    content: Annotated[str, Field(strict=True)]
    goal_tag: Annotated[str, Field(strict=True)] = ""


class ReadSetEntryIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: str
    version_at_read: StrictVersion


class CommitIn(BaseModel):
    """``POST /commit`` and ``/commit/v2`` (S-Bus accepts the aliases ``expected_ver`` and ``content``)."""

    model_config = ConfigDict(extra="ignore")

    key: str
    expected_version: StrictVersion = Field(validation_alias=AliasChoices("expected_version", "expected_ver"))
    delta: Annotated[str, Field(strict=True, validation_alias=AliasChoices("delta", "content"))]
    agent_id: Annotated[str, Field(strict=True)]
    rationale: str | None = None
    read_set: list[ReadSetEntryIn] | None = None


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    agent_id: Annotated[str, Field(strict=True)]


# --------------------------------------------------------------------------- errors
class SbusError(AgentbusError):
    """An error S-Bus has a name for, rendered as S-Bus renders it plus agentbus's fields.

    It is still an :class:`AgentbusError`, so the app's one error handler renders it; only
    the body differs, because S-Bus clients read ``body["error"]`` as a string.
    """

    def __init__(
        self,
        name: str,
        detail: str,
        *,
        status: int,
        type: str,
        code: str,
        retryable: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(detail, code=code, **extra)
        self.name = name
        self.status = status
        self.type = type
        self.retryable = retryable

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "error": self.name,
            "detail": self.message,
            "type": self.type,
            "code": self.code,
            "retryable": self.retryable,
        }
        body.update(self.extra)
        return body


def shard_not_found(key: str, conflicts: list[dict[str, Any]] | None = None) -> SbusError:
    extra: dict[str, Any] = {"key": key}
    if conflicts is not None:
        extra["conflicts"] = conflicts
    return SbusError(
        "ShardNotFound",
        f"shard not found: key={key}",
        status=404,
        type="not_found",
        code="shard_not_found",
        **extra,
    )


# --------------------------------------------------------------------------- version mapping
def to_sbus(version: int | None) -> int | None:
    """agentbus -> S-Bus numbering; 0 (never existed) and None (no version) become None."""
    return version - 1 if version else None


def conflict_json(c: ConflictItem) -> dict[str, Any]:
    """A core conflict item with its versions in S-Bus numbering."""
    item = c.to_json()
    item["read_version"] = to_sbus(c.read_version)
    item["current_version"] = to_sbus(c.current_version)
    return item


# --------------------------------------------------------------------------- per-process counters
@dataclass
class Counters:
    """Counters the store cannot answer (rejected commits leave no trace in it).

    They are per process and per S-Bus space: with several workers or hosts each process
    reports only what it served. Being keyed by space, they restart at 0 in every process
    that sees the new space after an ``/admin/reset``.
    """

    space: str = ""
    conflicts: int = 0
    cross_shard_stale: int = 0
    attempts_by_key: dict[str, int] = field(default_factory=dict)
    conflicts_by_key: dict[str, int] = field(default_factory=dict)
    agents: set[str] = field(default_factory=set)
    deliveries: int = 0

    def bump(self, table: dict[str, int], key: str) -> None:
        if key not in table and len(table) >= 100_000:  # bound memory; counts are advisory
            table.clear()
        table[key] = table.get(key, 0) + 1


def counters_of(request: Request, space: str) -> Counters:
    """This process's counters for ``space``; a new generation (a reset elsewhere) starts at 0."""
    current: Counters | None = getattr(request.app.state, "sbus_counters", None)
    if current is None or current.space != space:
        current = Counters(space=space)
        request.app.state.sbus_counters = current
    return current


# --------------------------------------------------------------------------- identity and space
def named_agent(request: Request, agent_id: str | None) -> bool:
    """S-Bus records a delivery only when the read names an agent; so do these routes."""
    return bool(agent_id) or bool(request.headers.get("x-agent-id"))


async def caller(request: Request, scope: str, agent_id: str | None = None) -> Principal:
    """The principal of an S-Bus request, required to hold ``scope``.

    With auth on the bearer token decides who the caller is; an S-Bus ``agent_id`` only
    becomes the *session* under that principal, so nobody can read or commit as another
    agent, while S-Bus harnesses that run many agent ids on one token keep separate read
    sets. In dev mode ``agent_id`` names the agent (``X-Agent-Id`` wins when both are given).
    Denials are audited like every other route's.
    """
    if settings_of(request).auth:
        who = await get_principal(request)
        if agent_id:
            who = dataclasses.replace(who, session=check_session(agent_id))
    else:
        who = dev_principal(request, agent_id=agent_id or None)
    authn = request.app.state.authenticator
    if scope not in who.scopes:
        await authn.deny(request, who, 403, f"missing scope {scope}")
        raise Forbidden(f"this caller lacks the {scope!r} scope", code="missing_scope", scope=scope)
    if not who.may_see_space(SPACE):
        await authn.deny(request, who, 403, f"space {SPACE} not in allow-list")
        raise Forbidden(f"this caller may not use the S-Bus space {SPACE!r}", code="space_forbidden")
    return who


async def current_space(store: Store, tenant: str) -> str:
    """The tenant's S-Bus space: ``sbus``, or ``sbus.<n>`` after n resets.

    A reset cannot delete one space with the Store interface (``Store.reset`` drops every
    space of the tenant), and tombstoning the shards would keep their version numbers, so
    S-Bus numbering would not restart at 0. Instead a reset moves the tenant to a fresh
    space. ``n`` is the *version* of the ``generation`` shard (not its value), so it is
    shared by every bus process and no write through v1 can make it unreadable. Reading it
    through ``history`` records nothing in any read set.
    """
    head = await store.history(tenant, META_SPACE, GENERATION_KEY, None, 1)
    n = head[0].version if head else 0
    return SPACE if n == 0 else f"{SPACE}.{n}"


def ref_of(who: Principal, space: str) -> SessionRef:
    return SessionRef(who.tenant, space, who.subject, who.session)


# --------------------------------------------------------------------------- stored value
@dataclass(frozen=True, slots=True)
class Head:
    """A shard's current version and value, whether it came from a recorded read or history."""

    key: str
    version: int
    value_json: str
    updated_by: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class View:
    """The S-Bus fields of a stored value."""

    content: str
    goal_tag: str
    shard_id: str
    created_at: float


def content_address(content: str) -> str:
    """S-Bus's shard id: SHA-256 (hex) of the content the shard was created with."""
    return hashlib.sha256(content.encode()).hexdigest()


def envelope(view: View) -> str:
    return orjson.dumps(
        {
            "content": view.content,
            "goal_tag": view.goal_tag,
            "shard_id": view.shard_id,
            "created_at": view.created_at,
        }
    ).decode()


def parse_value(value_json: str) -> tuple[str, dict[str, Any] | None]:
    """(content, envelope-or-None) of any stored value, so v1-written shards stay readable."""
    value = orjson.loads(value_json)
    if isinstance(value, dict) and isinstance(value.get("content"), str) and isinstance(value.get("goal_tag"), str):
        return value["content"], value
    if isinstance(value, str):
        return value, None
    return value_json, None


async def view_of(store: Store, tenant: str, space: str, head: Head) -> View:
    """The S-Bus fields of ``head``; creation facts missing from the value come from version 1."""
    content, env = parse_value(head.value_json)
    env = env or {}
    goal_tag = env.get("goal_tag", "")
    shard_id, created_at = env.get("shard_id"), env.get("created_at")
    if not isinstance(shard_id, str) or not isinstance(created_at, int | float):
        first = await store.history(tenant, space, head.key, 2, 1)
        if first and first[0].value_json is not None:
            shard_id = content_address(parse_value(first[0].value_json)[0])
            created_at = first[0].updated_at
        else:
            shard_id, created_at = content_address(content), head.updated_at
    return View(content=content, goal_tag=goal_tag, shard_id=shard_id, created_at=float(created_at))


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def shard_json(head: Head, view: View, counters: Counters) -> dict[str, Any]:
    """S-Bus's ShardResponse (plus agentbus's ``updated_by``)."""
    sbus_version = head.version - 1
    return {
        "key": head.key,
        "id": view.shard_id,
        "version": sbus_version,
        "content": view.content,
        "owner": None,  # S-Bus releases its ownership token inside the commit; never held between requests
        "goal_tag": view.goal_tag,
        "attempt_count": counters.attempts_by_key.get(head.key, 0),
        "conflict_count": counters.conflicts_by_key.get(head.key, 0),
        "delta_log_depth": sbus_version,  # agentbus keeps every version; one delta per commit
        "created_at": rfc3339(view.created_at),
        "updated_at": rfc3339(head.updated_at),
        "updated_by": head.updated_by,
    }


def head_from_history(entry: HistoryEntry) -> Head | None:
    if entry.deleted or entry.value_json is None:
        return None
    return Head(entry.key, entry.version, entry.value_json, entry.updated_by, entry.updated_at)


async def unrecorded_head(store: Store, tenant: str, space: str, key: str) -> tuple[Head | None, HistoryEntry | None]:
    """The newest version of ``key`` without recording a read (history is not a delivery)."""
    entries = await store.history(tenant, space, key, None, 1)
    if not entries:
        return None, None
    return head_from_history(entries[0]), entries[0]


async def list_all(store: Store, ref: SessionRef, page: int) -> list[ShardMeta]:
    """Every live shard of the space, paging by key (S-Bus's listing is not paginated)."""
    items: list[ShardMeta] = []
    start_after: str | None = None
    while True:
        listing = await store.list(ref, "", start_after, page)
        items.extend(listing.items)
        if listing.next_cursor is None or not listing.items:
            return items
        start_after = listing.items[-1].key


async def list_unrecorded(request: Request, tenant: str, space: str) -> list[ShardMeta]:
    """A listing that enters no agent's read set: S-Bus's ``GET /shards`` has no agent."""
    store = store_of(request)
    ref = SessionRef(tenant, space, LISTER, INTERNAL_SESSION)
    try:
        return await list_all(store, ref, settings_of(request).max_list_limit)
    finally:
        await store.clear_epoch(ref)


def notify(request: Request) -> None:
    """Wake v1 SSE streams of this process, as a v1 commit does."""
    signal = getattr(request.app.state, "commit_signal", None)
    if signal is not None:
        signal.notify()


# --------------------------------------------------------------------------- routes
@router.post("/shard", status_code=201, summary="S-Bus: create a shard (version 0)")
async def create_shard(request: Request, body: CreateShardIn) -> Response:
    settings = settings_of(request)
    store = store_of(request)
    who = await caller(request, "bus:write")
    check_key(body.key, max_len=settings.max_key_length)
    space = await current_space(store, who.tenant)
    now = time.time()
    view = View(body.content, body.goal_tag, content_address(body.content), now)
    value = envelope(view)
    check_value_size(len(value.encode()), key=body.key, max_bytes=settings.max_value_bytes)
    # Creation validates no read set and must not end the caller's: it runs in an internal
    # session of the caller (so the shard is attributed to them) that never reads.
    ref = SessionRef(who.tenant, space, who.subject, INTERNAL_SESSION)
    outcome = await store.commit(ref, CommitRequest((WriteOp(body.key, value, False, 0),), {}))
    if outcome.result is None:
        conflicts = [conflict_json(c) for c in outcome.conflicts or []]
        raise SbusError(
            "ShardAlreadyExists",
            f"shard already exists: key={body.key}",
            status=409,
            type="conflict",
            code="shard_exists",
            key=body.key,
            conflicts=conflicts,
        )
    notify(request)
    version = outcome.result.versions[body.key]
    head = Head(body.key, version, value, who.subject, now)
    return json_response(shard_json(head, view, counters_of(request, space)), status=201)


@router.get("/shard/{key:path}", summary="S-Bus: read a shard (recorded in agent_id's delivery log)")
async def get_shard(request: Request, key: str, agent_id: Annotated[str, Query(max_length=256)] = "") -> Response:
    settings = settings_of(request)
    store = store_of(request)
    who = await caller(request, "bus:read", agent_id)
    check_key(key, max_len=settings.max_key_length)
    space = await current_space(store, who.tenant)
    counters = counters_of(request, space)
    head: Head | None
    if named_agent(request, agent_id):
        # A recorded read: a missing shard is recorded as absent too (agentbus semantics), so
        # a later creation of it conflicts with this agent's next commit.
        shard = await store.read(ref_of(who, space), key)
        if len(counters.agents) >= 100_000:  # bound memory; the count is advisory
            counters.agents.clear()
        counters.agents.add(who.subject)
        counters.deliveries += 1
        head = None
        if shard is not None:
            m = shard.meta
            head = Head(key, m.version, shard.value_json, m.updated_by, m.updated_at)
    else:
        head, _ = await unrecorded_head(store, who.tenant, space, key)
    if head is None:
        raise shard_not_found(key)
    view = await view_of(store, who.tenant, space, head)
    return json_response(shard_json(head, view, counters))


@router.get("/shards", summary="S-Bus: list shard keys")
async def list_shards(request: Request, agent_id: Annotated[str, Query(max_length=256)] = "") -> Response:
    store = store_of(request)
    who = await caller(request, "bus:read", agent_id)
    space = await current_space(store, who.tenant)
    if named_agent(request, agent_id):
        # A named agent gets v1's range read: a shard created or deleted after this listing
        # conflicts with its next commit (phantom protection).
        items = await list_all(store, ref_of(who, space), settings_of(request).max_list_limit)
    else:
        items = await list_unrecorded(request, who.tenant, space)
    keys = [m.key for m in items]
    return json_response({"shards": keys, "count": len(keys)})


@router.post("/commit", summary="S-Bus: commit (same validation as /commit/v2)")
async def commit_v1(request: Request, body: CommitIn) -> Response:
    """S-Bus's v1 commit is an alias of v2; agentbus never offers weaker validation."""
    return await commit_v2(request, body)


@router.post("/commit/v2", summary="S-Bus: commit with delivery-log and read_set validation")
async def commit_v2(request: Request, body: CommitIn) -> Response:
    settings = settings_of(request)
    store = store_of(request)
    who = await caller(request, "bus:write", body.agent_id)
    key = check_key(body.key, max_len=settings.max_key_length)
    read_set = body.read_set or []
    if len(read_set) > settings.max_reads_per_commit:
        raise ValidationFailed(
            f"a read_set may have at most {settings.max_reads_per_commit} entries", code="too_many_reads"
        )
    expected = body.expected_version + 1
    # The target is validated by expected_version alone, as in S-Bus: an explicit read of it
    # at that version overrides whatever the delivery log holds for it (explicit wins), so
    # an agent that re-read the target before committing is judged on what it now expects.
    explicit: dict[str, int] = {}
    for entry in read_set:
        check_key(entry.key, max_len=settings.max_key_length)
        if entry.key != key:
            explicit[entry.key] = entry.version_at_read + 1
    explicit[key] = expected

    space = await current_space(store, who.tenant)
    counters = counters_of(request, space)
    head, newest = await unrecorded_head(store, who.tenant, space, key)
    if head is not None:
        old = await view_of(store, who.tenant, space, head)
        view = View(body.delta, old.goal_tag, old.shard_id, old.created_at)
    else:  # the commit will be refused (ShardNotFound) unless it revives a v1-deleted key
        view = View(body.delta, "", content_address(body.delta), time.time())
    value = envelope(view)
    if len(value.encode()) > settings.max_value_bytes:
        raise SbusError(
            "DeltaTooLarge",
            f"delta too large: key={key} len={len(body.delta)} max={settings.max_value_bytes} bytes stored",
            status=413,
            type="invalid_request",
            code="value_too_large",
            key=key,
            limit=settings.max_value_bytes,
        )

    ref = ref_of(who, space)
    try:
        outcome = await store.commit(ref, CommitRequest((WriteOp(key, value, False, expected),), explicit))
    except ReadSetExpired as exc:
        raise SbusError(
            "SessionExpired",
            f"session expired for agent '{who.subject}': {exc.message}",
            status=410,
            type="read_set_expired",
            code=exc.code,
            retryable=True,
            agent_id=who.subject,
        ) from exc
    if outcome.result is not None:
        counters.bump(counters.attempts_by_key, key)
        notify(request)
        return json_response({"new_version": outcome.result.versions[key] - 1, "shard_id": view.shard_id})
    raise commit_error(key, body.expected_version, outcome.conflicts or [], newest, counters)


def commit_error(
    key: str, expected: int, conflicts: list[ConflictItem], newest: HistoryEntry | None, counters: Counters
) -> SbusError:
    """Name a refused commit as S-Bus would.

    S-Bus checks the other shards of the read set first (``CrossShardStale``, or
    ``ShardNotFound`` for a read-set key that does not exist), then the target
    (``ShardNotFound``, then ``VersionMismatch``). The body lists every conflict the core
    found, minus the duplicate of the target's write conflict that the explicit target read
    produces.
    """
    items = [c for c in conflicts if not (c.key == key and c.kind == "stale_read")]
    listed = [conflict_json(c) for c in items]
    others = [c for c in items if c.key != key]
    stale = [c for c in others if c.current_version != 0] or [c for c in items if c.kind == "phantom"]
    if stale:
        c = stale[0]
        counters.cross_shard_stale += 1
        at_read, now = to_sbus(c.read_version), to_sbus(c.current_version)
        return SbusError(
            "CrossShardStale",
            f"cross-shard stale read: key={c.key} version_at_read={at_read} current_version={now}",
            status=409,
            type="conflict",
            code=c.kind,
            retryable=True,
            key=c.key,
            version_at_read=at_read,
            current_version=now,
            conflicts=listed,
        )
    if others:  # a read-set key that was never created
        return shard_not_found(others[0].key, listed)
    target = next((c for c in items if c.key == key), None)
    target_gone = target is None or target.current_version == 0
    if target is not None and newest is not None and newest.deleted and newest.version == target.current_version:
        target_gone = True
    if target_gone:
        return shard_not_found(key, listed)
    assert target is not None
    counters.bump(counters.attempts_by_key, key)
    counters.bump(counters.conflicts_by_key, key)
    counters.conflicts += 1
    found = to_sbus(target.current_version)
    return SbusError(
        "VersionMismatch",
        f"version mismatch on key={key}: expected={expected} found={found}",
        status=409,
        type="conflict",
        code="write_conflict",
        retryable=True,
        key=key,
        expected_version=expected,
        current_version=found,
        conflicts=listed,
    )


@router.post("/session", summary="S-Bus: start a fresh delivery log for an agent")
async def create_session(request: Request, body: SessionIn) -> Response:
    store = store_of(request)
    who = await caller(request, "bus:read", body.agent_id)
    space = await current_space(store, who.tenant)
    await store.clear_epoch(ref_of(who, space))
    return json_response({"agent_id": who.subject, "status": "created"})


async def totals(request: Request, tenant: str, space: str) -> dict[str, Any]:
    """Store-wide totals: live shards, and commits = the sum of S-Bus versions (creation is
    version 0 and each commit adds one), which every bus process agrees on."""
    items = await list_unrecorded(request, tenant, space)
    return {"total_shards": len(items), "total_commits": sum(m.version - 1 for m in items)}


@router.get("/stats", summary="S-Bus: counters (see agentbus/api/SBUS_COMPAT.md for which are per process)")
async def stats(request: Request) -> Response:
    store = store_of(request)
    who = await caller(request, "bus:read")
    space = await current_space(store, who.tenant)
    counters = counters_of(request, space)
    t = await totals(request, who.tenant, space)
    seq = next((s["seq"] for s in await store.list_spaces(who.tenant) if s["space"] == space), 0)
    attempts = t["total_commits"] + counters.conflicts
    return json_response(
        {
            **t,
            "total_conflicts": counters.conflicts,
            "cross_shard_stale": counters.cross_shard_stale,
            "total_attempts": attempts,
            "scr": counters.conflicts / attempts if attempts else 0.0,
            "ori_enabled": True,
            "delivery_log": {"agents": len(counters.agents), "deliveries": counters.deliveries},
            "space": space,
            "space_seq": seq,
            "per_process": ["total_conflicts", "cross_shard_stale", "total_attempts", "scr", "delivery_log"],
        }
    )


def backend_name(request: Request) -> str:
    return "agentbus-" + settings_of(request).store.split("://", 1)[0].split("+", 1)[0]


@router.get("/health", summary="S-Bus: liveness (503 when the backend is down)")
async def health(request: Request) -> Response:
    await store_of(request).ping()
    return json_response({"status": "ok", "backend": backend_name(request)})


@router.get("/admin/health", summary="S-Bus: liveness with summary counters")
async def admin_health(request: Request) -> Response:
    store = store_of(request)
    await store.ping()
    who = await caller(request, "bus:read")
    space = await current_space(store, who.tenant)
    counters = counters_of(request, space)
    t = await totals(request, who.tenant, space)
    return json_response(
        {
            "status": "ok",
            "backend": backend_name(request),
            **t,
            "total_conflicts": counters.conflicts,
            "delivery_agents": len(counters.agents),
        }
    )


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.post("/admin/reset", summary="S-Bus: clear all S-Bus shards and delivery logs (admin)")
async def admin_reset(request: Request) -> Response:
    """Start a fresh S-Bus space for the caller's tenant (see :func:`current_space`).

    The old space's shards, delivery logs and counters are left behind unreachable by S-Bus
    routes (still visible through v1 as ``sbus[.n]``) until the store can drop one space.
    """
    store = store_of(request)
    who = await caller(request, "admin")
    if not getattr(settings_of(request), "auth", False) and not is_loopback(request):
        raise Forbidden("without auth, /admin/reset is only allowed from a loopback client", code="admin_loopback_only")
    old = await current_space(store, who.tenant)
    cleared = len(await list_unrecorded(request, who.tenant, old))
    ref = SessionRef(who.tenant, META_SPACE, who.subject, INTERNAL_SESSION)
    head = await store.history(who.tenant, META_SPACE, GENERATION_KEY, None, 1)
    version = head[0].version if head else 0
    marker = orjson.dumps({"reset_at": time.time(), "reset_by": who.subject}).decode()
    # expected_version makes two concurrent resets advance the generation once; the loser's
    # reset happened anyway, so both answer 200.
    await store.commit(ref, CommitRequest((WriteOp(GENERATION_KEY, marker, False, version),), {}))
    space = await current_space(store, who.tenant)
    counters_of(request, space)
    notify(request)
    return json_response({"cleared": cleared, "space": space})
