"""Broker configuration: endpoints, aliases, routing rules, prices and limits.

Loaded from the YAML file named by ``AGENTBUS_BROKER_CONFIG`` (hot-reloaded when it
changes) or, for a single endpoint, from ``AGENTBUS_BROKER_ENDPOINTS``. Invalid config is
refused with a message naming the field; a reload that fails keeps the previous config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator, model_validator

Policy = Literal["round_robin", "least_outstanding", "load_aware", "prefix_affinity"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(Strict):
    """One OpenAI-compatible server (vLLM in production)."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    base_url: HttpUrl = Field(description="Up to and including /v1, e.g. http://10.0.0.5:8000/v1")
    models: list[str] = Field(min_length=1, description="Model names this endpoint serves")
    weight: float = Field(1.0, gt=0)
    max_concurrency: int = Field(64, ge=1)
    api_key: str | None = None
    metrics_url: HttpUrl | None = Field(None, description="vLLM Prometheus /metrics; default: next to base_url")
    timeout_s: float = Field(120.0, gt=0, description="Upper bound for one call")

    @property
    def url(self) -> str:
        return str(self.base_url).rstrip("/")

    @property
    def metrics(self) -> str:
        if self.metrics_url is not None:
            return str(self.metrics_url)
        root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        return f"{root}/metrics"


class Condition(Strict):
    """A routing predicate over request signals; fields given are ANDed, combinators nest."""

    all: list[Condition] | None = None
    any: list[Condition] | None = None
    not_: Condition | None = Field(None, alias="not")
    model: list[str] | None = Field(None, description="Requested model name or alias (before resolution)")
    scope: str | None = Field(None, description="Caller holds this scope")
    kind: str | None = Field(None, description="Caller kind: agent | operator | admin")
    tenant: list[str] | None = None
    subject_regex: str | None = None
    keywords: list[str] | None = Field(None, description="Any of these words in the last user message")
    regex: str | None = Field(None, description="Regex searched in the last user message")
    min_context_tokens: int | None = None
    max_context_tokens: int | None = None
    has_tools: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("model", "tenant", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Route(Strict):
    """Requests matching ``when`` go to ``targets`` chosen by ``policy``; on failure the
    ``fallbacks`` are tried in order."""

    name: str
    when: Condition | None = None
    targets: list[str] = Field(min_length=1)
    policy: Policy = "least_outstanding"
    fallbacks: list[str] = Field(default_factory=list)


class Price(Strict):
    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)


class Retry(Strict):
    attempts: int = Field(3, ge=1, le=10, description="Total tries across endpoints")
    backoff_ms: float = Field(50.0, ge=0)
    max_backoff_ms: float = Field(2000.0, ge=0)


class Circuit(Strict):
    failures: int = Field(5, ge=1, description="Consecutive failures that open the circuit")
    cooldown_s: float = Field(10.0, gt=0)


class LimitsIn(Strict):
    # Counters are 64-bit in every store (and orjson cannot write larger ints): cap at 2**62.
    max_tokens: int | None = Field(None, ge=0, le=2**62)
    max_cost: float | None = Field(None, ge=0)
    max_requests: int | None = Field(None, ge=0, le=2**62)
    window_s: float = Field(0.0, ge=0, description="Budget period; 0 = lifetime")
    rpm: int | None = Field(None, ge=0, le=2**62)
    tpm: int | None = Field(None, ge=0, le=2**62)
    max_concurrent: int | None = Field(None, ge=0, le=2**62)


class BrokerConfig(Strict):
    endpoints: list[Endpoint] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> served model name")
    routes: list[Route] = Field(default_factory=list, description="First match wins; default: all endpoints")
    prices: dict[str, Price] = Field(default_factory=dict, description="Per served model")
    retry: Retry = Retry()
    circuit: Circuit = Circuit()
    tenant_limits: dict[str, LimitsIn] = Field(default_factory=dict)
    default_principal_limits: LimitsIn = LimitsIn()
    default_max_tokens: int = Field(512, ge=1, description="Reserved when a request names no max_tokens")
    identity_headers: dict[str, str] = Field(
        default_factory=lambda: {"subject": "X-Agent-Id", "tenant": "X-Agent-Tenant"},
        description="Upstream headers carrying the caller's identity",
    )
    metrics_interval_s: float = Field(2.0, gt=0)
    health_interval_s: float = Field(10.0, gt=0)
    min_call_timeout_ms: float = Field(50.0, ge=0, description="Below this remaining budget a call fails fast (504)")

    @model_validator(mode="after")
    def _references(self) -> BrokerConfig:
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError("endpoint names must be unique")
        known = set(names)
        for r in self.routes:
            for ref in [*r.targets, *r.fallbacks]:
                if ref not in known:
                    raise ValueError(f"route {r.name!r} names unknown endpoint {ref!r}")
        served = {m for e in self.endpoints for m in e.models}
        for alias, target in self.aliases.items():
            if target not in served:
                raise ValueError(f"alias {alias!r} points to {target!r}, which no endpoint serves")
        return self

    def resolve(self, model: str) -> str:
        return self.aliases.get(model, model)

    def served_models(self) -> list[str]:
        return sorted({m for e in self.endpoints for m in e.models} | set(self.aliases))

    def endpoint(self, name: str) -> Endpoint:
        for e in self.endpoints:
            if e.name == name:
                return e
        raise KeyError(name)


class BrokerConfigError(ValueError):
    pass


def parse(data: dict[str, Any], source: str) -> BrokerConfig:
    try:
        return BrokerConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BrokerConfigError(f"{source}: {where}: {first['msg']}") from exc


def load_file(path: Path) -> BrokerConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BrokerConfigError(f"{path}: cannot read broker config: {exc}") from exc
    return load_text(text, str(path))


def load_text(text: str, source: str) -> BrokerConfig:
    """Parse a YAML document. An empty one is refused: it is far more often a file caught
    half-written by a reload than a wish to drop every endpoint."""
    if not text.strip():
        raise BrokerConfigError(f"{source}: the broker config is empty")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BrokerConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BrokerConfigError(f"{source}: the broker config must be a mapping")
    return parse(data.get("broker", data), source)


def load_env(endpoints_json: str) -> BrokerConfig:
    """``AGENTBUS_BROKER_ENDPOINTS``: a JSON list of endpoint objects (quick single-file setups)."""
    try:
        data = json.loads(endpoints_json)
    except json.JSONDecodeError as exc:
        raise BrokerConfigError(f"AGENTBUS_BROKER_ENDPOINTS is not JSON: {exc}") from exc
    return parse({"endpoints": data}, "AGENTBUS_BROKER_ENDPOINTS")
