"""Operator views: a space's timeline, usage per principal, and Prometheus ``/metrics``.

``GET /v1/spaces/{space}/trace?after=&limit=`` (scope ``traces:read``) returns the space's
events oldest first::

    {"events": [{"id", "ts" (ISO 8601, UTC), "ts_ms", "agent", "session",
                 "kind": "read" | "list" | "commit" | "conflict" | "model_call",
                 read:       "key", "version" (0 = read as absent)
                 list:       "prefix", "keys", "versions" {key: version}, "count"
                 commit:     "keys" (written), "commit_id", "seq", "versions" {key: new version}
                 conflict:   "keys" (written), "conflicts": [{key, kind, read_version,
                             current_version, committed_by, commit_seq}]
                 commit and conflict: "replayed": true for an Idempotency-Key replay
                 model_call: "operation", "model", "upstream_model", "endpoint",
                             "input_tokens", "output_tokens", "cost", "latency_ms",
                             "ttft_ms", "status" (ok | error | denied), "http_status", "stream"
                 "trace_id", "span_id"}],
     "next": "<cursor>" | null}

``next`` is the cursor of the last event returned: pass it as ``after`` to get newer events.
It is null when no event came back (nothing newer yet: poll again with the same ``after``).
``id`` and cursors are opaque strings. Events arrive a moment (``trace_flush_s``) after the
operation, and are kept ``trace_retention_s`` (at most ``trace_max_events_per_space``).
Model calls appear in a space when the caller sends ``X-Agent-Space`` (the SDK does).

``GET /v1/usage`` (``traces:read`` or ``admin``): every principal (token) of the caller's
tenant plus subjects seen only in usage records, with budgets, use and what remains.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from agentbus.api.bus import json_response, session_ref
from agentbus.auth.principal import Principal, get_principal, require
from agentbus.core.errors import Forbidden
from agentbus.store.base import TraceEvent

router = APIRouter(tags=["traces"])

TraceReader = Annotated[Principal, Depends(require("traces:read"))]
# Usage records read per /v1/usage request (newest first).
USAGE_SCAN = 20_000


def event_json(e: TraceEvent) -> dict[str, Any]:
    ts = datetime.datetime.fromtimestamp(e.ts, datetime.UTC)
    return {
        "id": e.id,
        "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "ts_ms": int(e.ts * 1000),
        "agent": e.agent,
        "session": e.session,
        "kind": e.kind,
        **e.data,
        "trace_id": e.trace_id,
        "span_id": e.span_id,
    }


@router.get("/v1/spaces/{space}/trace", summary="Timeline of a space: reads, commits, conflicts, model calls")
async def space_trace(
    request: Request,
    space: str,
    who: TraceReader,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Response:
    ref = await session_ref(request, who, space)  # a space outside the allow-list: 404, audited
    tel = request.app.state.telemetry
    if tel.traces is None:
        return json_response({"events": [], "next": None, "enabled": False})
    events = await tel.traces.events(ref.tenant, ref.space, after or None, limit)
    return json_response({"events": [event_json(e) for e in events], "next": events[-1].id if events else None})


async def _operator(request: Request) -> Principal:
    p = await get_principal(request)
    if not ({"traces:read", "admin"} & p.scopes):
        await request.app.state.authenticator.deny(request, p, 403, "missing scope traces:read")
        raise Forbidden("this token lacks the 'traces:read' scope", code="missing_scope", scope="traces:read")
    return p


@router.get("/v1/usage", summary="Budgets and usage of every principal of your tenant (operator view)")
async def usage(request: Request, who: Annotated[Principal, Depends(_operator)]) -> Response:
    from agentbus.broker import budget as b

    store = request.app.state.store
    broker = request.app.state.broker
    await broker.accounting.drain()  # calls this process answered, counted after their answers
    now = time.time()
    records = await store.budgets.usage(who.tenant, None, USAGE_SCAN)
    tokens = [t for t in await store.list_tokens(who.tenant) if t.revoked_at is None]
    principals: list[tuple[Principal, str | None, str]] = [
        (Principal(t.tenant, t.subject, budgets=t.budgets or None, token_id=t.id), t.id, t.kind) for t in tokens
    ]
    known = {p.subject for p, _, _ in principals}
    for subject in sorted({r.subject for r in records} - known):
        principals.append((Principal(who.tenant, subject), None, "unknown"))
    scopes: dict[str, Any] = {}
    for p, _, _ in principals:
        scopes.update(broker.scopes(p))
    if not scopes:
        scopes.update(broker.scopes(Principal(who.tenant, who.subject)))
    # One read of every scope; limits differ per token, so each entry rolls its own below.
    counters = await store.budgets.counters(scopes, now)

    def recorded(subject: str | None, since: float) -> dict[str, Any]:
        rs = [r for r in records if (subject is None or r.subject == subject) and r.at >= since]
        return {
            "calls": len(rs),
            "ok": sum(r.outcome == "ok" for r in rs),
            "errors": sum(r.outcome == "error" for r in rs),
            "denied": sum(r.outcome == "denied" for r in rs),
            "input_tokens": sum(r.input_tokens for r in rs),
            "output_tokens": sum(r.output_tokens for r in rs),
            "cost": sum(r.cost for r in rs),
            "first_at": min((r.at for r in rs), default=None),
            "last_at": max((r.at for r in rs), default=None),
        }

    def entry(scope: str, limits: b.Limits, subject: str | None) -> dict[str, Any]:
        counter = b.roll(counters.get(scope, b.Counter()), limits, now)
        since = counter.window_start if limits.window_s > 0 else 0.0
        window = recorded(subject, since)
        return {
            "scope": scope,
            "budgets": limits.to_json(),
            "used": {
                **counter.to_json(),
                "input_tokens": window["input_tokens"],
                "output_tokens": window["output_tokens"],
            },
            "remaining": b.remaining(counter, limits),
        }

    out = []
    for p, token_id, kind in principals:
        pscope, plimits = next((k, v) for k, v in broker.scopes(p).items() if k.startswith("p:"))
        out.append(
            {"subject": p.subject, "token_id": token_id, "kind": kind}
            | entry(pscope, plimits, p.subject)
            | {"recorded": recorded(p.subject, 0.0)}
        )
    tscope, tlimits = next((k, v) for k, v in scopes.items() if k.startswith("t:"))
    return json_response(
        {
            "tenant": who.tenant,
            "at": now,
            "principals": out,
            "tenant_budget": entry(tscope, tlimits, None) | {"recorded": recorded(None, 0.0)},
            "records_scanned": len(records),
            "records_truncated": len(records) >= USAGE_SCAN,
        }
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition. Open when ``metrics_public`` (default: loopback bind or auth
    off); otherwise ``Authorization: Bearer <AGENTBUS_METRICS_TOKEN>`` or a token with
    ``traces:read`` or ``admin``."""
    from agentbus.telemetry.metrics import render

    settings = request.app.state.settings
    public = settings.metrics_public
    if public is None:
        public = not settings.auth or _loopback(settings.host)
    if not public:
        secret = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        given = request.headers.get("authorization", "")
        if not (secret and hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())):
            await _operator(request)
    return Response(render(), media_type="text/plain; version=0.0.4; charset=utf-8")
