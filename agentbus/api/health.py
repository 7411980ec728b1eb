"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from agentbus.api.bus import json_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Readiness: the storage backend answers (503 if not)")
async def readyz(request: Request) -> Response:
    # Public route: it says whether the backend answers, never which backend or where.
    await request.app.state.store.ping()
    return json_response({"status": "ok"})
