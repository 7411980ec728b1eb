"""Apply the Alembic migrations in ``migrations/`` to a SQL store.

Alembic is configured in code (no alembic.ini at the top level). On PostgreSQL an advisory
lock makes concurrent ``agentbus serve`` starts safe; SQLite serialises DDL by itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

from agentbus.store.sql import async_url

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    return cfg


def is_sql(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "postgres")


def upgrade(url: str, revision: str = "head") -> None:
    if not is_sql(url):
        return
    if not MIGRATIONS.is_dir():
        raise RuntimeError(f"migrations folder not found at {MIGRATIONS}; install agentbus from its repository")
    command.upgrade(alembic_config(url), revision)


def current(url: str) -> None:
    command.current(alembic_config(url), verbose=False)


async def upgrade_async(url: str) -> None:
    await asyncio.to_thread(upgrade, url)
