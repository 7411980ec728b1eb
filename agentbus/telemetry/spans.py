"""Spans (and timeline events, and metrics) for bus operations and broker calls.

Each helper wraps one existing call site: :func:`bus_span` a store read/list/commit in
``agentbus.api.bus``; :func:`broker_span`, :func:`broker_finish` and :func:`inject` a model
call in ``agentbus.broker.service``. A finished operation becomes, from one set of facts,
a span (exported by OTLP when configured), a timeline event (kept in the backend, whether
or not the span was sampled) and metric samples.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from agentbus.core.names import SPACE_RE
from agentbus.store.base import TraceEvent
from agentbus.telemetry import metrics as m

if TYPE_CHECKING:
    from agentbus.core.model import SessionRef, Shard
    from agentbus.store.base import CommitOutcome, CommitRequest, Listing, UsageRecord
    from agentbus.telemetry import Telemetry

# Keys listed on one span/event at most (a listing may return 1000).
MAX_KEYS = 100
_noop = trace.NoOpTracer()


def telemetry_of(obj: Any) -> Telemetry | None:
    """The Telemetry of a request's app (or of a broker)."""
    app = getattr(obj, "app", None)
    if app is not None:
        return getattr(app.state, "telemetry", None)
    return getattr(obj, "telemetry", None)


def _ids(span: Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


class ReadSetTally:
    """Per session, the keys and listings this process delivered in the current epoch, for the
    read-set size histogram (no extra backend round trip on commit). Bounded LRU."""

    def __init__(self, cap: int = 10_000) -> None:
        self.cap = cap
        self._d: OrderedDict[tuple[str, str, str, str], tuple[set[str], int]] = OrderedDict()

    def _get(self, ref: SessionRef) -> tuple[set[str], int]:
        k = (ref.tenant, ref.space, ref.subject, ref.session)
        v = self._d.pop(k, None) or (set(), 0)
        self._d[k] = v
        if len(self._d) > self.cap:
            self._d.popitem(last=False)
        return v

    def read(self, ref: SessionRef, key: str) -> None:
        self._get(ref)[0].add(key)

    def listed(self, ref: SessionRef) -> None:
        keys, ranges = self._get(ref)
        self._d[(ref.tenant, ref.space, ref.subject, ref.session)] = (keys, ranges + 1)

    def end_epoch(self, ref: SessionRef, explicit: dict[str, int]) -> int:
        keys, ranges = self._d.pop((ref.tenant, ref.space, ref.subject, ref.session), (set(), 0))
        return len(keys | set(explicit)) + ranges


class BusSpan:
    """The span of one bus operation; the call site reports the result with one method."""

    def __init__(self, tel: Telemetry | None, span: Span, op: str, ref: SessionRef) -> None:
        self.tel = tel
        self.span = span
        self.op = op
        self.ref = ref
        self.kind = op
        self.data: dict[str, Any] = {}
        self.started = time.time()
        # False until an exporter is configured (RecordWhenExported): attributes are skipped.
        self.recording = span.is_recording()

    def set(self, **attrs: Any) -> None:
        if self.recording:
            self.span.set_attributes(attrs)

    def read(self, key: str, shard: Shard | None) -> None:
        version = shard.meta.version if shard is not None else 0
        self.set(**{"agentbus.key": key, "agentbus.version": version, "agentbus.found": shard is not None})
        self.data = {"key": key, "version": version}
        if self.tel is not None:
            self.tel.readsets.read(self.ref, key)

    def listed(self, prefix: str, listing: Listing) -> None:
        keys = [i.key for i in listing.items]
        self.set(**{"agentbus.prefix": prefix, "agentbus.keys": keys[:MAX_KEYS], "agentbus.count": len(keys)})
        self.data = {
            "prefix": prefix,
            "keys": keys[:MAX_KEYS],
            "versions": {i.key: i.version for i in listing.items[:MAX_KEYS]},
            "count": len(keys),
        }
        if self.tel is not None:
            self.tel.readsets.listed(self.ref)

    def committed(self, req: CommitRequest, outcome: CommitOutcome) -> None:
        keys = [w.key for w in req.writes]
        size = self.tel.readsets.end_epoch(self.ref, req.explicit_reads) if self.tel is not None else 0
        m.child(m.READSET_SIZE).observe(size)
        if self.recording:
            self.set(
                **{
                    "agentbus.keys": keys[:MAX_KEYS],
                    "agentbus.commit.writes": len(keys),
                    "agentbus.commit.explicit_reads": len(req.explicit_reads),
                    "agentbus.readset.size": size,
                }
            )
        self.data = {"keys": keys[:MAX_KEYS]}
        conflicts: list[dict[str, Any]] | None = None
        replayed = outcome.stored is not None
        if outcome.result is not None:
            r = outcome.result
            self.data.update(commit_id=r.commit_id, seq=r.seq, versions=r.versions)
        elif outcome.conflicts:
            conflicts = [c.to_json() for c in outcome.conflicts]
        elif outcome.stored is not None:
            body = outcome.stored.body
            if outcome.stored.status == 200:
                self.data.update(commit_id=body.get("commit_id"), seq=body.get("seq"), versions=body.get("versions"))
            else:
                err = body.get("error") if isinstance(body.get("error"), dict) else {}
                conflicts = list(err.get("conflicts") or [])
        if replayed:
            self.data["replayed"] = True
            self.set(**{"agentbus.idempotent_replay": True})
        if conflicts is not None:
            self.kind = "conflict"
            self.data["conflicts"] = conflicts
            self._conflicts(conflicts)
            m.child(m.COMMITS, "replayed" if replayed else "conflict").inc()
            return
        if self.recording:
            self.set(
                **{
                    "agentbus.outcome": "committed",
                    "agentbus.commit.seq": self.data.get("seq") or 0,
                    "agentbus.commit.id": self.data.get("commit_id") or "",
                    "agentbus.commit.versions": json.dumps(self.data.get("versions") or {}, sort_keys=True),
                }
            )
        m.child(m.COMMITS, "replayed" if replayed else "committed").inc()

    def _conflicts(self, conflicts: list[dict[str, Any]]) -> None:
        if self.recording:
            self.set(
                **{
                    "agentbus.outcome": "conflict",
                    "agentbus.conflict.keys": [c.get("key", "") for c in conflicts][:MAX_KEYS],
                    "agentbus.conflict.kinds": sorted({str(c.get("kind")) for c in conflicts}),
                    "error.type": "conflict",
                }
            )
        for c in conflicts[:MAX_KEYS]:
            if self.recording:
                attrs = {f"agentbus.conflict.{k}": v for k, v in c.items() if v is not None}
                self.span.add_event("agentbus.conflict", attrs)
            if self.data.get("replayed") is None:
                m.child(m.CONFLICTS, str(c.get("kind"))).inc()
        if self.recording:
            self.span.set_status(Status(StatusCode.ERROR, "conflict"))

    def event(self) -> TraceEvent:
        trace_id, span_id = _ids(self.span)
        return TraceEvent(
            tenant=self.ref.tenant,
            space=self.ref.space,
            ts=self.started,
            agent=self.ref.subject,
            session=self.ref.session,
            kind=self.kind,
            trace_id=trace_id,
            span_id=span_id,
            data=self.data,
        )


@contextlib.contextmanager
def bus_span(request: Any, op: str, ref: SessionRef) -> Iterator[BusSpan]:
    """Around one store call: ``with bus_span(request, "read", ref) as sp: ...; sp.read(...)``."""
    tel = telemetry_of(request)
    t0 = time.perf_counter()
    if tel is not None and not tel.exporting:
        # Nothing can record a span: the store call's timeline event takes the ids of the
        # request's span (same trace) instead of a child that would only carry new ids.
        # A child span per call was ~6% of a busy worker's CPU (py-spy, Redis commits).
        scope: contextlib.AbstractContextManager[Span] = contextlib.nullcontext(trace.get_current_span())
    else:
        tracer = tel.tracer if tel is not None else _noop
        scope = tracer.start_as_current_span(f"agentbus.{op}", kind=SpanKind.INTERNAL, record_exception=True)
    with scope as span:
        bs = BusSpan(tel, span, op, ref)
        bs.set(
            **{
                "agentbus.tenant": ref.tenant,
                "agentbus.space": ref.space,
                "agentbus.agent": ref.subject,
                "agentbus.session": ref.session,
                "gen_ai.agent.id": ref.subject,
                "agentbus.operation": op,
            }
        )
        try:
            yield bs
        finally:
            m.child(m.STORE_LATENCY, op).observe(time.perf_counter() - t0)
    if op != "commit":
        m.child(m.BUS_OPS, op).inc()
    if tel is not None and bs.data:
        tel.emit(bs.event())


# ---------------------------------------------------------------------------- broker


class BrokerTrace:
    """What a broker call's span needs between start and the usage record."""

    def __init__(self, span: Span, space: str | None) -> None:
        self.span = span
        self.space = space
        self.started = time.time()
        self.done = False


def _space_header(ctx: Any, incoming: Any) -> str | None:
    raw = incoming.get("x-agent-space") if incoming is not None else None
    if not raw or not SPACE_RE.fullmatch(raw) or not ctx.principal.may_see_space(raw):
        return None  # a space the caller may not see never gets its events
    return str(raw)


@contextlib.contextmanager
def broker_span(broker: Any, ctx: Any, incoming: Any) -> Iterator[None]:
    """Around ``Broker.call``: the CLIENT span of the model call, current while the call runs
    (so :func:`inject` propagates it upstream). :func:`broker_finish` ends it when the usage
    record is written (for a stream: when the stream closes); a call that raises before
    that ends it here."""
    tel = telemetry_of(broker)
    tracer = tel.tracer if tel is not None else _noop
    space = _space_header(ctx, incoming)
    p = ctx.principal
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": ctx.operation,
        "gen_ai.request.model": ctx.model,
        "gen_ai.agent.id": p.subject,
        "agentbus.tenant": p.tenant,
        "agentbus.session": p.session,
        "agentbus.route": ctx.route,
        "agentbus.upstream_model": ctx.upstream_model,
    }
    if space:
        attrs["agentbus.space"] = space
    for field, attr in (
        ("max_tokens", "gen_ai.request.max_tokens"),
        ("temperature", "gen_ai.request.temperature"),
        ("top_p", "gen_ai.request.top_p"),
    ):
        v = ctx.body.get(field)
        if isinstance(v, int | float) and not isinstance(v, bool):
            attrs[attr] = v
    span = tracer.start_span(f"{ctx.operation} {ctx.model}", kind=SpanKind.CLIENT, attributes=attrs)
    bt = BrokerTrace(span, space)
    ctx.span = bt
    with trace.use_span(span, end_on_exit=False):
        try:
            yield
        except BaseException as exc:
            if not bt.done:
                bt.done = True
                span.record_exception(exc)
                status = getattr(exc, "status", None)
                span.set_attribute("error.type", str(status or type(exc).__name__))
                span.set_status(Status(StatusCode.ERROR, getattr(exc, "code", None) or type(exc).__name__))
                span.end()
                m.BROKER_CALLS.labels(ctx.model, "", "error").inc()
                if tel is not None and space:
                    trace_id, span_id = _ids(span)
                    tel.emit(
                        TraceEvent(
                            tenant=p.tenant,
                            space=space,
                            ts=bt.started,
                            agent=p.subject,
                            session=p.session,
                            kind="model_call",
                            trace_id=trace_id,
                            span_id=span_id,
                            data={
                                "operation": ctx.operation,
                                "model": ctx.model,
                                "endpoint": "",
                                "input_tokens": 0,
                                "output_tokens": 0,
                                "cost": 0.0,
                                "latency_ms": round((time.time() - bt.started) * 1000.0, 3),
                                "status": "error",
                                "http_status": int(getattr(exc, "status", 0) or 0),
                                "error": getattr(exc, "code", None) or type(exc).__name__,
                            },
                        )
                    )
            raise


def inject(headers: dict[str, str]) -> None:
    """W3C trace context of the current span (the broker call) into an upstream request."""
    propagate.inject(headers)


def broker_finish(broker: Any, ctx: Any, rec: UsageRecord) -> None:
    """Called with the call's usage record: end its span, count it, queue its event."""
    bt: BrokerTrace | None = getattr(ctx, "span", None)
    tel = telemetry_of(broker)
    endpoint = rec.endpoint
    m.BROKER_CALLS.labels(rec.model, endpoint, rec.outcome).inc()
    if rec.outcome != "denied":
        m.BROKER_LATENCY.labels(rec.model, endpoint).observe(rec.latency_ms / 1000.0)
    if rec.input_tokens:
        m.BROKER_TOKENS.labels(rec.model, endpoint, "input").inc(rec.input_tokens)
    if rec.output_tokens:
        m.BROKER_TOKENS.labels(rec.model, endpoint, "output").inc(rec.output_tokens)
    if rec.cost:
        m.BROKER_COST.labels(rec.model, endpoint).inc(rec.cost)
    if rec.outcome != "denied" and tel is not None:
        tel.update_budget_gauges(broker, ctx.principal)
    if bt is None or bt.done:
        return
    bt.done = True
    span = bt.span
    attrs: dict[str, Any] = {
        "gen_ai.response.model": rec.upstream_model,
        "gen_ai.usage.input_tokens": rec.input_tokens,
        "gen_ai.usage.output_tokens": rec.output_tokens,
        "agentbus.endpoint": endpoint,
        "agentbus.cost": rec.cost,
        "agentbus.outcome": rec.outcome,
        "agentbus.latency_ms": rec.latency_ms,
        "agentbus.stream": rec.stream,
        "http.response.status_code": rec.status,
    }
    if rec.ttft_ms is not None:
        attrs["agentbus.ttft_ms"] = rec.ttft_ms
    st = broker.pool.states.get(endpoint) if endpoint else None
    if st is not None:
        u = urlsplit(st.endpoint.url)
        if u.hostname:
            attrs["server.address"] = u.hostname
        if u.port:
            attrs["server.port"] = u.port
    span.set_attributes(attrs)
    if rec.outcome != "ok":
        span.set_attribute("error.type", "budget_exceeded" if rec.outcome == "denied" else str(rec.status))
        span.set_status(Status(StatusCode.ERROR, rec.outcome))
    span.end()
    if tel is not None and bt.space:
        trace_id, span_id = _ids(span)
        tel.emit(
            TraceEvent(
                tenant=rec.tenant,
                space=bt.space,
                ts=bt.started,
                agent=rec.subject,
                session=rec.session,
                kind="model_call",
                trace_id=trace_id,
                span_id=span_id,
                data={
                    "operation": ctx.operation,
                    "model": rec.model,
                    "upstream_model": rec.upstream_model,
                    "endpoint": endpoint,
                    "input_tokens": rec.input_tokens,
                    "output_tokens": rec.output_tokens,
                    "cost": rec.cost,
                    "latency_ms": round(rec.latency_ms, 3),
                    "ttft_ms": None if rec.ttft_ms is None else round(rec.ttft_ms, 3),
                    "status": rec.outcome,
                    "http_status": rec.status,
                    "stream": rec.stream,
                },
            )
        )
