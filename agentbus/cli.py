"""The ``agentbus`` command line."""

from __future__ import annotations

import ipaddress
import socket
import sys

import typer
from rich.console import Console

from agentbus.settings import Settings, redact_url

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

    import uvicorn

    overrides = {k: val for k, val in {"host": host, "port": port, "workers": workers}.items() if val is not None}
    settings = Settings(**overrides)
    if not is_loopback(settings.host):
        err.print(
            f"[red]refusing to bind {settings.host}:[/] authentication is not enabled in this build, "
            "so agentbus only serves on a loopback address (127.0.0.1, ::1, localhost)."
        )
        raise typer.Exit(2)
    if migrate if migrate is not None else settings.auto_migrate:
        from agentbus.migrate import upgrade

        upgrade(settings.store)
    # Workers are separate processes: they rebuild Settings from the environment.
    for name, val in overrides.items():
        os.environ[f"AGENTBUS_{name.upper()}"] = str(val)
    err.print(
        f"agentbus serving on http://{settings.host}:{settings.port} "
        f"(store {redact_url(settings.store)}, {settings.workers} worker(s)); API docs at /docs"
    )
    uvicorn.run(
        "agentbus.asgi:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=log_level,
        lifespan="on",
        access_log=False,
    )


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


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except Exception as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    app()
