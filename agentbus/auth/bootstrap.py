"""Token issuance shared by the admin API, the CLI and first start."""

from __future__ import annotations

import time
from typing import Any

from agentbus.auth.principal import ALL_SCOPES, check_subject
from agentbus.auth.tokens import DEFAULT_SCOPES, KINDS, TokenRecord, hash_token, new_token, new_token_id
from agentbus.core.errors import ValidationFailed
from agentbus.core.names import check_space


def issue_token(
    *,
    tenant: str,
    subject: str,
    kind: str = "agent",
    scopes: list[str] | None = None,
    spaces: list[str] | None = None,
    expires_in_s: float | None = None,
    description: str = "",
    budgets: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[str, TokenRecord]:
    """Validate a token request and build its record; the plain token is returned once."""
    check_space(tenant)  # tenants follow the same naming rules as spaces
    check_subject(subject)
    if kind not in KINDS:
        raise ValidationFailed(f"kind must be one of {', '.join(KINDS)}", code="invalid_kind")
    granted = frozenset(scopes) if scopes is not None else DEFAULT_SCOPES[kind]
    unknown = granted - ALL_SCOPES
    if unknown:
        raise ValidationFailed(
            f"unknown scope(s): {', '.join(sorted(unknown))}; valid: {', '.join(sorted(ALL_SCOPES))}",
            code="invalid_scope",
        )
    if "admin" in granted and kind != "admin":
        raise ValidationFailed("only kind=admin tokens may hold the admin scope", code="invalid_scope")
    if spaces is not None:
        for sp in spaces:
            check_space(sp)
    if expires_in_s is not None and expires_in_s <= 0:
        raise ValidationFailed("expires_in_s must be positive", code="invalid_expiry")
    if budgets:
        budgets = _check_budgets(budgets)
    now = time.time()
    plain = token or new_token()
    rec = TokenRecord(
        id=new_token_id(),
        hash=hash_token(plain),
        tenant=tenant,
        subject=subject,
        kind=kind,
        scopes=granted,
        created_at=now,
        spaces=frozenset(spaces) if spaces is not None else None,
        expires_at=now + expires_in_s if expires_in_s is not None else None,
        description=description,
        budgets=budgets or {},
    )
    return plain, rec


async def ensure_admin(store: Any, tenant: str, configured: str | None) -> str | None:
    """Install the configured admin token, or create one if no admin exists.

    Returns a newly generated token (to print once) or None. Safe to call on every start
    and from several processes: the token hash is unique in the store.
    """
    if configured:
        if await store.token_by_hash(hash_token(configured)) is None:
            _, rec = issue_token(
                tenant=tenant, subject="admin", kind="admin", token=configured, description="bootstrap (configured)"
            )
            try:
                await store.put_token(rec)
            except Exception:
                if await store.token_by_hash(rec.hash) is None:
                    raise
        return None
    if await store.has_admin_token():
        return None
    plain, rec = issue_token(tenant=tenant, subject="admin", kind="admin", description="bootstrap (generated)")
    await store.put_token(rec)
    return plain


def _check_budgets(budgets: dict[str, Any]) -> dict[str, Any]:
    """Token budgets use the broker's limit fields; anything else is refused, not ignored."""
    from pydantic import ValidationError

    from agentbus.broker.config import LimitsIn

    try:
        limits = LimitsIn.model_validate(budgets)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValidationFailed(
            f"budgets.{where}: {first['msg']} (fields: {', '.join(LimitsIn.model_fields)})",
            code="invalid_budgets",
        ) from exc
    return limits.model_dump(exclude_none=True)
