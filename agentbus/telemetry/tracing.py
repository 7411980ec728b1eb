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
"""

from __future__ import annotations

import logging
import os

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
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


def make_provider(extra: list[SpanProcessor] | None = None) -> TracerProvider:
    attrs: dict[str, str] = {SERVICE_VERSION: __version__}
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        attrs[SERVICE_NAME] = "agentbus"  # else the operator's name wins
    resource = Resource.create(attrs)
    provider = TracerProvider(resource=resource)
    for name in exporter_names():
        exporter = make_exporter(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    for p in extra or ():
        provider.add_span_processor(p)
    return provider
