"""The ``agentbus`` command line."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from agentbus.mcp.cli import mcp_command
from agentbus.settings import Settings, redact_url
from agentbus.telemetry.cli import register as register_telemetry_commands

app = typer.Typer(
    help=(
        "agentbus: a shared-state bus with read-set validation for teams of LLM agents.\n\n"
        "Configure with AGENTBUS_* environment variables or a YAML file named by AGENTBUS_CONFIG. "
        "The backend is AGENTBUS_STORE: sqlite:///./agentbus.db (default), postgresql://..., or redis://..."
    ),
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default AGENTBUS_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default AGENTBUS_PORT or 8080)."),
    workers: int = typer.Option(None, help="Uvicorn worker processes (default AGENTBUS_WORKERS or 1)."),
    migrate: bool = typer.Option(None, help="Apply SQL migrations first (default AGENTBUS_AUTO_MIGRATE)."),
    log_level: str = typer.Option("warning", help="Uvicorn log level."),
) -> None:
    """Serve the HTTP API (state bus) with uvicorn."""
    import os

    overrides = {k: val for k, val in {"host": host, "port": port, "workers": workers}.items() if val is not None}
    settings = Settings(**overrides)
    if not settings.auth and not is_loopback(settings.host):
        err.print(
            f"[red]refusing to bind {settings.host} with AGENTBUS_AUTH=false:[/] dev mode (no tokens) is only "
            "allowed on a loopback address (127.0.0.1, ::1, localhost). Enable auth or bind to loopback."
        )
        raise typer.Exit(2)
    if settings.broker_config or settings.broker_endpoints:
        from agentbus.broker.config import BrokerConfigError, load_env, load_file

        try:
            if settings.broker_config:
                load_file(Path(settings.broker_config))
            else:
                load_env(settings.broker_endpoints or "")
        except BrokerConfigError as exc:
            err.print(f"[red]invalid broker config:[/] {exc}")
            raise typer.Exit(2) from exc
    if migrate if migrate is not None else settings.auto_migrate:
        from agentbus.migrate import upgrade

        upgrade(settings.store)
    if settings.auth:
        _bootstrap(settings)
    from agentbus.telemetry.metrics import prepare_multiprocess

    prepare_multiprocess(settings.workers)  # /metrics sums all workers
    # Workers are separate processes: they rebuild Settings from the environment.
    for name, val in overrides.items():
        os.environ[f"AGENTBUS_{name.upper()}"] = str(val)
    err.print(
        f"agentbus serving on http://{settings.host}:{settings.port} "
        f"(store {redact_url(settings.store)}, {settings.workers} worker(s), "
        f"{'bearer-token auth' if settings.auth else 'DEV MODE: no auth, X-Agent-Id names the caller'}); "
        "API docs at /docs"
    )
    from agentbus import workers as worker_procs

    status = worker_procs.serve(
        {
            "app": "agentbus.asgi:app",
            "log_level": log_level,
            "lifespan": "on",
            "access_log": False,
            # uvicorn would otherwise trust X-Forwarded-For from 127.0.0.1: any local caller could
            # choose its client address, evade the failed-auth limit and forge the audit log.
            "proxy_headers": bool(settings.forwarded_allow_ips),
            "forwarded_allow_ips": settings.forwarded_allow_ips or None,
        },
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
    )
    if status:
        raise typer.Exit(status)


@app.command()
def migrate(
    store: str = typer.Option(None, help="Store URL (default AGENTBUS_STORE)."),
    revision: str = typer.Option("head", help="Target revision."),
) -> None:
    """Apply the SQL schema migrations (SQLite/PostgreSQL; a no-op for Redis)."""
    from agentbus.migrate import is_sql, upgrade

    url = store or Settings().store
    if not is_sql(url):
        err.print(f"{redact_url(url)} needs no migrations")
        return
    upgrade(url, revision)
    err.print(f"migrated {redact_url(url)} to {revision}")


@app.command()
def config() -> None:
    """Print the effective settings (credentials redacted) as JSON."""
    import json

    print(json.dumps(Settings().public(), indent=2))


def _run(coro_fn: Any) -> Any:
    """Run ``coro_fn(store)`` against the configured store, outside the server."""
    import asyncio

    from agentbus.store import open_store

    async def go() -> Any:
        store = open_store(Settings())
        await store.start()
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _bootstrap(settings: Settings) -> None:
    from agentbus.auth.bootstrap import ensure_admin

    configured = settings.bootstrap_admin_token.get_secret_value() if settings.bootstrap_admin_token else None
    created = _run(lambda store: ensure_admin(store, settings.default_tenant, configured))
    if created:
        err.print(
            "[bold yellow]First start: created an admin token. It is shown only this once; store it now:[/]\n"
            f"  {created}\n"
            "Create agent tokens with: agentbus token create --subject AGENT_ID"
        )


app.command("mcp")(mcp_command)

register_telemetry_commands(app)  # agentbus trace, agentbus top

token_app = typer.Typer(help="Create, list and revoke bearer tokens (works directly on AGENTBUS_STORE).")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    subject: str = typer.Option(..., help="Agent or operator id the token acts as."),
    tenant: str = typer.Option(None, help="Tenant (default AGENTBUS_DEFAULT_TENANT)."),
    kind: str = typer.Option("agent", help="agent | operator | admin"),
    scope: list[str] = typer.Option(None, help="Scope to grant (repeat); default by kind."),
    space: list[str] = typer.Option(None, help="Restrict to this space (repeat); default all spaces."),
    expires_in: float = typer.Option(None, help="Lifetime in seconds; default never expires."),
    description: str = typer.Option("", help="Free text shown in listings."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a token and print it once."""
    import json

    from agentbus.auth.bootstrap import issue_token
    from agentbus.core.errors import AgentbusError

    settings = Settings()
    try:
        plain, rec = issue_token(
            tenant=tenant or settings.default_tenant,
            subject=subject,
            kind=kind,
            scopes=scope or None,
            spaces=space or None,
            expires_in_s=expires_in,
            description=description,
        )
    except AgentbusError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(2) from exc

    async def put(store: Any) -> None:
        await store.put_token(rec)
        await store.record_audit(_cli_event("token.create", rec.id, {"tenant": rec.tenant, "subject": rec.subject}))

    _run(put)
    if as_json:
        print(json.dumps({"token": plain, **rec.public()}, indent=2))
    else:
        print(plain)
        err.print(f"created {rec.id} for {rec.tenant}/{rec.subject} ({rec.kind}: {', '.join(sorted(rec.scopes))})")


@token_app.command("list")
def token_list(
    tenant: str = typer.Option(None, help="Only this tenant."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List tokens (never their secrets)."""
    import json

    from rich.table import Table

    recs = _run(lambda store: store.list_tokens(tenant))
    if as_json:
        print(json.dumps([r.public() for r in recs], indent=2))
        return
    table = Table("id", "tenant", "subject", "kind", "scopes", "state")
    for r in recs:
        state = "revoked" if r.revoked_at else ("expired" if not r.usable() else "active")
        table.add_row(r.id, r.tenant, r.subject, r.kind, ",".join(sorted(r.scopes)), state)
    Console().print(table)


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="Token id (tok_...).")) -> None:
    """Revoke a token; requests with it get 401 within AGENTBUS_AUTH_CACHE_TTL_S."""
    import time

    async def revoke(store: Any) -> Any:
        rec = await store.revoke_token(token_id, time.time())
        if rec is not None:
            await store.record_audit(_cli_event("token.revoke", token_id, {}))
        return rec

    if _run(revoke) is None:
        err.print(f"[red]error:[/] no token {token_id}")
        raise typer.Exit(1)
    err.print(f"revoked {token_id}")


@app.command()
def audit(
    tenant: str = typer.Option(None, help="Only this tenant."),
    limit: int = typer.Option(50, help="Newest N events."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the audit log: admin actions and denied requests, newest first."""
    import datetime
    import json

    from rich.table import Table

    events = _run(lambda store: store.audit_log(tenant, limit))
    if as_json:
        print(json.dumps([e.to_json() for e in events], indent=2))
        return
    table = Table("when (UTC)", "tenant", "subject", "action", "target", "status", "client")
    for e in events:
        when = datetime.datetime.fromtimestamp(e.at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, e.tenant, e.subject, e.action, e.target, str(e.status), e.client)
    Console().print(table)


def _cli_event(action: str, target: str, detail: dict[str, Any]) -> Any:
    import getpass
    import time

    from agentbus.auth.tokens import AuditEvent

    return AuditEvent(
        at=time.time(),
        tenant="",
        subject=f"cli:{getpass.getuser()}",
        action=action,
        target=target,
        status=200,
        client="cli",
        detail=detail,
    )


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except Exception as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    app()
