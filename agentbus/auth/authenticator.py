"""Bearer-token authentication against the store, with a short cache and audit of denials."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request

from agentbus.auth.principal import FailedAuthLimiter, Principal, client_of
from agentbus.auth.tokens import TOKEN_PREFIX, AuditEvent, TokenRecord, hash_token, same_hash
from agentbus.core.errors import Unauthorized
from agentbus.core.names import check_session
from agentbus.settings import Settings

log = logging.getLogger("agentbus.auth")


class Authenticator:
    def __init__(self, store: Any, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.limiter = FailedAuthLimiter(settings.auth_fail_limit, settings.auth_fail_window_s)
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}

    async def _lookup(self, token_hash: str) -> TokenRecord | None:
        ttl = self.settings.auth_cache_ttl_s
        now = time.monotonic()
        if ttl > 0:
            hit = self._cache.get(token_hash)
            if hit is not None and now - hit[0] < ttl:
                return hit[1]
        rec = await self.store.token_by_hash(token_hash)
        if ttl > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[token_hash] = (now, rec)
        return rec

    async def authenticate(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header:
            await self._fail(request, "missing_token")
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'", code="missing_token")
        if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX):
            await self._fail(request, "malformed_token")
            raise Unauthorized("malformed Authorization header: expected 'Bearer ab_...'", code="invalid_token")
        token_hash = hash_token(token)
        rec = await self._lookup(token_hash)
        if rec is None or not same_hash(rec.hash, token_hash):
            await self._fail(request, "unknown_token")
            raise Unauthorized("invalid token", code="invalid_token")
        if rec.revoked_at is not None:
            await self._fail(request, "revoked_token", rec)
            raise Unauthorized("this token was revoked", code="token_revoked")
        if not rec.usable():
            await self._fail(request, "expired_token", rec)
            raise Unauthorized("this token has expired", code="token_expired")
        return Principal(
            tenant=rec.tenant,
            subject=rec.subject,
            scopes=rec.scopes,
            session=check_session(request.headers.get("x-agent-session", "")),
            kind=rec.kind,
            spaces=rec.spaces,
            token_id=rec.id,
            budgets=rec.budgets or None,
        )

    async def _fail(self, request: Request, reason: str, rec: TokenRecord | None = None) -> None:
        # Only failures are limited: a valid token is never refused because a neighbour on the
        # same address (another agent on the host, a NAT, a proxy) keeps sending a bad one.
        # Past the limit a failure is neither audited nor counted, so a flood costs one lookup.
        self.limiter.check(client_of(request))
        self.limiter.fail(client_of(request))
        await self.audit(
            request,
            tenant=rec.tenant if rec else "",
            subject=rec.subject if rec else "",
            action="auth.denied",
            status=401,
            detail={"reason": reason, **({"token_id": rec.id} if rec else {})},
        )

    async def deny(self, request: Request, principal: Principal, status: int, reason: str) -> None:
        await self.audit(
            request,
            tenant=principal.tenant,
            subject=principal.subject,
            action="access.denied",
            status=status,
            detail={"reason": reason},
        )

    async def audit(
        self,
        request: Request | None,
        *,
        tenant: str,
        subject: str,
        action: str,
        status: int,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record an audit event; a failing audit write is logged, never turned into a 500."""
        if target is None:
            target = f"{request.method} {request.url.path}" if request else ""
        # The path is the caller's choice: PostgreSQL text cannot hold NUL (the write would fail
        # and the denial go unrecorded), and an unbounded path would bloat the log.
        target = target.replace("\x00", "\\x00")[:512]
        event = AuditEvent(
            at=time.time(),
            tenant=tenant,
            subject=subject,
            action=action,
            target=target,
            status=status,
            client=client_of(request) if request else "",
            detail=detail or {},
        )
        try:
            await self.store.record_audit(event)
        except Exception:
            log.warning("could not record audit event %s", event.action, exc_info=True)
