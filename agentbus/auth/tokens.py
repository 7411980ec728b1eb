"""Bearer tokens: generation, hashing and what a stored token grants.

A token is 256 random bits, shown once. Only its SHA-256 is stored: for secrets of that
entropy a slow KDF adds nothing, and a fast hash lets every request authenticate with one
indexed lookup. The stored hash is still compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from agentbus.auth.principal import ALL_SCOPES

TOKEN_PREFIX = "ab_"
Kind = Literal["agent", "operator", "admin"]
KINDS: tuple[str, ...] = ("agent", "operator", "admin")

DEFAULT_SCOPES: dict[str, frozenset[str]] = {
    "agent": frozenset({"bus:read", "bus:write", "broker:invoke"}),
    "operator": frozenset({"bus:read", "traces:read"}),
    "admin": ALL_SCOPES,
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(8)


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(slots=True)
class TokenRecord:
    """What the store keeps for a token (never the token itself)."""

    id: str
    hash: str
    tenant: str
    subject: str
    kind: str
    scopes: frozenset[str]
    created_at: float
    spaces: frozenset[str] | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    description: str = ""
    budgets: dict[str, Any] = field(default_factory=dict)

    def usable(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    def public(self) -> dict[str, Any]:
        """The record as an operator may see it: no hash."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "subject": self.subject,
            "kind": self.kind,
            "scopes": sorted(self.scopes),
            "spaces": sorted(self.spaces) if self.spaces is not None else None,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "description": self.description,
            "budgets": self.budgets,
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One admin action or denied request: who did what, when, and how it ended."""

    at: float
    tenant: str
    subject: str
    action: str
    target: str
    status: int
    client: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "tenant": self.tenant,
            "subject": self.subject,
            "action": self.action,
            "target": self.target,
            "status": self.status,
            "client": self.client,
            "detail": self.detail,
        }
