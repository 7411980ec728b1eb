"""OpenAI clients pointed at the agentbus broker, carrying the agent's identity.

The broker is OpenAI-compatible, so the official ``openai`` package is the best client for
it; this module only configures one (base URL, token, identity headers). ``openai`` is an
optional dependency (``pip install 'agentbus-sdk[openai]'``), imported on first use.
"""

from __future__ import annotations

from typing import Any

import httpx

from agentbus_sdk._base import ClientConfig
from agentbus_sdk._errors import AgentbusError, error_from_response

__all__ = ["error_from_openai", "make_openai"]


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Client.openai() needs the openai package: pip install 'agentbus-sdk[openai]' (or pip install openai)"
        ) from exc
    return openai


def make_openai(config: ClientConfig, space: str | None, *, asynchronous: bool, **kwargs: Any) -> Any:
    """``openai.OpenAI`` / ``openai.AsyncOpenAI`` with base URL ``<bus>/v1``, the bearer token
    as api_key (``"dev"`` in dev mode, where the broker ignores it) and identity headers."""
    openai = _import_openai()
    headers = {**config.openai_headers(space), **kwargs.pop("default_headers", {})}
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=f"{config.base_url}/v1", api_key=config.token or "dev", default_headers=headers, **kwargs)


def error_from_openai(exc: BaseException) -> AgentbusError | None:
    """The typed agentbus error behind an ``openai.APIStatusError`` raised for a broker answer
    (e.g. a 429 ``budget_exceeded`` becomes :class:`BudgetExceeded`); None for anything else.

    Duck-typed on ``exc.response`` (status, headers, body): openai releases differ in which
    HTTP library their response object comes from.
    """
    resp = getattr(exc, "response", None)
    status = getattr(resp, "status_code", None)
    if not isinstance(status, int) or status < 400:
        return None
    try:
        content = bytes(resp.content)  # type: ignore[union-attr]
    except Exception:
        content = b""
    stale = {"content-encoding", "content-length", "transfer-encoding"}  # the body is already decoded
    headers = {str(k): str(v) for k, v in getattr(resp, "headers", {}).items() if str(k).lower() not in stale}
    return error_from_response(httpx.Response(status, headers=headers, content=content))
