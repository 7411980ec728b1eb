"""The application factory: one FastAPI app over one store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from agentbus import __version__
from agentbus.api import admin, broker, bus, errors, health, traces
from agentbus.api.fast import FastBus
from agentbus.api.limits import BodyLimit, SecurityHeaders
from agentbus.auth.authenticator import Authenticator
from agentbus.auth.bootstrap import ensure_admin
from agentbus.broker.service import Broker
from agentbus.settings import Settings
from agentbus.store import open_store
from agentbus.telemetry import Telemetry
from agentbus.telemetry.middleware import TracingMiddleware
from agentbus.ui import routes as ui_routes

log = logging.getLogger("agentbus")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    telemetry = Telemetry(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings)
        await store.start()
        app.state.store = store
        app.state.authenticator = Authenticator(store, settings)
        if settings.auth and settings.bootstrap_admin_token is not None:
            await ensure_admin(store, settings.default_tenant, settings.bootstrap_admin_token.get_secret_value())
        await telemetry.start(store)
        broker = Broker(settings, store)
        broker.telemetry = telemetry
        await broker.start()
        app.state.broker = broker
        purger = asyncio.create_task(_purge_forever(store))
        try:
            # The MCP endpoint's session manager lives exactly as long as the app.
            async with app.state.mcp.run(app) if app.state.mcp else contextlib.nullcontext():
                yield
        finally:
            purger.cancel()
            await broker.close()
            await telemetry.close()
            await store.close()

    app = FastAPI(
        title="agentbus",
        version=__version__,
        summary="Shared state bus with read-set validation, and a model broker, for teams of LLM agents.",
        lifespan=lifespan,
        # agentbus has its own server spans and metrics (agentbus.telemetry). FastAPI's
        # native telemetry would otherwise ask OpenTelemetry on every request whether any
        # provider is configured (environment lookups, ~5% of a busy server's CPU), and add
        # a second server span per request once one is.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.commit_signal = bus.CommitSignal()
    app.state.telemetry = telemetry
    errors.install(app)
    app.include_router(health.router)
    app.include_router(bus.router)
    app.include_router(admin.router)
    app.include_router(broker.router)
    app.include_router(traces.router)
    app.state.mcp = None
    if settings.mcp_enabled:
        from agentbus.mcp.mount import LazyMcp

        app.state.mcp = LazyMcp(settings)
        app.add_route("/mcp", app.state.mcp, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    app.include_router(ui_routes.router)
    if settings.sbus_compat:
        from agentbus.api import sbus

        app.include_router(sbus.router)
    if settings.fast_paths:
        app.add_middleware(FastBus)  # innermost: everything below still wraps it
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        # Closed unless configured: browsers may not call the API from other origins.
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "X-Agent-Session",
                "X-Agent-Space",
                "Last-Event-ID",
            ],
        )
    app.add_middleware(TracingMiddleware, telemetry=telemetry)  # outermost: the server span covers everything
    return app


async def _purge_forever(store: object, every_s: float = 300.0) -> None:
    purge = getattr(store, "purge", None)
    if purge is None:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            await purge()
        except Exception:
            log.warning("purge of expired read sets failed", exc_info=True)
