"""The one error model of agentbus.

Every failure a client can see is an :class:`AgentbusError` subclass. The HTTP layer turns
it into ``{"error": {...}}`` with the status below, so routers never build error bodies by
hand and no endpoint can invent a second error shape.
"""

from __future__ import annotations

from typing import Any


class AgentbusError(Exception):
    """Base of every client-visible error; carries its own HTTP status and body fields."""

    status: int = 500
    type: str = "internal"
    code: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_ms: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after_ms = retry_after_ms
        self.extra = extra

    def to_body(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.retry_after_ms is not None:
            err["retry_after_ms"] = self.retry_after_ms
        err.update(self.extra)
        return {"error": err}


class BadRequest(AgentbusError):
    status = 400
    type = "invalid_request"
    code = "bad_request"


class ValidationFailed(AgentbusError):
    status = 422
    type = "invalid_request"
    code = "validation_error"


class Unauthorized(AgentbusError):
    status = 401
    type = "authentication"
    code = "unauthorized"


class Forbidden(AgentbusError):
    status = 403
    type = "permission"
    code = "forbidden"


class NotFound(AgentbusError):
    status = 404
    type = "not_found"
    code = "not_found"


class Conflict(AgentbusError):
    """A commit whose reads or expected versions went stale (HTTP 409).

    ``conflicts`` lists every conflicting key, so an agent can re-read exactly those.
    """

    status = 409
    type = "conflict"
    retryable = True

    def __init__(self, message: str, *, code: str, conflicts: list[dict[str, Any]]) -> None:
        super().__init__(message, code=code, conflicts=conflicts)
        self.conflicts = conflicts


class ReadSetExpired(AgentbusError):
    """The delivery log of this session outlived its TTL or bound: validating it is impossible.

    Passing such a commit would be a silent lost update, so it is refused (HTTP 410).
    """

    status = 410
    type = "read_set_expired"
    code = "read_set_expired"
    retryable = True


class PayloadTooLarge(AgentbusError):
    status = 413
    type = "invalid_request"
    code = "too_large"


class RateLimited(AgentbusError):
    status = 429
    type = "rate_limited"
    code = "rate_limited"
    retryable = True


class BadGateway(AgentbusError):
    """An upstream model endpoint failed or answered with something unusable (HTTP 502)."""

    status = 502
    type = "upstream"
    code = "upstream_error"
    retryable = True


class BackendUnavailable(AgentbusError):
    status = 503
    type = "unavailable"
    code = "backend_unavailable"
    retryable = True


class UpstreamTimeout(AgentbusError):
    status = 504
    type = "timeout"
    code = "deadline_exceeded"
    retryable = True


class InternalError(AgentbusError):
    """Last resort: a bug. The message never carries a stack trace."""

    status = 500
    type = "internal"
    code = "internal_error"
