"""Traces and the operator view: spans (bus and broker, GenAI attributes), W3C trace context
in and out, OTLP/HTTP export, the timeline kept in each backend (API, cursor, retention),
/v1/usage, and /metrics.

Span tests run the app in-process (httpx.ASGITransport with the lifespan) so the SDK's
InMemorySpanExporter sees every span; the timeline API runs against real servers on every
backend (conftest ``server_factory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentbus.app import create_app
from agentbus.auth.bootstrap import issue_token
from agentbus.migrate import upgrade
from agentbus.settings import Settings
from agentbus.store import open_store, open_trace_store
from agentbus.store.base import TraceEvent
from agentbus.telemetry.tracing import exporter_names
from tests.conftest import Server
from tests.upstream import FakeUpstream

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
MODEL = "m"


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("up-tel", models=[MODEL], completion_words=4).start()
    yield up
    up.stop()


def broker_yaml(tmp: Path, up: FakeUpstream) -> str:
    path = tmp / "broker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "endpoints": [up.endpoint()],
                "prices": {MODEL: {"input_per_1k": 1.0, "output_per_1k": 2.0}},
                "default_principal_limits": {"max_tokens": 100_000, "max_cost": 50.0},
                "retry": {"attempts": 1},
            }
        )
    )
    return str(path)


class App:
    def __init__(self, app: Any, client: httpx.AsyncClient, spans: InMemorySpanExporter) -> None:
        self.app = app
        self.client = client
        self.exporter = spans

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    async def flush(self) -> None:
        await self.app.state.telemetry.sink.flush()


@contextlib.asynccontextmanager
async def running(tmp: Path, **settings: Any) -> AsyncIterator[App]:
    store = settings.pop("store", None) or f"sqlite:///{tmp / f'{uuid.uuid4().hex[:6]}.db'}"
    await asyncio.to_thread(upgrade, store)
    app = create_app(Settings(store=store, **{"auth": False, "trace_flush_s": 60.0, **settings}))
    exporter = InMemorySpanExporter()
    app.state.telemetry.provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agentbus.test", timeout=20) as client:
            yield App(app, client, exporter)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def hex_trace(span: ReadableSpan) -> str:
    return f"{span.context.trace_id:032x}"


# --------------------------------------------------------------------------- spans


def test_bus_spans_read_list_commit_conflict(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as a:
            c = a.client
            a1, a2 = {"X-Agent-Id": "alice", "X-Agent-Session": "s1"}, {"X-Agent-Id": "bob"}
            assert (await c.get("/v1/spaces/sp/shards/plan", headers=a1)).status_code == 404
            r = await c.post("/v1/spaces/sp/commit", json={"writes": [{"key": "plan", "value": 1}]}, headers=a1)
            assert r.status_code == 200
            seq = r.json()["seq"]
            assert (await c.get("/v1/spaces/sp/shards/plan", headers=a2)).status_code == 200
            assert (await c.get("/v1/spaces/sp/shards", headers=a2)).status_code == 200
            await c.get("/v1/spaces/sp/shards/plan", headers=a1)
            r = await c.post("/v1/spaces/sp/commit", json={"writes": [{"key": "plan", "value": 2}]}, headers=a1)
            assert r.status_code == 200
            r = await c.post("/v1/spaces/sp/commit", json={"writes": [{"key": "plan", "value": 3}]}, headers=a2)
            assert r.status_code == 409

            reads = a.spans("agentbus.read")
            assert len(reads) == 3
            absent = attrs(reads[0])
            assert absent["agentbus.space"] == "sp"
            assert absent["agentbus.key"] == "plan"
            assert absent["agentbus.version"] == 0 and absent["agentbus.found"] is False
            assert absent["gen_ai.agent.id"] == "alice" and absent["agentbus.session"] == "s1"
            assert attrs(reads[1])["agentbus.version"] == 1

            (listing,) = a.spans("agentbus.list")
            assert attrs(listing)["agentbus.keys"] == ("plan",) and attrs(listing)["agentbus.count"] == 1

            ok, ok2, bad = a.spans("agentbus.commit")
            o = attrs(ok)
            assert o["agentbus.outcome"] == "committed"
            assert o["agentbus.commit.seq"] == seq
            assert o["agentbus.keys"] == ("plan",)
            assert o["agentbus.commit.versions"] == '{"plan": 1}'
            assert o["agentbus.readset.size"] == 1
            assert ok.status.is_ok

            b = attrs(bad)
            assert b["agentbus.outcome"] == "conflict"
            assert b["agentbus.conflict.keys"] == ("plan",)
            assert b["agentbus.conflict.kinds"] == ("stale_read",)
            assert not bad.status.is_ok and bad.status.description == "conflict"
            (ev,) = [e for e in bad.events if e.name == "agentbus.conflict"]
            assert ev.attributes is not None
            assert ev.attributes["agentbus.conflict.key"] == "plan"
            assert ev.attributes["agentbus.conflict.kind"] == "stale_read"
            assert ev.attributes["agentbus.conflict.read_version"] == 1
            assert ev.attributes["agentbus.conflict.current_version"] == 2
            assert ev.attributes["agentbus.conflict.committed_by"] == "alice"
            assert ev.attributes["agentbus.conflict.commit_seq"] == attrs(ok2)["agentbus.commit.seq"]

            # Each bus span is a child of its request's server span.
            servers = {s.context.span_id: s for s in a.spans() if s.kind.name == "SERVER"}
            assert bad.parent is not None and bad.parent.span_id in servers
            assert servers[bad.parent.span_id].name == "POST /v1/spaces/{space}/commit"
            assert attrs(servers[bad.parent.span_id])["http.response.status_code"] == 409

    asyncio.run(go())


def test_traceparent_inbound_makes_the_server_span_a_child(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as a:
            r = await a.client.get("/v1/spaces/sp/shards/k", headers={"traceparent": PARENT, "X-Agent-Id": "x"})
            assert r.status_code == 404
            (server,) = [s for s in a.spans() if s.kind.name == "SERVER"]
            assert hex_trace(server) == TRACE_ID
            assert server.parent is not None and f"{server.parent.span_id:016x}" == "b7ad6b7169203331"
            assert server.parent.is_remote
            assert attrs(server)["http.route"] == "/v1/spaces/{space}/shards/{key:path}"
            (read,) = a.spans("agentbus.read")
            assert hex_trace(read) == TRACE_ID

    asyncio.run(go())


def test_spans_are_not_recorded_until_exported_but_keep_trace_ids(tmp_path: Path) -> None:
    """No processor: spans are dropped by the sampler (cheap), yet the caller's trace id
    still reaches the timeline; adding a processor turns recording on."""

    async def go() -> None:
        store = f"sqlite:///{tmp_path / 'noexport.db'}"
        await asyncio.to_thread(upgrade, store)
        app = create_app(Settings(store=store, auth=False, trace_flush_s=60.0))
        tracer = app.state.telemetry.tracer
        span = tracer.start_span("probe")
        assert not span.is_recording() and span.get_span_context().is_valid
        span.end()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://agentbus.test") as c:
                h = {"traceparent": PARENT, "X-Agent-Id": "x"}
                r = await c.post("/v1/spaces/sp/commit", json={"writes": [{"key": "k", "value": 1}]}, headers=h)
                assert r.status_code == 200
                await app.state.telemetry.sink.flush()
                (event,) = (await c.get("/v1/spaces/sp/trace")).json()["events"]
                assert event["kind"] == "commit" and event["trace_id"] == TRACE_ID
                assert event["span_id"] != "b7ad6b7169203331"  # a span of its own, not the caller's
        app.state.telemetry.provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        span = tracer.start_span("probe")
        assert span.is_recording()
        span.end()

    asyncio.run(go())


def test_broker_span_genai_attributes_and_traceparent_upstream(tmp_path: Path, upstream: FakeUpstream) -> None:
    async def go() -> None:
        async with running(tmp_path, broker_config=broker_yaml(tmp_path, upstream)) as a:
            upstream.requests.clear()
            headers = {
                "traceparent": PARENT,
                "tracestate": "vendor=1",
                "X-Agent-Id": "planner",
                "X-Agent-Space": "run1",
            }
            body = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 20}
            r = await a.client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            (call,) = a.spans(f"chat {MODEL}")
            at = attrs(call)
            assert call.kind.name == "CLIENT"
            assert at["gen_ai.operation.name"] == "chat"
            assert at["gen_ai.request.model"] == MODEL
            assert at["gen_ai.response.model"] == MODEL
            assert at["gen_ai.usage.input_tokens"] == 3
            assert at["gen_ai.usage.output_tokens"] == 4
            assert at["gen_ai.agent.id"] == "planner"
            assert at["gen_ai.request.max_tokens"] == 20
            assert at["server.address"] == "127.0.0.1" and at["server.port"] == upstream.port
            assert at["agentbus.endpoint"] == upstream.name
            assert at["agentbus.cost"] == pytest.approx((3 * 1.0 + 4 * 2.0) / 1000)
            assert at["agentbus.space"] == "run1"
            assert hex_trace(call) == TRACE_ID
            # The upstream request carries the broker span as its parent, same trace.
            (seen,) = upstream.requests
            tp = seen["headers"]["traceparent"]
            assert tp.split("-")[1] == TRACE_ID
            assert tp.split("-")[2] == f"{call.context.span_id:016x}"
            assert seen["headers"]["tracestate"] == "vendor=1"

            # Streaming: the span ends when the stream closes, with the streamed usage.
            body["stream"] = True
            r = await a.client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200 and b"[DONE]" in r.content
            for _ in range(50):
                if len(a.spans(f"chat {MODEL}")) == 2:
                    break
                await asyncio.sleep(0.02)
            streamed = attrs(a.spans(f"chat {MODEL}")[1])
            assert streamed["agentbus.stream"] is True and streamed["gen_ai.usage.output_tokens"] == 4

            # An upstream error is an error span; embeddings have their operation name.
            r = await a.client.post("/v1/embeddings", json={"model": MODEL, "input": "a b"}, headers=headers)
            assert r.status_code == 200
            assert attrs(a.spans(f"embeddings {MODEL}")[0])["gen_ai.operation.name"] == "embeddings"
            upstream.mode = "error400"
            try:
                r = await a.client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
            finally:
                upstream.mode = "ok"
            assert r.status_code == 400
            (failed,) = a.spans(f"text_completion {MODEL}")
            assert not failed.status.is_ok and attrs(failed)["agentbus.outcome"] == "error"

            # Model calls appear in the named space's timeline.
            await a.flush()
            page = (await a.client.get("/v1/spaces/run1/trace")).json()
            calls = [e for e in page["events"] if e["kind"] == "model_call"]
            assert len(calls) == 4
            first = calls[0]
            assert first["agent"] == "planner" and first["model"] == MODEL and first["endpoint"] == upstream.name
            assert (first["input_tokens"], first["output_tokens"]) == (3, 4)
            assert first["cost"] == pytest.approx(0.011) and first["status"] == "ok" and first["latency_ms"] > 0
            assert first["trace_id"] == TRACE_ID and first["span_id"] == f"{call.context.span_id:016x}"
            assert calls[-1]["status"] == "error"

    asyncio.run(go())


def test_broker_call_without_space_header_is_not_in_any_timeline(tmp_path: Path, upstream: FakeUpstream) -> None:
    async def go() -> None:
        async with running(tmp_path, broker_config=broker_yaml(tmp_path, upstream)) as a:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            r = await a.client.post("/v1/chat/completions", json=body, headers={"X-Agent-Id": "solo"})
            assert r.status_code == 200
            assert "agentbus.space" not in attrs(a.spans(f"chat {MODEL}")[0])
            assert not a.app.state.telemetry.sink._buf
            # ... but it counts for usage.
            await asyncio.sleep(0.1)
            usage = (await a.client.get("/v1/usage")).json()
            (solo,) = [p for p in usage["principals"] if p["subject"] == "solo"]
            assert solo["recorded"]["calls"] == 1

    asyncio.run(go())


# --------------------------------------------------------------------------- OTLP export


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        if self.path == "/v1/traces":
            type(self).bodies.append(raw)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_exporter_only_when_configured() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]


def test_otlp_http_export_to_a_local_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Receiver.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "agentbus-test")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)

    async def go() -> None:
        async with running(tmp_path) as a:
            r = await a.client.post(
                "/v1/spaces/sp/commit",
                json={"writes": [{"key": "k", "value": 1}]},
                headers={"X-Agent-Id": "exp", "traceparent": PARENT},
            )
            assert r.status_code == 200
        # Leaving the lifespan shut the provider down: the batch was flushed.

    try:
        asyncio.run(go())
    finally:
        httpd.shutdown()
    assert _Receiver.bodies, "no OTLP request arrived"
    spans = []
    services = set()
    for raw in _Receiver.bodies:
        req = ExportTraceServiceRequest.FromString(raw)
        for rs in req.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    names = {s.name for s in spans}
    assert {"POST /v1/spaces/{space}/commit", "agentbus.commit"} <= names
    assert services == {"agentbus-test"}
    commit = next(s for s in spans if s.name == "agentbus.commit")
    assert commit.trace_id.hex() == TRACE_ID
    assert {a.key for a in commit.attributes} >= {"agentbus.space", "agentbus.commit.seq", "gen_ai.agent.id"}


# --------------------------------------------------------------------------- timeline API, every backend


def _poll(srv: Server, space: str, n: int, **params: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        page = httpx.get(f"{srv.url}/v1/spaces/{space}/trace", params=params, timeout=10).json()
        if len(page["events"]) >= n or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_trace_api_on_every_backend(server_factory: Any, space: str) -> None:
    srv: Server = server_factory(trace_flush_s="0.1")
    a1, a2 = {"X-Agent-Id": "alice"}, {"X-Agent-Id": "bob", "X-Agent-Session": "t2"}
    base = f"{srv.url}/v1/spaces/{space}"
    assert httpx.get(f"{base}/shards/doc", headers=a1).status_code == 404
    assert httpx.get(f"{base}/shards/doc", headers=a2).status_code == 404
    r = httpx.post(f"{base}/commit", json={"writes": [{"key": "doc", "value": "a"}]}, headers=a1)
    assert r.status_code == 200
    win = r.json()
    httpx.get(f"{base}/shards", params={"prefix": "d"}, headers=a1)
    r = httpx.post(f"{base}/commit", json={"writes": [{"key": "doc", "value": "b"}]}, headers=a2)
    assert r.status_code == 409

    page = _poll(srv, space, 5)
    events = page["events"]
    assert [e["kind"] for e in events] == ["read", "read", "commit", "list", "conflict"]
    for e in events:
        assert set(e) >= {"id", "ts", "ts_ms", "agent", "session", "kind", "trace_id", "span_id"}
        assert e["ts"].endswith("Z") and isinstance(e["ts_ms"], int) and len(e["trace_id"]) == 32
    read, _, commit, listing, conflict = events
    assert (read["agent"], read["key"], read["version"]) == ("alice", "doc", 0)
    assert events[1]["session"] == "t2"
    assert commit["commit_id"] == win["commit_id"] and commit["seq"] == win["seq"]
    assert commit["versions"] == {"doc": 1} and commit["keys"] == ["doc"]
    assert listing["prefix"] == "d" and listing["keys"] == ["doc"]
    assert conflict["agent"] == "bob" and conflict["keys"] == ["doc"]
    assert conflict["conflicts"] == [
        {
            "key": "doc",
            "kind": "stale_read",
            "read_version": 0,
            "current_version": 1,
            "committed_by": "alice",
            "commit_seq": win["seq"],
        }
    ]
    ts = [e["ts_ms"] for e in events]
    assert ts == sorted(ts)
    assert page["next"] == events[-1]["id"]

    # Cursor paging: limit, then after=next; past the end: no events and next null.
    first = httpx.get(f"{base}/trace", params={"limit": 2}).json()
    assert [e["id"] for e in first["events"]] == [e["id"] for e in events[:2]]
    rest = httpx.get(f"{base}/trace", params={"after": first["next"]}).json()
    assert [e["id"] for e in rest["events"]] == [e["id"] for e in events[2:]]
    tail = httpx.get(f"{base}/trace", params={"after": page["next"]}).json()
    assert tail == {"events": [], "next": None}
    for cursor in ("not-a-cursor", "9" * 30, "-1", "99999999999999999999-0"):
        bad = httpx.get(f"{base}/trace", params={"after": cursor})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor", (cursor, bad.text)
    # Other spaces are separate timelines.
    assert httpx.get(f"{srv.url}/v1/spaces/other-{space}/trace").json() == {"events": [], "next": None}


# --------------------------------------------------------------------------- retention


@contextlib.asynccontextmanager
async def trace_store(url: str, **settings: Any) -> AsyncIterator[Any]:
    store = open_store(Settings(store=url, redis_prefix=f"t{uuid.uuid4().hex[:8]}", **settings))
    await store.start()
    try:
        yield open_trace_store(store)
    finally:
        await store.close()


def _ev(space: str, i: int, ts: float) -> TraceEvent:
    return TraceEvent("ten", space, ts, "a", "", "read", "0" * 32, "0" * 16, {"key": f"k{i}", "version": i})


def test_retention_by_age_and_count(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from tests.conftest import make_store

    url = make_store(backend, request, tmp_path)

    async def go() -> None:
        async with trace_store(url, trace_retention_s=3600, trace_max_events_per_space=5) as ts:
            now = time.time()
            sp = f"ret-{uuid.uuid4().hex[:6]}"
            await ts.append([_ev(sp, i, now) for i in range(12)])
            await ts.append([_ev(sp + "-b", 0, now)])
            await ts.prune(now)
            kept = await ts.events("ten", sp, None, 100)
            # The newest max_per_space events stay (exactly after a prune; Redis also trims
            # approximately on append).
            assert [e.data["key"] for e in kept] == [f"k{i}" for i in range(7, 12)]
            assert len(await ts.events("ten", sp + "-b", None, 100)) == 1
            # Tenants are separate.
            assert await ts.events("other", sp, None, 100) == []
            # Past retention everything goes.
            await ts.prune(now + 3600 + 5)
            assert await ts.events("ten", sp, None, 100) == []
            assert await ts.events("ten", sp + "-b", None, 100) == []

    asyncio.run(go())


def test_sql_prune_keeps_recent_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)

    async def go() -> None:
        async with trace_store(url, trace_retention_s=60) as ts:
            now = time.time()
            await ts.append([_ev("s", 0, now - 120), _ev("s", 1, now - 30), _ev("s", 2, now)])
            assert await ts.prune(now) == 1
            assert [e.data["key"] for e in await ts.events("ten", "s", None, 10)] == ["k1", "k2"]
            # The count bound, checked only in the spaces named.
            ts.max_per_space = 1
            await ts.append([_ev("t", 0, now), _ev("t", 1, now)])
            assert await ts.prune(now, {("ten", "t")}) == 1
            assert [e.data["key"] for e in await ts.events("ten", "t", None, 10)] == ["k1"]
            assert len(await ts.events("ten", "s", None, 10)) == 2

    asyncio.run(go())


def test_events_are_flushed_at_shutdown(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"

    async def go() -> None:
        async with running(tmp_path, store=url) as a:  # trace_flush_s=60: only shutdown flushes
            r = await a.client.post("/v1/spaces/sp/commit", json={"writes": [{"key": "k", "value": 1}]})
            assert r.status_code == 200
            assert len(a.app.state.telemetry.sink._buf) == 1
        async with trace_store(url) as ts:
            (ev,) = await ts.events("default", "sp", None, 10)
            assert ev.kind == "commit" and ev.data["versions"] == {"k": 1}

    asyncio.run(go())


# --------------------------------------------------------------------------- auth, usage, metrics


def test_usage_and_trace_scopes_with_tokens(tmp_path: Path, upstream: FakeUpstream) -> None:
    admin = "ab_admin_" + uuid.uuid4().hex

    async def go() -> None:
        async with running(
            tmp_path, auth=True, bootstrap_admin_token=admin, broker_config=broker_yaml(tmp_path, upstream)
        ) as a:
            store = a.app.state.store
            tokens = {}
            for subject, kind, budgets in (
                ("worker", "agent", {"max_tokens": 1000, "max_requests": 10}),
                ("ops", "operator", None),
            ):
                plain, rec = issue_token(tenant="default", subject=subject, kind=kind, budgets=budgets)
                await store.put_token(rec)
                tokens[subject] = (plain, rec.id)
            plain, rec = issue_token(tenant="other", subject="stranger", kind="agent")
            await store.put_token(rec)
            worker = {"Authorization": f"Bearer {tokens['worker'][0]}"}
            ops = {"Authorization": f"Bearer {tokens['ops'][0]}"}
            body = {"model": MODEL, "messages": [{"role": "user", "content": "a b c d e"}], "max_tokens": 10}
            for _ in range(2):
                r = await a.client.post("/v1/chat/completions", json=body, headers={**worker, "X-Agent-Space": "w"})
                assert r.status_code == 200
            await asyncio.sleep(0.2)  # usage records are written in the background

            assert (await a.client.get("/v1/usage", headers=worker)).status_code == 403
            assert (await a.client.get("/v1/spaces/w/trace", headers=worker)).status_code == 403
            assert (await a.client.get("/v1/usage")).status_code == 401
            r = await a.client.get("/v1/usage", headers=ops)
            assert r.status_code == 200
            u = r.json()
            assert u["tenant"] == "default"
            subjects = {p["subject"] for p in u["principals"]}
            assert {"worker", "ops", "admin"} <= subjects and "stranger" not in subjects
            (w,) = [p for p in u["principals"] if p["subject"] == "worker"]
            assert w["token_id"] == tokens["worker"][1] and w["kind"] == "agent"
            assert w["budgets"]["max_tokens"] == 1000 and w["budgets"]["max_requests"] == 10
            assert w["used"]["requests"] == 2
            assert w["used"]["input_tokens"] == 10 and w["used"]["output_tokens"] == 8
            assert w["used"]["tokens"] == 18 and w["used"]["cost"] == pytest.approx(2 * (5 + 8) / 1000)
            assert w["remaining"]["tokens"] == 1000 - 18 and w["remaining"]["requests"] == 8
            assert w["recorded"]["calls"] == 2 and w["recorded"]["ok"] == 2
            assert u["tenant_budget"]["scope"] == "t:default"

            await a.flush()
            r = await a.client.get("/v1/spaces/w/trace", headers=ops)
            assert r.status_code == 200 and len(r.json()["events"]) == 2
            # A token restricted to some spaces cannot put events into others; a denied call is
            # an error span and a "denied" event.
            plain, rec = issue_token(
                tenant="default", subject="tight", kind="agent", spaces=["mine"], budgets={"max_requests": 1}
            )
            await store.put_token(rec)
            tight = {"Authorization": f"Bearer {plain}"}
            r = await a.client.post("/v1/chat/completions", json=body, headers={**tight, "X-Agent-Space": "w"})
            assert r.status_code == 200
            r = await a.client.post("/v1/chat/completions", json=body, headers={**tight, "X-Agent-Space": "mine"})
            assert r.status_code == 429
            denied = a.spans(f"chat {MODEL}")[-1]
            assert attrs(denied)["agentbus.outcome"] == "denied" and not denied.status.is_ok
            assert attrs(denied)["error.type"] == "budget_exceeded"
            await a.flush()
            assert len((await a.client.get("/v1/spaces/w/trace", headers=ops)).json()["events"]) == 2
            (ev,) = (await a.client.get("/v1/spaces/mine/trace", headers=ops)).json()["events"]
            assert ev["agent"] == "tight" and ev["status"] == "denied" and ev["http_status"] == 429
            # Another tenant's operator sees nothing of it.
            plain, rec = issue_token(tenant="other", subject="ops2", kind="operator")
            await store.put_token(rec)
            r = await a.client.get("/v1/spaces/w/trace", headers={"Authorization": f"Bearer {plain}"})
            assert r.json()["events"] == []

    asyncio.run(go())


def test_unknown_http_methods_share_one_metric_label(tmp_path: Path) -> None:
    """A client may send any method token; the metric labels must stay bounded."""

    async def go() -> None:
        async with running(tmp_path) as a:
            for method in ("FOO", "BAR-BAZ"):
                r = await a.client.request(method, "/v1/spaces/sp/shards/k", headers={"X-Agent-Id": "x"})
                assert r.status_code == 405
            text = (await a.client.get("/metrics")).text
            assert 'method="_OTHER"' in text
            assert 'method="FOO"' not in text and 'method="BAR-BAZ"' not in text

    asyncio.run(go())


def test_metrics_after_traffic(tmp_path: Path, upstream: FakeUpstream) -> None:
    async def go() -> None:
        async with running(tmp_path, broker_config=broker_yaml(tmp_path, upstream)) as a:
            c = a.client
            h = {"X-Agent-Id": "m1"}
            await c.get("/v1/spaces/msp/shards/x", headers=h)
            await c.post("/v1/spaces/msp/commit", json={"writes": [{"key": "x", "value": 1}]}, headers=h)
            await c.post(
                "/v1/spaces/msp/commit", json={"writes": [{"key": "x", "value": 2, "expected_version": 0}]}, headers=h
            )
            body = {"model": MODEL, "messages": [{"role": "user", "content": "a b"}]}
            assert (await c.post("/v1/chat/completions", json=body, headers=h)).status_code == 200
            gauge = 'agentbus_budget_remaining{kind="tokens",scope="p:default/m1"}'
            for _ in range(100):  # the budget gauge is updated in the background
                r = await c.get("/metrics")
                if gauge in r.text:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            text = r.text
            for line in (
                'agentbus_http_requests_total{method="POST",route="/v1/spaces/{space}/commit",status="409"}',
                'agentbus_http_request_duration_seconds_count{method="POST",route="/v1/spaces/{space}/commit"}',
                'agentbus_commits_total{outcome="committed"}',
                'agentbus_commits_total{outcome="conflict"}',
                'agentbus_conflicts_total{kind="write_conflict"}',
                "agentbus_commit_readset_size_bucket{",
                'agentbus_store_operation_seconds_count{op="commit"}',
                f'agentbus_broker_calls_total{{endpoint="{upstream.name}",model="{MODEL}",outcome="ok"}}',
                f'agentbus_broker_tokens_total{{direction="output",endpoint="{upstream.name}",model="{MODEL}"}}',
                f'agentbus_broker_cost_total{{endpoint="{upstream.name}",model="{MODEL}"}}',
                f'agentbus_broker_call_duration_seconds_count{{endpoint="{upstream.name}",model="{MODEL}"}}',
                'agentbus_budget_remaining{kind="tokens",scope="p:default/m1"}',
            ):
                assert line in text, line
            assert "unmatched" not in text or 'route="unmatched"' in text

    asyncio.run(go())


def test_metrics_auth_off_loopback(tmp_path: Path) -> None:
    secret = "scrape-" + uuid.uuid4().hex
    admin = "ab_admin_" + uuid.uuid4().hex

    async def go() -> None:
        async with running(tmp_path, auth=True, host="0.0.0.0", metrics_token=secret, bootstrap_admin_token=admin) as a:
            assert (await a.client.get("/metrics")).status_code == 401
            assert (await a.client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
            ok = await a.client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
            assert ok.status_code == 200 and "agentbus_http_requests_total" in ok.text
            assert (await a.client.get("/metrics", headers={"Authorization": f"Bearer {admin}"})).status_code == 200
        async with running(tmp_path, auth=True, host="127.0.0.1", bootstrap_admin_token=admin) as a:
            assert (await a.client.get("/metrics")).status_code == 200
        async with running(tmp_path, auth=True, host="0.0.0.0", metrics_public=True, bootstrap_admin_token=admin) as a:
            assert (await a.client.get("/metrics")).status_code == 200

    asyncio.run(go())


@pytest.mark.slow
def test_metrics_sum_over_uvicorn_workers(tmp_path: Path) -> None:
    """`serve --workers 2` gives the workers a PROMETHEUS_MULTIPROC_DIR: any worker's /metrics
    reports every worker's commits (a worker adds its buffered counts at least every
    second, so the scrapes wait for that)."""
    from tests.conftest import dev_env, migrate

    url = f"sqlite:///{tmp_path / 'mw.db'}"
    migrate(url)
    srv = Server(store=url, env=dev_env(), log_dir=tmp_path).start(1, workers=2)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for i in range(30):
                r = c.post("/v1/spaces/mw/commit", json={"writes": [{"key": f"k{i}", "value": i}]})
                assert r.status_code == 200
            deadline = time.monotonic() + 10
            while True:
                seen = set()
                for _ in range(6):  # new connections: the scrapes land on both workers
                    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
                    prefix = 'agentbus_commits_total{outcome="committed"}'
                    line = next((x for x in text.splitlines() if x.startswith(prefix)), f"{prefix} 0")
                    seen.add(float(line.split()[-1]))
                assert max(seen) <= 30.0, seen
                if seen == {30.0} or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert seen == {30.0}
    finally:
        srv.stop()


def test_buffered_metrics_add_up_to_what_direct_updates_give() -> None:
    """Multiprocess mode buffers per-request metrics in the process (agentbus.telemetry.
    metrics): after a flush the exposition equals that of the same updates made directly,
    bucket by bucket."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from agentbus.telemetry import metrics as m

    # Quarters: their sums are exact in any grouping, so the comparison can be byte for byte.
    values = st.integers(0, 400).map(lambda i: i / 4)

    @settings(max_examples=50, deadline=None)
    @given(
        ops=st.lists(st.tuples(st.sampled_from(["inc", "observe"]), st.sampled_from(["a", "b"]), values), max_size=60),
        flush_at=st.sets(st.integers(0, 60)),
    )
    def check(ops: list[tuple[str, str, float]], flush_at: set[int]) -> None:
        exposition = []
        for buffered in (False, True):
            registry = CollectorRegistry()
            counter = Counter("c_total", "c", ["l"], registry=registry)
            histogram = Histogram("h", "h", ["l"], buckets=(0.5, 1, 10, 50), registry=registry)
            children: dict[tuple[str, str], Any] = {}
            for i, (op, label, value) in enumerate(ops):
                metric = counter if op == "inc" else histogram
                if (op, label) not in children:
                    real = metric.labels(label)
                    wrap = m._BufferedCounter if op == "inc" else m._BufferedHistogram
                    children[(op, label)] = wrap(real) if buffered else real
                target = children[(op, label)]
                target.inc(value) if op == "inc" else target.observe(value)
                if buffered and i in flush_at:
                    m.flush()
            m.flush()
            exposition.append(generate_latest(registry))
        assert exposition[0] == exposition[1]

    check()
