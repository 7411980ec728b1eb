"""The synchronous client: :class:`Client`, :class:`Space` and the commit event stream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from agentbus_sdk import _base
from agentbus_sdk._base import Backoff, ClientConfig
from agentbus_sdk._errors import AgentbusError, NotFoundError, error_from_response
from agentbus_sdk._models import (
    Budget,
    CommitEvent,
    CommitResult,
    Identity,
    Read,
    ReadSet,
    Shard,
    ShardInfo,
    ShardVersion,
    SpaceInfo,
    Write,
    normalize_reads,
    normalize_writes,
)
from agentbus_sdk._transaction import TX_BACKOFF, Retrying, Transaction, transact

if TYPE_CHECKING:
    import openai

T = TypeVar("T")

__all__ = ["Client", "EventStream", "Space"]


class Client:
    """A connection to one agentbus server, safe to share between threads.

    ``token`` is a bearer token (with auth on, it alone names the agent); ``agent_id`` names
    the agent in dev mode; ``session`` separates concurrent tasks of one agent (each gets its
    own read set). Requests that failed without a usable answer (503, connection errors,
    timeouts) are retried up to ``retries`` times with jittered exponential backoff; commits
    carry an ``Idempotency-Key`` so a retried commit applies once.
    """

    def __init__(
        self,
        base_url: str = _base.DEFAULT_URL,
        token: str | None = None,
        agent_id: str | None = None,
        session: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        *,
        backoff: Backoff | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig(
            base_url, token, agent_id, session, timeout, retries, backoff if backoff is not None else Backoff()
        )
        self._http = httpx.Client(
            base_url=self.config.base_url,
            headers=self.config.headers(),
            timeout=self.config.http_timeout(),
            transport=transport,
        )

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """Configured from ``AGENTBUS_URL`` / ``AGENTBUS_TOKEN`` / ``AGENTBUS_AGENT_ID`` /
        ``AGENTBUS_SESSION``; keyword arguments win."""
        transport = overrides.pop("transport", None)
        backoff = overrides.pop("backoff", None)
        c = ClientConfig.from_env(**overrides)
        return cls(
            c.base_url, c.token, c.agent_id, c.session, c.timeout, c.retries, backoff=backoff, transport=transport
        )

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def http(self) -> httpx.Client:
        """The underlying ``httpx.Client`` (base URL and identity headers set), for routes the SDK does not wrap."""
        return self._http

    # ------------------------------------------------------------------ requests
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; return the 2xx response or raise the typed error.

        Retries (same request, same headers - so the same ``Idempotency-Key``) on 503 and on
        failures without a response, honouring the server's ``retry_after``.
        """
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, params=params, json=json, headers=headers)
            except _base.RETRY_NETWORK as exc:
                err: AgentbusError = _base.connection_failed(exc, method, path)
                cause: BaseException | None = exc
            else:
                if resp.status_code < 400:
                    return resp
                err, cause = error_from_response(resp), None
            if attempt >= self.config.retries or not _base.should_retry(err):
                if headers and "Idempotency-Key" in headers:
                    err.idempotency_key = headers["Idempotency-Key"]
                raise err from cause
            time.sleep(self.config.backoff.delay(attempt, err.retry_after))
            attempt += 1

    # ------------------------------------------------------------------ API
    def space(self, name: str) -> Space:
        """A handle on one space (nothing is sent until you read or commit)."""
        return Space(self, name, self.config.session)

    def spaces(self) -> list[SpaceInfo]:
        """Spaces of the caller's tenant (that its token may see)."""
        data = self.request("GET", "/v1/spaces").json()
        return [SpaceInfo.model_validate(s) for s in data["spaces"]]

    def whoami(self) -> Identity:
        return Identity.model_validate(self.request("GET", "/v1/whoami").json())

    def budget(self) -> Budget:
        """The caller's broker budgets: limits, usage and what remains, own and tenant's."""
        return Budget.model_validate(self.request("GET", "/v1/budget").json())

    def openai(self, space: str | None = None, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client that calls the broker as this client's identity.

        ``space`` adds ``X-Agent-Space`` so model calls show up on that space's timeline.
        Extra keyword arguments go to ``openai.OpenAI`` (e.g. ``max_retries``).
        """
        from agentbus_sdk._openai import make_openai

        return make_openai(self.config, space, asynchronous=False, **kwargs)  # type: ignore[return-value]


class Space:
    """One space: read, list and commit shards, follow its log and events.

    Reads are recorded by the server in this client's read set (per agent and session), and
    the next commit is validated against them: if anything read has changed since, the
    commit raises :class:`ConflictError` and nothing is applied.
    """

    def __init__(self, client: Client, name: str, session: str | None) -> None:
        self.client = client
        self.name = name
        self.session = session
        self._headers = {"X-Agent-Session": session} if session else None

    def __repr__(self) -> str:
        return f"Space({self.name!r}, session={self.session!r})"

    def with_session(self, session: str | None) -> Space:
        """The same space seen from another session (another read set)."""
        return Space(self.client, self.name, session)

    def _hdrs(self, extra: Mapping[str, str] | None = None) -> dict[str, str] | None:
        if not extra:
            return self._headers
        return {**(self._headers or {}), **extra}

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> Shard | None:
        """The shard, or None if it does not exist - which the server records as "read as
        absent", so a commit of yours conflicts if someone else creates it meanwhile."""
        try:
            return self.read(key)
        except NotFoundError as exc:
            if exc.code == "shard_not_found":
                return None
            raise

    def read(self, key: str) -> Shard:
        """Like :meth:`get`, but a missing shard raises :class:`NotFoundError`."""
        resp = self.client.request("GET", _base.shard_path(self.name, key), headers=self._headers)
        return Shard.model_validate_json(resp.content)

    def list(self, prefix: str = "", limit: int | None = None) -> list[ShardInfo]:
        """Live shards under ``prefix`` in key order, following cursors (all of them, or the
        first ``limit``). Recorded as a range read: a commit of yours conflicts if anything
        under the prefix is created, changed or deleted meanwhile."""
        out: list[ShardInfo] = []
        if limit is not None and limit <= 0:
            return out
        cursor: str | None = None
        path = _base.space_path(self.name, "shards")
        while True:
            params: dict[str, Any] = {"prefix": prefix}
            if limit is not None:
                params["limit"] = min(limit - len(out), 1000)
            if cursor:
                params["cursor"] = cursor
            data = self.client.request("GET", path, params=params, headers=self._headers).json()
            out.extend(ShardInfo.model_validate(s) for s in data["shards"])
            cursor = data.get("next_cursor")
            if not cursor or (limit is not None and len(out) >= limit):
                return out

    def history(self, key: str, limit: int | None = None, before_version: int | None = None) -> list[ShardVersion]:
        """Versions of ``key``, newest first (tombstones included): all of them, or the first
        ``limit``, older than ``before_version`` if given. Not recorded as a read."""
        out: list[ShardVersion] = []
        path = _base.shard_path(self.name, key) + "/history"
        while limit is None or len(out) < limit:
            page = 1000 if limit is None else min(limit - len(out), 1000)
            params: dict[str, Any] = {"limit": page}
            if before_version is not None:
                params["before_version"] = before_version
            data = self.client.request("GET", path, params=params, headers=self._headers).json()
            batch = [ShardVersion.model_validate(v) for v in data["versions"]]
            out.extend(batch)
            if len(batch) < page:
                break
            before_version = batch[-1].version
        return out

    def log(self, after: int | None = None, limit: int | None = None) -> list[CommitEvent]:
        """Commits after seq ``after``, oldest first: all of them, or the first ``limit``."""
        out: list[CommitEvent] = []
        if limit is not None and limit <= 0:
            return out
        pos = after or 0
        path = _base.space_path(self.name, "log")
        while True:
            page = 1000 if limit is None else min(limit - len(out), 1000)
            data = self.client.request("GET", path, params={"after": pos, "limit": page}, headers=self._headers).json()
            batch = [CommitEvent.model_validate(c) for c in data["commits"]]
            out.extend(batch)
            if len(batch) < page or (limit is not None and len(out) >= limit):
                return out
            pos = batch[-1].seq

    def readset(self) -> ReadSet:
        """What your next commit in this session will be validated against."""
        return ReadSet.model_validate(
            self.client.request("GET", _base.space_path(self.name, "readset"), headers=self._headers).json()
        )

    def clear_readset(self) -> None:
        """Forget what this session read (start a new epoch) without committing."""
        self.client.request("DELETE", _base.space_path(self.name, "readset"), headers=self._headers)

    # ------------------------------------------------------------------ writes
    def commit(
        self,
        writes: Mapping[str, Any] | Iterable[Write],
        reads: Mapping[str, int] | Iterable[Read] | None = None,
        idempotency_key: str | None = None,
    ) -> CommitResult:
        """Atomically apply ``writes`` if everything this session read is still current.

        ``writes``: ``{key: value}`` (``DELETE`` as value deletes) or :class:`Write` objects
        (for ``expected_version``). ``reads`` adds explicit ``{key: version}`` entries that win
        over the recorded ones. Raises :class:`ConflictError` (409, listing every conflicting
        key) - never retried here; use :meth:`transact` to re-run your logic. A commit whose
        response was lost is retried with the same ``Idempotency-Key`` (generated unless
        given), so it applies exactly once.
        """
        body: dict[str, Any] = {"writes": [w.to_json() for w in normalize_writes(writes)]}
        explicit = normalize_reads(reads)
        if explicit:
            body["reads"] = [r.to_json() for r in explicit]
        key = idempotency_key or _base.new_idempotency_key()
        resp = self.client.request(
            "POST", _base.space_path(self.name, "commit"), json=body, headers=self._hdrs({"Idempotency-Key": key})
        )
        data = resp.json()
        data["replayed"] = resp.headers.get("idempotent-replayed") == "true"
        return CommitResult.model_validate(data)

    # ------------------------------------------------------------------ transactions
    def transaction(self) -> Transaction:
        """``with space.transaction() as tx:`` - reads via ``tx`` go to a fresh session of
        their own, ``tx.put``/``tx.delete`` are staged and committed on normal exit (raising
        :class:`ConflictError` on 409); an exception in the block discards them."""
        return Transaction(self.with_session(_base.tx_session(self.session)))

    def transact(self, fn: Callable[[Transaction], T], max_attempts: int = 8, backoff: Backoff = TX_BACKOFF) -> T:
        """Run ``fn(tx)`` in a transaction and commit; on a conflict run it again in a fresh
        one (jittered exponential backoff), up to ``max_attempts`` times. Returns what
        ``fn`` returned for the attempt that committed; raises the last :class:`ConflictError`.
        A :class:`ReadSetExpired` (410) is re-run the same way; any other error propagates."""
        return transact(self, fn, max_attempts, backoff)

    def retrying(self, max_attempts: int = 8, backoff: Backoff = TX_BACKOFF) -> Retrying:
        """``for attempt in space.retrying(): with attempt as tx: ...`` - the loop form of
        :meth:`transact` (the block runs again after a conflict)."""
        return Retrying(self, max_attempts, backoff)

    # ------------------------------------------------------------------ events
    def events(self, last_event_id: int | str | None = None, *, reconnect_timeout: float = 60.0) -> EventStream:
        """Commits as they happen (SSE), starting after ``last_event_id`` (a seq; None = from
        the beginning). The stream reconnects by itself and resumes with ``Last-Event-ID``,
        so no commit is skipped or repeated; it gives up when no connection succeeded for
        ``reconnect_timeout`` seconds. Close it (or use ``with``) when done."""
        return EventStream(self, last_event_id, reconnect_timeout)


class EventStream:
    """Iterator of :class:`CommitEvent` over a reconnecting SSE stream.

    ``last_event_id`` is the seq of the last event delivered: persist it to resume later.
    """

    def __init__(self, space: Space, last_event_id: int | str | None, reconnect_timeout: float) -> None:
        self._space = space
        self._decoder = _base.SSEDecoder(last_event_id=None if last_event_id is None else str(last_event_id))
        self._reconnect_timeout = reconnect_timeout
        self._gen = self._run()

    @property
    def last_event_id(self) -> int | None:
        v = self._decoder.last_event_id
        return int(v) if v is not None and v.isdigit() else None

    def __iter__(self) -> Iterator[CommitEvent]:
        return self

    def __next__(self) -> CommitEvent:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> Iterator[CommitEvent]:
        client = self._space.client
        cfg = client.config
        path = _base.space_path(self._space.name, "events")
        # The server sends a keep-alive comment every 15 s: a longer silence is a dead connection.
        timeout = httpx.Timeout(max(cfg.timeout, 20.0), connect=min(cfg.timeout, 10.0))
        failures = 0
        down_since: float | None = None
        while True:
            headers = dict(self._space._headers or {})
            if self._decoder.last_event_id is not None:
                headers["Last-Event-ID"] = self._decoder.last_event_id
            err: AgentbusError | None = None
            try:
                with client.http.stream("GET", path, headers=headers, timeout=timeout) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        err = error_from_response(resp)
                        if not _base.should_retry(err):
                            raise err
                    else:
                        failures, down_since = 0, None
                        self._decoder.reconnected()
                        for line in resp.iter_lines():
                            ev = self._decoder.feed(line)
                            if ev is not None and ev[0] == "commit":
                                yield CommitEvent.model_validate_json(ev[1])
            except _base.RETRY_NETWORK as exc:
                err = _base.connection_failed(exc, "GET", path)
            if err is None:
                # The server ended the stream cleanly: reconnect after its ``retry:`` hint.
                time.sleep((self._decoder.retry_ms or 0) / 1000.0)
                continue
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if now - down_since > self._reconnect_timeout:
                raise err
            time.sleep(cfg.backoff.delay(failures, err.retry_after))
            failures += 1
