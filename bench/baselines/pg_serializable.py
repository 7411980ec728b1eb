"""Baseline: a plain PostgreSQL SERIALIZABLE transaction per commit, retried on
serialization failure, behind agentbus's commit HTTP shape.

This is what a developer would write by hand to get "reject stale writes, never lose an
update" on PostgreSQL: read the current versions, compare with ``expected_version``, upsert
the new versions, and let SERIALIZABLE abort any interleaving that would lose an update. It
keeps no history, no commit log and no delivery log, and its ``seq`` comes from a sequence
(unique and increasing, but not gap-free per space), so it does strictly less work than
agentbus: the benchmark ratio is the price of what agentbus adds.

Run: ``BENCH_PG_URL=postgresql://... uvicorn bench.baselines.pg_serializable:app``; create
the schema first with :func:`create_schema` (``bench/run.py`` does), because several
uvicorn workers racing on ``CREATE TABLE IF NOT EXISTS`` can fail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from bench.baselines.common import (
    MAX_RETRIES,
    CommitIn,
    backoff,
    conflict_response,
    conflicts_of,
    duplicate_keys,
    error_response,
    json_response,
    new_commit_id,
    not_found,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_shards (
    space text NOT NULL,
    key text NOT NULL,
    version bigint NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (space, key)
);
CREATE SEQUENCE IF NOT EXISTS bench_commit_seq;
"""

SELECT_VERSIONS = "SELECT key, version FROM bench_shards WHERE space = $1 AND key = ANY($2::text[])"
UPSERT = """
INSERT INTO bench_shards (space, key, version, value)
SELECT $1, k, v, val FROM unnest($2::text[], $3::bigint[], $4::text[]) AS t(k, v, val)
ON CONFLICT (space, key) DO UPDATE SET version = EXCLUDED.version, value = EXCLUDED.value
"""
RETRYABLE = (asyncpg.exceptions.TransactionRollbackError, asyncpg.exceptions.UniqueViolationError)


async def create_schema(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Same pool bound as agentbus's SQLAlchemy engine: pool_size plus as much overflow.
    size = int(os.environ.get("BENCH_POOL_SIZE", "10"))
    app.state.pool = await asyncpg.create_pool(os.environ["BENCH_PG_URL"], min_size=1, max_size=2 * size)
    try:
        yield
    finally:
        await app.state.pool.close()


app = FastAPI(title="baseline: PostgreSQL SERIALIZABLE", lifespan=lifespan)


@app.get("/readyz")
async def readyz(request: Request) -> Response:
    await request.app.state.pool.fetchval("SELECT 1")
    return json_response({"status": "ok"})


@app.get("/v1/spaces/{space}/shards/{key:path}")
async def read_shard(request: Request, space: str, key: str) -> Response:
    row = await request.app.state.pool.fetchrow(
        "SELECT version, value FROM bench_shards WHERE space = $1 AND key = $2", space, key
    )
    if row is None:
        return not_found(key)
    head = orjson.dumps({"key": key, "version": row["version"]})[:-1]
    return Response(head + b',"value":' + row["value"].encode() + b"}", media_type="application/json")


@app.post("/v1/spaces/{space}/commit")
async def commit(request: Request, space: str, body: CommitIn) -> Response:
    bad = duplicate_keys(body)
    if bad is not None:
        return bad
    # Sorted keys: concurrent multi-key commits lock rows in one order (no deadlock cycles).
    writes = sorted(body.writes, key=lambda w: w.key)
    keys = [w.key for w in writes]
    values = [orjson.dumps(w.value).decode() for w in writes]
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        for attempt in range(MAX_RETRIES):
            try:
                async with conn.transaction(isolation="serializable"):
                    rows = await conn.fetch(SELECT_VERSIONS, space, keys)
                    current = {r["key"]: int(r["version"]) for r in rows}
                    conflicts = conflicts_of(body, current)
                    if conflicts:
                        return conflict_response(conflicts)
                    versions = {k: current.get(k, 0) + 1 for k in keys}
                    seq = int(await conn.fetchval("SELECT nextval('bench_commit_seq')"))
                    await conn.execute(UPSERT, space, keys, [versions[k] for k in keys], values)
                return json_response({"commit_id": new_commit_id(), "seq": seq, "versions": versions})
            except RETRYABLE:
                # Serialization failure: another commit got there first. Back off a little and
                # re-read; the retry either succeeds or sees the new version and answers 409.
                await backoff(attempt)
    return error_response(503, "unavailable", "too_many_retries", "serialization retries exhausted", retryable=True)
