"""Turns every failure into the one error shape; nothing else writes error bodies."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentbus.core.errors import (
    AgentbusError,
    BadRequest,
    InternalError,
    NotFound,
    ValidationFailed,
)

log = logging.getLogger("agentbus")


def error_response(err: AgentbusError) -> Response:
    headers: dict[str, str] = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="agentbus"'
    if err.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, (err.retry_after_ms + 999) // 1000))
    return Response(orjson.dumps(err.to_body()), status_code=err.status, media_type="application/json", headers=headers)


def _clean_errors(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors[:20]:
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


async def _agentbus_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AgentbusError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(BadRequest("request body is not valid JSON", code="malformed_json"))
    details = _clean_errors(list(errors))
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return error_response(ValidationFailed(f"{where}: {first['msg']}", details=details))


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(NotFound("no such route", code="route_not_found"))
    err = AgentbusError(str(exc.detail), code=f"http_{exc.status_code}")
    err.status = exc.status_code
    err.type = "invalid_request" if exc.status_code < 500 else "internal"
    return error_response(err)


async def _unhandled(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(InternalError("internal error; see the server log"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(AgentbusError, _agentbus_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
