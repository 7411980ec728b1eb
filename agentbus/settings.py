"""Typed settings: ``AGENTBUS_*`` environment variables, optionally a YAML file.

Precedence (highest first): explicit keyword arguments, environment, the YAML file named by
``AGENTBUS_CONFIG``, defaults. Every limit a client can hit is a setting here, so the error
message can name it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_", extra="ignore")

    store: str = Field(
        "sqlite:///./agentbus.db",
        description="Backend URL: sqlite:///path, postgresql://..., or redis://...",
    )
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = Field(1, ge=1)
    auto_migrate: bool = Field(True, description="Apply SQL migrations on `agentbus serve`.")

    # Identity. With auth off (dev mode, loopback only) the caller names itself with X-Agent-Id.
    auth: bool = Field(True, description="Require bearer tokens; false is allowed only on a loopback bind.")
    default_tenant: str = "default"
    bootstrap_admin_token: SecretStr | None = Field(
        None, description="Admin token to install on start (else one is generated and printed once)."
    )
    auth_cache_ttl_s: float = Field(2.0, ge=0, description="Token lookups are cached this long; revocation lag.")
    auth_fail_limit: int = Field(30, ge=1, description="Failed authentications per client per window before 429.")
    auth_fail_window_s: float = Field(60.0, gt=0)
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; empty = CORS closed.")
    forwarded_allow_ips: str = Field(
        "",
        description="Comma-separated proxy addresses whose X-Forwarded-For names the client (for the failed-auth "
        "limit and the audit log); empty = trust no one, the TCP peer is the client.",
    )
    audit_retention_s: float = Field(30 * 86400.0, gt=0)

    # Delivery log bounds.
    readset_ttl_s: float = Field(3600.0, gt=0, description="Age after which a read set is expired (410).")
    readset_max_entries: int = Field(10_000, ge=1, description="Entries per session before overflow (410).")
    readset_retention_s: float = Field(
        7 * 86400.0, gt=0, description="Expired read sets are kept this long so commits still get 410."
    )
    idempotency_ttl_s: float = Field(86400.0, gt=0)

    # Input limits.
    max_value_bytes: int = Field(1_048_576, ge=1)
    max_writes_per_commit: int = Field(256, ge=1)
    max_reads_per_commit: int = Field(4096, ge=1)
    max_key_length: int = Field(512, ge=1, le=4096)
    max_body_bytes: int = Field(8 * 1_048_576, ge=1)
    max_list_limit: int = Field(1000, ge=1)

    # Storage tuning.
    sqlite_synchronous: str = Field("FULL", description="SQLite PRAGMA synchronous: FULL or NORMAL.")
    sqlite_busy_timeout_ms: int = 10_000
    pool_size: int = Field(10, ge=1)
    pool_timeout_s: float = Field(
        30.0, gt=0, description="Wait for a free database connection at most this long, then answer 503."
    )
    db_connect_timeout_s: float = Field(5.0, gt=0, description="Connecting to PostgreSQL longer than this is a 503.")
    db_command_timeout_s: float = Field(
        15.0, gt=0, description="A PostgreSQL statement unanswered this long (a partition) is a 503, not a hang."
    )
    redis_prefix: str = "ab"

    # S-Bus compatible routes (/shard, /commit, ...).
    sbus_compat: bool = False
    fast_paths: bool = Field(
        True,
        description="Serve commit and shard reads without FastAPI's routing (same endpoint code, same errors); "
        "false routes every request through FastAPI.",
    )

    # Model broker: a YAML file (hot-reloaded) or a JSON list of endpoints.
    broker_config: str | None = Field(None, description="Path of the broker YAML config (hot-reloaded).")
    broker_endpoints: str | None = Field(None, description="JSON list of endpoints, for a config-file-free setup.")
    broker_reload_s: float = Field(2.0, gt=0, description="How often the broker config file is checked.")

    events_poll_s: float = Field(0.25, gt=0, description="How often SSE streams poll for commits.")

    # MCP server at /mcp (streamable HTTP); `agentbus mcp` serves the same tools over stdio.
    mcp_enabled: bool = Field(True, description="Serve the MCP endpoint /mcp.")
    mcp_stateless: bool = Field(
        False,
        description="Serve /mcp without MCP sessions, so any worker or host can answer any request (no sticky "
        "routing needed); each agent then has one MCP read set unless its client sends X-Agent-Session.",
    )

    # Traces (OTLP export is configured by the standard OTEL_* variables) and /metrics.
    trace_store: bool = Field(True, description="Keep bus and broker events in the backend for /v1/spaces/*/trace.")
    trace_retention_s: float = Field(86400.0, gt=0, description="Timeline events older than this are pruned.")
    trace_max_events_per_space: int = Field(100_000, ge=1, description="Newest events kept per space.")
    trace_flush_s: float = Field(0.5, gt=0, description="How often buffered timeline events are written.")
    trace_prune_s: float = Field(60.0, gt=0, description="How often old timeline events are pruned.")
    metrics_public: bool | None = Field(
        None,
        description="Serve /metrics without a token; default: only when bound to loopback or with auth off. "
        "Otherwise it needs AGENTBUS_METRICS_TOKEN or a token with traces:read or admin.",
    )
    metrics_token: SecretStr | None = Field(None, description="A bearer token for Prometheus to scrape /metrics.")

    @field_validator("default_tenant")
    @classmethod
    def _tenant_name(cls, v: str) -> str:
        from agentbus.core.names import SPACE_RE

        if not SPACE_RE.fullmatch(v):
            raise ValueError("default_tenant must be 1-128 characters of A-Z a-z 0-9 . _ - (it names keys)")
        return v

    @field_validator("sqlite_synchronous")
    @classmethod
    def _sync_mode(cls, v: str) -> str:
        if v.upper() not in {"FULL", "NORMAL", "EXTRA", "OFF"}:
            raise ValueError("sqlite_synchronous must be FULL, NORMAL, EXTRA or OFF")
        return v.upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("AGENTBUS_CONFIG")
        if config:
            path = Path(config)
            if not path.is_file():
                raise ValueError(f"AGENTBUS_CONFIG={config!r} does not name a readable file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def public(self) -> dict[str, Any]:
        """Settings safe to show an operator (no credentials in URLs)."""
        data = self.model_dump()
        data["store"] = redact_url(self.store)
        data["bootstrap_admin_token"] = "***" if self.bootstrap_admin_token else None
        data["metrics_token"] = "***" if self.metrics_token else None
        return data


def redact_url(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
