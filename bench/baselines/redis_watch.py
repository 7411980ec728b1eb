"""Baseline: a Redis WATCH/MULTI/EXEC check-and-write, behind agentbus's commit HTTP shape.

The textbook optimistic transaction on Redis: WATCH the written keys, read their versions,
compare with ``expected_version``, then MULTI the new values plus an INCR of the space's
commit counter and EXEC; a WatchError (someone wrote a watched key in between) re-runs the
check, which then either succeeds or answers 409. Keys of one space share a hash tag, as in
agentbus. It keeps no history, commit log or delivery log, so it does strictly less work
than agentbus: the benchmark ratio is the price of what agentbus adds.

Run: ``BENCH_REDIS_URL=redis://... BENCH_REDIS_PREFIX=<unique> uvicorn
bench.baselines.redis_watch:app``. Every key starts with ``{<prefix>:`` so a run can delete
exactly its own keys (never FLUSHALL a shared Redis).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response
from redis.exceptions import WatchError

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


def shard_key(prefix: str, space: str, key: str) -> str:
    return f"{{{prefix}:{space}}}:s:{key}"


def seq_key(prefix: str, space: str) -> str:
    return f"{{{prefix}:{space}}}:seq"


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The same connection bound agentbus's Redis store uses (max(32, 4 x pool_size) per worker).
    size = int(os.environ.get("BENCH_POOL_SIZE", "10"))
    pool = aioredis.BlockingConnectionPool.from_url(os.environ["BENCH_REDIS_URL"], max_connections=max(32, 4 * size))
    app.state.redis = aioredis.Redis(connection_pool=pool)
    app.state.prefix = os.environ["BENCH_REDIS_PREFIX"]
    try:
        yield
    finally:
        await app.state.redis.aclose()
        await pool.disconnect()


app = FastAPI(title="baseline: Redis WATCH/MULTI", lifespan=lifespan)


@app.get("/readyz")
async def readyz(request: Request) -> Response:
    await request.app.state.redis.ping()
    return json_response({"status": "ok"})


@app.get("/v1/spaces/{space}/shards/{key:path}")
async def read_shard(request: Request, space: str, key: str) -> Response:
    ver, val = await request.app.state.redis.hmget(shard_key(request.app.state.prefix, space, key), "v", "val")
    if ver is None:
        return not_found(key)
    head = orjson.dumps({"key": key, "version": int(ver)})[:-1]
    return Response(head + b',"value":' + val + b"}", media_type="application/json")


@app.post("/v1/spaces/{space}/commit")
async def commit(request: Request, space: str, body: CommitIn) -> Response:
    bad = duplicate_keys(body)
    if bad is not None:
        return bad
    r: aioredis.Redis = request.app.state.redis
    prefix: str = request.app.state.prefix
    names = {w.key: shard_key(prefix, space, w.key) for w in body.writes}
    values = {w.key: orjson.dumps(w.value) for w in body.writes}
    async with r.pipeline(transaction=True) as pipe:
        for attempt in range(MAX_RETRIES):
            try:
                await pipe.watch(*names.values())
                # After WATCH the pipeline runs commands immediately: one round trip per key.
                current: dict[str, int] = {}
                for key, name in names.items():
                    ver = await pipe.hget(name, "v")
                    if ver is not None:
                        current[key] = int(ver)
                conflicts = conflicts_of(body, current)
                if conflicts:
                    await pipe.unwatch()
                    return conflict_response(conflicts)
                versions = {k: current.get(k, 0) + 1 for k in names}
                pipe.multi()
                for key, name in names.items():
                    pipe.hset(name, mapping={"v": versions[key], "val": values[key]})
                pipe.incr(seq_key(prefix, space))
                res = await pipe.execute()
                return json_response({"commit_id": new_commit_id(), "seq": int(res[-1]), "versions": versions})
            except WatchError:
                await pipe.reset()
                await backoff(attempt)
    return error_response(503, "unavailable", "too_many_retries", "WATCH retries exhausted", retryable=True)
