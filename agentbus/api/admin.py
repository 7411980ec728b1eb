"""Admin API: tokens and the audit log. Every admin action is itself audited."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from agentbus.api.bus import json_response, store_of
from agentbus.auth.bootstrap import issue_token
from agentbus.auth.principal import Principal, get_principal, require
from agentbus.core.errors import NotFound
from agentbus.core.names import check_space

router = APIRouter(prefix="/v1", tags=["admin"])

Admin = Annotated[Principal, Depends(require("admin"))]
Auditor = Annotated[Principal, Depends(require("traces:read"))]
Anyone = Annotated[Principal, Depends(get_principal)]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(description="Agent or operator id the token acts as")
    tenant: str | None = Field(None, description="Defaults to the admin's own tenant")
    kind: str = Field("agent", description="agent | operator | admin")
    scopes: list[str] | None = Field(None, description="Defaults by kind")
    spaces: list[str] | None = Field(None, description="Allow-list of spaces; omitted = all of the tenant")
    expires_in_s: float | None = Field(None, gt=0)
    description: str = Field("", max_length=500, pattern=r"^[^\x00]*$")
    budgets: dict[str, Any] = Field(default_factory=dict, description="Broker budgets (used by the broker)")


@router.get("/whoami", summary="The principal behind your credentials")
async def whoami(who: Anyone) -> Response:
    return json_response(
        {
            "tenant": who.tenant,
            "subject": who.subject,
            "kind": who.kind,
            "scopes": sorted(who.scopes),
            "spaces": sorted(who.spaces) if who.spaces is not None else None,
            "session": who.session,
            "token_id": who.token_id,
        }
    )


@router.post("/admin/tokens", status_code=201, summary="Create a token (shown once)")
async def create_token(request: Request, body: TokenIn, who: Admin) -> Response:
    plain, rec = issue_token(
        tenant=body.tenant or who.tenant,
        subject=body.subject,
        kind=body.kind,
        scopes=body.scopes,
        spaces=body.spaces,
        expires_in_s=body.expires_in_s,
        description=body.description,
        budgets=body.budgets,
    )
    await store_of(request).put_token(rec)
    await request.app.state.authenticator.audit(
        request,
        tenant=who.tenant,
        subject=who.subject,
        action="token.create",
        status=201,
        target=rec.id,
        detail={"tenant": rec.tenant, "subject": rec.subject, "kind": rec.kind, "scopes": sorted(rec.scopes)},
    )
    return json_response({"token": plain, **rec.public()}, status=201)


@router.get("/admin/tokens", summary="List tokens (no secrets)")
async def list_tokens(request: Request, who: Admin, tenant: str | None = None) -> Response:
    if tenant is not None:
        check_space(tenant)  # tenants follow the space naming rules
    recs = await store_of(request).list_tokens(tenant)
    return json_response({"tokens": [r.public() for r in recs]})


@router.delete("/admin/tokens/{token_id}", summary="Revoke a token")
async def revoke_token(request: Request, token_id: str, who: Admin) -> Response:
    rec = await store_of(request).revoke_token(token_id, time.time())
    if rec is None:
        raise NotFound(f"token {token_id!r} does not exist", code="token_not_found")
    await request.app.state.authenticator.audit(
        request, tenant=who.tenant, subject=who.subject, action="token.revoke", status=200, target=token_id
    )
    return json_response(rec.public())


@router.get("/admin/audit", summary="Audit log: admin actions and denied requests, newest first")
async def audit_log(
    request: Request,
    who: Auditor,
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: float | None = None,
) -> Response:
    # Operators see their own tenant; only admins may look across tenants.
    scope_tenant = tenant if "admin" in who.scopes else who.tenant
    if scope_tenant:
        check_space(scope_tenant)
    events = await store_of(request).audit_log(scope_tenant, limit, before)
    return json_response({"events": [e.to_json() for e in events]})
