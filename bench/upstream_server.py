"""A no-op OpenAI-compatible upstream for the broker-overhead benchmark (``bench/broker.py``).

Why not tests/upstream.py (Starlette + uvicorn): the benchmark subtracts the latency of a
direct call from the latency of the same call through agentbus, and on a 2-core machine
every microsecond the upstream spends is a microsecond taken from agentbus or the load
generator. So this is a raw ``asyncio.Protocol`` HTTP/1.1 server on uvloop that answers
from pre-rendered bytes: no framework, no routing table, and no delay unless ``--delay-ms`` asks
for one: then each completion is answered after a delay drawn uniformly from 0.5x to 1.5x
that (like a model; the spread keeps closed-loop clients from marching in lockstep, which
a fixed delay would make them do, every call of a round arriving in the same instant).
Other routes still answer at once.

Routes:

- ``POST /v1/chat/completions`` (and ``/v1/completions``): non-streaming, a fixed small
  chat.completion JSON body with ``usage``; with ``"stream": true``, ``STREAM_CHUNKS`` SSE
  content chunks, a usage-only chunk when ``stream_options.include_usage`` is set (as
  OpenAI and vLLM do; the broker always sets it), then ``data: [DONE]`` — written back to
  back, each as its own HTTP chunk.
- ``GET /v1/models``, ``GET /metrics`` (vLLM gauges, all zero: the broker scrapes them),
  ``GET /readyz`` (what bench.servers.Server polls before a run).

Run: ``python -m bench.upstream_server --port 8001 [--delay-ms 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
from typing import Any

import orjson

STREAM_CHUNKS = 8
MODEL = "bench-model"
USAGE = {"prompt_tokens": 12, "completion_tokens": STREAM_CHUNKS, "total_tokens": 12 + STREAM_CHUNKS}


def _head(status: bytes, content_type: bytes, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%s\r\n\r\n" % (status, content_type, framing)


def _fixed(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return _head(status, content_type, len(body)) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(f"tok{i}" for i in range(STREAM_CHUNKS))},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
)
JSON_RESPONSE = _fixed(b"200 OK", b"application/json", COMPLETION)
# Each SSE event is its own HTTP chunk, as a token-by-token server sends them.
STREAM_EVENTS = [
    _chunk(
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
            }
        )
        + b"\n\n"
    )
    for i in range(STREAM_CHUNKS)
]
USAGE_EVENT = _chunk(
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [],
            "usage": USAGE,
        }
    )
    + b"\n\n"
)
DONE_EVENT = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
STREAM_HEAD = _head(b"200 OK", b"text/event-stream", None)
MODELS_RESPONSE = _fixed(
    b"200 OK", b"application/json", orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
)
METRICS_RESPONSE = _fixed(
    b"200 OK",
    b"text/plain; version=0.0.4",
    (
        f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="{MODEL}"}} 0\n'
        f'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name="{MODEL}"}} 0\n'
        f'# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0\n'
    ).encode(),
)
READY_RESPONSE = _fixed(b"200 OK", b"application/json", b'{"status":"ok"}')
NOT_FOUND = _fixed(b"404 Not Found", b"application/json", b'{"error":{"message":"not found"}}')
BAD_REQUEST = _fixed(b"400 Bad Request", b"application/json", b'{"error":{"message":"bad request"}}')
GETS = {b"/v1/models": MODELS_RESPONSE, b"/metrics": METRICS_RESPONSE, b"/readyz": READY_RESPONSE}
COMPLETION_PATHS = (b"/v1/chat/completions", b"/v1/completions")
# Seconds a completion takes (``--delay-ms``); 0 answers at once.
DELAY_S = 0.0


def delay_factor(body: bytes) -> float:
    """0.5-1.5: from the request's OpenAI ``seed`` when it has one, so a client that chose the
    seed knows how long this "model" took and can subtract it (bench.broker does: the added
    latency is then measured per call, not as a difference of two noisy percentiles);
    otherwise random."""
    i = body.find(b'"seed":')
    if i >= 0:
        digits = re.match(rb"\s*(\d+)", body[i + 7 : i + 40])
        if digits:
            return 0.5 + (int(digits.group(1)) % 1000) / 1000.0
    return random.uniform(0.5, 1.5)


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: requests framed by Content-Length, answered in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.answer_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            raw = bytes(self.buf[:end])
            head = raw.lower()
            length = 0
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else None])
            elif b"\r\ntransfer-encoding:" in head:
                self._answer(BAD_REQUEST, close=True)  # no client of this bench sends chunked bodies
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            parts = raw.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3:
                self._answer(BAD_REQUEST, close=True)
                return
            self._handle(parts[0], parts[1], body, close=b"\r\nconnection: close" in head)

    def _handle(self, method: bytes, path: bytes, body: bytes, *, close: bool) -> None:
        if method == b"POST" and path in COMPLETION_PATHS and DELAY_S > 0:
            loop = asyncio.get_running_loop()
            # Never before this connection's previous answer: answers stay in request order.
            self.answer_at = max(self.answer_at, loop.time() + DELAY_S * delay_factor(body))
            loop.call_at(self.answer_at, self._complete, body, close)
        elif method == b"POST" and path in COMPLETION_PATHS:
            self._complete(body, close)
        elif method == b"GET" and path in GETS:
            self._answer(GETS[path], close=close)
        else:
            self._answer(NOT_FOUND, close=close)

    def _complete(self, body: bytes, close: bool) -> None:
        if self.transport is None:
            return  # the client went away while the "model" worked
        try:
            req: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._answer(BAD_REQUEST, close=close)
            return
        if not isinstance(req, dict):
            self._answer(BAD_REQUEST, close=close)
        elif req.get("stream"):
            self._stream(bool((req.get("stream_options") or {}).get("include_usage")), close=close)
        else:
            self._answer(JSON_RESPONSE, close=close)

    def _answer(self, response: bytes, *, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(response)
        if close:
            self.transport.close()

    def _stream(self, include_usage: bool, *, close: bool) -> None:
        assert self.transport is not None
        # One write per event: with TCP_NODELAY each leaves as it is written, like tokens.
        self.transport.write(STREAM_HEAD + STREAM_EVENTS[0])
        for event in STREAM_EVENTS[1:]:
            self.transport.write(event)
        if include_usage:
            self.transport.write(USAGE_EVENT)
        self._answer(DONE_EVENT, close=close)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="answer each completion after this long")
    args = p.parse_args(argv)
    global DELAY_S
    DELAY_S = args.delay_ms / 1000.0
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port))


if __name__ == "__main__":
    main()
