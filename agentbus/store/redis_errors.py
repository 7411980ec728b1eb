"""Which Redis client errors mean "Redis cannot serve now" (503, retryable) — one list for the
bus, budget and timeline stores."""

from __future__ import annotations

from redis import exceptions as rexc

from agentbus.core.errors import BackendUnavailable

# Error replies that mean "not now", not "bad request".
TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "OOM")
UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError and MaxConnectionsError
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.OutOfMemoryError,
    TimeoutError,
    OSError,
)


def closed_transport(exc: BaseException) -> bool:
    """uvloop's RuntimeError for a write on a pooled connection whose peer (Redis, a proxy,
    CLIENT KILL) has closed it: 'unable to perform operation on <TCPTransport closed=True>;
    the handler is closed'. redis-py drops the connection, so a retry connects afresh."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("closed=True" in text or "handler is closed" in text)


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, UNAVAILABLE) or closed_transport(exc):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(TRANSIENT_REPLIES)


def unavailable(exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(f"storage backend unavailable ({type(exc).__name__}); retry shortly")
