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
