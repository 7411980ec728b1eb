"""OpenAI-compatible broker routes (SPEC: "Broker HTTP API").

Bodies are passed through as JSON objects (tool-calling fields untouched), so no schema
here second-guesses the upstream's; only what the broker itself needs is checked.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from agentbus.api.bus import json_response
from agentbus.auth.principal import Principal, require
from agentbus.broker.service import Broker
from agentbus.core.errors import BadRequest

router = APIRouter(prefix="/v1", tags=["broker"])

Invoker = Annotated[Principal, Depends(require("broker:invoke"))]
OpenAIBody = Annotated[dict[str, Any], Body(description="OpenAI-compatible request body, passed through")]


def broker_of(request: Request) -> Broker:
    return request.app.state.broker  # type: ignore[no-any-return]


# Route path under /v1 -> (operation, upstream path); agentbus.api.fast uses it too.
OPERATIONS = {
    "/v1/chat/completions": ("chat", "chat/completions"),
    "/v1/completions": ("text_completion", "completions"),
    "/v1/embeddings": ("embeddings", "embeddings"),
}


async def _proxy(request: Request, who: Principal, operation: str, path: str, body: Any = None) -> Response:
    """``body``: already parsed by the caller (the fast path), else read here."""
    if body is None:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise BadRequest("request body is not valid JSON", code="malformed_json") from exc
    broker = broker_of(request)
    ctx = broker.context(operation, path, body, who, request.headers)
    return await broker.call(ctx, request.headers)


@router.post("/chat/completions", summary="Chat completion through the broker (streaming and tools)")
async def chat_completions(request: Request, who: Invoker, _body: OpenAIBody) -> Response:
    return await _proxy(request, who, *OPERATIONS["/v1/chat/completions"])


@router.post("/completions", summary="Text completion through the broker")
async def completions(request: Request, who: Invoker, _body: OpenAIBody) -> Response:
    return await _proxy(request, who, *OPERATIONS["/v1/completions"])


@router.post("/embeddings", summary="Embeddings through the broker")
async def embeddings(request: Request, who: Invoker, _body: OpenAIBody) -> Response:
    return await _proxy(request, who, *OPERATIONS["/v1/embeddings"])


@router.get("/models", summary="Models and aliases this broker serves")
async def models(request: Request, who: Invoker) -> Response:
    return json_response(broker_of(request).models())


@router.get("/budget", summary="Your budget and rate-limit usage and what remains")
async def budget(request: Request, who: Invoker) -> Response:
    return json_response(await broker_of(request).budget_view(who))
