"""Transactions: read, stage writes, commit once - and re-run the whole thing on a conflict.

A transaction reads through a session of its own (a fresh ``X-Agent-Session``), so its read
set holds exactly what *this* transaction read: two transactions of one agent running in
threads or tasks never validate each other's reads. The server does the bookkeeping (the
delivery log); a transaction only stages writes and sends one commit.

Why re-run rather than retry the commit: a 409 means the inputs changed, so the values
computed from them may be wrong. Only re-running the caller's logic on fresh reads is
correct; that is what :func:`transact` and :class:`Retrying` do.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from agentbus_sdk._base import Backoff
from agentbus_sdk._errors import AgentbusError, ConflictError, ReadSetExpired
from agentbus_sdk._models import CommitResult, Shard, ShardInfo, Write

if TYPE_CHECKING:
    from agentbus_sdk._async_client import AsyncSpace
    from agentbus_sdk._client import Space

T = TypeVar("T")

__all__ = ["AsyncAttempt", "AsyncRetrying", "AsyncTransaction", "Attempt", "Retrying", "Transaction"]

TX_BACKOFF = Backoff(initial=0.01, maximum=0.5)
"""Conflicts clear up as fast as the winner commits: start retrying quickly, cap low."""

RERUN = (ConflictError, ReadSetExpired)
"""Errors that mean "your inputs are stale": re-read and run again."""


class _Staging:
    """The staged write set shared by the sync and async transactions."""

    def __init__(self) -> None:
        self._writes: dict[str, Write] = {}
        self.result: CommitResult | None = None
        """The commit's result once committed (None for a transaction that wrote nothing)."""
        self.done = False

    def put(self, key: str, value: Any, *, expected_version: int | None = None) -> None:
        """Stage ``key = value`` (replacing an earlier staged write of the same key)."""
        self._check_open()
        self._writes[key] = Write(key, value, expected_version=expected_version)

    def delete(self, key: str, *, expected_version: int | None = None) -> None:
        """Stage a delete of ``key``."""
        self._check_open()
        self._writes[key] = Write(key, delete=True, expected_version=expected_version)

    @property
    def writes(self) -> list[Write]:
        """The staged writes, in staging order."""
        return list(self._writes.values())

    def _check_open(self) -> None:
        if self.done:
            raise RuntimeError("this transaction has already been committed or rolled back")


class Transaction(_Staging):
    """``with space.transaction() as tx:`` - see :meth:`Space.transaction`.

    Reads (``get``/``read``/``list``) see committed state, not this transaction's own
    staged writes.
    """

    def __init__(self, space: Space) -> None:
        super().__init__()
        self.space = space

    @property
    def session(self) -> str:
        return self.space.session or ""

    def get(self, key: str) -> Shard | None:
        return self.space.get(key)

    def read(self, key: str) -> Shard:
        return self.space.read(key)

    def list(self, prefix: str = "", limit: int | None = None) -> list[ShardInfo]:
        return self.space.list(prefix, limit)

    def commit(self) -> CommitResult | None:
        """Send the staged writes as one commit (done automatically at the end of ``with``).

        A transaction without writes just drops its read set: it has nothing to validate
        against, and leaving the epoch behind would only cost the server space.
        """
        self._check_open()
        self.done = True
        if not self._writes:
            self.space.clear_readset()
            return None
        self.result = self.space.commit(self.writes)
        return self.result

    def rollback(self) -> None:
        """Discard staged writes and the read set (best effort: the server expires it anyway)."""
        if self.done:
            return
        self.done = True
        try:
            self.space.clear_readset()
        except AgentbusError:
            pass

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.rollback()
        elif not self.done:
            self.commit()


class AsyncTransaction(_Staging):
    """``async with space.transaction() as tx:`` - the async :class:`Transaction`."""

    def __init__(self, space: AsyncSpace) -> None:
        super().__init__()
        self.space = space

    @property
    def session(self) -> str:
        return self.space.session or ""

    async def get(self, key: str) -> Shard | None:
        return await self.space.get(key)

    async def read(self, key: str) -> Shard:
        return await self.space.read(key)

    async def list(self, prefix: str = "", limit: int | None = None) -> list[ShardInfo]:
        return await self.space.list(prefix, limit)

    async def commit(self) -> CommitResult | None:
        self._check_open()
        self.done = True
        if not self._writes:
            await self.space.clear_readset()
            return None
        self.result = await self.space.commit(self.writes)
        return self.result

    async def rollback(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            await self.space.clear_readset()
        except AgentbusError:
            pass

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None:
            await self.rollback()
        elif not self.done:
            await self.commit()


# ---------------------------------------------------------------------- transact


def _check_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")


def transact(space: Space, fn: Callable[[Transaction], T], max_attempts: int, backoff: Backoff) -> T:
    _check_attempts(max_attempts)
    for attempt in range(max_attempts):
        try:
            with space.transaction() as tx:
                result = fn(tx)
            return result
        except RERUN:
            if attempt + 1 >= max_attempts:
                raise
            time.sleep(backoff.delay(attempt))
    raise AssertionError("unreachable")


async def atransact(
    space: AsyncSpace, fn: Callable[[AsyncTransaction], Awaitable[T] | T], max_attempts: int, backoff: Backoff
) -> T:
    _check_attempts(max_attempts)
    for attempt in range(max_attempts):
        try:
            async with space.transaction() as tx:
                result = fn(tx)
                if inspect.isawaitable(result):
                    result = await result
            return result  # type: ignore[return-value]
        except RERUN:
            if attempt + 1 >= max_attempts:
                raise
            await asyncio.sleep(backoff.delay(attempt))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- retrying (loop form)


class Attempt:
    """One try of :class:`Retrying`: ``with attempt as tx:`` runs a transaction; a conflict
    at commit (or raised in the block) is swallowed so the loop can try again."""

    def __init__(self, space: Space, number: int) -> None:
        self.number = number
        """1-based attempt number."""
        self.error: AgentbusError | None = None
        self.succeeded = False
        self._space = space
        self._tx: Transaction | None = None

    def __enter__(self) -> Transaction:
        self._tx = self._space.transaction()
        return self._tx

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> bool:
        assert self._tx is not None, "use the attempt as a context manager"
        try:
            self._tx.__exit__(et, ev, tb)
        except RERUN as exc:
            self.error = exc
            return True
        if et is None:
            self.succeeded = True
            return False
        if isinstance(ev, RERUN):
            self.error = ev
            return True
        return False


class Retrying:
    """``for attempt in space.retrying(max_attempts=8): with attempt as tx: ...``

    Stops after the first attempt that committed; after ``max_attempts`` conflicts it raises
    the last :class:`ConflictError`. Code after the ``with`` inside the loop runs on every
    attempt (check ``attempt.succeeded``).
    """

    def __init__(self, space: Space, max_attempts: int, backoff: Backoff) -> None:
        _check_attempts(max_attempts)
        self._space, self._max, self._backoff = space, max_attempts, backoff

    def __iter__(self) -> Iterator[Attempt]:
        for n in range(self._max):
            attempt = Attempt(self._space, n + 1)
            yield attempt
            if attempt.error is None:  # committed, or the block was never entered
                return
            if n + 1 >= self._max:
                raise attempt.error
            time.sleep(self._backoff.delay(n))


class AsyncAttempt:
    """One try of :class:`AsyncRetrying`: ``async with attempt as tx:``."""

    def __init__(self, space: AsyncSpace, number: int) -> None:
        self.number = number
        self.error: AgentbusError | None = None
        self.succeeded = False
        self._space = space
        self._tx: AsyncTransaction | None = None

    async def __aenter__(self) -> AsyncTransaction:
        self._tx = self._space.transaction()
        return self._tx

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._tx is not None, "use the attempt as an async context manager"
        try:
            await self._tx.__aexit__(et, ev, tb)
        except RERUN as exc:
            self.error = exc
            return True
        if et is None:
            self.succeeded = True
            return False
        if isinstance(ev, RERUN):
            self.error = ev
            return True
        return False


class AsyncRetrying:
    """``async for attempt in space.retrying(): async with attempt as tx: ...``"""

    def __init__(self, space: AsyncSpace, max_attempts: int, backoff: Backoff) -> None:
        _check_attempts(max_attempts)
        self._space, self._max, self._backoff = space, max_attempts, backoff

    async def __aiter__(self) -> AsyncIterator[AsyncAttempt]:
        for n in range(self._max):
            attempt = AsyncAttempt(self._space, n + 1)
            yield attempt
            if attempt.error is None:
                return
            if n + 1 >= self._max:
                raise attempt.error
            await asyncio.sleep(self._backoff.delay(n))
