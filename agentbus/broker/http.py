"""The broker's HTTP client to model endpoints (aiohttp).

Why aiohttp and not httpx, which the SDK and the tests use: the client's own CPU per call
is most of what the broker adds to a model call. Against the same local no-op upstream,
one keep-alive connection, uvloop: httpx2 0.50-0.54 ms of CPU per request, aiohttp
0.15-0.16 ms; with 32 concurrent requests 0.51-0.56 against 0.07 ms. Everything
aiohttp-specific the broker touches is named here: the session, the timeouts, and the
exceptions that mean "this attempt failed on the network", so ``service`` and ``pool``
map them to the API's errors in one way.
"""

from __future__ import annotations

import aiohttp

# Connection refused or reset, a body broken off mid-way, a response that is not HTTP:
# the attempt failed, the endpoint is at fault. aiohttp's timeouts are TimeoutError
# (some also ClientError): catch TimeoutError first where a timeout means something else.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)

# Connecting to an endpoint longer than this is a failed attempt whatever the call's budget.
CONNECT_TIMEOUT_S = 5.0


def new_session() -> aiohttp.ClientSession:
    """One session per process: pooled keep-alive connections to every endpoint.

    No session-wide timeout (each call sets its own from the caller's deadline), no
    environment proxies or .netrc (endpoints are addressed directly, with their own keys),
    and no ``raise_for_status``: an upstream error status is the broker's to map.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30.0),
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
    )


def call_timeout(seconds: float, *, stream: bool) -> aiohttp.ClientTimeout:
    """A whole-call bound for a plain call (an upstream trickling its answer stays inside
    the budget); for a stream, a bound on each wait for more bytes, so a long generation
    that keeps producing is not cut off."""
    connect = min(seconds, CONNECT_TIMEOUT_S)
    if stream:
        return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=seconds)
    return aiohttp.ClientTimeout(total=seconds, sock_connect=connect)


def total_timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)
