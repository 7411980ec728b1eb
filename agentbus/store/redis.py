"""Redis backend (redis-py asyncio): one Lua script per read, listing and commit.

Atomicity comes from Redis running each script alone, not from any lock in this process, so
any number of bus processes can share one Redis (or one Redis Cluster: every key of a space
shares the hash tag ``{tenant/space}``, so a commit script only touches one slot).

Key layout, with ``B = "{redis_prefix}:{tenant/space}"`` (tenant and space names are plain,
see :mod:`agentbus.core.names`):

=================================  ==========================================================
``B:space``     hash               ``seq`` (commit counter), ``created_at``
``B:meta``      hash               key -> ``"version|deleted|seq|updated_at|updated_by"``
``B:vals``      hash               key -> value JSON text (live shards only)
``B:live``      sorted set         live keys, all score 0: byte-ordered prefix listing
``B:changed``   sorted set         key -> seq of its last write (phantom checks)
``B:hist:KEY``  list               version v at index v-1: ``"<n>|<meta><value>"``
``B:log``       list               commit seq s at index s-1, as a JSON record
``B:ep:N:SUBJECT:SESSION`` hash    the session's epoch (delivery log), expires after
                                   ``readset_retention_s`` counted from its start
``B:idem:N:SUBJECT:IDEMKEY``       ``"status|fingerprint|body"``, expires after
                                   ``idempotency_ttl_s`` (status 0 = pending, see commit)
``{redis_prefix}:spaces:TENANT``   set of the tenant's spaces, for :meth:`list_spaces`
=================================  ==========================================================

(``N`` is the subject's length, so subject and session/key can never be confused.)

The spaces set is outside the space's slot, so the commit script cannot touch it. Like the
SQL store, every commit attempt creates its space; Python then ``SADD``s it to the set: in
the same pipeline as the commit script the first time this process commits to the space
(one round trip, idempotent), and afterwards only when the script reports that it created
the space (i.e. a reset removed it meanwhile), so the hot path sends no extra command.

Tokens and the audit log live under their own hash tag ``{redis_prefix}:{auth}:...`` (see
the tokens section below); ``reset`` of a tenant leaves them alone, as in the SQL store.

What decides what: conflict rules live in :mod:`agentbus.core.validation`. Python loads the
epoch, checks its expiry (``check_epoch``) and builds the guards (``build_guards``); the
commit script repeats only the yes/no check so that check and apply are one atomic step;
on a conflict it returns the heads it observed and ``find_conflicts`` explains them. A commit
costs two round trips: load the epoch (and the idempotency record), then the script.

Failures: connection errors, timeouts and "not now" replies (LOADING, BUSY, READONLY, ...)
become :class:`BackendUnavailable` (503, retryable). redis-py's automatic retries are off,
because re-sending a commit script whose reply was lost could apply it twice; as with any
database, a 503 on a commit means "outcome unknown": retry with an Idempotency-Key.

``redis+cluster://host:port`` connects to a Redis Cluster (redis-py's RedisCluster).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentbus.auth.tokens import AuditEvent, TokenRecord
from agentbus.core import validation as v
from agentbus.core.errors import BackendUnavailable, BadRequest, InternalError, ReadSetExpired
from agentbus.core.model import (
    CommitRecord,
    CommitResult,
    Epoch,
    Guards,
    RangeRead,
    SessionRef,
    Shard,
    ShardMeta,
    StoredOutcome,
)
from agentbus.core.names import encode_cursor
from agentbus.settings import Settings
from agentbus.store.base import CommitOutcome, CommitRequest, HistoryEntry, Listing, Store, outcome_body
from agentbus.store.redis_budget import RedisBudgetStore
from agentbus.store.redis_errors import UNAVAILABLE, is_unavailable, unavailable
from agentbus.store.redis_pool import FairBlockingConnectionPool
from agentbus.store.shadows import NOTHING, EpochShadows

# The commit script says "reload the epoch" when a read of the same session slipped in
# between loading the epoch and running the script; only a session reading in a tight loop
# while committing can make that repeat, so a small bound is plenty.
MAX_EPOCH_RETRIES = 50
# A 409 outcome is stored in two steps (the script leaves a pending marker, Python writes
# the body from core). The marker expires so a process that died in between does not block
# the Idempotency-Key for long; a concurrent retry waits at most this long for the body.
PENDING_TTL_MS = 10_000
PENDING_WAIT_S = 2.0


def _load_script(name: str) -> str:
    common = resources.files("agentbus.store").joinpath("lua/common.lua").read_text()
    body = resources.files("agentbus.store").joinpath(f"lua/{name}.lua").read_text()
    return common + "\n" + body


class _Script:
    """A Lua script run with EVALSHA (loaded on first NOSCRIPT), usable inside pipelines.

    redis-py's own Script objects make every pipeline run SCRIPT EXISTS first, which would
    cost the commit a round trip; here a pipeline is simply re-sent after a NOSCRIPT reply,
    which is safe because a script that was not found did not run.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _load_script(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def args(self, keys: Sequence[str], argv: Sequence[str | int | bytes]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *argv)


def _parse_meta(key: str, raw: bytes) -> ShardMeta:
    ver, deleted, seq, at, by = raw.split(b"|", 4)
    return ShardMeta(
        key=key,
        version=int(ver),
        deleted=deleted == b"1",
        seq=int(seq),
        updated_by=by.decode(),
        updated_at=float(at),
    )


def _parse_history(key: str, raw: bytes) -> HistoryEntry:
    bar = raw.index(b"|")
    n = int(raw[:bar])
    meta = _parse_meta(key, raw[bar + 1 : bar + 1 + n])
    value = raw[bar + 1 + n :]
    return HistoryEntry(
        key=key,
        version=meta.version,
        value_json=None if meta.deleted else value.decode(),
        deleted=meta.deleted,
        seq=meta.seq,
        updated_by=meta.updated_by,
        updated_at=meta.updated_at,
    )


def _parse_epoch(raw: Mapping[bytes, bytes]) -> tuple[Epoch, str] | None:
    """An epoch hash as :class:`Epoch` plus its tag ``"tok:gen"`` (what the commit script
    compares to detect a read that landed after the epoch was loaded)."""
    if not raw or b"started_at" not in raw:
        return None
    epoch = Epoch(
        started_at=float(raw[b"started_at"]),
        overflow=raw.get(b"overflow") == b"1",
        generation=int(raw.get(b"gen", b"0")),
    )
    ranges: list[tuple[str, RangeRead]] = []
    for field, value in raw.items():
        if field.startswith(b"p:"):
            epoch.points[field[2:].decode()] = int(value)
        elif field.startswith(b"r:"):
            ident = field[2:].decode()
            # RangeRead.ident is "prefix|start_after|end_at" ('' for None); keys never hold '|'.
            prefix, start_after, end_at = ident.split("|", 2)
            ranges.append((ident, RangeRead(prefix, start_after or None, end_at or None, int(value))))
    epoch.ranges = [r for _, r in sorted(ranges, key=lambda item: item[0])]
    tag = f"{raw.get(b'tok', b'').decode()}:{raw.get(b'gen', b'0').decode()}"
    return epoch, tag


def _lex_bounds(prefix: str, start_after: str | None) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds for keys starting with ``prefix`` and greater than ``start_after``
    (byte order, as ``COLLATE "C"`` in the SQL stores)."""
    p = prefix.encode()
    lo = b"[" + p if p else b"-"
    if start_after is not None:
        s = start_after.encode()
        if s >= p:
            lo = b"(" + s
    if not p:
        return lo, b"+"
    # Smallest byte string above every string that starts with the prefix.
    stripped = p.rstrip(b"\xff")
    if not stripped:
        return lo, b"+"
    return lo, b"(" + stripped[:-1] + bytes([stripped[-1] + 1])


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(Store):
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        super().__init__(settings)
        self.url = url or settings.store
        self.prefix = settings.redis_prefix
        self.client: Any = None
        self.budgets: RedisBudgetStore
        self._read = _Script("read")
        self._list = _Script("list")
        self._commit = _Script("commit")
        self._history = _Script("history")
        self._expire = _Script("expire")
        self._finalize = _Script("finalize")
        self._token_put = _Script("token_put")
        self._token_revoke = _Script("token_revoke")
        self._audit_add = _Script("audit_add")
        self._trace_append = _Script("trace_append")
        self._retention_ms = str(max(1, int(settings.readset_retention_s * 1000)))
        self._idem_ttl_ms = str(max(1, int(settings.idempotency_ttl_s * 1000)))
        self._max_entries = str(settings.readset_max_entries)
        # (tenant, space) this process has put in the tenant's set of spaces.
        self._registered: set[tuple[str, str]] = set()
        # Sessions this process delivered reads to and has not seen commit since. Only a hint
        # for which commit path to try first: the script re-checks the epoch either way.
        self._readers: dict[SessionRef, None] = {}
        self._shadows = EpochShadows()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Build the client without connecting (like SQLStore): a Redis that is down at
        start-up shows as 503s and a failing /readyz, not as a process that cannot start."""
        # No automatic retries: re-sending a commit script after a timeout could apply it
        # twice. A failed call is a 503 and the client retries (with an Idempotency-Key).
        common: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": 10.0,
            "socket_connect_timeout": 5.0,
            "health_check_interval": 30,
        }
        scheme, rest = self.url.split("://", 1)
        if scheme.endswith("+cluster"):
            from redis.asyncio.cluster import RedisCluster

            plain = scheme.split("+", 1)[0] + "://" + rest
            self.client = RedisCluster.from_url(plain, max_connections=max(32, self.settings.pool_size * 4), **common)
        else:
            pool = FairBlockingConnectionPool.from_url(
                self.url,
                max_connections=max(32, self.settings.pool_size * 4),
                timeout=5.0,
                **common,
            )
            self.client = aioredis.Redis.from_pool(pool)
        # Broker budgets live in the same Redis (SPEC: one backend), like SQLStore.budgets.
        self.budgets = RedisBudgetStore(self.client, self.prefix)

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            try:
                await client.aclose()
            except (*UNAVAILABLE, rexc.RedisError):
                pass

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Map "Redis cannot serve now" to BackendUnavailable (503, retryable), never a 500."""
        if self.client is None:
            await self.start()
        try:
            yield
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise

    async def _eval(self, script: _Script, keys: Sequence[str], argv: Sequence[str | int | bytes]) -> Any:
        """EVALSHA, loading the script once if this Redis has not seen it yet."""
        return await self._eval_args(script.args(keys, argv))

    async def _eval_args(self, args: tuple[Any, ...]) -> Any:
        try:
            return await self.client.execute_command(*args)
        except rexc.NoScriptError:
            await self.client.script_load(self._source_of(args[1]))
            return await self.client.execute_command(*args)

    async def _pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send several commands in one round trip (no MULTI); re-send once after NOSCRIPT."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            missing = [cmd for cmd, res in zip(commands, results, strict=True) if isinstance(res, rexc.NoScriptError)]
            if missing and attempt == 0:
                for source in {self._source_of(cmd[1]) for cmd in missing}:
                    await self.client.script_load(source)
                continue
            for res in results:
                if isinstance(res, Exception):
                    raise res
            return results
        raise AssertionError("unreachable")

    def _source_of(self, sha: str) -> str:
        for script in vars(self).values():
            if isinstance(script, _Script) and script.sha == sha:
                return script.source
        raise KeyError(sha)

    async def ping(self) -> None:
        async with self._guard():
            await self.client.ping()

    # ------------------------------------------------------------------ keys
    def _base(self, tenant: str, space: str) -> str:
        return f"{self.prefix}:{{{tenant}/{space}}}"

    def _epoch_key(self, ref: SessionRef) -> str:
        return f"{self._base(ref.tenant, ref.space)}:ep:{len(ref.subject)}:{ref.subject}:{ref.session}"

    def _idem_key(self, ref: SessionRef, idem: str) -> str:
        return f"{self._base(ref.tenant, ref.space)}:idem:{len(ref.subject)}:{ref.subject}:{idem}"

    def _spaces_key(self, tenant: str) -> str:
        return f"{self.prefix}:spaces:{tenant}"

    def _auth_key(self, *parts: str) -> str:
        """Tokens and audit share one hash tag, so their scripts stay in one cluster slot.
        ("{auth}" cannot collide with a space's "{tenant/space}" tag: it has no "/".)"""
        return ":".join((f"{self.prefix}:{{auth}}", *parts))

    def _clock(self) -> tuple[float, str]:
        """The time as a float and as the text stored in Redis (repr round-trips exactly)."""
        now = self.now()
        return now, repr(now)

    # ------------------------------------------------------------------ reads
    async def read(self, ref: SessionRef, key: str) -> Shard | None:
        b = self._base(ref.tenant, ref.space)
        _, now = self._clock()
        token = uuid.uuid4().hex
        async with self._guard():
            meta_raw, value, did, tok, gen, started = await self._eval(
                self._read,
                (f"{b}:meta", f"{b}:vals", self._epoch_key(ref)),
                (key, now, self._max_entries, self._retention_ms, token),
            )
        self._note_reader(ref)
        meta = _parse_meta(key, meta_raw) if meta_raw is not None else None
        self._follow(ref, key, meta.version if meta else 0, did, tok, int(gen), float(started), token)
        if meta is None or value is None:
            return None
        return Shard(meta=meta, value_json=value.decode())

    def _follow(
        self, ref: SessionRef, key: str, version: int, did: bytes, tok: bytes, gen: int, started: float, token: str
    ) -> None:
        """Feed the shadows with tags ``"tok:gen"``; the read script bumps gen once per change."""
        tag = tok.decode()
        if tok == token.encode():  # this read started the epoch (with our token)
            before = None if gen == 1 else "!"  # "!" matches no copy: anything else is unexpected
        else:
            before = f"{tag}:{gen if did == NOTHING else gen - 1}"
        self._shadows.follow(ref, key, version, did, before, f"{tag}:{gen}", started, gen)

    def _note_reader(self, ref: SessionRef) -> None:
        if len(self._readers) >= 100_000:
            self._readers.clear()
        self._readers[ref] = None

    async def list(self, ref: SessionRef, prefix: str, start_after: str | None, limit: int) -> Listing:
        b = self._base(ref.tenant, ref.space)
        lo, hi = _lex_bounds(prefix, start_after)
        _, now = self._clock()
        # The ident of this range with end_at still unknown; the script appends the last key
        # of the page when more pages follow (RangeRead.ident ends with end_at).
        ident_base = RangeRead(prefix, start_after, None, 0).ident
        async with self._guard():
            has_more, keys, metas = await self._eval(
                self._list,
                (f"{b}:space", f"{b}:live", f"{b}:meta", self._epoch_key(ref)),
                (lo, hi, limit, ident_base, now, self._max_entries, self._retention_ms, uuid.uuid4().hex),
            )
        self._note_reader(ref)
        self._shadows.drop(ref)  # range reads: the commit loads the epoch itself
        items = [_parse_meta(k.decode(), m) for k, m in zip(keys, metas, strict=True) if m is not None]
        cursor = encode_cursor(items[-1].key) if has_more and items else None
        return Listing(items=items, next_cursor=cursor)

    # ------------------------------------------------------------------ epochs
    async def get_epoch(self, ref: SessionRef) -> Epoch | None:
        async with self._guard():
            raw = await self.client.hgetall(self._epoch_key(ref))
        parsed = _parse_epoch(raw)
        return parsed[0] if parsed else None

    async def clear_epoch(self, ref: SessionRef) -> None:
        self._shadows.drop(ref)
        async with self._guard():
            await self.client.delete(self._epoch_key(ref))

    # ------------------------------------------------------------------ commit
    async def commit(self, ref: SessionRef, req: CommitRequest) -> CommitOutcome:
        b = self._base(ref.tenant, ref.space)
        ep_key = self._epoch_key(ref)
        idem_key = self._idem_key(ref, req.idempotency_key) if req.idempotency_key else None
        # A session with no reads recorded (blind writes with expected_version) commits in one
        # round trip: the script is called as if there were no epoch, and answers "E" if there
        # is one after all (read by another process), which sends us down the two-trip path.
        optimistic = self._readers.pop(ref, False) is False
        # Every outcome ends the epoch, so its shadow is used at most once. With a shadow the
        # first try skips loading the epoch; the script's tag check catches a stale shadow.
        shadow = self._shadows.pop(ref)
        async with self._guard():
            for _ in range(MAX_EPOCH_RETRIES):
                parsed: tuple[Epoch, str] | None
                from_shadow = shadow is not None
                if shadow is not None:
                    parsed, shadow = shadow, None
                    optimistic = False
                elif optimistic:
                    optimistic = False
                    parsed = None
                # Round trip 1: the stored outcome (if any) and the epoch.
                elif idem_key is not None:
                    rec, raw_epoch = await self._pipeline((("GET", idem_key), ("HGETALL", ep_key)))
                    if rec is not None:
                        stored = await self._settle(idem_key, rec)
                        if stored is not None:
                            return CommitOutcome(stored=stored)
                        continue
                    parsed = _parse_epoch(raw_epoch)
                else:
                    parsed = _parse_epoch(await self.client.hgetall(ep_key))
                epoch, tag = parsed if parsed else (None, "")
                now, now_text = self._clock()
                try:
                    v.check_epoch(epoch, now=now, ttl_s=self.settings.readset_ttl_s)
                except ReadSetExpired:
                    if from_shadow:
                        # A stored outcome under the Idempotency-Key wins over the 410: take
                        # the path that looks for it first.
                        continue
                    await self._pipeline(
                        (
                            self._expire.args((f"{b}:space", ep_key), (now_text, tag.split(":", 1)[0])),
                            ("SADD", self._spaces_key(ref.tenant), ref.space),
                        )
                    )
                    raise
                guards = v.build_guards(epoch, req.explicit_reads, req.writes)
                commit_id = v.new_commit_id()
                # Round trip 2: validate + apply (one script).
                call = self._commit_call(ref, req, guards, b, ep_key, idem_key, tag, now, now_text, commit_id)
                space_id = (ref.tenant, ref.space)
                registered = space_id in self._registered
                if registered:
                    res = await self._eval_args(call)
                else:
                    res, _ = await self._pipeline((call, ("SADD", self._spaces_key(ref.tenant), ref.space)))
                    if len(self._registered) > 100_000:
                        self._registered.clear()
                    self._registered.add(space_id)
                kind = res[0]
                if registered and kind in (b"OK", b"C") and res[-1] == 1:
                    await self.client.sadd(self._spaces_key(ref.tenant), ref.space)
                if kind == b"OK":
                    versions = {w.key: int(ver) for w, ver in zip(req.writes, res[2], strict=True)}
                    return CommitOutcome(result=CommitResult(commit_id=commit_id, seq=int(res[1]), versions=versions))
                if kind == b"C":
                    return await self._conflict(req, guards, res, idem_key, commit_id, ep_key, tag)
                if kind == b"R":
                    assert idem_key is not None
                    stored = await self._settle(idem_key, res[1])
                    if stored is not None:
                        return CommitOutcome(stored=stored)
                # b"E": a read of this session landed after the epoch was loaded; reload.
            raise BackendUnavailable(
                "the read set of this session kept changing while committing; retry the commit",
                code="commit_contention",
            )

    def _commit_call(
        self,
        ref: SessionRef,
        req: CommitRequest,
        guards: Guards,
        b: str,
        ep_key: str,
        idem_key: str | None,
        tag: str,
        now: float,
        now_text: str,
        commit_id: str,
    ) -> tuple[Any, ...]:
        keys = [f"{b}:space", f"{b}:meta", f"{b}:vals", f"{b}:live", f"{b}:changed", f"{b}:log", ep_key]
        keys += [f"{b}:hist:{w.key}" for w in req.writes]
        if idem_key is not None:
            keys.append(idem_key)
        log_head = orjson.dumps({"commit_id": commit_id, "subject": ref.subject, "session": ref.session, "at": now})
        argv: list[str | int | bytes] = [
            now_text,
            commit_id,
            tag,
            self._idem_ttl_ms,
            req.fingerprint or "",
            log_head[:-1],
            ref.subject,
            len(guards.points),
            len(guards.ranges),
            len(req.writes),
            PENDING_TTL_MS,
        ]
        for g in guards.points:
            argv += [g.key, str(g.version), "e" if g.kind == "expect" else "r"]
        for r in guards.ranges:
            argv += [
                r.prefix,
                "-" if r.start_after is None else "=" + r.start_after,
                "-" if r.end_at is None else "=" + r.end_at,
                str(r.seq),
            ]
        for w in req.writes:
            argv += [w.key, orjson.dumps(w.key), "1" if w.delete else "0", "" if w.delete else (w.value_json or "")]
        return self._commit.args(keys, argv)

    async def _conflict(
        self,
        req: CommitRequest,
        guards: Guards,
        res: list[Any],
        idem_key: str | None,
        commit_id: str,
        ep_key: str,
        tag: str,
    ) -> CommitOutcome:
        """Explain a rejected commit with core (never with Lua), then store that 409 as the
        Idempotency-Key outcome in place of the script's pending marker."""
        _, gkeys, gmetas, ckeys, cmetas, _ = res
        heads: dict[str, ShardMeta | None] = {}
        for k, m in zip(gkeys, gmetas, strict=True):
            key = k.decode()
            heads[key] = _parse_meta(key, m) if m is not None else None
        changed = [_parse_meta(k.decode(), m) for k, m in zip(ckeys, cmetas, strict=True) if m is not None]
        conflicts = v.find_conflicts(guards, heads, changed)
        if not conflicts:
            raise InternalError("the Redis commit script rejected a commit that core validation accepts")
        outcome = CommitOutcome(conflicts=conflicts)
        if idem_key is not None:
            status, body = outcome_body(outcome)
            fp = req.fingerprint or ""
            await self._eval(
                self._finalize,
                (idem_key, ep_key),
                (f"0|{fp}|{commit_id}", f"{status}|{fp}|".encode() + orjson.dumps(body), self._idem_ttl_ms, tag),
            )
        return outcome

    async def _settle(self, idem_key: str, rec: bytes) -> StoredOutcome | None:
        """A stored outcome, waiting briefly while it is another request's pending 409.
        None means the pending marker vanished (its writer died): run the commit afresh."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while rec is not None:
            status, fp, body = rec.split(b"|", 2)
            if status != b"0":
                return StoredOutcome(fingerprint=fp.decode(), status=int(status), body=orjson.loads(body))
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    "a commit with this Idempotency-Key is still being recorded; retry shortly",
                    code="idempotency_pending",
                    retry_after_ms=500,
                )
            await asyncio.sleep(0.01)
            rec = await self.client.get(idem_key)
        return None

    # ------------------------------------------------------------------ inspection
    async def space_exists(self, tenant: str, space: str) -> bool:
        async with self._guard():
            return bool(await self.client.exists(f"{self._base(tenant, space)}:space"))

    async def history(
        self, tenant: str, space: str, key: str, before_version: int | None, limit: int
    ) -> list[HistoryEntry]:
        b = self._base(tenant, space)
        async with self._guard():
            raw = await self._eval(self._history, (f"{b}:hist:{key}",), (before_version or 0, limit))
        return [_parse_history(key, e) for e in reversed(raw)]

    async def log(self, tenant: str, space: str, after_seq: int, limit: int) -> list[CommitRecord]:
        start = max(after_seq, 0)
        async with self._guard():
            raw = await self.client.lrange(f"{self._base(tenant, space)}:log", start, start + limit - 1)
        out: list[CommitRecord] = []
        for item in raw:
            d = orjson.loads(item)
            out.append(
                CommitRecord(
                    seq=int(d["seq"]),
                    commit_id=d["commit_id"],
                    subject=d["subject"],
                    session=d["session"],
                    at=d["at"],
                    writes=d["writes"],
                )
            )
        return out

    async def list_spaces(self, tenant: str) -> list[dict[str, Any]]:
        async with self._guard():
            names = sorted(n.decode() for n in await self.client.smembers(self._spaces_key(tenant)))
            if not names:
                return []
            rows = await self._pipeline(
                [("HMGET", f"{self._base(tenant, n)}:space", "seq", "created_at") for n in names]
            )
        out: list[dict[str, Any]] = []
        for name, (seq, created_at) in zip(names, rows, strict=True):
            if created_at is None:  # registered, but deleted by a concurrent reset
                continue
            out.append({"space": name, "seq": int(seq or 0), "created_at": float(created_at)})
        return out

    async def reset(self, tenant: str) -> None:
        """Delete every key of the tenant under this prefix, epochs of never-committed spaces
        included. Uses SCAN, which is fine for an admin/test operation (never a hot path)."""
        pattern = f"{_glob_escape(self.prefix)}:{{{_glob_escape(tenant)}/*"
        async with self._guard():
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await self._unlink(batch)
                    batch = []
            if batch:
                await self._unlink(batch)
            await self.client.delete(self._spaces_key(tenant))

    async def _unlink(self, keys: list[bytes]) -> None:
        # One command per key: in a cluster the keys of several spaces span slots.
        await self._pipeline([("UNLINK", k) for k in keys])

    async def purge(self) -> int:
        """Trim audit events past ``audit_retention_s``. Epochs and idempotency records need
        nothing: they expire by Redis TTL."""
        cutoff = f"({self.now() - self.settings.audit_retention_s!r}"
        async with self._guard():
            tenants = await self.client.smembers(self._auth_key("audit", "tenants"))
            keys = [self._auth_key("audit", "all")] + [self._auth_key("audit", "t", t.decode()) for t in tenants]
            removed = await self._pipeline([("ZREMRANGEBYSCORE", k, "-inf", cutoff) for k in keys])
        return int(removed[0])

    # ------------------------------------------------------------------ tokens and audit
    # Layout (all under the "{auth}" hash tag): tok:h:HASH hash = the record (string fields,
    # absent = None), tok:id:ID -> HASH, tok:all zset of ids by created_at; audit:all and
    # audit:t:TENANT zsets of "<id>|<event JSON>" scored by time, audit:seq, audit:tenants.
    async def put_token(self, rec: TokenRecord) -> None:
        fields: list[str] = []
        for name, value in _token_fields(rec).items():
            if value is not None:
                fields += [name, value]
        async with self._guard():
            stored = await self._eval(
                self._token_put,
                (
                    self._auth_key("tok", "h", rec.hash),
                    self._auth_key("tok", "id", rec.id),
                    self._auth_key("tok", "all"),
                ),
                (rec.id, rec.hash, repr(rec.created_at), *fields),
            )
        if not stored:
            raise BadRequest("a token with this id or hash already exists", code="token_exists")

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        async with self._guard():
            raw = await self.client.hgetall(self._auth_key("tok", "h", token_hash))
        return _token(token_hash, raw) if raw else None

    async def list_tokens(self, tenant: str | None) -> list[TokenRecord]:
        async with self._guard():
            ids = await self.client.zrange(self._auth_key("tok", "all"), 0, -1)
            if not ids:
                return []
            hashes = await self.client.mget([self._auth_key("tok", "id", i.decode()) for i in ids])
            found = [h.decode() for h in hashes if h is not None]
            raws = await self._pipeline([("HGETALL", self._auth_key("tok", "h", h)) for h in found])
        recs = [_token(h, raw) for h, raw in zip(found, raws, strict=True) if raw]
        return [r for r in recs if tenant is None or r.tenant == tenant]

    async def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        async with self._guard():
            token_hash = await self.client.get(self._auth_key("tok", "id", token_id))
            if token_hash is None:
                return None
            h = token_hash.decode()
            raw = await self._eval(self._token_revoke, (self._auth_key("tok", "h", h),), (repr(at),))
        if not raw:
            return None
        return _token(h, dict(zip(raw[::2], raw[1::2], strict=True)))

    async def has_admin_token(self) -> bool:
        return any(r.kind == "admin" and r.revoked_at is None for r in await self.list_tokens(None))

    async def record_audit(self, event: AuditEvent) -> None:
        async with self._guard():
            await self._eval(
                self._audit_add,
                (
                    self._auth_key("audit", "seq"),
                    self._auth_key("audit", "all"),
                    self._auth_key("audit", "t", event.tenant),
                    self._auth_key("audit", "tenants"),
                ),
                (repr(event.at), orjson.dumps(event.to_json()), event.tenant),
            )

    async def audit_log(self, tenant: str | None, limit: int, before: float | None = None) -> list[AuditEvent]:
        """Newest first (time, then id, descending), like SQLStore.audit_log."""
        key = self._auth_key("audit", "all") if tenant is None else self._auth_key("audit", "t", tenant)
        top = "+inf" if before is None else f"({before!r}"
        async with self._guard():
            raw = await self.client.zrevrangebyscore(key, top, "-inf", start=0, num=limit)
        out: list[AuditEvent] = []
        for member in raw:
            d = orjson.loads(member.split(b"|", 1)[1])
            out.append(
                AuditEvent(
                    at=d["at"],
                    tenant=d["tenant"],
                    subject=d["subject"],
                    action=d["action"],
                    target=d["target"],
                    status=int(d["status"]),
                    client=d["client"],
                    detail=d["detail"],
                )
            )
        return out


def _token_fields(rec: TokenRecord) -> dict[str, str | None]:
    return {
        "id": rec.id,
        "tenant": rec.tenant,
        "subject": rec.subject,
        "kind": rec.kind,
        "scopes": orjson.dumps(sorted(rec.scopes)).decode(),
        "spaces": orjson.dumps(sorted(rec.spaces)).decode() if rec.spaces is not None else None,
        "created_at": repr(rec.created_at),
        "expires_at": repr(rec.expires_at) if rec.expires_at is not None else None,
        "revoked_at": repr(rec.revoked_at) if rec.revoked_at is not None else None,
        "description": rec.description,
        "budgets": orjson.dumps(rec.budgets).decode(),
    }


def _token(token_hash: str, raw: Mapping[bytes, bytes]) -> TokenRecord:
    def opt_float(name: bytes) -> float | None:
        value = raw.get(name)
        return float(value) if value is not None else None

    spaces = raw.get(b"spaces")
    return TokenRecord(
        id=raw[b"id"].decode(),
        hash=token_hash,
        tenant=raw[b"tenant"].decode(),
        subject=raw[b"subject"].decode(),
        kind=raw[b"kind"].decode(),
        scopes=frozenset(orjson.loads(raw[b"scopes"])),
        spaces=frozenset(orjson.loads(spaces)) if spaces is not None else None,
        created_at=float(raw[b"created_at"]),
        expires_at=opt_float(b"expires_at"),
        revoked_at=opt_float(b"revoked_at"),
        description=raw.get(b"description", b"").decode(),
        budgets=orjson.loads(raw.get(b"budgets", b"{}")),
    )
