"""SQLite's writer threads take turns through an flock beside the database (agentbus.store.sqlite).

Holding that lock from outside must hold a commit back, and releasing it must let the commit
through: the turn is what orders writers of several processes without SQLite's sleeping busy
handler.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from agentbus.core.model import SessionRef, WriteOp
from agentbus.migrate import upgrade
from agentbus.settings import Settings
from agentbus.store import open_store
from agentbus.store.base import CommitRequest


def test_a_commit_waits_for_the_writer_turn(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'turn.db'}"
    upgrade(url)

    async def main() -> None:
        store = open_store(Settings(store=url), url)
        await store.start()
        ref = SessionRef("t", "sp", "agent")
        try:
            first = await store.commit(ref, CommitRequest((WriteOp("k", "1"),), {}))
            assert first.result is not None
            fd = os.open(tmp_path / "turn.db-writer.lock", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # another process's writer holds the turn
                pending = asyncio.ensure_future(store.commit(ref, CommitRequest((WriteOp("k", "2"),), {})))
                done, _ = await asyncio.wait({pending}, timeout=0.5)
                assert not done, "the commit ran while another writer held the turn"
                fcntl.flock(fd, fcntl.LOCK_UN)
                second = await asyncio.wait_for(pending, 30)
                assert second.result is not None and second.result.versions == {"k": 2}
            finally:
                os.close(fd)
        finally:
            await store.close()

    asyncio.run(main())


def test_only_reservations_and_timeline_rows_skip_their_own_fsync(tmp_path: Path) -> None:
    """A reservation commits with ``synchronous=NORMAL`` (no fsync of its own); the settle
    that ends its call, a commit and usage records keep ``FULL``; and the connection is
    back to ``FULL`` after a relaxed transaction, also one that failed."""
    from agentbus.broker.budget import Amount, Charge, Limits
    from agentbus.store import sqlite_budget

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    upgrade(url)
    seen: dict[str, int] = {}

    def spy(name: str, fn: object) -> object:
        def wrapped(conn: object, *args: object) -> object:
            seen[name] = conn.execute("PRAGMA synchronous").fetchone()[0]  # type: ignore[attr-defined]
            return fn(conn, *args)  # type: ignore[operator]

        return wrapped

    async def main() -> None:
        store = open_store(Settings(store=url), url)
        await store.start()
        try:
            scopes = {"t:t": Limits(max_tokens=1000)}
            orig = (sqlite_budget._reserve, sqlite_budget._settle, sqlite_budget._account)
            sqlite_budget._reserve = spy("reserve", orig[0])  # type: ignore[assignment]
            sqlite_budget._settle = spy("settle", orig[1])  # type: ignore[assignment]
            sqlite_budget._account = spy("account", orig[2])  # type: ignore[assignment]
            try:
                res = await store.budgets.reserve(scopes, Amount(10, 0.0), 1000.0, 60.0)
                await store.budgets.settle(res, Amount(5, 0.0), 1001.0)  # type: ignore[arg-type]
                await store.budgets.account([Charge(scopes=scopes, amount=Amount(1, 0.0), at=1002.0)], [])
            finally:
                sqlite_budget._reserve, sqlite_budget._settle, sqlite_budget._account = orig

            def boom(conn: object) -> None:
                seen["failed"] = conn.execute("PRAGMA synchronous").fetchone()[0]  # type: ignore[attr-defined]
                raise RuntimeError("refused")

            try:
                await store._run(boom, durable=False)  # type: ignore[attr-defined]
            except RuntimeError:
                pass
            seen["after"] = await store._run(  # type: ignore[attr-defined]
                lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
            )
            ref = SessionRef("t", "sp", "agent")
            assert (await store.commit(ref, CommitRequest((WriteOp("k", "1"),), {}))).result is not None
        finally:
            await store.close()

    asyncio.run(main())
    normal, full = 1, 2
    assert seen == {"reserve": normal, "settle": full, "account": full, "failed": normal, "after": full}
