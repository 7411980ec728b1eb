"""The agentbus MCP server: bus and broker as MCP tools (SPEC: "MCP").

There is one implementation of the tools, :func:`build_server`. Every tool is a call to the
bus's own HTTP API through an ``httpx.AsyncClient``, made with the MCP caller's identity, so
MCP gets exactly the identity, scope, read-set and conflict semantics of HTTP; nothing of
the bus is re-implemented here. A :class:`BusLink` says how a tool reaches the bus:

* :class:`McpMount` (``/mcp`` on the agentbus app, streamable HTTP): the bus is the same
  FastAPI app, called in-process through ``httpx.ASGITransport``; the MCP request's
  ``Authorization`` header (or, in dev mode, ``X-Agent-Id``) is forwarded on every call.
  Unauthenticated MCP requests get 401 in the service's one error shape before the MCP SDK
  sees them.
* :class:`StaticLink` (``agentbus mcp``, stdio): a normal HTTP client to a remote bus with
  fixed credentials.

Read sets: each MCP session reads and commits under its own ``X-Agent-Session``, so two
sessions of one agent never mix their read sets:

* streamable HTTP with the initialize handshake (protocol <= 2025-11-25): ``mcp-<Mcp-Session-Id>``;
* stdio: ``mcp-<uuid>`` per server process (or ``--session``);
* 2026-07-28 requests carry no session: ``mcp`` (one read set per agent) unless the client
  names one itself with an ``X-Agent-Session`` header, which always wins and is forwarded
  verbatim (so an agent may deliberately share a read set between MCP and plain HTTP).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Protocol
from urllib.parse import quote

import httpx
import orjson
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from agentbus import __version__
from agentbus.core.errors import AgentbusError, BackendUnavailable, BadGateway, ValidationFailed
from agentbus.core.names import check_space

if TYPE_CHECKING:
    from fastapi import FastAPI

    from agentbus.settings import Settings

BUS = "http://agentbus"
"""Base URL of the in-process bus (never resolved: requests go through ASGITransport)."""

FORWARDED = ("authorization", "x-agent-id", "x-agent-deadline", "x-timeout-budget-ms", "traceparent", "tracestate")
"""Headers of an MCP request that are passed on to the bus with every tool call."""

INSTRUCTIONS = """\
agentbus: shared, versioned state for teams of agents, plus a model broker.

State lives in *shards* (key -> any JSON value, with a version) inside *spaces*. To change
shared state safely:
1. read what your change depends on (read_shard, list_shards); agentbus records each read
   in your read set (a missing shard is recorded as read at version 0);
2. commit your writes. The commit is atomic and is refused if anything you read (or a prefix
   you listed) changed since you read it: the tool then returns an error with every
   conflicting key, its kind (stale_read, write_conflict, phantom), the version you read,
   the current version and who committed it. Re-read those keys and try again.
Every commit, successful or not, starts a new read set. Use history/commit_log to see who
changed what. chat and complete call language models through the agentbus broker under
your identity and budget."""


# --------------------------------------------------------------------------- links


class BusLink(Protocol):
    """How the tools reach the bus: an HTTP client and the headers of the current caller."""

    @property
    def client(self) -> httpx.AsyncClient: ...

    def headers(self, ctx: Context) -> dict[str, str]: ...


class StaticLink:
    """A remote bus with fixed credentials (stdio mode): one caller, one read set per process."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @property
    def client(self) -> httpx.AsyncClient:
        return self._client

    def headers(self, ctx: Context) -> dict[str, str]:
        return {}  # the client carries them


def request_headers(ctx: Context) -> Mapping[str, str]:
    """Headers of the HTTP request that carried this MCP message (empty on stdio)."""
    try:
        request = ctx.request_context.request
    except ValueError:
        return {}
    return getattr(request, "headers", None) or {}


def session_of(headers: Mapping[str, str]) -> str:
    """The bus session (read set) of an MCP request; see the module docstring."""
    explicit = headers.get("x-agent-session")
    if explicit is not None:
        return explicit
    sid = headers.get("mcp-session-id")
    return f"mcp-{sid}" if sid else "mcp"


# --------------------------------------------------------------------------- results


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def ok(data: dict[str, Any]) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=_dumps(data))], structured_content=data)


def error_result(status: int, body: dict[str, Any]) -> CallToolResult:
    """A tool error (isError) carrying the bus's error body: ``{"status", "error": {...}}``."""
    data = {"status": status, **body}
    err = body["error"]
    text = f"agentbus error {status} {err.get('code')}: {err.get('message')}\n{_dumps(data)}"
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data, is_error=True)


def local_error(exc: AgentbusError) -> CallToolResult:
    return error_result(exc.status, exc.to_body())


def bus_error(r: httpx.Response) -> CallToolResult:
    try:
        body = r.json()
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        body = {
            "error": {
                "type": "internal" if r.status_code >= 500 else "invalid_request",
                "code": f"http_{r.status_code}",
                "message": r.text[:500] or r.reason_phrase,
                "retryable": r.status_code >= 500,
            }
        }
    return error_result(r.status_code, body)


def unreachable(exc: Exception) -> CallToolResult:
    message = f"agentbus did not answer: {exc.__class__.__name__}: {exc}"
    return local_error(BackendUnavailable(message, code="bus_unreachable"))


def _seg(name: str) -> str:
    return quote(name, safe="")


def _key(key: str) -> str:
    return quote(key, safe="/")


def _need(space: str, key: str | None = None) -> CallToolResult | None:
    """Refuse here what cannot even be put into a bus URL (with the bus's own error)."""
    try:
        check_space(space)
    except AgentbusError as exc:
        return local_error(exc)
    if key is not None and not key:
        return local_error(ValidationFailed("invalid key: it must not be empty", code="invalid_key"))
    return None


# --------------------------------------------------------------------------- tool arguments

Space = Annotated[
    str,
    Field(description="Space name: one per multi-agent run or workspace (1-128 of A-Z a-z 0-9 . _ -)."),
]
Key = Annotated[str, Field(description="Shard key, e.g. 'plan' or 'notes/alice'.")]
Model = Annotated[str, Field(description="Model name or alias served by the agentbus broker.")]


class WriteArg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="Shard key to write.")
    value: Any = Field(
        None, description="The new value: any JSON (object, array, string, number, boolean, null); omit it when delete."
    )
    delete: bool = Field(False, description="True deletes the shard (recorded as a new version, a tombstone).")
    expected_version: int | None = Field(
        None,
        ge=0,
        description="Optional compare-and-set: the shard must currently be at this version (0 = must not exist).",
    )

    def to_bus(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.delete:
            out["delete"] = True
        if "value" in self.model_fields_set:
            out["value"] = self.value
        if self.expected_version is not None:
            out["expected_version"] = self.expected_version
        return out


class ReadArg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="Shard key you based the commit on.")
    version: int = Field(ge=0, description="The version you saw (0 = you saw it absent).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, user, assistant or tool.")
    content: str | list[Any] | None = Field(description="The message text (or OpenAI content parts).")


# --------------------------------------------------------------------------- the server


def _quiet_mcpserver(**kwargs: Any) -> MCPServer:
    """MCPServer() calls logging.basicConfig (a root handler); an embedding app keeps its own."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return MCPServer(**kwargs)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def build_server(link: BusLink) -> MCPServer:
    """The MCP server with every agentbus tool, each calling the bus over ``link``."""
    server = _quiet_mcpserver(
        name="agentbus",
        title="agentbus",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
    )
    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    async def send(
        ctx: Context,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response | CallToolResult:
        try:
            return await link.client.request(
                method,
                path,
                json=json,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers={**link.headers(ctx), **(headers or {})},
            )
        except httpx.HTTPError as exc:
            return unreachable(exc)

    @server.tool(
        annotations=reading,
        description="Who you are on the bus: tenant, agent id (subject), scopes, and the session (read set) "
        "this MCP session uses.",
    )
    async def whoami(ctx: Context) -> CallToolResult:
        r = await send(ctx, "GET", "/v1/whoami")
        if isinstance(r, CallToolResult):
            return r
        return ok(r.json()) if r.status_code == 200 else bus_error(r)

    @server.tool(
        annotations=reading,
        description="Read one shard of a space: its value, version and who last wrote it. The read is recorded "
        "in your read set, so a later commit fails if this shard changed meanwhile. A missing shard is not an "
        "error: the result says exists=false, version 0 (and is recorded as read-as-absent).",
    )
    async def read_shard(space: Space, key: Key, ctx: Context) -> CallToolResult:
        if bad := _need(space, key):
            return bad
        r = await send(ctx, "GET", f"/v1/spaces/{_seg(space)}/shards/{_key(key)}")
        if isinstance(r, CallToolResult):
            return r
        if r.status_code == 200:
            return ok({"space": space, "exists": True, **r.json()})
        if r.status_code == 404 and _code(r) == "shard_not_found":
            return ok({"space": space, "key": key, "exists": False, "version": 0, "value": None})
        return bus_error(r)

    @server.tool(
        annotations=reading,
        description="List the shards of a space (keys, versions, last writer), optionally under a key prefix, "
        "in key order. Recorded as a range read: a later commit fails if any shard under the prefix was "
        "created, changed or deleted meanwhile. Page with the returned next_cursor.",
    )
    async def list_shards(
        space: Space,
        ctx: Context,
        prefix: Annotated[str, Field(description="Only keys starting with this prefix ('' = all).")] = "",
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many shards.")] = 100,
        cursor: Annotated[str | None, Field(description="next_cursor of the previous page.")] = None,
    ) -> CallToolResult:
        if bad := _need(space):
            return bad
        r = await send(
            ctx,
            "GET",
            f"/v1/spaces/{_seg(space)}/shards",
            params={"prefix": prefix, "limit": limit, "cursor": cursor},
        )
        if isinstance(r, CallToolResult):
            return r
        return ok({"space": space, "prefix": prefix, **r.json()}) if r.status_code == 200 else bus_error(r)

    @server.tool(
        description="Atomically apply writes to a space, validated against everything you read in this session "
        "(read_shard, list_shards) plus any explicit reads. Success returns the new version of every written "
        "key. If anything you read or write went stale, nothing is applied and the tool returns an error "
        "(status 409) listing every conflicting key with kind (stale_read, write_conflict, phantom), "
        "read_version, current_version and committed_by: re-read those keys, redo your change, commit again. "
        "Either way the commit starts a new read set.",
    )
    async def commit(
        space: Space,
        writes: Annotated[
            list[WriteArg], Field(min_length=1, description="The writes, applied all or nothing; each key once.")
        ],
        ctx: Context,
        reads: Annotated[
            list[ReadArg] | None,
            Field(description="Optional explicit reads (key, version) to validate besides the recorded ones."),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Field(description="Optional: a retried commit with the same key returns the first outcome, applied once."),
        ] = None,
    ) -> CallToolResult:
        if bad := _need(space):
            return bad
        body: dict[str, Any] = {"writes": [w.to_bus() for w in writes]}
        if reads:
            body["reads"] = [r.model_dump() for r in reads]
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        r = await send(ctx, "POST", f"/v1/spaces/{_seg(space)}/commit", json=body, headers=headers)
        if isinstance(r, CallToolResult):
            return r
        return ok({"space": space, **r.json()}) if r.status_code == 200 else bus_error(r)

    @server.tool(
        annotations=reading,
        description="Versions of one shard, newest first: value, version, deleted, who wrote it and when.",
    )
    async def history(
        space: Space,
        key: Key,
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many versions.")] = 20,
        before_version: Annotated[int | None, Field(ge=1, description="Only versions older than this.")] = None,
    ) -> CallToolResult:
        if bad := _need(space, key):
            return bad
        r = await send(
            ctx,
            "GET",
            f"/v1/spaces/{_seg(space)}/shards/{_key(key)}/history",
            params={"limit": limit, "before_version": before_version},
        )
        if isinstance(r, CallToolResult):
            return r
        return ok({"space": space, **r.json()}) if r.status_code == 200 else bus_error(r)

    @server.tool(
        annotations=reading,
        description="Commits of a space, oldest first, after a commit seq: who committed which keys and versions. "
        "Page with next_after.",
    )
    async def commit_log(
        space: Space,
        ctx: Context,
        after: Annotated[int, Field(ge=0, description="Only commits with a larger seq.")] = 0,
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many commits.")] = 50,
    ) -> CallToolResult:
        if bad := _need(space):
            return bad
        r = await send(ctx, "GET", f"/v1/spaces/{_seg(space)}/log", params={"after": after, "limit": limit})
        if isinstance(r, CallToolResult):
            return r
        return ok({"space": space, **r.json()}) if r.status_code == 200 else bus_error(r)

    @server.tool(
        description="Show your current read set in a space (what the next commit will be validated against); "
        "with clear=true, discard it first and start afresh.",
    )
    async def readset(
        space: Space,
        ctx: Context,
        clear: Annotated[bool, Field(description="Discard the read set (start a new one).")] = False,
    ) -> CallToolResult:
        if bad := _need(space):
            return bad
        path = f"/v1/spaces/{_seg(space)}/readset"
        if clear:
            r = await send(ctx, "DELETE", path)
            if isinstance(r, CallToolResult):
                return r
            if r.status_code != 204:
                return bus_error(r)
        r = await send(ctx, "GET", path)
        if isinstance(r, CallToolResult):
            return r
        return ok({"space": space, **r.json()}) if r.status_code == 200 else bus_error(r)

    @server.tool(
        description="Ask a language model through the agentbus broker (OpenAI chat completions), under your "
        "identity, budget and rate limits. Give messages, or just a prompt (and optionally a system message).",
    )
    async def chat(
        model: Model,
        ctx: Context,
        messages: Annotated[
            list[ChatMessage] | None, Field(description="The conversation, oldest first (OpenAI format).")
        ] = None,
        prompt: Annotated[str | None, Field(description="Shortcut for one user message.")] = None,
        system: Annotated[str | None, Field(description="Optional system message put first.")] = None,
        max_tokens: Annotated[int | None, Field(ge=1, description="Most tokens to generate.")] = 256,
        temperature: Annotated[float | None, Field(ge=0, le=2, description="Sampling temperature.")] = None,
    ) -> CallToolResult:
        msgs: list[dict[str, Any]] = [m.model_dump(exclude_none=True) for m in messages or []]
        if prompt is not None:
            msgs.append({"role": "user", "content": prompt})
        if not msgs:
            return local_error(ValidationFailed("give messages or a prompt", code="missing_messages"))
        if system is not None:
            msgs.insert(0, {"role": "system", "content": system})
        body: dict[str, Any] = {"model": model, "messages": msgs, "stream": False}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        r = await send(ctx, "POST", "/v1/chat/completions", json=body)
        if isinstance(r, CallToolResult):
            return r
        if r.status_code != 200:
            return bus_error(r)
        data, choice = _completion(r)
        if data is None:
            return bad_gateway(r)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        out: dict[str, Any] = {
            "model": data.get("model", model),
            "content": message.get("content"),
            "finish_reason": choice.get("finish_reason"),
            "usage": data.get("usage"),
        }
        if message.get("tool_calls"):
            out["tool_calls"] = message["tool_calls"]
        if endpoint := r.headers.get("x-agentbus-endpoint"):
            out["endpoint"] = endpoint
        return ok(out)

    @server.tool(
        description="Plain text completion through the agentbus broker (OpenAI completions): the model continues "
        "the prompt. Under your identity, budget and rate limits.",
    )
    async def complete(
        model: Model,
        prompt: Annotated[str, Field(description="Text to continue.")],
        ctx: Context,
        max_tokens: Annotated[int | None, Field(ge=1, description="Most tokens to generate.")] = 128,
        temperature: Annotated[float | None, Field(ge=0, le=2, description="Sampling temperature.")] = None,
        stop: Annotated[list[str] | None, Field(description="Stop sequences.")] = None,
    ) -> CallToolResult:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": False}
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("stop", stop)):
            if value is not None:
                body[name] = value
        r = await send(ctx, "POST", "/v1/completions", json=body)
        if isinstance(r, CallToolResult):
            return r
        if r.status_code != 200:
            return bus_error(r)
        data, choice = _completion(r)
        if data is None:
            return bad_gateway(r)
        out = {
            "model": data.get("model", model),
            "text": choice.get("text"),
            "finish_reason": choice.get("finish_reason"),
            "usage": data.get("usage"),
        }
        if endpoint := r.headers.get("x-agentbus-endpoint"):
            out["endpoint"] = endpoint
        return ok(out)

    return server


def _completion(r: httpx.Response) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """An OpenAI completion body and its first choice; (None, {}) if it is not one."""
    try:
        data = r.json()
    except ValueError:
        return None, {}
    if not isinstance(data, dict):
        return None, {}
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    return data, choice


def bad_gateway(r: httpx.Response) -> CallToolResult:
    message = f"the broker answered something that is not an OpenAI completion: {r.text[:200]!r}"
    return local_error(BadGateway(message, code="bad_upstream_response"))


def _code(r: httpx.Response) -> str | None:
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) else None


# --------------------------------------------------------------------------- mounted mode


class McpMount:
    """``/mcp`` on an agentbus app: streamable HTTP, the app's own authentication, and tools
    that call the same app in-process with the MCP caller's credentials.

    ``create_app`` routes ``/mcp`` to this ASGI callable and enters :meth:`run` in its lifespan.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None
        self._app: FastAPI | None = None
        self.server = build_server(self)
        if settings.auth:
            security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        else:
            # Dev mode has no tokens: refuse requests whose Host/Origin is not loopback, so a web
            # page cannot reach a developer's bus through DNS rebinding.
            security = TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=["127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*", "[::1]", "[::1]:*"],
                allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
            )
        self.server.streamable_http_app(
            transport_security=security,
            max_request_body_size=settings.max_body_bytes,
            stateless_http=settings.mcp_stateless,
        )
        self.sessions = self.server.session_manager

    # BusLink
    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the MCP endpoint is not running (McpMount.run was not entered)")
        return self._client

    def headers(self, ctx: Context) -> dict[str, str]:
        incoming = request_headers(ctx)
        out = {name: incoming[name] for name in FORWARDED if name in incoming}
        out["x-agent-session"] = session_of(incoming)
        return out

    @contextlib.asynccontextmanager
    async def run(self, app: FastAPI) -> AsyncIterator[None]:
        """Run the MCP session manager and the in-process bus client (inside the app's lifespan)."""
        self._app = app
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=BUS, timeout=None) as client:
            self._client = client
            try:
                async with self.sessions.run():
                    yield
            finally:
                self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from agentbus.api.errors import error_response

        app = self._app if self._app is not None else scope.get("app")
        request = Request(scope, receive)
        try:
            user = await self._identify(app, request)
        except AgentbusError as err:
            await error_response(err)(scope, receive, send)
            return
        # The SDK binds each MCP session to the credential that opened it: another caller
        # presenting the session id is answered as if the session did not exist.
        await self.sessions.handle_request({**scope, "user": user}, receive, send)

    async def _identify(self, app: Any, request: Request) -> AuthenticatedUser:
        from agentbus.auth.principal import dev_principal

        if not self.settings.auth:
            p = dev_principal(request)
            token = AccessToken(token="dev", client_id=f"dev:{p.subject}", scopes=[], subject=p.subject)
            return AuthenticatedUser(token)
        principal = await app.state.authenticator.authenticate(request)
        owner = principal.token_id or f"{principal.tenant}/{principal.subject}"
        token = AccessToken(
            token=owner,
            client_id=owner,
            scopes=sorted(principal.scopes),
            subject=f"{principal.tenant}/{principal.subject}",
        )
        return AuthenticatedUser(token)


# --------------------------------------------------------------------------- stdio mode


async def run_stdio(
    url: str,
    *,
    token: str | None = None,
    agent_id: str | None = None,
    session: str | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Serve the tools over stdio against the bus at ``url`` (``agentbus mcp``)."""
    headers = {"X-Agent-Session": session if session is not None else f"mcp-{uuid.uuid4().hex}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if agent_id:
        headers["X-Agent-Id"] = agent_id
    timeout = httpx.Timeout(30.0, read=timeout_s)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        await build_server(StaticLink(client)).run_stdio_async()
