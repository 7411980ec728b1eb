"""State bus HTTP API v1 (SPEC: "State bus HTTP API")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentbus.auth.principal import Principal, require, space_not_found
from agentbus.core import validation as v
from agentbus.core.errors import NotFound, ValidationFailed
from agentbus.core.model import SessionRef, Shard, WriteOp
from agentbus.core.names import check_key, check_prefix, check_space, check_value_size, decode_cursor
from agentbus.settings import Settings
from agentbus.store.base import CommitRequest, Store, outcome_body
from agentbus.telemetry.spans import bus_span


class StrictJSONRequest(Request):
    """Request bodies must be RFC 8259 JSON: UTF-8 and no NaN/Infinity (json.loads accepts
    both; NaN would then be stored as null)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


def strict_json(raw: bytes) -> Any:
    """Parse a request body as RFC 8259 JSON (raises json.JSONDecodeError). The stdlib
    parser on purpose: integers of any size survive parsing (orjson would turn those beyond
    64 bits into floats) and are refused later with a precise error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("request body is not UTF-8", "", exc.start) from exc
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)  # as json.loads
    return _DECODER.decode(text)


def _reject_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


# One decoder for every request: json.loads with any option builds a new one per call
# (~3% of a busy worker's CPU on commits).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


router = APIRouter(prefix="/v1", tags=["state bus"], route_class=StrictJSONRoute)

JSON = "application/json"
# Versions and seqs are 64-bit in every backend; larger client numbers are bad input (422).
MAX_INT = 2**62


class WriteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    value: Any = None
    delete: bool = False
    expected_version: int | None = Field(None, ge=0, le=MAX_INT, description="0 = the key must not exist")

    @model_validator(mode="after")
    def _value_xor_delete(self) -> WriteIn:
        has_value = "value" in self.model_fields_set
        if self.delete and has_value:
            raise ValueError("a write has either a value or delete: true, not both")
        if not self.delete and not has_value:
            raise ValueError("a write needs a value (any JSON) or delete: true")
        return self


class ReadIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    version: int = Field(ge=0, le=MAX_INT)


class CommitIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    writes: list[WriteIn] = Field(min_length=1)
    reads: list[ReadIn] = Field(default_factory=list)


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type=JSON, headers=headers)


def store_of(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def session_ref(request: Request, principal: Principal, space: str) -> SessionRef:
    """The caller's read-set identity in ``space``; a space outside the token's allow-list
    answers exactly like a space that does not exist (audited as a denial)."""
    check_space(space)
    if not principal.may_see_space(space):
        await request.app.state.authenticator.deny(request, principal, 404, f"space {space} not in allow-list")
        raise space_not_found(space)
    return SessionRef(principal.tenant, space, principal.subject, principal.session)


Reader = Annotated[Principal, Depends(require("bus:read"))]
Writer = Annotated[Principal, Depends(require("bus:write"))]


def shard_body(shard: Shard) -> bytes:
    """Splice the stored JSON text in without decoding it."""
    m = shard.meta
    head = dumps({"key": m.key, "version": m.version})[:-1]
    tail = dumps({"updated_by": m.updated_by, "updated_at": m.updated_at})[1:]
    return head + b',"value":' + shard.value_json.encode() + b"," + tail


@router.get("/spaces", summary="Spaces of the caller's tenant")
async def list_spaces(request: Request, who: Reader) -> Response:
    spaces = await store_of(request).list_spaces(who.tenant)
    return json_response({"spaces": [s for s in spaces if who.may_see_space(s["space"])]})


@router.get("/spaces/{space}/shards/{key:path}/history", summary="Versions of one shard, newest first")
async def shard_history(
    request: Request,
    space: str,
    key: str,
    who: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_version: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
) -> Response:
    settings = settings_of(request)
    ref = await session_ref(request, who, space)
    check_key(key, max_len=settings.max_key_length)
    store = store_of(request)
    entries = await store.history(ref.tenant, ref.space, key, before_version, limit)
    if not entries and before_version is None:
        raise NotFound(f"shard {key!r} has no history in space {space!r}", code="shard_not_found")
    parts = [
        dumps(
            {
                "version": e.version,
                "deleted": e.deleted,
                "seq": e.seq,
                "updated_by": e.updated_by,
                "updated_at": e.updated_at,
            }
        )[:-1]
        + b',"value":'
        + (e.value_json.encode() if e.value_json is not None else b"null")
        + b"}"
        for e in entries
    ]
    body = b'{"key":' + dumps(key) + b',"versions":[' + b",".join(parts) + b"]}"
    return Response(body, media_type=JSON)


@router.get("/spaces/{space}/shards/{key:path}", summary="Read a shard (recorded in your read set)")
async def read_shard(request: Request, space: str, key: str, who: Reader) -> Response:
    settings = settings_of(request)
    ref = await session_ref(request, who, space)
    check_key(key, max_len=settings.max_key_length)
    with bus_span(request, "read", ref) as sp:
        shard = await store_of(request).read(ref, key)
        sp.read(key, shard)
    if shard is None:
        raise NotFound(
            f"shard {key!r} does not exist in space {space!r}; recorded in your read set as absent",
            code="shard_not_found",
            key=key,
        )
    return Response(shard_body(shard), media_type=JSON, headers={"ETag": f'"{shard.meta.version}"'})


@router.get("/spaces/{space}/shards", summary="List shards (recorded as a range read)")
async def list_shards(
    request: Request,
    space: str,
    who: Reader,
    prefix: str = "",
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> Response:
    settings = settings_of(request)
    ref = await session_ref(request, who, space)
    check_prefix(prefix, max_len=settings.max_key_length)
    if limit is None:
        limit = min(100, settings.max_list_limit)
    if limit > settings.max_list_limit:
        raise ValidationFailed(f"limit must be at most {settings.max_list_limit}", code="limit_too_large")
    start_after = decode_cursor(cursor) if cursor else None
    if start_after is not None and not start_after.startswith(prefix):
        raise ValidationFailed("cursor does not belong to this prefix", code="invalid_cursor")
    with bus_span(request, "list", ref) as sp:
        listing = await store_of(request).list(ref, prefix, start_after, limit)
        sp.listed(prefix, listing)
    return json_response(
        {
            "shards": [
                {"key": m.key, "version": m.version, "updated_by": m.updated_by, "updated_at": m.updated_at}
                for m in listing.items
            ],
            "next_cursor": listing.next_cursor,
        }
    )


@router.post("/spaces/{space}/commit", summary="Atomically validate your read set and apply writes")
async def commit(
    request: Request,
    space: str,
    body: CommitIn,
    who: Writer,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    settings = settings_of(request)
    ref = await session_ref(request, who, space)
    req = build_commit_request(settings, body, idempotency_key)
    with bus_span(request, "commit", ref) as sp:
        outcome = await store_of(request).commit(ref, req)
        sp.committed(req, outcome)
    if outcome.stored is not None and outcome.stored.fingerprint != req.fingerprint:
        raise ValidationFailed(
            "this Idempotency-Key was already used with a different request body",
            code="idempotency_key_reused",
        )
    status, payload = outcome_body(outcome)
    if outcome.result is not None:
        request.app.state.commit_signal.notify()
    headers = {"Idempotent-Replayed": "true"} if outcome.stored is not None else None
    return json_response(payload, status=status, headers=headers)


def build_commit_request(settings: Settings, body: CommitIn, idempotency_key: str | None) -> CommitRequest:
    if len(body.writes) > settings.max_writes_per_commit:
        raise ValidationFailed(
            f"a commit may have at most {settings.max_writes_per_commit} writes", code="too_many_writes"
        )
    if len(body.reads) > settings.max_reads_per_commit:
        raise ValidationFailed(
            f"a commit may have at most {settings.max_reads_per_commit} reads", code="too_many_reads"
        )
    writes: list[WriteOp] = []
    seen: set[str] = set()
    for w in body.writes:
        check_key(w.key, max_len=settings.max_key_length)
        if w.key in seen:
            raise ValidationFailed(f"key {w.key!r} is written twice in one commit", code="duplicate_write", key=w.key)
        seen.add(w.key)
        encoded: str | None = None
        if not w.delete:
            try:
                encoded = orjson.dumps(w.value).decode()
            except orjson.JSONEncodeError as exc:
                raise ValidationFailed(f"value of {w.key!r} cannot be stored: {exc}", code="invalid_value") from exc
            check_value_size(len(encoded), key=w.key, max_bytes=settings.max_value_bytes)
        writes.append(WriteOp(w.key, encoded, w.delete, w.expected_version))
    reads: dict[str, int] = {}
    for r in body.reads:
        check_key(r.key, max_len=settings.max_key_length)
        reads[r.key] = r.version
    fp = v.fingerprint(body.model_dump(mode="json", exclude_unset=True)) if idempotency_key else None
    return CommitRequest(tuple(writes), reads, idempotency_key, fp)


@router.get("/spaces/{space}/readset", summary="Your current read set in this space")
async def get_readset(request: Request, space: str, who: Reader) -> Response:
    ref = await session_ref(request, who, space)
    settings = settings_of(request)
    epoch = await store_of(request).get_epoch(ref)
    if epoch is None:
        return json_response({"subject": ref.subject, "session": ref.session, "reads": [], "ranges": []})
    age = time.time() - epoch.started_at
    return json_response(
        {
            "subject": ref.subject,
            "session": ref.session,
            "started_at": epoch.started_at,
            "expired": epoch.overflow or age > settings.readset_ttl_s,
            "overflow": epoch.overflow,
            "reads": [{"key": k, "version": ver} for k, ver in sorted(epoch.points.items())],
            "ranges": [
                {"prefix": r.prefix, "start_after": r.start_after, "end_at": r.end_at, "seq": r.seq}
                for r in epoch.ranges
            ],
        }
    )


@router.delete("/spaces/{space}/readset", summary="Clear your read set (start a new epoch)")
async def clear_readset(request: Request, space: str, who: Reader) -> Response:
    await store_of(request).clear_epoch(await session_ref(request, who, space))
    return Response(status_code=204)


@router.get("/spaces/{space}/log", summary="Commits of a space, oldest first")
async def commit_log(
    request: Request,
    space: str,
    who: Reader,
    after: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    ref = await session_ref(request, who, space)
    store = store_of(request)
    if not await store.space_exists(ref.tenant, ref.space):
        raise space_not_found(space)
    records = await store.log(ref.tenant, ref.space, after, limit)
    next_after = records[-1].seq if records else after
    return json_response({"commits": [r.to_json() for r in records], "next_after": next_after})


@router.get("/spaces/{space}/events", summary="Server-Sent Events of commits (resume with Last-Event-ID)")
async def events(
    request: Request,
    space: str,
    who: Reader,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
) -> StreamingResponse:
    ref = await session_ref(request, who, space)
    start = after if after is not None else 0
    if last_event_id:
        try:
            start = int(last_event_id)
            if not 0 <= start <= MAX_INT:
                raise ValueError(last_event_id)
        except ValueError as exc:
            raise ValidationFailed(
                "Last-Event-ID must be a commit seq (integer)", code="invalid_last_event_id"
            ) from exc
    store = store_of(request)
    settings = settings_of(request)
    signal: CommitSignal = request.app.state.commit_signal

    async def stream() -> AsyncIterator[bytes]:
        last = start
        idle = 0.0
        yield b"retry: 1000\n\n"
        while not await request.is_disconnected():
            records = await store.log(ref.tenant, ref.space, last, 100)
            for r in records:
                yield b"id: %d\nevent: commit\ndata: %s\n\n" % (r.seq, dumps(r.to_json()))
                last = r.seq
            if records:
                idle = 0.0
                continue
            await signal.wait(settings.events_poll_s)
            idle += settings.events_poll_s
            if idle >= 15.0:
                idle = 0.0
                yield b": keep-alive\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


class CommitSignal:
    """Wakes this process's SSE streams on a local commit; other processes' commits are
    seen by polling, so the signal is only a latency optimisation."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            pass
