"""Storage backends behind one interface; :func:`open_store` picks one by URL scheme."""

from __future__ import annotations

from agentbus.core.errors import BadRequest
from agentbus.settings import Settings
from agentbus.store.base import Store, TraceStore


def open_store(settings: Settings, url: str | None = None) -> Store:
    url = url or settings.store
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        from agentbus.store.sqlite import SQLiteStore

        return SQLiteStore(settings, url)
    if scheme in ("postgresql", "postgres"):
        from agentbus.store.postgres import PostgresStore

        return PostgresStore(settings, url)
    if scheme in ("redis", "rediss"):
        from agentbus.store.redis import RedisStore

        return RedisStore(settings, url)
    raise BadRequest(f"unsupported AGENTBUS_STORE scheme {scheme!r}: use sqlite://, postgresql:// or redis://")


def open_trace_store(store: Store) -> TraceStore:
    """The timeline store living in the same backend as ``store``."""
    s = store.settings
    from agentbus.store.sql import SQLStore

    if isinstance(store, SQLStore):
        from agentbus.store.sql_traces import SQLTraceStore

        return SQLTraceStore(store, s.trace_retention_s, s.trace_max_events_per_space)
    from agentbus.store.redis_traces import RedisTraceStore

    return RedisTraceStore(store, s.trace_retention_s, s.trace_max_events_per_space)  # type: ignore[arg-type]
