"""Model broker: OpenAI pass-through, streaming, routing rules, policies, faults, deadlines,
identity and hot reload, against a real agentbus process and real fake upstreams.

A server start is the expensive part on a busy machine, so one auth-mode server (SQLite;
the broker's routing and relaying do not depend on the backend - budgets, which do, are in
``test_broker_budget.py`` on every backend) serves the whole module. Every test writes its
own broker YAML over the hot-reloaded config file and waits until the server serves it (a
unique marker alias appears in ``GET /v1/models``), uses endpoint names unique to the test
(so no endpoint state - circuit, outstanding calls, scraped load - carries over) and its
own tokens (so its budget counters start at zero).

Which endpoint served a call is read from ``X-Agentbus-Endpoint`` and cross-checked with
what each fake upstream recorded.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import os
import secrets
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from agentbus.broker.rules import estimate_tokens
from tests.conftest import Server, migrate
from tests.upstream import FakeUpstream

TIMEOUT = httpx.Timeout(20.0)
MODEL = "m"


# --------------------------------------------------------------------------- upstreams


class Upstream(FakeUpstream):
    """FakeUpstream that also counts /metrics scrapes and can fail its next N calls.

    The metrics handler reads ``running`` once per served model per scrape, so counting
    reads of it counts scrapes; a test that sets gauges waits for two more scrapes, after
    which the broker has certainly parsed a scrape taken after the change.
    """

    def __init__(self, name: str, models: list[str] | None = None, completion_words: int = 5) -> None:
        self.scrapes = 0
        self.fail_next = 0
        super().__init__(name, models=models or [MODEL], completion_words=completion_words)

    @property  # type: ignore[override]
    def running(self) -> float:
        self.scrapes += 1
        return self._running

    @running.setter
    def running(self, value: float) -> None:
        self._running = value

    @property  # type: ignore[override]
    def mode(self) -> str:
        if self.fail_next > 0:
            self.fail_next -= 1
            return "error500"
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value

    @property
    def posts(self) -> int:
        return len(self.requests)


class RawUpstream:
    """A socket-level endpoint for faults an ASGI app cannot produce. On POST:

    * ``reset``: reset the TCP connection (RST, no response). ``FakeUpstream(mode="reset")``
      cannot do this: Starlette turns the exception it raises into a 500 response.
    * ``trickle``: send the status line and headers at once, then a valid JSON body one
      piece every ``trickle_s`` seconds (an upstream that never goes silent for long).

    GET (the broker's health check of ``/v1/models``) is answered normally.
    """

    def __init__(self, name: str, mode: str = "reset", trickle_s: float = 0.25) -> None:
        self.name = name
        self.models = [MODEL]
        self.mode = mode
        self.trickle_s = trickle_s
        self.posts = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "models": self.models, **extra}

    def start(self) -> RawUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            if data.startswith(b"GET"):
                body = orjson.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            elif self.mode == "reset":
                self.posts += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.posts += 1
                body = orjson.dumps(
                    {
                        "id": "trickle",
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        "padding": " " * 100,
                    }
                )
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                )
                pieces = 12
                step = -(-len(body) // pieces)
                for i in range(0, len(body), step):
                    if self._stop.wait(self.trickle_s):
                        return
                    conn.sendall(body[i : i + step])
        except OSError:
            pass
        finally:
            conn.close()


# --------------------------------------------------------------------------- the server


class Bk:
    """The module's broker server, seen from a test: config rewrites, tokens, calls."""

    def __init__(self, server: Server, config_path: Path, admin: str) -> None:
        self.server = server
        self.config_path = config_path
        self.admin = admin
        self.http = httpx.Client(base_url=server.url, timeout=TIMEOUT)

    # -- config
    def configure(self, cfg: dict[str, Any]) -> None:
        """Write ``cfg`` (atomically) and wait until the server serves it."""
        cfg = copy.deepcopy(cfg)
        marker = f"cfg-{uuid.uuid4().hex[:10]}"
        if cfg.get("endpoints"):
            cfg.setdefault("aliases", {})[marker] = cfg["endpoints"][0]["models"][0]
        self.write(cfg)
        deadline = time.monotonic() + 20
        while True:
            ids = self.model_ids()
            if (marker in ids) if cfg.get("endpoints") else ids == []:
                return
            assert time.monotonic() < deadline, f"the server did not load the new broker config: {ids}"
            time.sleep(0.05)

    def write(self, cfg: dict[str, Any] | str) -> None:
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def model_ids(self) -> list[str]:
        r = self.http.get("/v1/models", headers=auth(self.admin))
        assert r.status_code == 200, r.text
        return [m["id"] for m in r.json()["data"]]

    # -- identity
    def token(
        self,
        subject: str | None = None,
        *,
        tenant: str | None = None,
        kind: str = "agent",
        scopes: list[str] | None = None,
        budgets: dict[str, Any] | None = None,
    ) -> Tok:
        subject = subject or f"agent-{uuid.uuid4().hex[:8]}"
        tenant = tenant or f"tn-{uuid.uuid4().hex[:8]}"
        body: dict[str, Any] = {"subject": subject, "tenant": tenant, "kind": kind}
        if scopes is not None:
            body["scopes"] = scopes
        if budgets is not None:
            body["budgets"] = budgets
        r = self.http.post("/v1/admin/tokens", json=body, headers=auth(self.admin))
        assert r.status_code == 201, r.text
        return Tok(r.json()["token"], tenant, subject)

    # -- calls
    def post(self, path: str, body: Any, tok: str | None) -> httpx.Response:
        return self.http.post(path, json=body, headers=auth(tok))

    def chat(
        self, tok: Tok, text: str = "hello world again", *, model: str = MODEL, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        return self.http.post("/v1/chat/completions", json=body, headers={**auth(tok), **(headers or {})})

    def served(self, tok: Tok, text: str = "hello world again", **kw: Any) -> str:
        r = self.chat(tok, text, **kw)
        assert r.status_code == 200, r.text
        return r.headers["x-agentbus-endpoint"]

    def used(self, tok: Tok) -> dict[str, Any]:
        r = self.http.get("/v1/budget", headers=auth(tok))
        assert r.status_code == 200, r.text
        return r.json()["scopes"][f"p:{tok.tenant}/{tok.subject}"]["used"]  # type: ignore[no-any-return]


class Tok(str):
    """A bearer token that remembers whose it is."""

    tenant: str
    subject: str

    def __new__(cls, token: str, tenant: str, subject: str) -> Tok:
        t = super().__new__(cls, token)
        t.tenant, t.subject = tenant, subject
        return t


def auth(tok: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"} if tok else {}


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bk]:
    tmp = tmp_path_factory.mktemp("broker")
    config = tmp / "broker.yaml"
    config.write_text("endpoints: []\n")
    store = f"sqlite:///{tmp / 'agentbus.db'}"
    migrate(store)
    admin = "ab_" + secrets.token_urlsafe(32)
    env = {
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": admin,
        "AGENTBUS_AUTH_CACHE_TTL_S": "0",
        "AGENTBUS_AUTH_FAIL_LIMIT": "100000",
        "AGENTBUS_DEFAULT_TENANT": f"adm-{uuid.uuid4().hex[:8]}",
        "AGENTBUS_BROKER_CONFIG": str(config),
        "AGENTBUS_BROKER_RELOAD_S": "0.2",
    }
    srv = Server(store=store, env=env, log_dir=tmp).start()
    bk = Bk(srv, config, admin)
    try:
        yield bk
    finally:
        bk.http.close()
        srv.stop()


@pytest.fixture
def bk(module_server: Bk) -> Bk:
    return module_server


@pytest.fixture
def ups() -> Iterator[Callable[..., Upstream]]:
    """``ups(short_name, models=None, completion_words=5)`` starts a FakeUpstream whose
    endpoint name is unique to this test; all are stopped afterwards."""
    uid = uuid.uuid4().hex[:6]
    started: list[Any] = []

    def make(name: str, models: list[str] | None = None, completion_words: int = 5) -> Upstream:
        u = Upstream(f"{name}-{uid}", models=models, completion_words=completion_words).start()
        started.append(u)
        return u

    yield make
    for u in started:
        u.stop()


def by_name(names: list[str], *ups: Upstream | RawUpstream) -> list[str]:
    """Endpoint names -> the upstreams' short names, for readable assertions."""
    short = {u.name: u.name.rsplit("-", 1)[0] for u in ups}
    return [short.get(n, n) for n in names]


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert the one error shape; return its ``error`` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"type", "code", "message", "retryable"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in r.text
    return err  # type: ignore[no-any-return]


def wait_scraped(*ups: Upstream, scrapes: int = 2) -> None:
    start = {id(u): u.scrapes for u in ups}
    deadline = time.monotonic() + 20
    while not all(u.scrapes >= start[id(u)] + scrapes for u in ups):
        assert time.monotonic() < deadline, "the broker stopped scraping /metrics"
        time.sleep(0.02)


def sse_events(r: httpx.Response) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    out = []
    for event in r.content.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


def concurrent(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run blocking calls at the same time (threads); results in call order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # surfaced below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results


# =========================================================================== pass-through


def test_openai_calls_pass_through_unchanged(bk: Bk, ups: Callable[..., Upstream]) -> None:
    up = ups("a", models=["served-model"])
    bk.configure({"endpoints": [up.endpoint()], "aliases": {"chat-alias": "served-model"}})
    tok = bk.token()

    chat = {
        "model": "chat-alias",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo brave new world"}],
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "user": "u-1",
        "logit_bias": {"50256": -100},
        "x_vendor_extension": {"nested": [1, 2, {"k": None}]},
    }
    r = bk.post("/v1/chat/completions", chat, tok)
    assert r.status_code == 200, r.text
    assert r.headers["x-agentbus-endpoint"] == up.name
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {
        "id": f"{up.name}-1",
        "object": "chat.completion",
        "model": "served-model",
        "served_by": up.name,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "w0 w1 w2 w3 w4"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11},
    }
    sent = up.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    # The alias is resolved; every other field reaches the upstream untouched.
    assert sent["body"] == {**chat, "model": "served-model"}

    text = {"model": "served-model", "prompt": "once upon a time", "max_tokens": 7, "echo": False, "n": 1}
    r = bk.post("/v1/completions", text, tok)
    assert r.status_code == 200, r.text
    assert r.headers["x-agentbus-endpoint"] == up.name
    assert r.json() == {
        "id": f"{up.name}-1",
        "object": "text_completion",
        "model": "served-model",
        "served_by": up.name,
        "choices": [{"index": 0, "text": "w0 w1 w2 w3 w4", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
    }
    assert up.requests[-1]["path"] == "/v1/completions"
    assert up.requests[-1]["body"] == text

    emb = {"model": "chat-alias", "input": "some text here", "encoding_format": "float"}
    r = bk.post("/v1/embeddings", emb, tok)
    assert r.status_code == 200, r.text
    assert r.headers["x-agentbus-endpoint"] == up.name
    assert r.json() == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
        "model": "served-model",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    assert up.requests[-1]["path"] == "/v1/embeddings"
    assert up.requests[-1]["body"] == {**emb, "model": "served-model"}
    assert up.posts == 3

    # Usage of the three calls is what the upstream reported, to the token.
    assert bk.used(tok)["tokens"] == 11 + 9 + 3
    assert bk.used(tok)["requests"] == 3


def test_tool_calling_fields_pass_through(bk: Bk, ups: Callable[..., Upstream]) -> None:
    up = ups("a")
    bk.configure({"endpoints": [up.endpoint()]})
    tok = bk.token()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "noop",
                "description": "does nothing",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "call it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "noop", "arguments": '{"x":1}'}}],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "done"},
        {"role": "user", "content": [{"type": "text", "text": "again please"}]},
    ]
    body = {
        "model": MODEL,
        "messages": messages,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "noop"}},
        "parallel_tool_calls": False,
    }
    r = bk.post("/v1/chat/completions", body, tok)
    assert r.status_code == 200, r.text
    assert up.requests[-1]["body"] == body
    assert r.json()["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "noop", "arguments": "{}"}}
    ]


def test_models_list_and_model_errors(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a = ups("a", models=["m1", "m2"])
    b = ups("b", models=["m2", "m3"])
    bk.configure({"endpoints": [a.endpoint(), b.endpoint()], "aliases": {"fast": "m1", "big": "m3"}})
    tok = bk.token()

    r = bk.http.get("/v1/models", headers=auth(tok))
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert {"m1", "m2", "m3", "fast", "big"} <= set(ids)
    assert len(ids) == len(set(ids)) == 6  # + the test's config marker alias
    for m in listing["data"]:
        assert m["object"] == "model"
        assert isinstance(m["owned_by"], str)
        assert isinstance(m["created"], int)

    err = error_of(bk.chat(tok, model="nope"), 404, "model_not_found")
    assert err["type"] == "not_found"
    assert "nope" in err["message"]
    error_of(bk.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, tok), 422)
    error_of(bk.post("/v1/chat/completions", {"model": "", "messages": []}, tok), 422)
    error_of(bk.post("/v1/chat/completions", {"model": 5, "messages": []}, tok), 422)
    error_of(bk.post("/v1/chat/completions", {"model": "m1", "messages": "hi"}, tok), 422)
    error_of(bk.post("/v1/completions", {"prompt": "x"}, tok), 422)
    error_of(bk.post("/v1/embeddings", {"model": "zzz", "input": "x"}, tok), 404, "model_not_found")
    error_of(bk.post("/v1/chat/completions", ["not", "an", "object"], tok), 422)
    bad_json = {**auth(tok), "content-type": "application/json"}
    r = bk.http.post("/v1/chat/completions", content=b"{not json", headers=bad_json)
    assert r.status_code in (400, 422)
    error_of(r, r.status_code)
    assert a.posts == b.posts == 0
    # Each model goes only to endpoints that serve it.
    assert bk.served(tok, model="big") == b.name
    assert bk.served(tok, model="fast") == a.name
    assert b.requests[-1]["body"]["model"] == "m3"
    assert a.requests[-1]["body"]["model"] == "m1"


# =========================================================================== streaming


def test_streaming_relays_chunks_and_records_usage(bk: Bk, ups: Callable[..., Upstream]) -> None:
    up = ups("a")
    bk.configure({"endpoints": [up.endpoint()]})
    tok = bk.token()
    prompt = "hello brave new world"  # 4 words; the upstream answers with 5

    def stream(body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
        r = bk.post(path, body, tok)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-agentbus-endpoint"] == up.name
        return r

    def chunks(events: list[bytes]) -> list[dict[str, Any]]:
        assert events[-1] == b"[DONE]", events
        assert b"[DONE]" not in events[:-1]
        return [orjson.loads(e) for e in events[:-1]]

    base = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}

    # 1. The client did not ask for usage: the broker asks upstream, and strips the chunk.
    r = stream(base)
    got = chunks(sse_events(r))
    assert [c["choices"][0]["delta"]["content"] for c in got] == [f"w{i} " for i in range(5)]
    assert all("usage" not in c for c in got)
    assert up.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in up.requests[-1]["body"].items() if k != "stream_options"} == base

    # 2. An explicit include_usage=false is the same as not asking.
    r = stream({**base, "stream_options": {"include_usage": False}})
    got = chunks(sse_events(r))
    assert len(got) == 5 and all("usage" not in c for c in got)

    # 3. The client asked: the usage chunk is relayed, last before [DONE], exact.
    r = stream({**base, "stream_options": {"include_usage": True}})
    got = chunks(sse_events(r))
    assert len(got) == 6
    assert got[-1]["choices"] == []
    assert got[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert [c["choices"][0]["delta"]["content"] for c in got[:-1]] == [f"w{i} " for i in range(5)]

    # 4. Text completions stream too.
    r = stream({"model": MODEL, "prompt": prompt, "stream": True}, "/v1/completions")
    got = chunks(sse_events(r))
    assert [c["choices"][0]["text"] for c in got] == [f"w{i} " for i in range(5)]

    # Usage of all four streams is settled exactly (settling may finish just after [DONE]).
    deadline = time.monotonic() + 15
    while True:
        used = bk.used(tok)
        if used["tokens"] == 4 * 9 and used["inflight"] == 0:
            break
        assert time.monotonic() < deadline, used
        time.sleep(0.05)
    assert used["requests"] == 4


# =========================================================================== routing rules


def test_routing_rules_over_request_signals(bk: Bk, ups: Callable[..., Upstream]) -> None:
    names = ["coder", "tools", "combo", "either", "long", "tiny", "rest"]
    u = {n: ups(n) for n in names}
    bk.configure(
        {
            "endpoints": [x.endpoint() for x in u.values()],
            "aliases": {"coder-model": MODEL},
            "routes": [
                {"name": "coder", "when": {"model": "coder-model"}, "targets": [u["coder"].name]},
                {"name": "tools", "when": {"has_tools": True}, "targets": [u["tools"].name]},
                {
                    "name": "combo",
                    "when": {"all": [{"keywords": ["deploy"]}, {"not": {"keywords": ["dryrun"]}}]},
                    "targets": [u["combo"].name],
                },
                {
                    "name": "either",
                    "when": {"any": [{"keywords": ["urgent"]}, {"regex": "^translate:"}]},
                    "targets": [u["either"].name],
                },
                {"name": "long", "when": {"min_context_tokens": 200}, "targets": [u["long"].name]},
                {"name": "tiny", "when": {"max_context_tokens": 2}, "targets": [u["tiny"].name]},
                {"name": "rest", "targets": [u["rest"].name]},
            ],
        }
    )
    tok = bk.token()

    def where(messages: list[dict[str, Any]] | str, **extra: Any) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        r = bk.post("/v1/chat/completions", {"model": MODEL, "messages": messages, **extra}, tok)
        assert r.status_code == 200, r.text
        return by_name([r.headers["x-agentbus-endpoint"]], *u.values())[0]

    long_text = "x " * 400
    assert estimate_tokens(long_text) >= 200
    assert estimate_tokens("hey") <= 2 < estimate_tokens("hello world again")

    # The alias rule sees the requested name (first match wins, even over keywords).
    r = bk.chat(tok, "urgent: deploy it", model="coder-model")
    assert by_name([r.headers["x-agentbus-endpoint"]], *u.values()) == ["coder"]
    assert u["coder"].requests[-1]["body"]["model"] == MODEL
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert where("urgent: deploy it", tools=[tool]) == "tools"
    assert where("please deploy now") == "combo"
    assert where("please DEPLOY now, dryrun only") == "rest"  # all + not
    assert where("URGENT: the build is red") == "either"  # keywords ignore case
    assert where("translate: hola mundo") == "either"  # regex
    assert where("please translate: hola") == "rest"  # the regex is anchored
    assert where(long_text) == "long"
    assert where("hey") == "tiny"
    assert where("hello world again") == "rest"
    # Keywords and regexes look at the *last user* message only.
    assert (
        where(
            [
                {"role": "user", "content": "urgent thing"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now something else"},
            ]
        )
        == "rest"
    )
    assert where([{"role": "system", "content": "urgent"}, {"role": "user", "content": "hello world again"}]) == "rest"
    assert where([{"role": "user", "content": [{"type": "text", "text": "urgent, in parts"}]}]) == "either"
    # ... but context length counts every message.
    assert where([{"role": "system", "content": long_text}, {"role": "user", "content": "hello world again"}]) == "long"
    # Text completions route on their prompt.
    r = bk.post("/v1/completions", {"model": MODEL, "prompt": "translate: bonjour"}, tok)
    assert by_name([r.headers["x-agentbus-endpoint"]], *u.values()) == ["either"]

    counts = {n: x.posts for n, x in u.items()}
    assert counts == {"coder": 1, "tools": 1, "combo": 1, "either": 4, "long": 2, "tiny": 1, "rest": 5}


def test_routing_on_caller_identity(bk: Bk, ups: Callable[..., Upstream]) -> None:
    names = ["ops", "tracer", "tenant", "vip", "rest"]
    u = {n: ups(n) for n in names}
    special = f"tn-{uuid.uuid4().hex[:8]}"
    bk.configure(
        {
            "endpoints": [x.endpoint() for x in u.values()],
            "routes": [
                {"name": "ops", "when": {"kind": "operator"}, "targets": [u["ops"].name]},
                {"name": "tracer", "when": {"scope": "traces:read"}, "targets": [u["tracer"].name]},
                {"name": "tenant", "when": {"tenant": special}, "targets": [u["tenant"].name]},
                {"name": "vip", "when": {"subject_regex": "^vip-"}, "targets": [u["vip"].name]},
                {"name": "rest", "targets": [u["rest"].name]},
            ],
        }
    )
    cases = {
        "ops": bk.token(kind="operator", scopes=["broker:invoke"]),
        "tracer": bk.token(scopes=["broker:invoke", "traces:read"]),
        "tenant": bk.token(tenant=special),
        "vip": bk.token(f"vip-{uuid.uuid4().hex[:6]}"),
        "rest": bk.token(),
    }
    for expected, tok in cases.items():
        assert by_name([bk.served(tok)], *u.values()) == [expected], expected
    assert by_name([bk.served(bk.admin)], *u.values()) == ["tracer"]  # admins hold traces:read
    # A spoofed X-Agent-Id does not change the subject the rules see.
    assert by_name([bk.served(cases["rest"], headers={"X-Agent-Id": "vip-1"})], *u.values()) == ["rest"]


# =========================================================================== policies


def test_round_robin_alternates_and_follows_weights(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b, c, d = ups("a"), ups("b"), ups("c"), ups("d")
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint(), c.endpoint(weight=3), d.endpoint(weight=1)],
            "aliases": {"weighted": MODEL},
            "routes": [
                {"name": "w", "when": {"model": "weighted"}, "targets": [c.name, d.name], "policy": "round_robin"},
                {"name": "rr", "targets": [a.name, b.name], "policy": "round_robin"},
            ],
        }
    )
    tok = bk.token()
    seq = by_name([bk.served(tok) for _ in range(8)], a, b)
    assert set(seq) == {"a", "b"}, seq
    assert all(x != y for x, y in itertools.pairwise(seq)), f"round robin must alternate: {seq}"
    weighted = Counter(by_name([bk.served(tok, model="weighted") for _ in range(8)], c, d))
    assert weighted == {"c": 6, "d": 2}, weighted


def test_least_outstanding_spreads_concurrent_calls(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.delay_s = b.delay_s = 1.0
    bk.configure({"endpoints": [a.endpoint(), b.endpoint()]})  # no route: least_outstanding over all
    tok = bk.token()
    results = concurrent([lambda: bk.chat(tok) for _ in range(4)])
    assert [r.status_code for r in results] == [200] * 4
    assert Counter(by_name([r.headers["x-agentbus-endpoint"] for r in results], a, b)) == {"a": 2, "b": 2}
    assert a.posts == b.posts == 2


def test_load_aware_prefers_the_less_loaded_endpoint(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.running = 12
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint()],
            "routes": [{"name": "la", "targets": [a.name, b.name], "policy": "load_aware"}],
            "metrics_interval_s": 0.3,
        }
    )
    tok = bk.token()
    wait_scraped(a, b)
    assert set(by_name([bk.served(tok) for _ in range(6)], a, b)) == {"b"}

    a.running, b.waiting = 0, 4  # waiting counts double
    wait_scraped(a, b)
    assert set(by_name([bk.served(tok) for _ in range(6)], a, b)) == {"a"}

    b.waiting, a.kv_usage, b.running = 0, 0.99, 1  # a nearly full KV cache outweighs one running request
    wait_scraped(a, b)
    assert set(by_name([bk.served(tok) for _ in range(6)], a, b)) == {"b"}


def test_prefix_affinity_keeps_a_prefix_home_unless_it_is_busy(bk: Bk, ups: Callable[..., Upstream]) -> None:
    e = [ups("p0"), ups("p1"), ups("p2")]
    bk.configure(
        {
            "endpoints": [x.endpoint() for x in e],
            "routes": [{"name": "pa", "targets": [x.name for x in e], "policy": "prefix_affinity"}],
            "metrics_interval_s": 0.3,
        }
    )
    tok = bk.token()
    system = "You are a careful planner. " * 25  # > 512 characters: the shared prefix
    assert len(system) > 512

    def call(prefix: str, question: str) -> str:
        msgs = [{"role": "system", "content": prefix}, {"role": "user", "content": question}]
        r = bk.post("/v1/chat/completions", {"model": MODEL, "messages": msgs}, tok)
        assert r.status_code == 200, r.text
        return r.headers["x-agentbus-endpoint"]

    homes = {call(system, f"question number {i}") for i in range(6)}
    assert len(homes) == 1, homes
    home = homes.pop()

    spread = {call(f"{i}: " + "another agent's context " * 30, "go") for i in range(12)}
    assert len(spread) >= 2, spread

    # The home gets much busier than the others: the prefix moves ...
    busy = next(x for x in e if x.name == home)
    busy.running = 20
    wait_scraped(*e)
    moved = {call(system, f"later question {i}") for i in range(4)}
    assert home not in moved
    assert len(moved) == 1, moved  # ... consistently, to one other endpoint
    # ... and comes back when the home is idle again.
    busy.running = 0
    wait_scraped(*e)
    assert {call(system, f"last question {i}") for i in range(3)} == {home}


# =========================================================================== retries, fallbacks, circuit


def test_retryable_upstream_error_is_retried_on_another_endpoint(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.mode = "error500"
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint()],
            "routes": [{"name": "r", "targets": [a.name, b.name], "policy": "round_robin"}],
            "retry": {"attempts": 2, "backoff_ms": 1},
            "circuit": {"failures": 100},
        }
    )
    tok = bk.token()
    served = [bk.served(tok) for _ in range(4)]
    assert set(served) == {b.name}
    assert a.posts >= 1  # round robin put the failing endpoint first at least once
    assert b.posts == 4
    # Identical bodies on the retry.
    assert all(r["body"] == b.requests[0]["body"] for r in a.requests + b.requests)


def test_client_error_is_not_retried(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.mode = "error400"
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint()],
            "routes": [{"name": "r", "targets": [a.name], "fallbacks": [b.name]}],
            "retry": {"attempts": 3, "backoff_ms": 1},
        }
    )
    tok = bk.token()
    err = error_of(bk.chat(tok), 400)
    assert "bad prompt" in err["message"]  # the upstream's message reaches the caller
    assert err["retryable"] is False
    assert (a.posts, b.posts) == (1, 0)
    used = bk.used(tok)
    assert (used["tokens"], used["inflight"]) == (0, 0)


def test_upstream_429_is_retried_then_surfaced_with_retry_after(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.mode = b.mode = "error429"
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint()],
            "routes": [{"name": "r", "targets": [a.name, b.name], "policy": "round_robin"}],
            "retry": {"attempts": 2, "backoff_ms": 1},
            "circuit": {"failures": 1},
        }
    )
    tok = bk.token()
    r = bk.chat(tok)
    err = error_of(r, 429)
    assert err["retryable"] is True
    assert "slow down" in err["message"]
    assert err["retry_after_ms"] == 1000
    assert r.headers["retry-after"] == "1"
    assert (a.posts, b.posts) == (1, 1)
    # 429s are the upstream being busy, not broken: no circuit opens (failures: 1).
    a.mode = b.mode = "ok"
    assert {bk.served(tok) for _ in range(4)} == {a.name, b.name}


def test_fallbacks_only_after_the_route_targets(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b, f = ups("a"), ups("b"), ups("f")
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint(), f.endpoint()],
            "routes": [{"name": "r", "targets": [a.name, b.name], "fallbacks": [f.name]}],
            "retry": {"attempts": 3, "backoff_ms": 1},
            "circuit": {"failures": 100},
        }
    )
    tok = bk.token()
    assert {bk.served(tok) for _ in range(6)} <= {a.name, b.name}
    assert f.posts == 0
    a.mode = b.mode = "error500"
    assert bk.served(tok) == f.name
    assert (a.posts + b.posts, f.posts) == (8, 1)  # both targets were tried first
    a.mode = b.mode = f.mode = "error500"
    err = error_of(bk.chat(tok), 502, "upstream_error")
    assert err["retryable"] is True
    assert f.posts == 2
    # Streams fail over the same way (the error comes before the first byte is relayed).
    f.mode = "ok"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = bk.post("/v1/chat/completions", body, tok)
    assert r.status_code == 200, r.text
    assert r.headers["x-agentbus-endpoint"] == f.name
    assert sse_events(r)[-1] == b"[DONE]"
    assert (a.posts + b.posts, f.posts) == (12, 3)


def test_endpoint_max_concurrency_is_respected(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.delay_s = b.delay_s = 1.5
    bk.configure({"endpoints": [a.endpoint(max_concurrency=1), b.endpoint(max_concurrency=1)]})
    tok = bk.token()
    results = concurrent([lambda: bk.chat(tok) for _ in range(3)])
    assert sorted(r.status_code for r in results) == [200, 200, 503]
    assert {r.headers["x-agentbus-endpoint"] for r in results if r.status_code == 200} == {a.name, b.name}
    err = error_of(next(r for r in results if r.status_code == 503), 503, "no_healthy_endpoint")
    assert err["retryable"] is True and "retry-after" in next(r for r in results if r.status_code == 503).headers
    assert (a.posts, b.posts) == (1, 1)  # nobody queued a second call on a full endpoint
    a.delay_s = b.delay_s = 0
    assert bk.chat(tok).status_code == 200  # the slots are free again


def test_circuit_opens_after_consecutive_failures_then_half_opens(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a"), ups("b")
    a.mode = "error500"
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint()],
            "routes": [{"name": "r", "targets": [a.name], "fallbacks": [b.name]}],
            "retry": {"attempts": 2, "backoff_ms": 1},
            "circuit": {"failures": 2, "cooldown_s": 1.5},
        }
    )
    tok = bk.token()
    assert [bk.served(tok) for _ in range(2)] == [b.name, b.name]
    assert a.posts == 2
    opened = time.monotonic()
    # Open: the endpoint gets no traffic at all.
    for _ in range(4):
        assert bk.served(tok) == b.name
    assert a.posts == 2
    # After the cooldown exactly one trial goes through; it fails, the circuit opens again.
    time.sleep(max(0.0, opened + 1.7 - time.monotonic()))
    assert bk.served(tok) == b.name
    assert a.posts == 3
    reopened = time.monotonic()
    for _ in range(3):
        assert bk.served(tok) == b.name
    assert a.posts == 3
    # Next cooldown: while the (slow, healthy) trial runs, nobody else goes to the endpoint ...
    a.mode, a.delay_s = "ok", 1.5
    time.sleep(max(0.0, reopened + 1.7 - time.monotonic()))
    results = concurrent([lambda: bk.chat(tok) for _ in range(3)])
    assert Counter(r.headers["x-agentbus-endpoint"] for r in results) == {a.name: 1, b.name: 2}
    # ... and its success closes the circuit.
    a.delay_s = 0
    assert {bk.served(tok) for _ in range(3)} == {a.name}


def test_half_open_trial_ending_in_a_client_error_does_not_wedge_the_circuit(
    bk: Bk, ups: Callable[..., Upstream]
) -> None:
    """BUG (pool.finished): a half-open trial that ends in a non-counting failure (an
    upstream 4xx or 429, or the caller going away) returns early and leaves
    ``half_open_trial`` set, so ``available()`` is False forever and the endpoint never
    gets traffic again."""
    a, b = ups("a"), ups("b")
    a.mode = "error500"
    bk.configure(
        {
            "endpoints": [a.endpoint(), b.endpoint()],
            "routes": [{"name": "r", "targets": [a.name], "fallbacks": [b.name]}],
            "retry": {"attempts": 2, "backoff_ms": 1},
            "circuit": {"failures": 1, "cooldown_s": 0.5},
        }
    )
    tok = bk.token()
    assert bk.served(tok) == b.name  # a fails once: open
    time.sleep(0.7)
    a.mode = "error400"
    error_of(bk.chat(tok), 400)  # the half-open trial: a client error, not an endpoint failure
    assert a.posts == 2
    a.mode = "ok"
    deadline = time.monotonic() + 5
    while bk.served(tok) != a.name:
        assert time.monotonic() < deadline, "the endpoint never got traffic again after its half-open trial"
        time.sleep(0.2)


def test_transient_error_on_a_single_endpoint_is_retried(bk: Bk, ups: Callable[..., Upstream]) -> None:
    """BUG (service._attempts): ``retry.attempts`` counts tries "across endpoints", but an
    endpoint is never tried twice, so with one endpoint (or fewer endpoints than attempts)
    a transient 500 is never retried and the backoff never matters."""
    a = ups("a")
    a.fail_next = 1
    bk.configure({"endpoints": [a.endpoint()], "retry": {"attempts": 3, "backoff_ms": 1}})
    tok = bk.token()
    r = bk.chat(tok)
    assert r.status_code == 200, r.text
    assert a.posts == 2


# =========================================================================== faults and deadlines


def test_hanging_upstream_gives_504_within_the_time_budget(bk: Bk, ups: Callable[..., Upstream]) -> None:
    h = ups("h")
    h.mode = "hang"
    bk.configure({"endpoints": [h.endpoint()]})
    tok = bk.token()
    # The client's own timeout (20 s) bounds the test; the upstream would hang for an hour.
    err = error_of(bk.chat(tok, headers={"X-Timeout-Budget-Ms": "300"}), 504)
    assert err["code"] in ("upstream_timeout", "deadline_exceeded")
    deadline = f"{time.time() + 0.5:.3f}"
    err = error_of(bk.chat(tok, headers={"X-Agent-Deadline": deadline}), 504)
    assert err["code"] in ("upstream_timeout", "deadline_exceeded")
    assert h.posts == 2
    used = bk.used(tok)
    assert (used["tokens"], used["inflight"]) == (0, 0)  # both reservations were released


def test_time_budget_bounds_the_whole_call_not_each_read(bk: Bk) -> None:
    """BUG (service._attempts): the remaining budget becomes an httpx *per-read* timeout, so
    an upstream that keeps sending a little at a time holds a call far past the caller's
    time budget. Here the body takes 12 x 0.25 s = 3 s to arrive; the budget is 800 ms."""
    slow = RawUpstream(f"trickle-{uuid.uuid4().hex[:6]}", mode="trickle").start()
    try:
        bk.configure({"endpoints": [slow.endpoint()], "retry": {"attempts": 1}})
        tok = bk.token()
        r = bk.chat(tok, headers={"X-Timeout-Budget-Ms": "800"})
        assert slow.posts == 1
        assert r.status_code == 504, f"a 3 s answer was relayed under an 800 ms budget: {r.status_code}"
        error_of(r, 504)
    finally:
        slow.stop()


@pytest.mark.parametrize("limited", [True, False], ids=["with-budget", "unlimited"])
def test_client_leaving_a_stream_frees_the_endpoint_and_settles(
    bk: Bk, ups: Callable[..., Upstream], limited: bool
) -> None:
    """A caller with a budget holds a reservation while streaming (inflight 1); one without
    any limit reserves nothing and is charged once at the end. Either way the hang-up frees
    the endpoint and what was streamed is counted."""
    endless = ups("a", completion_words=1_000_000)  # ~20 minutes of chunks
    bk.configure({"endpoints": [endless.endpoint(max_concurrency=1)]})
    tok = bk.token(budgets={"max_tokens": 10_000_000} if limited else None)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on forever"}], "stream": True}
    with bk.http.stream("POST", "/v1/chat/completions", json=body, headers=auth(tok)) as r:
        assert r.status_code == 200
        # Keep the iterator: a dropped one is closed at once, which hangs up the stream.
        chunks = r.iter_bytes()
        first = next(chunks)
        assert first.startswith(b"data: ") and b'"delta"' in first, first
        assert bk.used(tok)["inflight"] == (1 if limited else 0), first
    # The caller hung up: the broker must notice, stop relaying, settle and free the slot.
    deadline = time.monotonic() + 15
    while (used := bk.used(tok))["inflight"] != 0 or used["requests"] != 1:
        assert time.monotonic() < deadline, f"the abandoned stream was never settled: {used}"
        time.sleep(0.1)
    assert used["tokens"] > 0  # what was streamed before the hang-up is charged
    endless.completion_words = 5
    # max_concurrency is 1: this only gets through if the abandoned stream gave its slot back.
    assert bk.served(tok) == endless.name


def test_connection_reset_is_retried_elsewhere_or_502(bk: Bk, ups: Callable[..., Upstream]) -> None:
    uid = uuid.uuid4().hex[:6]
    reset = RawUpstream(f"reset-{uid}").start()
    try:
        b = ups("b")
        bk.configure(
            {
                "endpoints": [reset.endpoint(), b.endpoint()],
                "routes": [{"name": "r", "targets": [reset.name], "fallbacks": [b.name]}],
                "retry": {"attempts": 2, "backoff_ms": 1},
            }
        )
        tok = bk.token()
        assert bk.served(tok) == b.name
        assert reset.posts == 1

        bk.configure({"endpoints": [reset.endpoint()], "retry": {"attempts": 1}})
        err = error_of(bk.chat(tok), 502, "upstream_unavailable")
        assert err["retryable"] is True
        assert reset.posts == 2
    finally:
        reset.stop()


def test_non_json_200_is_502_upstream_invalid_response(bk: Bk, ups: Callable[..., Upstream]) -> None:
    g = ups("g")
    g.mode = "garbage"
    bk.configure({"endpoints": [g.endpoint()]})
    tok = bk.token()
    error_of(bk.chat(tok), 502, "upstream_invalid_response")
    used = bk.used(tok)
    assert (used["tokens"], used["inflight"]) == (0, 0)


def test_deadline_headers(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a = ups("a")
    bk.configure({"endpoints": [a.endpoint()]})
    tok = bk.token()

    # An exhausted budget fails fast: nothing upstream, nothing reserved.
    for h in ({"X-Timeout-Budget-Ms": "0"}, {"X-Agent-Deadline": f"{time.time() - 5:.3f}"}):
        err = error_of(bk.chat(tok, headers=h), 504, "deadline_exceeded")
        assert err["type"]
    assert a.posts == 0
    assert bk.used(tok)["requests"] == 0

    for h in (
        {"X-Timeout-Budget-Ms": "soon"},
        {"X-Timeout-Budget-Ms": "-5"},
        {"X-Timeout-Budget-Ms": "nan"},
        {"X-Agent-Deadline": "tomorrow"},
    ):
        error_of(bk.chat(tok, headers=h), 400, "invalid_deadline")
    assert a.posts == 0

    assert bk.served(tok, headers={"X-Timeout-Budget-Ms": "15000"}) == a.name
    assert bk.served(tok, headers={"X-Agent-Deadline": f"{time.time() + 30:.3f}"}) == a.name
    iso = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    assert bk.served(tok, headers={"X-Agent-Deadline": iso}) == a.name
    assert a.posts == 3


def test_non_finite_agent_deadline_is_rejected(bk: Bk, ups: Callable[..., Upstream]) -> None:
    """BUG (service.Deadline.from_headers): ``X-Agent-Deadline: nan`` parses as a float and
    becomes a NaN deadline, which every comparison treats as "no deadline"."""
    a = ups("a")
    bk.configure({"endpoints": [a.endpoint()]})
    tok = bk.token()
    for value in ("nan", "NaN", "-inf"):
        r = bk.chat(tok, headers={"X-Agent-Deadline": value})
        assert r.status_code in (400, 504), (value, r.status_code, r.text)
    assert a.posts == 0


# =========================================================================== identity


def test_identity_is_propagated_upstream(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a = ups("a")
    bk.configure({"endpoints": [a.endpoint(api_key="sk-upstream-secret")]})
    tok = bk.token()
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = bk.chat(
        tok,
        headers={
            "traceparent": trace,
            "tracestate": "vendor=1",
            "X-Agent-Id": "mallory",
            "X-Agent-Tenant": "other-tenant",
        },
    )
    assert r.status_code == 200, r.text
    got = a.requests[-1]["headers"]
    assert got["x-agent-id"] == tok.subject  # from the token, never from the caller's headers
    assert got["x-agent-tenant"] == tok.tenant
    # Same trace; the parent is now the broker's own span for this call.
    assert got["traceparent"].split("-")[1] == trace.split("-")[1]
    assert got["tracestate"] == "vendor=1"
    # The upstream sees the endpoint's key, never the caller's agentbus token.
    assert got["authorization"] == "Bearer sk-upstream-secret"
    assert tok not in str(got)


def test_identity_header_names_are_configurable(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a = ups("a")
    bk.configure(
        {
            "endpoints": [a.endpoint()],
            "identity_headers": {"subject": "X-User", "tenant": "X-Org", "session": "X-Task"},
        }
    )
    tok = bk.token()
    r = bk.chat(tok, headers={"X-Agent-Session": "task-7"})
    assert r.status_code == 200, r.text
    got = a.requests[-1]["headers"]
    assert (got["x-user"], got["x-org"], got["x-task"]) == (tok.subject, tok.tenant, "task-7")
    assert "x-agent-id" not in got
    assert "authorization" not in got  # no api_key configured: no credentials at all


def test_broker_routes_require_a_token_with_broker_invoke(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a = ups("a")
    bk.configure({"endpoints": [a.endpoint()]})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    operator = bk.token(kind="operator")  # bus:read + traces:read, no broker:invoke
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        error_of(bk.post(path, body, None), 401, "missing_token")
        error_of(bk.post(path, body, "ab_" + secrets.token_urlsafe(32)), 401, "invalid_token")
        err = error_of(bk.post(path, body, operator), 403, "missing_scope")
        assert "broker:invoke" in err["message"]
    for path in ("/v1/models", "/v1/budget"):
        error_of(bk.http.get(path), 401, "missing_token")
        error_of(bk.http.get(path, headers=auth(operator)), 403, "missing_scope")
    assert a.posts == 0


# =========================================================================== config


def test_hot_reload_picks_up_changes_and_keeps_serving_on_invalid_config(bk: Bk, ups: Callable[..., Upstream]) -> None:
    a, b = ups("a", models=["m1"]), ups("b", models=["m2"])
    cfg: dict[str, Any] = {"endpoints": [a.endpoint()], "aliases": {"one": "m1"}}
    bk.configure(cfg)
    tok = bk.token()
    assert bk.served(tok, model="one") == a.name
    error_of(bk.chat(tok, model="m2"), 404, "model_not_found")

    # Add an alias and an endpoint: both are served without a restart.
    cfg = {"endpoints": [a.endpoint(), b.endpoint()], "aliases": {"one": "m1", "two": "m2"}}
    bk.configure(cfg)
    assert {"one", "two", "m1", "m2"} <= set(bk.model_ids())
    assert bk.served(tok, model="two") == b.name
    assert b.requests[-1]["body"]["model"] == "m2"
    before = sorted(bk.model_ids())

    # Invalid rewrites are refused: the previous config keeps serving.
    invalid = [
        yaml.safe_dump({**cfg, "aliases": {"three": "no-such-model"}}),
        yaml.safe_dump({**cfg, "routes": [{"name": "r", "targets": ["ghost"]}]}),
        yaml.safe_dump({**cfg, "unknown_field": 1}),
        "endpoints: [\n",
        "- just a list\n",
    ]
    for text in invalid:
        bk.write(text)
        time.sleep(0.6)  # several reload periods
        assert sorted(bk.model_ids()) == before
        assert bk.served(tok, model="two") == b.name
        assert bk.served(tok, model="one") == a.name

    # A valid rewrite after the invalid ones is picked up again.
    bk.configure({"endpoints": [b.endpoint()], "aliases": {"two": "m2"}})
    assert "one" not in bk.model_ids()
    error_of(bk.chat(tok, model="one"), 404, "model_not_found")
    assert bk.served(tok, model="two") == b.name


def test_broker_without_endpoints_is_503_not_configured(bk: Bk) -> None:
    bk.configure({"endpoints": []})
    tok = bk.token()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        err = error_of(bk.post(path, {"model": MODEL, "messages": [], "prompt": "x", "input": "x"}, tok), 503)
        assert err["code"] == "broker_not_configured"
        assert err["retryable"] is True
    r = bk.http.get("/v1/models", headers=auth(tok))
    assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
