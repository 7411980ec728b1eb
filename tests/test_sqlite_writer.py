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


def test_only_budget_calls_and_timeline_rows_skip_their_own_fsync(tmp_path: Path) -> None:
    """A reservation and its settle commit with ``synchronous=NORMAL`` (no fsync of their
    own); usage records and counts (the accountant's batches, which fsync them too) and
    commits keep ``FULL``; and the connection is back to ``FULL`` after a relaxed
    transaction, also one that failed."""
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
    assert seen == {"reserve": normal, "settle": normal, "account": full, "failed": normal, "after": full}


def test_queued_transactions_share_one_commit_and_a_failing_one_rolls_back_alone(tmp_path: Path) -> None:
    """Group commit: transactions that queued while the writer was busy run as one SQLite
    transaction, in queue order, each in its own savepoint. One that raises after writing
    is undone alone and gets its exception; the others are applied and answered."""
    from agentbus.store import sqlite as sqlite_mod

    url = f"sqlite:///{tmp_path / 'group.db'}"
    upgrade(url)
    groups: list[int] = []
    real_grouped = sqlite_mod._grouped

    def counting(conn: object, group: list[object]) -> object:
        groups.append(len(group))
        return real_grouped(conn, group)  # type: ignore[arg-type]

    def bad(conn: object) -> None:
        conn.execute("UPDATE shards SET version = version + 100")  # type: ignore[attr-defined]
        raise RuntimeError("refused after writing")

    async def main() -> None:
        store = open_store(Settings(store=url), url)
        await store.start()
        ref = SessionRef("t", "sp", "agent")
        sqlite_mod._grouped = counting  # type: ignore[assignment]
        try:
            await store.commit(ref, CommitRequest((WriteOp("seed", "0"),), {}))
            fd = os.open(tmp_path / "group.db-writer.lock", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # the writer blocks on its first job; the rest queue
                blocker = asyncio.ensure_future(store.commit(ref, CommitRequest((WriteOp("seed", "1"),), {})))
                await asyncio.sleep(0.2)
                jobs = [
                    asyncio.ensure_future(store.commit(ref, CommitRequest((WriteOp(f"k{i}", str(i)),), {})))
                    for i in range(10)
                ]
                failing = asyncio.ensure_future(store._run(bad))  # type: ignore[attr-defined]
                jobs += [
                    asyncio.ensure_future(store.commit(ref, CommitRequest((WriteOp(f"k{i}", str(i)),), {})))
                    for i in range(10, 20)
                ]
                await asyncio.sleep(0.2)
                fcntl.flock(fd, fcntl.LOCK_UN)
                assert (await asyncio.wait_for(blocker, 30)).result is not None
                outcomes = await asyncio.wait_for(asyncio.gather(*jobs), 30)
                try:
                    await asyncio.wait_for(failing, 30)
                    raise AssertionError("the failing job did not fail")
                except RuntimeError as exc:
                    assert "refused after writing" in str(exc)
            finally:
                os.close(fd)
            assert [o.result.versions for o in outcomes] == [{f"k{i}": 1} for i in range(20)]  # type: ignore[union-attr]
            # Queue order: each commit got the next sequence number of the space.
            seqs = [o.result.seq for o in outcomes]  # type: ignore[union-attr]
            assert seqs == sorted(seqs) and len(set(seqs)) == 20
            for i in (0, 19):
                shard = await store.read(ref, f"k{i}")
                assert shard is not None and shard.meta.version == 1
            seed = await store.read(ref, "seed")
            assert seed is not None and seed.meta.version == 2
        finally:
            sqlite_mod._grouped = real_grouped  # type: ignore[assignment]
            await store.close()
        # The 21 queued transactions went in one group (MAX_GROUP is larger than that).
        assert groups == [21], groups

    asyncio.run(main())
