"""Request signals and routing-rule evaluation (pure, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from agentbus.auth.principal import Principal
from agentbus.broker.config import BrokerConfig, Condition, Route


@dataclass(frozen=True, slots=True)
class Signals:
    model: str
    tenant: str
    subject: str
    kind: str
    scopes: frozenset[str]
    last_user_message: str
    prefix_key: str
    context_tokens: int
    has_tools: bool


def _text(content: Any) -> str:
    """Message content may be a string or a list of typed parts (OpenAI format)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def estimate_tokens(text: str) -> int:
    """A deliberate over-estimate (~3.5 chars/token) so reservations err on the safe side."""
    return max(1, (len(text) * 2 + 6) // 7)


def signals_of(body: dict[str, Any], principal: Principal) -> Signals:
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [_text(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last_user = users[-1] if users else ""
        everything = "\n".join(texts)
    else:
        prompt = body.get("prompt", body.get("input", ""))
        everything = prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt) if prompt else ""
        last_user = everything
    tools = body.get("tools") or body.get("functions")
    return Signals(
        model=str(body.get("model", "")),
        tenant=principal.tenant,
        subject=principal.subject,
        kind=principal.kind,
        scopes=principal.scopes,
        last_user_message=last_user,
        prefix_key=everything[:512],
        context_tokens=estimate_tokens(everything),
        has_tools=bool(tools),
    )


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def matches(cond: Condition | None, s: Signals) -> bool:
    if cond is None:
        return True
    if cond.all is not None and not all(matches(c, s) for c in cond.all):
        return False
    if cond.any is not None and not any(matches(c, s) for c in cond.any):
        return False
    if cond.not_ is not None and matches(cond.not_, s):
        return False
    if cond.model is not None and s.model not in cond.model:
        return False
    if cond.scope is not None and cond.scope not in s.scopes:
        return False
    if cond.kind is not None and s.kind != cond.kind:
        return False
    if cond.tenant is not None and s.tenant not in cond.tenant:
        return False
    if cond.subject_regex is not None and not _compiled(cond.subject_regex).search(s.subject):
        return False
    if cond.keywords is not None:
        text = s.last_user_message.lower()
        if not any(k.lower() in text for k in cond.keywords):
            return False
    if cond.regex is not None and not _compiled(cond.regex).search(s.last_user_message):
        return False
    if cond.min_context_tokens is not None and s.context_tokens < cond.min_context_tokens:
        return False
    if cond.max_context_tokens is not None and s.context_tokens > cond.max_context_tokens:
        return False
    return not (cond.has_tools is not None and s.has_tools != cond.has_tools)


def choose_route(config: BrokerConfig, s: Signals) -> Route:
    """First matching rule wins; with no rules (or no match) every endpoint serving the
    model is eligible under least-outstanding."""
    for route in config.routes:
        if matches(route.when, s):
            return route
    return Route(name="default", targets=[e.name for e in config.endpoints], policy="least_outstanding")
