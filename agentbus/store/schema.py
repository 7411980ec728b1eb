"""SQL schema (SQLite and PostgreSQL), used by the SQL store and mirrored by the Alembic
migrations in ``migrations/``.

Keys compare in byte order on both dialects (``COLLATE "C"`` on PostgreSQL), because prefix
listings, cursors and the core's range checks all assume it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
)

metadata = MetaData()

KeyText = Text().with_variant(Text(collation="C"), "postgresql")

spaces = Table(
    "spaces",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)

shards = Table(
    "shards",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("key", KeyText, primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("value", Text, nullable=True),
    Column("deleted", Boolean, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("updated_by", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_shards_space_seq", "tenant", "space", "seq"),
)

shard_versions = Table(
    "shard_versions",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("key", KeyText, primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("value", Text, nullable=True),
    Column("deleted", Boolean, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("updated_by", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

commits = Table(
    "commits",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("commit_id", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("session", Text, nullable=False),
    Column("at", Float, nullable=False),
    Column("writes", Text, nullable=False),
)

readset_epochs = Table(
    "readset_epochs",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("session", Text, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("n", Integer, nullable=False),
    Column("overflow", Boolean, nullable=False),
    Column("gen", BigInteger, nullable=False),
    Index("ix_readset_epochs_started", "started_at"),
)

readset_entries = Table(
    "readset_entries",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("session", Text, primary_key=True),
    Column("kind", Text, primary_key=True),  # "p" point read, "r" range read
    Column("ident", KeyText, primary_key=True),
    Column("prefix", KeyText, nullable=True),
    Column("start_after", KeyText, nullable=True),
    Column("end_at", KeyText, nullable=True),
    Column("version", BigInteger, nullable=False),  # shard version, or space seq for ranges
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("space", Text, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("idem_key", Text, primary_key=True),
    Column("fingerprint", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_idempotency_created", "created_at"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hash", Text, nullable=False, unique=True),
    Column("tenant", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("scopes", Text, nullable=False),  # JSON list
    Column("spaces", Text, nullable=True),  # JSON list, NULL = every space of the tenant
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("description", Text, nullable=False),
    Column("budgets", Text, nullable=False),  # JSON object
    Index("ix_tokens_tenant", "tenant"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("tenant", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("client", Text, nullable=False),
    Column("detail", Text, nullable=False),  # JSON object
    Index("ix_audit_tenant_at", "tenant", "at"),
)

# Budget accounting (agentbus.store.sql_budget). One row per scope ("t:<tenant>" or
# "p:<tenant>/<subject>"): the fields of agentbus.broker.budget.Counter, plus the window the
# scope was last reserved under, because settle() must roll the counter without its limits.
budget_counters = Table(
    "budget_counters",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("window_s", Float, nullable=False),
    Column("window_start", Float, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("cost", Float, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("minute_start", Float, nullable=False),
    Column("minute_requests", BigInteger, nullable=False),
    Column("minute_tokens", BigInteger, nullable=False),
    Column("inflight", BigInteger, nullable=False),
)

budget_reservations = Table(
    "budget_reservations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("scopes", Text, nullable=False),  # JSON list of scope keys
    Column("tokens", BigInteger, nullable=False),
    Column("cost", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_budget_reservations_expires", "expires_at"),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("tenant", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("session", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("upstream_model", Text, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("outcome", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("stream", Boolean, nullable=False),
    Index("ix_usage_at", "at"),
    Index("ix_usage_tenant_at", "tenant", "at"),
    Index("ix_usage_tenant_subject_at", "tenant", "subject", "at"),
)

# Timeline events of spaces (agentbus.store.sql_traces): bus reads/lists/commits/conflicts and
# model calls, derived from their spans; pruned by age and count per space.
trace_events = Table(
    "trace_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant", Text, nullable=False),
    Column("space", Text, nullable=False),
    Column("ts", Float, nullable=False),
    Column("agent", Text, nullable=False),
    Column("session", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("trace_id", Text, nullable=False),
    Column("span_id", Text, nullable=False),
    Column("data", Text, nullable=False),  # JSON object of the kind-specific fields
    Index("ix_trace_events_space_id", "tenant", "space", "id"),
    Index("ix_trace_events_ts", "ts"),
)
