"""Who is calling: every request is mapped to a :class:`Principal` here and nowhere else.

With ``auth`` on, identity comes only from the bearer token: ``X-Agent-Id`` and body
fields are ignored, so no caller can record reads or commit as another agent. With
``auth`` off (dev mode, which ``agentbus serve`` allows only on loopback) the caller names
itself with ``X-Agent-Id``.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from agentbus.core.errors import Forbidden, NotFound, RateLimited, ValidationFailed
from agentbus.core.names import check_session

SUBJECT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
ALL_SCOPES = frozenset({"bus:read", "bus:write", "broker:invoke", "traces:read", "admin"})


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    subject: str
    scopes: frozenset[str] = ALL_SCOPES
    session: str = ""
    kind: str = "agent"
    spaces: frozenset[str] | None = None
    token_id: str | None = None
    budgets: dict[str, Any] | None = None

    def may_see_space(self, space: str) -> bool:
        return self.spaces is None or space in self.spaces


def check_subject(subject: str) -> str:
    if not SUBJECT_RE.fullmatch(subject):
        raise ValidationFailed("invalid agent id: 1-128 characters of A-Z a-z 0-9 . _ : @ -", code="invalid_agent_id")
    return subject


def dev_principal(request: Request, agent_id: str | None = None) -> Principal:
    """Dev mode: identity from ``X-Agent-Id`` (or an S-Bus ``agent_id``), default ``anonymous``."""
    settings = request.app.state.settings
    subject = request.headers.get("x-agent-id") or agent_id or "anonymous"
    session = request.headers.get("x-agent-session", "")
    return Principal(
        tenant=settings.default_tenant,
        subject=check_subject(subject),
        session=check_session(session),
        kind="admin",
    )


class FailedAuthLimiter:
    """Counts failed authentications per client address in this process.

    Tokens carry 256 bits, so guessing is hopeless anyway; the limit keeps a flood of bad
    tokens from filling the audit log and burning backend lookups.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._fails.setdefault(client, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def check(self, client: str) -> None:
        now = time.monotonic()
        q = self._recent(client, now)
        if len(q) >= self.limit:
            retry = max(1, int(q[0] + self.window_s - now) + 1)
            raise RateLimited(
                "too many failed authentication attempts from this address; wait and retry",
                code="auth_rate_limited",
                retry_after_ms=retry * 1000,
            )

    def fail(self, client: str) -> None:
        if len(self._fails) > 10_000:  # bound memory under a spray of addresses
            self._fails.clear()
        self._recent(client, time.monotonic()).append(time.monotonic())


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


async def get_principal(request: Request) -> Principal:
    settings = request.app.state.settings
    if not settings.auth:
        return dev_principal(request)
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    authn = request.app.state.authenticator
    principal = await authn.authenticate(request)
    request.state.principal = principal
    return principal


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that authenticates and demands ``scope`` (403 otherwise, audited)."""

    async def dependency(request: Request) -> Principal:
        principal = await get_principal(request)
        if scope not in principal.scopes:
            await request.app.state.authenticator.deny(request, principal, 403, f"missing scope {scope}")
            raise Forbidden(f"this token lacks the {scope!r} scope", code="missing_scope", scope=scope)
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


def space_not_found(space: str) -> NotFound:
    """The same 404 whether the space is elsewhere in the tenant, in another tenant, or nowhere."""
    return NotFound(f"space {space!r} does not exist", code="space_not_found")
