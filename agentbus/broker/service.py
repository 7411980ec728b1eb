"""The broker: decide where a model call goes, whether it is allowed, and what it cost.

One call: route (rules over request signals) -> reserve budget in the backend -> try
endpoints best-first (policy, then fallbacks) with jittered backoff on retryable errors
only, inside the caller's deadline -> relay the response (streamed or not) -> settle the
reservation with the actual usage and store a usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from agentbus.auth.principal import Principal
from agentbus.broker import budget as b
from agentbus.broker import http
from agentbus.broker.accounting import Accountant
from agentbus.broker.config import BrokerConfig, BrokerConfigError, load_env, load_text
from agentbus.broker.pool import EndpointPool, EndpointState
from agentbus.broker.rules import Signals, choose_route, estimate_tokens, signals_of
from agentbus.core.errors import (
    AgentbusError,
    BackendUnavailable,
    BadGateway,
    BadRequest,
    NotFound,
    RateLimited,
    UpstreamTimeout,
    ValidationFailed,
)
from agentbus.settings import Settings
from agentbus.store.base import Reservation, Store, UsageRecord
from agentbus.telemetry import spans as tel

log = logging.getLogger("agentbus.broker")

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
PASS_HEADERS = ("traceparent", "tracestate")
SWEEP_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class Deadline:
    """Absolute monotonic deadline derived from the caller's whole-task time budget."""

    at: float | None

    @classmethod
    def from_headers(cls, headers: Any) -> Deadline:
        budget = headers.get("x-timeout-budget-ms")
        absolute = headers.get("x-agent-deadline")
        now = time.monotonic()
        if budget is not None:
            try:
                ms = float(budget)
            except ValueError as exc:
                raise BadRequest(
                    "X-Timeout-Budget-Ms must be a number of milliseconds", code="invalid_deadline"
                ) from exc
            if ms != ms or ms < 0:  # NaN or negative
                raise BadRequest("X-Timeout-Budget-Ms must be >= 0", code="invalid_deadline")
            return cls(now + ms / 1000.0)
        if absolute is not None:
            return cls(now + (_parse_wallclock(absolute) - time.time()))
        return cls(None)

    def remaining_ms(self) -> float | None:
        return None if self.at is None else (self.at - time.monotonic()) * 1000.0


def _parse_wallclock(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise BadRequest("X-Agent-Deadline must be a finite time", code="invalid_deadline")
        return seconds
    try:
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(
            "X-Agent-Deadline must be unix seconds or an ISO 8601 timestamp", code="invalid_deadline"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


@dataclass(slots=True)
class CallContext:
    operation: str  # chat | text_completion | embeddings
    path: str  # upstream path after /v1
    body: dict[str, Any]
    principal: Principal
    signals: Signals
    model: str
    upstream_model: str
    route: str
    deadline: Deadline
    started: float
    reservation: Reservation | None = None
    # Scopes of a caller without any limit: nothing is reserved, the usage is charged once
    # at the end (one backend write instead of two). None once charged.
    charge_scopes: dict[str, b.Limits] | None = None
    span: Any = None  # agentbus.telemetry.spans.BrokerTrace


class Broker:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.config = BrokerConfig()
        self.pool = EndpointPool(self.config)
        self.client: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._digest: str | None = None
        self.accounting = Accountant(lambda: self.store.budgets)
        self.telemetry: Any = None  # agentbus.telemetry.Telemetry, set by the app

    @property
    def configured(self) -> bool:
        return bool(self.config.endpoints)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.accounting.start()
        self.config = self._load()
        self.pool = EndpointPool(self.config)
        self.client = http.new_session()
        if self.configured or self.settings.broker_config:
            self._tasks = [
                asyncio.create_task(self.pool.scrape_forever(self.client)),
                asyncio.create_task(self._health_forever()),
                asyncio.create_task(self._reload_forever()),
                asyncio.create_task(self._sweep_forever()),
            ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.client is not None:
            await self.client.close()
        await self.accounting.close()

    def _load(self) -> BrokerConfig:
        if self.settings.broker_config:
            path = Path(self.settings.broker_config)
            text = _read(path)
            cfg = load_text(text, str(path))
            self._digest = _digest(text)
            return cfg
        if self.settings.broker_endpoints:
            return load_env(self.settings.broker_endpoints)
        return BrokerConfig()

    async def _reload_forever(self) -> None:
        if not self.settings.broker_config:
            return
        path = Path(self.settings.broker_config)
        while True:
            await asyncio.sleep(self.settings.broker_reload_s)
            try:
                # By content, not mtime: two writes within one timestamp tick still reload.
                text = await asyncio.to_thread(_read, path)
                digest = _digest(text)
                if digest == self._digest:
                    continue
                cfg = load_text(text, str(path))
            except BrokerConfigError as exc:
                log.error("broker config reload failed, keeping the previous config: %s", exc)
                continue
            self._digest = digest
            self.config = cfg
            self.pool.reconfigure(cfg)
            log.warning("broker config reloaded from %s (%d endpoints)", path, len(cfg.endpoints))

    async def _health_forever(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.gather(*(self._health(st) for st in list(self.pool.states.values())))
            await asyncio.sleep(self.config.health_interval_s)

    async def _health(self, st: EndpointState) -> None:
        assert self.client is not None
        try:
            async with self.client.get(
                f"{st.endpoint.url}/models", headers=self._auth(st), timeout=http.total_timeout(5.0)
            ) as r:
                await r.read()  # read whole, so the connection goes back to the pool
                healthy = r.status == 200
        except (TimeoutError, *http.NETWORK_ERRORS):
            healthy = False
        if healthy != st.healthy:
            log.warning("endpoint %s is now %s", st.endpoint.name, "healthy" if healthy else "unhealthy")
        st.healthy = healthy

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                n = await self.store.budgets.sweep(time.time())
                if n:
                    log.warning("released %d budget reservations of calls that never settled", n)
            except AgentbusError:
                log.warning("budget sweep failed", exc_info=True)

    # ------------------------------------------------------------------ budgets
    def scopes(self, p: Principal) -> dict[str, b.Limits]:
        principal_limits = b.Limits.from_json(p.budgets) if p.budgets else None
        if principal_limits is None:
            principal_limits = b.Limits.from_json(self.config.default_principal_limits.model_dump())
        tenant_cfg = self.config.tenant_limits.get(p.tenant)
        tenant_limits = b.Limits.from_json(tenant_cfg.model_dump() if tenant_cfg else None)
        return {f"p:{p.tenant}/{p.subject}": principal_limits, f"t:{p.tenant}": tenant_limits}

    def price(self, model: str, tokens_in: int, tokens_out: int) -> float:
        p = self.config.prices.get(model)
        if p is None:
            return 0.0
        return (tokens_in * p.input_per_1k + tokens_out * p.output_per_1k) / 1000.0

    def estimate(self, ctx: CallContext) -> b.Amount:
        if ctx.operation == "embeddings":
            out = 0
        else:
            mt = ctx.body.get("max_completion_tokens", ctx.body.get("max_tokens"))
            out = int(mt) if isinstance(mt, int) and mt > 0 else self.config.default_max_tokens
        tin = ctx.signals.context_tokens
        return b.Amount(tokens=tin + out, cost=self.price(ctx.upstream_model, tin, out))

    async def _reserve(self, ctx: CallContext) -> None:
        scopes = self.scopes(ctx.principal)
        if all(b.unlimited(lim) for lim in scopes.values()):
            # Nothing can be denied and no concurrency is capped: count the call at the end.
            ctx.charge_scopes = scopes
            return
        amount = self.estimate(ctx)
        ttl = self._reservation_ttl(ctx)
        res = await self.store.budgets.reserve(scopes, amount, time.time(), ttl)
        if isinstance(res, b.Denial):
            budget = res.reason in ("tokens", "cost", "requests")
            self._record(ctx, None, 0, 0, outcome="denied", status=429)
            never = math.isinf(res.retry_after_s)
            err = RateLimited(
                res.message() + (" and it does not reset" if never else ""),
                code="budget_exceeded" if budget else "rate_limited",
                retry_after_ms=None if never else int(res.retry_after_s * 1000),
                scope=res.scope,
                limit_kind=res.reason,
            )
            if never:
                err.retryable = False
            raise err
        ctx.reservation = res

    def _reservation_ttl(self, ctx: CallContext) -> float:
        remaining = ctx.deadline.remaining_ms()
        longest = max((e.timeout_s for e in self.config.endpoints), default=120.0) * self.config.retry.attempts
        if remaining is not None:
            longest = min(longest, remaining / 1000.0)
        return longest + 60.0

    async def _settle(self, ctx: CallContext, tokens_in: int, tokens_out: int, *, release: bool = False) -> None:
        if ctx.reservation is None and ctx.charge_scopes is None:
            return
        actual = b.Amount(tokens=tokens_in + tokens_out, cost=self.price(ctx.upstream_model, tokens_in, tokens_out))
        if ctx.charge_scopes is not None:
            # No limit depends on it: counted after the answer (broker.accounting).
            scopes, ctx.charge_scopes = ctx.charge_scopes, None
            self.accounting.charge(scopes, actual, time.time(), release=release)
            return
        assert ctx.reservation is not None
        try:
            await self.store.budgets.settle(ctx.reservation, actual, time.time(), release=release)
        except AgentbusError:
            # The sweeper releases it later; the call's result must not be lost over this.
            log.warning("settling a budget reservation failed; the sweeper will release it", exc_info=True)
        ctx.reservation = None

    def _record(
        self,
        ctx: CallContext,
        st: EndpointState | None,
        tokens_in: int,
        tokens_out: int,
        *,
        outcome: str,
        status: int,
        ttft_ms: float | None = None,
        stream: bool = False,
    ) -> None:
        rec = UsageRecord(
            at=time.time(),
            tenant=ctx.principal.tenant,
            subject=ctx.principal.subject,
            session=ctx.principal.session,
            model=ctx.model,
            upstream_model=ctx.upstream_model,
            endpoint=st.endpoint.name if st else "",
            route=ctx.route,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost=self.price(ctx.upstream_model, tokens_in, tokens_out),
            latency_ms=(time.monotonic() - ctx.started) * 1000.0,
            ttft_ms=ttft_ms,
            outcome=outcome,
            status=status,
            stream=stream,
        )
        tel.broker_finish(self, ctx, rec)
        self.accounting.record(rec)

    # ------------------------------------------------------------------ calls
    def context(self, operation: str, path: str, body: Any, principal: Principal, headers: Any) -> CallContext:
        if not self.configured:
            raise BackendUnavailable(
                "the model broker has no endpoints configured (AGENTBUS_BROKER_CONFIG or AGENTBUS_BROKER_ENDPOINTS)",
                code="broker_not_configured",
            )
        if not isinstance(body, dict):
            raise ValidationFailed("request body must be a JSON object", code="invalid_body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ValidationFailed("'model' is required (see GET /v1/models)", code="model_required")
        upstream_model = self.config.resolve(model)
        if not any(upstream_model in e.models for e in self.config.endpoints):
            raise NotFound(
                f"model {model!r} is not served here; available: {', '.join(self.config.served_models())}",
                code="model_not_found",
            )
        if operation == "chat" and not isinstance(body.get("messages"), list):
            raise ValidationFailed("'messages' must be a list", code="invalid_messages")
        signals = signals_of(body, principal)
        route = choose_route(self.config, signals)
        return CallContext(
            operation=operation,
            path=path,
            body=body,
            principal=principal,
            signals=signals,
            model=model,
            upstream_model=upstream_model,
            route=route.name,
            deadline=Deadline.from_headers(headers),
            started=time.monotonic(),
        )

    def _targets(self, ctx: CallContext, exclude: set[str]) -> list[EndpointState]:
        route = next((r for r in self.config.routes if r.name == ctx.route), None)
        if route is None:
            route = choose_route(self.config, ctx.signals)
        primary = self.pool.candidates(route.targets, ctx.upstream_model, exclude)
        ordered = self.pool.order(route.policy, primary, ctx.signals.prefix_key)
        fallbacks = self.pool.candidates(
            route.fallbacks, ctx.upstream_model, exclude | {s.endpoint.name for s in ordered}
        )
        return ordered + fallbacks

    def _auth(self, st: EndpointState) -> dict[str, str]:
        return {"Authorization": f"Bearer {st.endpoint.api_key}"} if st.endpoint.api_key else {}

    def _headers(self, ctx: CallContext, st: EndpointState, incoming: Any) -> dict[str, str]:
        h = {"Content-Type": "application/json", **self._auth(st)}
        ids = self.config.identity_headers
        if "subject" in ids:
            h[ids["subject"]] = ctx.principal.subject
        if "tenant" in ids:
            h[ids["tenant"]] = ctx.principal.tenant
        if ctx.principal.session and "session" in ids:
            h[ids["session"]] = ctx.principal.session
        for name in PASS_HEADERS:
            if incoming.get(name):
                h[name] = incoming[name]
        tel.inject(h)  # the broker call's own span as the upstream's parent
        return h

    def _timeout(self, ctx: CallContext, st: EndpointState) -> float:
        """The call's timeout from what remains of the caller's budget, refusing calls that
        cannot finish: below the endpoint's observed median there is no point trying."""
        limit = st.endpoint.timeout_s
        remaining = ctx.deadline.remaining_ms()
        if remaining is None:
            return limit
        p50 = st.percentile(0.5)
        floor = max(self.config.min_call_timeout_ms, p50 or 0.0)
        if remaining < floor:
            raise UpstreamTimeout(
                f"time budget exhausted: {max(0.0, remaining):.0f} ms left, endpoint {st.endpoint.name} "
                f"needs ~{floor:.0f} ms",
                code="deadline_exceeded",
            )
        return min(limit, remaining / 1000.0)

    async def _backoff(self, ctx: CallContext, attempt: int) -> None:
        r = self.config.retry
        delay = min(r.max_backoff_ms, r.backoff_ms * (2**attempt)) * random.uniform(0.5, 1.0)
        remaining = ctx.deadline.remaining_ms()
        if remaining is not None:
            delay = min(delay, max(0.0, remaining - self.config.min_call_timeout_ms))
        await asyncio.sleep(delay / 1000.0)

    async def call(self, ctx: CallContext, incoming_headers: Any) -> Response:
        with tel.broker_span(self, ctx, incoming_headers):
            remaining = ctx.deadline.remaining_ms()
            if remaining is not None and remaining <= 0:
                raise UpstreamTimeout("the caller's time budget is already exhausted", code="deadline_exceeded")
            await self._reserve(ctx)
            try:
                return await self._attempts(ctx, incoming_headers)
            except BaseException:
                if ctx.reservation is not None or ctx.charge_scopes is not None:
                    await self._settle(ctx, 0, 0, release=True)
                raise

    async def _attempts(self, ctx: CallContext, incoming: Any) -> Response:
        assert self.client is not None
        stream = bool(ctx.body.get("stream")) and ctx.operation != "embeddings"
        payload = dict(ctx.body)
        payload["model"] = ctx.upstream_model
        strip_usage_chunk = False
        if stream:
            opts = dict(payload.get("stream_options") or {})
            if not opts.get("include_usage"):
                opts["include_usage"] = True
                strip_usage_chunk = True
            payload["stream_options"] = opts
        content = orjson.dumps(payload)
        tried: set[str] = set()
        last_error: AgentbusError | None = None
        for attempt in range(self.config.retry.attempts):
            targets = self._targets(ctx, tried)
            if not targets and tried:
                # Every eligible endpoint had its try: the remaining attempts go round again
                # (after the backoff) instead of being dropped.
                targets = self._targets(ctx, set())
            if not targets:
                break
            st = targets[0]
            tried.add(st.endpoint.name)
            timeout = self._timeout(ctx, st)
            outcome = _Outcome()
            self.pool.started(st)
            t0 = time.monotonic()
            try:
                raw = b""
                try:
                    resp = await self.client.post(
                        f"{st.endpoint.url}/{ctx.path}",
                        data=content,
                        headers=self._headers(ctx, st, incoming),
                        timeout=http.call_timeout(timeout, stream=stream),
                    )
                    if not stream or resp.status != 200:
                        # Inside the call's timeout; a body broken off is a failed attempt.
                        try:
                            raw = await resp.read()
                        finally:
                            resp.release()
                except TimeoutError:
                    outcome.fail()
                    last_error = UpstreamTimeout(
                        f"endpoint {st.endpoint.name} did not answer within {timeout:.1f}s", code="upstream_timeout"
                    )
                except http.NETWORK_ERRORS as exc:
                    outcome.fail()
                    last_error = BadGateway(
                        f"endpoint {st.endpoint.name} failed: {type(exc).__name__}", code="upstream_unavailable"
                    )
                else:
                    if resp.status == 200:
                        if stream:
                            outcome.handed_off = True
                            return self._relay_stream(ctx, st, resp, t0, strip_usage_chunk)
                        return await self._finish_json(ctx, st, raw, t0, outcome)
                    err = self._upstream_error(st, resp.status, resp.headers, raw)
                    outcome.fail(counts=resp.status >= 500)
                    if resp.status not in RETRYABLE_STATUS:
                        self._record(ctx, st, 0, 0, outcome="error", status=err.status, stream=stream)
                        raise err
                    last_error = err
            finally:
                # Exactly once per attempt, also when the caller disconnects mid-call.
                if not outcome.handed_off:
                    self.pool.finished(
                        st, ok=outcome.ok, latency_ms=outcome.latency_ms, counts_as_failure=outcome.counts
                    )
            if attempt + 1 < self.config.retry.attempts:
                await self._backoff(ctx, attempt)
        if last_error is None:
            last_error = BackendUnavailable(
                f"no healthy endpoint serves {ctx.upstream_model!r} right now (circuits open or at capacity)",
                code="no_healthy_endpoint",
                retry_after_ms=int(self.config.circuit.cooldown_s * 1000),
            )
        self._record(ctx, None, 0, 0, outcome="error", status=last_error.status, stream=stream)
        raise last_error

    def _upstream_error(self, st: EndpointState, status: int, headers: Any, raw: bytes) -> AgentbusError:
        detail = ""
        try:
            data = orjson.loads(raw)
            err = data.get("error") if isinstance(data, dict) else None
            detail = (err.get("message") if isinstance(err, dict) else str(err or data))[:500]
        except orjson.JSONDecodeError:
            detail = raw[:200].decode(errors="replace")
        msg = f"endpoint {st.endpoint.name} answered {status}: {detail}"
        retry_after = headers.get("retry-after")
        if status == 429:
            ms = int(float(retry_after) * 1000) if retry_after and retry_after.isdigit() else 1000
            return RateLimited(msg, code="upstream_rate_limited", retry_after_ms=ms)
        if status in (408, 504):
            return UpstreamTimeout(msg, code="upstream_timeout")
        if status >= 500:
            return BadGateway(msg, code="upstream_error")
        err_cls = ValidationFailed if status == 422 else BadRequest
        e = err_cls(msg, code="upstream_rejected")
        e.status = status if 400 <= status < 500 else 400
        return e

    async def _finish_json(
        self, ctx: CallContext, st: EndpointState, raw: bytes, t0: float, outcome: _Outcome
    ) -> Response:
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (orjson.JSONDecodeError, ValueError) as exc:
            outcome.fail()
            self._record(ctx, st, 0, 0, outcome="error", status=502)
            raise BadGateway(
                f"endpoint {st.endpoint.name} returned a response that is not a JSON object",
                code="upstream_invalid_response",
            ) from exc
        outcome.succeed((time.monotonic() - t0) * 1000.0)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tin = _int(usage.get("prompt_tokens"), ctx.signals.context_tokens)
        tout = _int(usage.get("completion_tokens"), 0)
        await self._settle(ctx, tin, tout)
        self._record(ctx, st, tin, tout, outcome="ok", status=200)
        return Response(raw, media_type="application/json", headers={"X-Agentbus-Endpoint": st.endpoint.name})

    def _relay_stream(
        self, ctx: CallContext, st: EndpointState, resp: aiohttp.ClientResponse, t0: float, strip_usage: bool
    ) -> StreamingResponse:
        state: dict[str, Any] = {"tin": None, "tout": None, "chars": 0, "ttft": None, "ok": False, "closed": False}

        async def relay() -> AsyncIterator[bytes]:
            buf = b""
            try:
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        out = self._inspect_event(event, state, t0, strip_usage)
                        if out is not None:
                            yield out + b"\n\n"
                if buf.strip():
                    out = self._inspect_event(buf, state, t0, strip_usage)
                    if out is not None:
                        yield out + b"\n\n"
                state["ok"] = True
            except (TimeoutError, *http.NETWORK_ERRORS) as exc:
                err = BadGateway(f"endpoint {st.endpoint.name} broke off the stream: {type(exc).__name__}")
                yield b"data: " + orjson.dumps(err.to_body()) + b"\n\n"

        async def on_close() -> None:
            """Runs once however the stream ends: completed, upstream broke, client left."""
            if state["closed"]:
                return
            state["closed"] = True
            ok = bool(state["ok"])
            latency = (time.monotonic() - t0) * 1000.0
            self.pool.finished(st, ok=ok, latency_ms=latency if ok else None, counts_as_failure=not ok)
            if ok:
                resp.release()  # read to the end: the connection goes back to the pool
            else:
                resp.close()  # unread bytes may follow: never reuse this connection
            tin = state["tin"] if state["tin"] is not None else ctx.signals.context_tokens
            tout = state["tout"]
            if tout is None:
                tout = estimate_tokens("x" * state["chars"]) if state["chars"] else 0
            await self._settle(ctx, tin, tout)
            self._record(
                ctx,
                st,
                tin,
                tout,
                outcome="ok" if ok else "error",
                status=200 if ok else 502,
                ttft_ms=state["ttft"],
                stream=True,
            )

        return RelayResponse(
            relay(),
            on_close=on_close,
            media_type="text/event-stream",
            headers={"X-Agentbus-Endpoint": st.endpoint.name, "Cache-Control": "no-cache"},
        )

    def _inspect_event(self, event: bytes, state: dict[str, Any], t0: float, strip_usage: bool) -> bytes | None:
        """Read usage and content size from one SSE event; drop the usage-only chunk the
        client did not ask for."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return event
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                return event
            if not isinstance(obj, dict):
                return event
            choices = obj.get("choices") or []
            for ch in choices:
                if not isinstance(ch, dict):
                    continue
                delta = ch.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                text = text if isinstance(text, str) else ch.get("text") if isinstance(ch.get("text"), str) else ""
                if text:
                    state["chars"] += len(text)
                    if state["ttft"] is None:
                        state["ttft"] = (time.monotonic() - t0) * 1000.0
            usage = obj.get("usage")
            if isinstance(usage, dict):
                state["tin"] = _int(usage.get("prompt_tokens"), None)
                state["tout"] = _int(usage.get("completion_tokens"), None)
                if strip_usage and not choices:
                    return None
        return event

    # ------------------------------------------------------------------ views
    def models(self) -> dict[str, Any]:
        data = [{"id": m, "object": "model", "owned_by": "agentbus", "created": 0} for m in self.config.served_models()]
        return {"object": "list", "data": data}

    async def budget_view(self, p: Principal) -> dict[str, Any]:
        scopes = self.scopes(p)
        await self.accounting.drain()  # the caller's own calls, counted after their answers
        counters = await self.store.budgets.counters(scopes, time.time())
        return {
            "tenant": p.tenant,
            "subject": p.subject,
            "scopes": {
                key: {
                    "limits": lim.to_json(),
                    "used": counters[key].to_json(),
                    "remaining": b.remaining(counters[key], lim),
                }
                for key, lim in scopes.items()
            },
        }


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise BrokerConfigError(f"{path}: cannot read broker config: {exc}") from exc


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _int(v: Any, default: Any) -> Any:
    return v if isinstance(v, int) and v >= 0 else default


class _Outcome:
    """How one attempt ended, so the endpoint is released exactly once."""

    def __init__(self) -> None:
        self.ok = False
        self.counts = False
        self.latency_ms: float | None = None
        self.handed_off = False

    def fail(self, *, counts: bool = True) -> None:
        self.ok, self.counts = False, counts

    def succeed(self, latency_ms: float) -> None:
        self.ok, self.counts, self.latency_ms = True, False, latency_ms


class RelayResponse(StreamingResponse):
    """A streaming response whose ``on_close`` always runs, shielded from cancellation,
    so budgets settle and endpoint slots free even when the client disconnects."""

    def __init__(self, content: Any, *, on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()
