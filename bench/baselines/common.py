"""What both baselines share: the request model and agentbus-shaped response bodies.

The baselines speak exactly the subset of the agentbus v1 API the load generator uses
(``POST /v1/spaces/{space}/commit`` with ``expected_version`` writes, ``GET`` of one shard),
and answer a stale ``expected_version`` with the same 409 body agentbus sends, including
``current_version``, so one client drives both without knowing which it talks to.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from typing import Any

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

JSON = "application/json"
MAX_RETRIES = 50


class WriteIn(BaseModel):
    """One write; like agentbus, ``expected_version`` 0 means "must not exist"."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=512)
    value: Any = None
    expected_version: int | None = Field(None, ge=0)


class CommitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    writes: list[WriteIn] = Field(min_length=1, max_length=256)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type=JSON)


def new_commit_id() -> str:
    return "c_" + secrets.token_hex(8)


def conflicts_of(body: CommitIn, current: dict[str, int]) -> list[dict[str, Any]]:
    """Every write whose expected_version is not the current version (0 = absent)."""
    return [
        {
            "key": w.key,
            "kind": "write_conflict",
            "read_version": w.expected_version,
            "current_version": current.get(w.key, 0),
            "committed_by": None,
            "commit_seq": None,
        }
        for w in body.writes
        if w.expected_version is not None and current.get(w.key, 0) != w.expected_version
    ]


def conflict_response(conflicts: list[dict[str, Any]]) -> Response:
    keys = ", ".join(sorted({c["key"] for c in conflicts}))
    return json_response(
        {
            "error": {
                "type": "conflict",
                "code": "write_conflict",
                "message": f"commit rejected: expected_version does not match the current version ({keys})",
                "retryable": True,
                "conflicts": conflicts,
            }
        },
        status=409,
    )


def duplicate_keys(body: CommitIn) -> Response | None:
    keys = [w.key for w in body.writes]
    if len(set(keys)) != len(keys):
        return error_response(422, "validation_failed", "duplicate_write", "a key is written twice in one commit")
    return None


def error_response(status: int, type_: str, code: str, message: str, retryable: bool = False) -> Response:
    return json_response(
        {"error": {"type": type_, "code": code, "message": message, "retryable": retryable}}, status=status
    )


def not_found(key: str) -> Response:
    return error_response(404, "not_found", "shard_not_found", f"shard {key!r} does not exist")


async def backoff(attempt: int) -> None:
    """Retry at once the first time (a stale expected_version then answers 409 without
    delay), then with jittered exponential backoff so blind writers do not livelock."""
    if attempt:
        await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
