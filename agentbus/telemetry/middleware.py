"""The server span and HTTP metrics of every request: a small pure-ASGI middleware.

The caller's W3C ``traceparent``/``tracestate`` headers are extracted, so the server span
is a child of the caller's span. The span is named ``METHOD /route/{template}`` once the
router has matched (FastAPI puts the route in the scope), which also keeps the metric
labels bounded; unmatched paths are labelled ``unmatched``.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentbus.telemetry import metrics as m


class _Getter:
    """Reads ASGI header pairs (lower-case bytes) for the propagator."""

    def get(self, carrier: dict[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key.lower())

    def keys(self, carrier: dict[str, list[str]]) -> list[str]:
        return list(carrier)


_GETTER = _Getter()


_PROPAGATED = (b"traceparent", b"tracestate", b"baggage")


def _carrier(scope: Scope) -> dict[str, list[str]]:
    # ASGI header names are lower-case bytes: compare them as they come.
    out: dict[str, list[str]] = {}
    for k, v in scope.get("headers") or ():
        if k in _PROPAGATED:
            out.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
    return out


class TracingMiddleware:
    def __init__(self, app: ASGIApp, telemetry: Any) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        carrier = _carrier(scope)
        # Without trace headers there is nothing to extract: the span starts a new trace.
        parent = propagate.extract(carrier, getter=_GETTER) if carrier else None  # type: ignore[arg-type]
        tracer = self.telemetry.tracer
        span = tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        # Until an exporter is configured the span only carries ids (see RecordWhenExported):
        # building its attributes would be work nobody reads.
        recording = span.is_recording()
        if recording:
            attributes = {
                "http.request.method": method,
                "url.path": scope.get("path", ""),
                "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", "1.1"),
            }
            if scope.get("client"):
                attributes["client.address"] = scope["client"][0]
            agent = _header(scope, b"user-agent")
            if agent:
                attributes["user_agent.original"] = agent
            span.set_attributes(attributes)
        token = context.attach(trace.set_span_in_context(span, parent))
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if recording:
                span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if recording:
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("error.type", str(status))
            span.end()
            context.detach(token)
            label = method if method in _METHODS else "_OTHER"
            m.child(m.HTTP_REQUESTS, label, template, str(status)).inc()
            m.child(m.HTTP_LATENCY, label, template).observe(time.perf_counter() - t0)


# Metric labels stay bounded: any other method (a client may send any token) is "_OTHER",
# as in OpenTelemetry's HTTP conventions.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return str(v.decode("latin-1"))[:256]
    return ""
