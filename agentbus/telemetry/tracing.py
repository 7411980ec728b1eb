"""The tracer provider of one app, and its exporters, from the standard OTEL_* variables.

Export happens only when asked for, so an unconfigured service opens no connection:

* ``OTEL_TRACES_EXPORTER`` (comma-separated): ``otlp`` (OTLP/HTTP protobuf), ``console``,
  ``none``. Unset: ``otlp`` if an OTLP endpoint variable is set, else nothing.
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  ``OTEL_EXPORTER_OTLP[_TRACES]_HEADERS``, ``..._TIMEOUT``, ``..._COMPRESSION``,
  ``..._CERTIFICATE``: read by the SDK's OTLP/HTTP exporter itself. Only the
  ``http/protobuf`` protocol is installed; ``grpc`` falls back to it with a warning.
* ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``,
  ``OTEL_BSP_*`` (batching), ``OTEL_SDK_DISABLED``: the SDK's own handling.

The provider belongs to the app (not the process-global one), so several apps in one
process (tests) keep their spans apart; it is shut down - queued spans flushed - when the
app stops.

Until a span processor is added, spans are not recorded: nothing could receive them, and
recording (attributes, events, the end-of-span bookkeeping) was a tenth of the CPU of a
commit request. A span that is not recorded still has its trace and span ids, so the
``traceparent`` sent upstream and the trace ids in timeline events are unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from agentbus import __version__

log = logging.getLogger("agentbus.telemetry")

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def exporter_names(env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ) if env is None else env
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        return ["otlp"] if any(env.get(v) for v in _ENDPOINT_VARS) else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def make_exporter(name: str) -> SpanExporter | None:
    if name in ("otlp", "otlp_proto_http"):
        proto = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", ""))
        if proto and proto != "http/protobuf":
            log.warning("OTLP protocol %r is not installed; exporting traces with http/protobuf", proto)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (supported: otlp, console, none)", name)
    return None


class RecordWhenExported(sampling.Sampler):
    """Drops every span until the provider has a processor, then defers to the configured
    sampler (``OTEL_TRACES_SAMPLER``, default parent-based always-on)."""

    def __init__(self, inner: sampling.Sampler) -> None:
        self.inner = inner
        self.exporting = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: sampling.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> sampling.SamplingResult:
        if self.exporting:
            return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        parent = trace.get_current_span(parent_context).get_span_context()
        return sampling.SamplingResult(sampling.Decision.DROP, None, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"RecordWhenExported{{{self.inner.get_description()}}}"


class AppTracerProvider(TracerProvider):
    def __init__(self, resource: Resource) -> None:
        super().__init__(sampler=RecordWhenExported(sampling._get_from_env_or_default()), resource=resource)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        if isinstance(self.sampler, RecordWhenExported):
            self.sampler.exporting = True


def make_provider(extra: list[SpanProcessor] | None = None) -> TracerProvider:
    attrs: dict[str, str] = {SERVICE_VERSION: __version__}
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        attrs[SERVICE_NAME] = "agentbus"  # else the operator's name wins
    resource = Resource.create(attrs)
    provider = AppTracerProvider(resource=resource)
    for name in exporter_names():
        exporter = make_exporter(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    for p in extra or ():
        provider.add_span_processor(p)
    return provider
