"""Fault injection for the reliability tests (tests/test_faults.py) and the soak run.

* :class:`FaultProxy` - a TCP proxy (asyncio, in a background thread) put between agentbus
  and PostgreSQL/Redis, or between clients and agentbus. An outage of the server behind it
  is what the service sees when the proxy resets every open connection and refuses new
  ones; the shared PostgreSQL/Redis servers themselves are never restarted.
* :class:`FaultyUpstream` - a socket-level OpenAI-compatible endpoint that can hang, reset
  the connection before or in the middle of its response, or answer garbage.
* :class:`Recorder` - an httpx transport that records every request's status, error body
  and duration, so a test can assert what clients saw during a fault (503 + retryable, no
  500, no request slower than the configured timeouts).
* :func:`redis_kill_clients_of` - ``CLIENT KILL`` exactly the Redis connections of one
  agentbus process tree (found by their local ports), leaving other tests' clients alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

_LINGER_RST = struct.pack("ii", 1, 0)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection with a TCP RST (SO_LINGER 0), as a crashed peer or a firewall would."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Loop:
    """An asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None


class FaultProxy:
    """A TCP proxy 127.0.0.1:``port`` -> ``target_host``:``target_port``.

    ``mode``:

    * ``pass`` - forward both ways;
    * ``refuse`` - every new connection is reset at once (the server is down);
    * ``blackhole`` - a network partition: new connections are accepted and never
      answered, and open connections stop forwarding (what they carry is held back, then
      delivered if the mode returns to ``pass`` before the connection is reset): only
      timeouts notice;
    * ``drop_responses`` - forward requests, but with probability ``drop_p`` reset the
      connection the moment the server starts answering instead of relaying the answer
      (the request was executed, its acknowledgement is lost).

    :meth:`reset_all` resets every open connection (both sides). :meth:`outage` is the
    usual combination: reset everything, refuse for a while, then pass again.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.drop_p = 0.0
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()
        self._pairs: set[_Pair] = set()  # type: ignore[misc]
        self._lp = _Loop()
        self._server: asyncio.Server | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        async def go() -> int:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._lp.call(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all()

        with contextlib.suppress(Exception):
            self._lp.call(go())
        self._lp.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def set_mode(self, mode: str, *, drop_p: float | None = None) -> None:
        if mode not in ("pass", "refuse", "blackhole", "drop_responses"):
            raise ValueError(mode)
        if drop_p is not None:
            self.drop_p = drop_p
        self.mode = mode

    def reset_all(self) -> int:
        """RST every open connection through the proxy; returns how many."""

        async def go() -> int:
            return self._reset_all()

        return int(self._lp.call(go()))

    @contextlib.contextmanager
    def outage(self, mode: str = "refuse") -> Iterator[None]:
        """Reset all connections and refuse (or blackhole) new ones inside the block."""
        self.set_mode(mode)
        self.reset_all()
        try:
            yield
        finally:
            self.set_mode("pass")
            self.reset_all()  # blackholed connections would hang forever otherwise

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    # ------------------------------------------------------------------ internals
    def _reset_all(self) -> int:
        pairs = list(self._pairs)
        for p in pairs:
            _rst(p.client)
            _rst(p.server)
        self._pairs.clear()
        self.stats["reset_by_fault"] += len(pairs)
        return len(pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        self.stats[f"accepted_{mode}"] += 1
        if mode == "refuse":
            _rst(writer)
            return
        pair = _Pair(writer)
        self._pairs.add(pair)
        if mode == "blackhole":
            return  # held open, never answered, until reset_all
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._pairs.discard(pair)
            _rst(writer)
            return
        pair.server = up_writer
        if pair not in self._pairs:  # reset while connecting
            _rst(up_writer)
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, pair, upstream=False),
            self._pipe(up_reader, writer, pair, upstream=True),
            return_exceptions=True,
        )
        self._pairs.discard(pair)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair, upstream: bool
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                # mode is set from another thread: poll it rather than share an asyncio.Event
                while self.mode == "blackhole" and pair in self._pairs:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                if pair not in self._pairs:
                    return
                if upstream and self.mode == "drop_responses" and self.rng.random() < self.drop_p:
                    self.stats["dropped_response"] += 1
                    self._pairs.discard(pair)
                    _rst(pair.client)
                    _rst(pair.server)
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if pair in self._pairs:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                    else:
                        writer.close()


# --------------------------------------------------------------------------- model endpoint
class FaultyUpstream:
    """An OpenAI-compatible endpoint at the socket level. ``mode`` for POSTs:

    * ``ok`` - a small valid chat.completion (usage 3 + 2 tokens);
    * ``hang`` - read the request, never answer;
    * ``reset`` - reset the connection without answering;
    * ``reset_mid`` - send the status line, headers and half of a valid JSON body, then RST;
    * ``garbage`` - ``200 OK`` with a non-JSON body.

    ``GET /v1/models`` (the broker's health probe) and ``/metrics`` always answer.
    """

    BODY = orjson.dumps(
        {
            "id": "faulty-1",
            "object": "chat.completion",
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )

    def __init__(self, name: str, models: list[str] | None = None, mode: str = "ok") -> None:
        self.name = name
        self.models = models or ["m"]
        self.mode = mode
        self.posts: Counter[str] = Counter()
        self._lp = _Loop()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "models": self.models, **extra}

    def start(self) -> FaultyUpstream:
        async def go() -> int:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=256)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._lp.call(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._open):
                _rst(w)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._lp.call(go())
        self._lp.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                i = lower.find(b"\r\ncontent-length:")
                if i >= 0:
                    await reader.readexactly(int(lower[i + 17 : lower.index(b"\r\n", i + 2)]))
                if head.startswith(b"GET"):
                    if b" /metrics" in head.split(b"\r\n", 1)[0]:
                        body = b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
                        ctype = b"text/plain"
                    else:
                        body = orjson.dumps(
                            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
                        )
                        ctype = b"application/json"
                    writer.write(self._response(body, ctype))
                    await writer.drain()
                    continue
                mode = self.mode
                self.posts[mode] += 1
                if mode == "hang":
                    await asyncio.sleep(3600)
                    return
                if mode == "reset":
                    _rst(writer)
                    return
                if mode == "reset_mid":
                    full = self._response(self.BODY, b"application/json")
                    writer.write(full[: len(full) - len(self.BODY) // 2])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    _rst(writer)
                    return
                if mode == "garbage":
                    writer.write(self._response(b"<html>502 bad gateway, not json", b"text/html"))
                else:
                    writer.write(self._response(self.BODY, b"application/json"))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._open.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    @staticmethod
    def _response(body: bytes, ctype: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (ctype, len(body), body)


# --------------------------------------------------------------------------- what clients saw
@dataclass
class Seen:
    """One request as a client saw it."""

    t: float  # monotonic start
    duration: float
    method: str
    url: str
    status: int | None  # None: transport error
    error: str | None = None  # transport error, or the error body of a 5xx
    body: Any = None  # parsed JSON of a >= 500 response
    idempotency_key: str | None = None


@dataclass
class Recorder(httpx.AsyncBaseTransport):
    """An httpx transport that records every request (wraps the default transport)."""

    inner: httpx.AsyncBaseTransport = field(default_factory=lambda: httpx.AsyncHTTPTransport(retries=0))
    seen: list[Seen] = field(default_factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t0 = time.monotonic()
        try:
            resp = await self.inner.handle_async_request(request)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            key = request.headers.get("idempotency-key")
            self.seen.append(Seen(t0, time.monotonic() - t0, request.method, str(request.url), None, err, None, key))
            raise
        body: Any = None
        if resp.status_code >= 500:
            raw = await resp.aread()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")[:300]
            resp = httpx.Response(resp.status_code, headers=resp.headers, content=raw, request=request)
        key = request.headers.get("idempotency-key")
        self.seen.append(
            Seen(t0, time.monotonic() - t0, request.method, str(request.url), resp.status_code, None, body, key)
        )
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> Counter[int | None]:
        return Counter(s.status for s in self.seen if since <= s.t <= until)

    def attempts(self, idempotency_key: str) -> list[str]:
        """What each attempt of one idempotent request got: status and error code."""
        out = []
        for s in self.seen:
            if s.idempotency_key == idempotency_key:
                err = s.body.get("error", {}) if isinstance(s.body, dict) else {}
                out.append(f"{s.status or s.error}" + (f" {err.get('code')}" if err else ""))
        return out

    def bad_5xx(self) -> list[Seen]:
        """5xx responses that are not a retryable 503/504 in the one error shape."""
        out = []
        for s in self.seen:
            if s.status is None or s.status < 500:
                continue
            err = s.body.get("error") if isinstance(s.body, dict) else None
            if s.status not in (503, 504) or not isinstance(err, dict) or err.get("retryable") is not True:
                out.append(s)
        return out


# --------------------------------------------------------------------------- Redis
def redis_local_ports(pid: int, redis_port: int = 6379) -> list[int]:
    """Local ports of the TCP connections from process ``pid`` (and its children) to Redis."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    ports = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for c in p.net_connections(kind="tcp"):
                if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED:
                    ports.append(c.laddr.port)
    return ports


def redis_kill_clients_of(redis_url: str, pid: int) -> int:
    """``CLIENT KILL ADDR`` every connection of the agentbus process tree ``pid``; returns
    how many were killed. Other clients of the shared Redis are untouched."""
    import redis

    r = redis.Redis.from_url(redis_url, socket_timeout=5)
    port = r.connection_pool.connection_kwargs.get("port", 6379)
    mine = set(redis_local_ports(pid, int(port)))
    killed = 0
    try:
        for c in r.client_list():
            _, _, cport = str(c.get("addr", "")).rpartition(":")
            if cport.isdigit() and int(cport) in mine:
                with contextlib.suppress(redis.RedisError):
                    r.execute_command("CLIENT", "KILL", "ADDR", c["addr"])
                    killed += 1
    finally:
        r.close()
    return killed
