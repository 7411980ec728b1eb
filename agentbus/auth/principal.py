"""The caller of a request.

Until token authentication lands, agentbus runs in dev mode only: the service refuses to
bind anywhere but loopback (see ``agentbus serve``), and a caller names itself with
``X-Agent-Id``. The rest of the code only ever sees a :class:`Principal`, so adding tokens
changes this module, not the routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Request

from agentbus.core.errors import ValidationFailed
from agentbus.core.names import check_session

SUBJECT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
ALL_SCOPES = frozenset({"bus:read", "bus:write", "broker:invoke", "traces:read", "admin"})


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    subject: str
    scopes: frozenset[str] = ALL_SCOPES
    session: str = ""


def check_subject(subject: str) -> str:
    if not SUBJECT_RE.match(subject):
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
    )


async def get_principal(request: Request) -> Principal:
    return dev_principal(request)
