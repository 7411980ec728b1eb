"""Typed errors, built from the server's one error shape.

agentbus answers every failure with ``{"error": {"type", "code", "message", "retryable",
"retry_after_ms"?, ...}}`` and a meaningful status. The SDK turns that into one exception
class per thing a caller would handle differently (re-read and retry, back off, fix the
request, fix the credentials), so ``except ConflictError`` is all an agent needs to write,
and the raw body stays available on ``.body`` for anything the classes do not model.
"""

from __future__ import annotations

from typing import Any

import httpx
import pydantic

from agentbus_sdk._models import Conflict

__all__ = [
    "AgentbusError",
    "AuthError",
    "BadRequest",
    "BudgetExceeded",
    "ConflictError",
    "ConnectionFailed",
    "ForbiddenError",
    "NotFoundError",
    "RateLimited",
    "ReadSetExpired",
    "Unavailable",
    "UpstreamError",
    "error_from_response",
]


class AgentbusError(Exception):
    """Base of every error the SDK raises.

    ``status`` is the HTTP status (``None`` when no response arrived), ``type``/``code``/
    ``message``/``retryable`` come from the server's error body, ``body`` is that whole body
    (``{}`` when there was none). ``idempotency_key`` is set on errors raised by a commit,
    so a caller whose commit outcome is unknown can resend it safely with the same key.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str = "error",
        code: str = "error",
        retryable: bool = False,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        """Seconds to wait before retrying, from ``retry_after_ms`` or ``Retry-After``; None if not given."""
        self.body: dict[str, Any] = body or {}
        self.idempotency_key: str | None = None

    @property
    def error(self) -> dict[str, Any]:
        """The inner ``error`` object of the body (extra fields such as ``key`` or ``limit_kind``)."""
        inner = self.body.get("error")
        return inner if isinstance(inner, dict) else {}

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class BadRequest(AgentbusError):
    """The request itself is wrong (400, 413 too large, 422 validation): retrying it cannot help."""


class AuthError(AgentbusError):
    """401: no token, or a bad, revoked or expired one."""


class ForbiddenError(AgentbusError):
    """403: the token is valid but lacks the scope this route needs."""


class NotFoundError(AgentbusError):
    """404: a shard, space or route that does not exist (or is not visible to this tenant)."""


class ConflictError(AgentbusError):
    """409: the commit was refused because something it read or expected went stale.

    ``conflicts`` names every conflicting key (not only the first), so the caller can re-read
    exactly those. Nothing of the commit was applied, and the read set was cleared: re-read,
    recompute, commit again (``Space.transact`` does this loop for you).
    """

    def __init__(self, message: str, *, conflicts: list[Conflict], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.conflicts = conflicts

    @property
    def keys(self) -> list[str]:
        """The conflicting keys, in the server's order."""
        return [c.key for c in self.conflicts]


class ReadSetExpired(AgentbusError):
    """410: the read set outlived its TTL or size bound and can no longer be validated.

    It was cleared; like a conflict, the cure is to re-read and commit again, so
    ``Space.transact`` retries it too.
    """


class RateLimited(AgentbusError):
    """429 from a rate limit (rpm/tpm/concurrency, failed-auth throttling, an upstream's 429).

    ``retry_after`` (seconds) says when to try again.
    """


class BudgetExceeded(AgentbusError):
    """429 ``budget_exceeded``: a token/cost/request budget of the caller or its tenant is spent.

    A budget with a window resets (``retry_after`` says when); a lifetime budget never does
    (``retryable`` is False and ``retry_after`` is None). ``limit_kind`` and ``scope`` name
    which limit was hit.
    """

    @property
    def limit_kind(self) -> str | None:
        return self.error.get("limit_kind")

    @property
    def scope(self) -> str | None:
        return self.error.get("scope")


class Unavailable(AgentbusError):
    """503: the backend (or every model endpoint) is unavailable right now; safe to retry."""


class ConnectionFailed(Unavailable):
    """No response at all: connection refused or reset, or a timeout.

    For a commit the outcome is unknown; the SDK already retried with the same
    ``Idempotency-Key`` (``idempotency_key`` on this error), and resending with that key
    later still applies the commit at most once.
    """


class UpstreamError(AgentbusError):
    """502/504: a model endpoint behind the broker failed, answered garbage, or ran out of time."""


def _retry_after(resp: httpx.Response, err: dict[str, Any]) -> float | None:
    ms = err.get("retry_after_ms")
    if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
        return float(ms) / 1000.0
    header = resp.headers.get("retry-after")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            return None
    return None


def _class_for(status: int, code: str) -> type[AgentbusError]:
    if status == 409:
        return ConflictError
    if status == 429:
        return BudgetExceeded if code == "budget_exceeded" else RateLimited
    by_status: dict[int, type[AgentbusError]] = {
        400: BadRequest,
        401: AuthError,
        403: ForbiddenError,
        404: NotFoundError,
        410: ReadSetExpired,
        413: BadRequest,
        422: BadRequest,
        502: UpstreamError,
        503: Unavailable,
        504: UpstreamError,
    }
    return by_status.get(status, AgentbusError)


def error_from_response(resp: httpx.Response) -> AgentbusError:
    """The typed error for a non-2xx response.

    Never raises itself: a body that is not the agentbus shape (a proxy's HTML page, an
    OpenAI-style upstream error) still yields the class its status implies, with the text
    as message, so callers can always rely on ``except AgentbusError``.
    """
    try:
        body = resp.json()
    except (ValueError, httpx.ResponseNotRead):
        body = None
    if not isinstance(body, dict):
        body = {}
    raw = body.get("error")
    err: dict[str, Any] = raw if isinstance(raw, dict) else {}
    status = resp.status_code
    code = err.get("code") if isinstance(err.get("code"), str) else None
    etype = err.get("type") if isinstance(err.get("type"), str) else None
    message = err.get("message") if isinstance(err.get("message"), str) else None
    if message is None:
        if isinstance(raw, str):
            message = raw  # S-Bus style {"error": "VersionMismatch", ...}
        else:
            try:
                message = resp.text[:500] or resp.reason_phrase
            except httpx.ResponseNotRead:
                message = resp.reason_phrase
    retryable = err.get("retryable")
    if not isinstance(retryable, bool):
        retryable = status in (409, 410, 429, 502, 503, 504)
    cls = _class_for(status, code or "")
    kw: dict[str, Any] = {
        "status": status,
        "type": etype or cls.__name__,
        "code": code or f"http_{status}",
        "retryable": retryable,
        "retry_after": _retry_after(resp, err),
        "body": body,
    }
    if cls is ConflictError:
        conflicts: list[Conflict] = []
        raw_conflicts = err.get("conflicts")
        for item in raw_conflicts if isinstance(raw_conflicts, list) else []:
            try:
                conflicts.append(Conflict.model_validate(item))
            except pydantic.ValidationError:
                continue
        return ConflictError(message, conflicts=conflicts, **kw)
    return cls(message, **kw)
