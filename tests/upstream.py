"""A deterministic OpenAI-compatible upstream for broker tests, with vLLM-format metrics.

It runs a real uvicorn server in a background thread on 127.0.0.1. Tests steer it through
its attributes: ``mode`` (ok | error500 | error429 | error400 | hang | garbage; a real TCP reset is
``RawUpstream`` in tests/test_broker.py),
``delay_s``, the gauges it reports on ``/metrics``, and they read what it received in
``requests``. Usage numbers are exact (prompt words / completion words), so accounting can
be checked to the token.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeUpstream:
    def __init__(self, name: str, models: list[str] | None = None, completion_words: int = 5) -> None:
        self.name = name
        self.models = models or ["fake-model"]
        self.completion_words = completion_words
        self.mode = "ok"
        self.delay_s = 0.0
        self.running = 0.0
        self.waiting = 0.0
        self.kv_usage = 0.0
        self.requests: list[dict[str, Any]] = []
        self.port = _free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "models": self.models, **extra}

    # ------------------------------------------------------------------ app
    def app(self) -> Starlette:
        async def models(_: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

        async def metrics(_: Request) -> Response:
            lines = []
            for m in self.models:
                lab = f'model_name="{m}"'
                lines += [
                    "# TYPE vllm:num_requests_running gauge",
                    f"vllm:num_requests_running{{{lab}}} {self.running}",
                    "# TYPE vllm:num_requests_waiting gauge",
                    f"vllm:num_requests_waiting{{{lab}}} {self.waiting}",
                    "# TYPE vllm:kv_cache_usage_perc gauge",
                    f"vllm:kv_cache_usage_perc{{{lab}}} {self.kv_usage}",
                ]
            return PlainTextResponse("\n".join(lines) + "\n")

        async def completion(request: Request) -> Response:
            body = await request.json()
            self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            mode = self.mode
            if mode == "hang":
                await asyncio.sleep(3600)
            if mode == "error500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if mode == "error429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "1"})
            if mode == "error400":
                return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
            if mode == "garbage":
                return PlainTextResponse("<html>not json</html>", status_code=200)
            prompt_tokens = _words(body)
            words = [f"w{i}" for i in range(self.completion_words)]
            if request.url.path.endswith("/embeddings"):
                return JSONResponse(
                    {
                        "object": "list",
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                        "model": body.get("model"),
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                    }
                )
            chat = request.url.path.endswith("/chat/completions")
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            }
            if body.get("stream"):
                return StreamingResponse(self._stream(body, words, usage, chat), media_type="text/event-stream")
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
                if body.get("tools"):
                    message["tool_calls"] = [
                        {"id": "call_1", "type": "function", "function": {"name": "noop", "arguments": "{}"}}
                    ]
                choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": " ".join(words), "finish_reason": "stop"}
            return JSONResponse(
                {
                    "id": f"{self.name}-1",
                    "object": "chat.completion" if chat else "text_completion",
                    "model": body.get("model"),
                    "served_by": self.name,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/metrics", metrics),
                Route("/v1/chat/completions", completion, methods=["POST"]),
                Route("/v1/completions", completion, methods=["POST"]),
                Route("/v1/embeddings", completion, methods=["POST"]),
            ]
        )

    async def _stream(self, body: dict[str, Any], words: list[str], usage: dict[str, int], chat: bool) -> Any:
        for w in words:
            if chat:
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w + " "}}]}
            else:
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": w + " "}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            await asyncio.sleep(0.001)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield b"data: " + orjson.dumps({"object": "chunk", "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeUpstream:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(5)


def _words(body: dict[str, Any]) -> int:
    if isinstance(body.get("messages"), list):
        text = " ".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    else:
        text = str(body.get("prompt", body.get("input", "")))
    return len(text.split())
