"""What the sync and async clients share: configuration, headers, paths, retry timing, SSE parsing.

Everything here is free of I/O, so the two clients differ only in ``await`` and the two
can never drift apart on what a request looks like or when it is retried.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from agentbus_sdk._errors import AgentbusError, ConnectionFailed, Unavailable

DEFAULT_URL = "http://127.0.0.1:8080"
USER_AGENT = "agentbus-sdk/0.1"
# Characters agentbus allows in keys that are also safe unescaped in a URL path; "/" stays a
# path separator on purpose (the server takes the rest of the path as the key).
_KEY_SAFE = "/:@+=~.-_"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits uniformly in
    ``[0, min(maximum, initial * multiplier**n)]``.

    Full jitter, because the callers that collide (agents that conflicted on one shard,
    clients that lost one server) would otherwise retry in lockstep and collide again.
    """

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: bool = True

    def delay(self, attempt: int, at_least: float | None = None) -> float:
        cap = min(self.maximum, self.initial * self.multiplier ** max(0, attempt))
        d = random.uniform(0.0, cap) if self.jitter else cap
        # A server that says how long to wait (Retry-After / retry_after_ms) knows best.
        return max(d, at_least) if at_least is not None else d


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Connection settings shared by :class:`Client` and :class:`AsyncClient`."""

    base_url: str = DEFAULT_URL
    token: str | None = None
    agent_id: str | None = None
    session: str | None = None
    timeout: float = 30.0
    retries: int = 3
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.retries < 0:
            raise ValueError("retries must be >= 0")

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """``AGENTBUS_URL``, ``AGENTBUS_TOKEN``, ``AGENTBUS_AGENT_ID``, ``AGENTBUS_SESSION``;
        keyword arguments win over the environment."""
        env = {
            "base_url": os.environ.get("AGENTBUS_URL") or DEFAULT_URL,
            "token": os.environ.get("AGENTBUS_TOKEN") or None,
            "agent_id": os.environ.get("AGENTBUS_AGENT_ID") or None,
            "session": os.environ.get("AGENTBUS_SESSION") or None,
        }
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)

    def headers(self) -> dict[str, str]:
        """Identity headers sent with every request: the token when there is one; the
        agent id (dev mode names the caller by it; with auth on the server ignores it)."""
        h = {"User-Agent": USER_AGENT}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if self.agent_id:
            h["X-Agent-Id"] = self.agent_id
        if self.session:
            h["X-Agent-Session"] = self.session
        return h

    def http_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))

    def openai_headers(self, space: str | None) -> dict[str, str]:
        """Headers an OpenAI client sends to the broker: identity (the token goes as its api_key)."""
        h: dict[str, str] = {}
        if self.agent_id:
            h["X-Agent-Id"] = self.agent_id
        if self.session:
            h["X-Agent-Session"] = self.session
        if space:
            h["X-Agent-Space"] = space
        return h


def space_path(space: str, *parts: str) -> str:
    return "/v1/spaces/" + "/".join([quote(space, safe=""), *parts])


def shard_path(space: str, key: str) -> str:
    return space_path(space, "shards", quote(key, safe=_KEY_SAFE))


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def tx_session(base: str | None) -> str:
    """A fresh session id for one transaction (``X-Agent-Session`` allows ``A-Za-z0-9._:@-``,
    128 chars): its read set is its own, so concurrent transactions of one agent never mix."""
    suffix = f"tx-{uuid.uuid4().hex}"
    return f"{base[:90]}:{suffix}" if base else suffix


RETRY_NETWORK = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


def connection_failed(exc: httpx.HTTPError, method: str, url: str) -> ConnectionFailed:
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else f"failed ({exc.__class__.__name__}: {exc})"
    return ConnectionFailed(
        f"{method} {url} {what}",
        type="connection",
        code="timeout" if isinstance(exc, httpx.TimeoutException) else "connection_failed",
        retryable=True,
    )


def should_retry(err: AgentbusError) -> bool:
    """Only "the server could not answer" is retried automatically: 503 and no response.

    Never a 409 (the caller must re-read; see ``transact``), never a 429 (the caller
    decides whether to wait ``retry_after``), never bad input.
    """
    return isinstance(err, Unavailable)


@dataclass(slots=True)
class SSEDecoder:
    """Incremental Server-Sent Events parser (the WHATWG rules agentbus needs: ``id``,
    ``event``, ``data``, ``retry``, comments), fed one line at a time."""

    last_event_id: str | None = None
    retry_ms: int | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def reconnected(self) -> None:
        """Drop a half-received event: a new connection resends it whole (from Last-Event-ID)."""
        self._event, self._data, self._id = "", [], None

    def feed(self, line: str) -> tuple[str, str, str | None] | None:
        """Returns ``(event, data, id)`` when ``line`` completes an event."""
        if line == "":
            if not self._data:
                self._event, self._id = "", None
                return None
            out = (self._event or "message", "\n".join(self._data), self._id)
            if self._id is not None:
                self.last_event_id = self._id
            self._event, self._data, self._id = "", [], None
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None
