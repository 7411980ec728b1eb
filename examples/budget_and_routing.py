"""Model calls through the agentbus broker: routing by rule, and a token budget that stops an agent.

What it does, printing each step:

1. starts its own agentbus (temporary SQLite, bearer-token auth on) with a broker config:
   two endpoints serving the same model - a ``standard`` and a ``premium`` pool - and two
   model aliases, ``small`` and ``large``. Rules (first match wins) send ``large`` and any
   prompt mentioning "urgent" to ``premium``, everything else to ``standard``;
2. issues an agent token with a small lifetime budget of model tokens;
3. calls the broker through the SDK's OpenAI helper (``Client.openai``) until the budget is
   spent: the calls succeed, each on the endpoint its rule picked (the broker says which in
   ``X-Agentbus-Endpoint``), then the broker refuses with ``429 budget_exceeded``, which the
   SDK turns into :class:`agentbus_sdk.BudgetExceeded`.

Without ``--upstream`` two small built-in stand-ins play the model servers (they answer
with exact token counts); with ``--upstream`` both pools point at a real OpenAI-compatible
server (vLLM, llama.cpp, ...):

    .venv/bin/python examples/budget_and_routing.py
    .venv/bin/python examples/budget_and_routing.py --upstream http://127.0.0.1:8000/v1 --model qwen2.5-7b

Needs the ``openai`` package (``pip install 'agentbus-sdk[openai]'``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from agentbus_sdk import BudgetExceeded, Client, error_from_openai

PROMPTS = [
    ("small", "Summarise the release plan in one line."),
    ("large", "Design the rollout for the new storage backend."),
    ("small", "Urgent: the build is red, what do we check first?"),
    ("small", "List two risks of the release."),
    ("large", "Write the migration checklist."),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- stand-in model servers


class StandIn:
    """A tiny OpenAI-compatible chat server in a background thread: answers name the pool
    and report exact usage (prompt words in, ``min(max_tokens, 8)`` words out)."""

    def __init__(self, name: str, model: str) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.name, self.model, self.port = name, model, free_port()

        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            words_in = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            n_out = min(int(body.get("max_tokens") or 8), 8)
            text = " ".join([f"({name})", *(["ok"] * (n_out - 1))])
            usage = {"prompt_tokens": words_in, "completion_tokens": n_out, "total_tokens": words_in + n_out}
            message = {"role": "assistant", "content": text}
            return JSONResponse(
                {
                    "id": f"{name}-{secrets.token_hex(4)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                }
            )

        async def models(_: Request) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": model, "object": "model"}]})

        app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"stand-in model server {name} did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


# --------------------------------------------------------------------------- broker config and bus


def broker_config(standard_url: str, premium_url: str, model: str) -> dict[str, Any]:
    return {
        "endpoints": [
            {"name": "standard", "base_url": standard_url, "models": [model]},
            {"name": "premium", "base_url": premium_url, "models": [model]},
        ],
        "aliases": {"small": model, "large": model},
        "routes": [
            {
                "name": "large-or-urgent",
                "when": {"any": [{"model": ["large"]}, {"keywords": ["urgent"]}]},
                "targets": ["premium"],
            },
            {"name": "default", "targets": ["standard"]},
        ],
        "retry": {"attempts": 1},
    }


def expected_endpoint(alias: str, prompt: str) -> str:
    """What the rules above should pick (checked against what the broker reports)."""
    return "premium" if alias == "large" or "urgent" in prompt.lower() else "standard"


def start_bus(workdir: Path, config_path: Path, admin_token: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "AGENTBUS_STORE": f"sqlite:///{workdir / 'agentbus.db'}",
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": admin_token,
        "AGENTBUS_BROKER_CONFIG": str(config_path),
    }
    log = open(workdir / "agentbus.log", "wb")  # lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentbus.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agentbus exited with {proc.returncode}; see {workdir / 'agentbus.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("agentbus did not become ready")


# --------------------------------------------------------------------------- the agent


def run_agent(url: str, admin_token: str, budget_tokens: int, max_tokens: int) -> bool:
    with Client(url, token=admin_token) as admin:
        r = admin.request(
            "POST",
            "/v1/admin/tokens",
            json={"subject": "writer", "budgets": {"max_tokens": budget_tokens, "window_s": 0}},
        )
        token = r.json()["token"]
    print(f"token: issued for agent 'writer' with a lifetime budget of {budget_tokens} model tokens")

    ok_calls, routed_right = 0, True
    with Client(url, token=token) as bus:
        # max_retries=0: a spent lifetime budget does not come back, so retrying is pointless.
        llm = bus.openai(space="release-plan", max_retries=0)
        for i in range(40):
            alias, prompt = PROMPTS[i % len(PROMPTS)]
            try:
                raw = llm.chat.completions.with_raw_response.create(
                    model=alias, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
                )
            except Exception as exc:
                err = error_from_openai(exc)
                if not isinstance(err, BudgetExceeded):
                    raise
                print(
                    f"call {i + 1}: model={alias!r} -> 429 {type(err).__name__} "
                    f"(code={err.code}, limit={err.limit_kind}, scope={err.scope}, retryable={err.retryable}): "
                    f"{err.message}"
                )
                break
            completion = raw.parse()
            endpoint = raw.headers.get("x-agentbus-endpoint", "?")
            want = expected_endpoint(alias, prompt)
            routed_right &= endpoint == want
            usage = completion.usage
            left = bus.budget().mine.remaining.get("tokens")
            print(
                f"call {i + 1}: model={alias!r} prompt={prompt[:28]!r}... -> endpoint {endpoint} "
                f"(rule says {want}), {usage.total_tokens if usage else '?'} tokens used, {left} left"
            )
            ok_calls += 1
        else:
            print("the budget was never exhausted")
            return False
        used = bus.budget().mine.used
    print(f"\nbudget: {used.get('tokens')} of {budget_tokens} tokens spent in {used.get('requests')} calls")
    ok = ok_calls > 0 and routed_right and used.get("tokens", 0) <= budget_tokens
    print(
        f"OK: {ok_calls} calls succeeded, each routed by rule, then BudgetExceeded stopped the agent"
        if ok
        else "FAILED: see above"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", help="OpenAI-compatible base URL (…/v1) of a real model server for both pools")
    ap.add_argument("--model", default="demo-chat", help="model name the upstream serves")
    ap.add_argument("--budget", type=int, default=120, help="the agent's lifetime budget, in model tokens")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each call")
    args = ap.parse_args()

    stand_ins: list[StandIn] = []
    if args.upstream:
        standard_url = premium_url = args.upstream
        print(f"model servers: both pools use {args.upstream} (model {args.model})")
    else:
        stand_ins = [StandIn("standard", args.model), StandIn("premium", args.model)]
        standard_url, premium_url = stand_ins[0].base_url, stand_ins[1].base_url
        print(f"model servers: built-in stand-ins on {standard_url} and {premium_url}")
    admin_token = "ab_" + secrets.token_urlsafe(32)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="agentbus-budget-") as tmp:
            workdir = Path(tmp)
            config_path = workdir / "broker.yaml"
            config_path.write_text(yaml.safe_dump(broker_config(standard_url, premium_url, args.model)))
            proc, url = start_bus(workdir, config_path, admin_token)
            print(f"bus: agentbus on {url} (SQLite in {workdir}, auth on), broker config:")
            print("  " + config_path.read_text().replace("\n", "\n  ").rstrip())
            ok = run_agent(url, admin_token, args.budget, args.max_tokens)
            proc.terminate()
            proc.wait(10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for s in stand_ins:
            s.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
