"""A shortcut through FastAPI for the requests agents send most: commit, read a shard, and
model calls through the broker.

Why: on a warm store, FastAPI's request machinery (walking the route table, the exception
and exit-stack middlewares, dependency solving, stdlib JSON parsing) costs about as much
CPU as the commit itself. This middleware recognises ``POST /v1/spaces/{space}/commit`` and
``GET /v1/spaces/{space}/shards/{key}`` and calls the *same* endpoint functions of
:mod:`agentbus.api.bus` with the same authentication dependency (and likewise the broker's
``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` through
:func:`agentbus.api.broker._proxy`), so identity, scopes,
validation, spans and the response bytes are those of the routed path; the body is parsed
by the same :func:`~agentbus.api.bus.strict_json`.

Anything unusual is handed to FastAPI untouched (the body replayed): a body that is not
JSON or that the strict ``CommitIn`` model refuses, a second or over-long ``Idempotency-Key``, another
content type (FastAPI reads a body without ``Content-Type: application/json`` as bytes), a
``root_path``, HEAD. FastAPI then produces exactly the error it always
did, so there is still one place that words each 4xx. ``AGENTBUS_FAST_PATHS=false`` turns
the shortcut off (the test suite compares both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentbus.api import broker, bus
from agentbus.api.errors import error_response
from agentbus.auth.principal import require
from agentbus.core.errors import AgentbusError

_PREFIX = "/v1/spaces/"
_COMMIT_SUFFIX = "/commit"
_SHARDS = "/shards/"
_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8")
# FastAPI's Header(max_length=256) on the commit route; longer keys get its 422 there.
_IDEM_MAX = 256


class FastBus:
    """Pure ASGI; sits innermost among the app's middlewares, so tracing, security headers
    and the body limit apply to shortcut requests exactly as to routed ones."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._reader = require("bus:read")
        self._writer = require("bus:write")
        self._invoker = require("broker:invoke")
        routes = {r.name: r for r in bus.router.routes if isinstance(r, APIRoute)}
        # Put in the scope as the router would: the server span and the HTTP metrics are
        # labelled with the route's path template.
        self._commit_route = routes["commit"]
        self._read_route = routes["read_shard"]
        self._broker_routes = {r.path: r for r in broker.router.routes if isinstance(r, APIRoute)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            if path in broker.OPERATIONS and scope["method"] == "POST":
                await self._broker(scope, receive, send, path)
                return
            if path.startswith(_PREFIX):
                rest = path[len(_PREFIX) :]
                method = scope["method"]
                if method == "POST" and rest.endswith(_COMMIT_SUFFIX):
                    space = rest[: -len(_COMMIT_SUFFIX)]
                    if space and "/" not in space:
                        await self._commit(scope, receive, send, space)
                        return
                elif method == "GET":
                    space, sep, key = rest.partition(_SHARDS)
                    # ".../history" belongs to the history route, declared before this one.
                    if sep and space and "/" not in space and key and not key.endswith("/history"):
                        await self._read(scope, receive, send, space, key)
                        return
        await self.app(scope, receive, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send, space: str, key: str) -> None:
        async def endpoint(request: Request) -> Response:
            return await bus.read_shard(request, space, key, await self._reader(request))

        await _serve(scope, receive, send, self._read_route, {"space": space, "key": key}, endpoint)

    async def _commit(self, scope: Scope, receive: Receive, send: Send, space: str) -> None:
        ctype, idem = _headers(scope)
        messages, body = await _read_body(receive)
        model: bus.CommitIn | None = None
        if body is not None and ctype in _JSON_TYPES and len(idem) <= 1 and all(len(v) <= _IDEM_MAX for v in idem):
            try:
                model = bus.CommitIn.model_validate(bus.strict_json(body))
            except ValueError:  # json.JSONDecodeError and pydantic's ValidationError both are
                model = None
        if model is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        commit_in = model
        idempotency_key = idem[0].decode("latin-1") if idem else None

        async def endpoint(request: Request) -> Response:
            return await bus.commit(request, space, commit_in, await self._writer(request), idempotency_key)

        await _serve(scope, receive, send, self._commit_route, {"space": space}, endpoint)

    async def _broker(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        ctype, _ = _headers(scope)
        messages, raw = await _read_body(receive)
        body: Any = None
        if raw is not None and ctype in _JSON_TYPES:
            # The routed path parses with json.loads (FastAPI, which also wants an object)
            # and then with orjson; whatever orjson reads as an object, both accept.
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(raw)
        if not isinstance(body, dict):
            await self.app(scope, _replay(messages, receive), send)
            return

        async def endpoint(request: Request) -> Response:
            return await broker._proxy(request, await self._invoker(request), *broker.OPERATIONS[path], body=body)

        await _serve(scope, receive, send, self._broker_routes[path], {}, endpoint)


async def _serve(
    scope: Scope,
    receive: Receive,
    send: Send,
    route: APIRoute,
    path_params: dict[str, str],
    endpoint: Callable[[Request], Awaitable[Response]],
) -> None:
    """Answer as the router would have: the route in the scope, errors in the one shape."""
    scope["route"] = route
    scope["endpoint"] = route.endpoint
    scope["path_params"] = path_params
    request = bus.StrictJSONRequest(scope, receive)
    try:
        response = await endpoint(request)
    except AgentbusError as exc:
        response = error_response(exc)
    await response(scope, receive, send)


def _headers(scope: Scope) -> tuple[bytes | None, list[bytes]]:
    """The content type (b"?" if sent twice: FastAPI decides) and every Idempotency-Key."""
    ctype: bytes | None = None
    idem: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"content-type":
            ctype = b"?" if ctype is not None else value.lower()
        elif name == b"idempotency-key":
            idem.append(value)
    return ctype, idem


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The messages read and the whole body; None as the body if the client went away
    before sending all of it (FastAPI then gets the same messages and reacts as always)."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands the already-read messages over again, then defers to the real one."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
