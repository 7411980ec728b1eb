"""Record what agents did against an agentbus server, then check the history for anomalies.

Used by the test-suite and by ``bench/``; it imports no pytest. Three parts:

* **Recording** - :class:`Agent` performs reads, listings and commits over plain HTTP and
  appends what it saw to a shared :class:`History`: every read with the version (and value)
  delivered, every listing with the range it covered, every commit with its writes, explicit
  reads, status and response. Reads since the agent's previous commit form the transaction
  that commit closes, exactly as the server's epochs do.
* **Collecting** - :func:`fetch_state` downloads the space's commit log, the full version
  history of every key and the final live heads (:class:`ServerState`).
* **Checking** - :func:`check` replays the commit log in seq order and reports every
  :class:`Anomaly`:

  - the log and the per-key histories agree: seqs strictly increasing (contiguous from 1),
    versions of each key exactly 1..n with increasing seqs, every version belongs to the
    commit with its seq and every commit's writes exist (no partial commit), and each write's
    version is the head's version + 1 at that seq (no lost update inside the store);
  - every acknowledged (200) commit is in the log with the commit id, seq and versions the
    server returned, and each of its values is present exactly once, at that version;
  - no value of a rejected (4xx) commit is present anywhere; a commit whose outcome is
    unknown (transport error, 5xx, server killed) is applied completely or not at all;
  - every committed transaction's reads were current at its commit point: right before its
    seq each key it read (delivery log, or the explicit ``reads`` which win for their key) had
    the version it saw, every ``expected_version`` matched, and every listed range held
    exactly the keys and versions the listing returned (no phantom);
  - every version/value a read returned exists in the history (no dirty or invented read);
  - the final live heads equal the replayed state;
  - the dependency graph over committed transactions (ww, wr and rw edges, Adya's DSG)
    has no cycle.

Written values should be unique (e.g. ``f"{client}-{n}"``) so that a value identifies the
commit that wrote it; pass ``unique_values=False`` for workloads such as counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

COMMITTED = "committed"
ABORTED = "aborted"
UNKNOWN = "unknown"

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def canon(value: Any) -> str:
    """Canonical JSON text of a value: how values are compared and identified."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------- recorded operations
@dataclass(frozen=True)
class ReadOp:
    """A point read: ``version`` None means the shard was absent (404: never written or deleted)."""

    key: str
    version: int | None
    value: Any = None


@dataclass(frozen=True)
class ListOp:
    """One listing page: live keys under ``prefix`` in (start_after, end_at] (end_at None = no bound)."""

    prefix: str
    start_after: str | None
    end_at: str | None
    items: dict[str, int]

    def contains(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        if self.start_after is not None and key <= self.start_after:
            return False
        return not (self.end_at is not None and key > self.end_at)


@dataclass(frozen=True)
class Write:
    key: str
    value: Any = None
    delete: bool = False
    expected_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.delete:
            out["delete"] = True
        else:
            out["value"] = self.value
        if self.expected_version is not None:
            out["expected_version"] = self.expected_version
        return out


@dataclass
class Txn:
    """One commit request and the reads of the epoch it closed."""

    client: str
    session: str
    n: int
    reads: list[ReadOp]
    lists: list[ListOp]
    writes: list[Write]
    explicit_reads: dict[str, int] = field(default_factory=dict)
    idempotency_key: str | None = None
    status: int | None = None
    body: Any = None
    error: str | None = None

    @property
    def name(self) -> str:
        who = f"{self.client}[{self.session}]" if self.session else self.client
        return f"{who}#{self.n}"

    @property
    def outcome(self) -> str:
        if self.status == 200:
            return COMMITTED
        if self.status is None or self.status >= 500:
            return UNKNOWN
        return ABORTED

    @property
    def seq(self) -> int | None:
        return int(self.body["seq"]) if self.outcome == COMMITTED else None

    @property
    def conflict_code(self) -> str | None:
        if self.status == 409 and isinstance(self.body, dict):
            return self.body.get("error", {}).get("code")
        return None

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        if self.status == 409 and isinstance(self.body, dict):
            return list(self.body.get("error", {}).get("conflicts", []))
        return []


@dataclass
class History:
    """Everything a set of agents did in one space."""

    txns: list[Txn] = field(default_factory=list)
    reads: list[tuple[str, ReadOp]] = field(default_factory=list)
    lists: list[tuple[str, ListOp]] = field(default_factory=list)

    def by_outcome(self, outcome: str) -> list[Txn]:
        return [t for t in self.txns if t.outcome == outcome]


class UnexpectedResponse(Exception):
    def __init__(self, what: str, response: httpx.Response) -> None:
        super().__init__(f"{what}: HTTP {response.status_code} {response.text[:500]}")
        self.response = response


def _retryable(resp: httpx.Response) -> bool:
    return resp.status_code == 503


class Agent:
    """One agent (X-Agent-Id, optional X-Agent-Session) that records what it sees.

    ``base_urls`` may name several bus processes; requests rotate over them, which is fine
    because the delivery log lives in the shared store. Reads are retried on 503/transport
    errors; a commit only when it carries an Idempotency-Key (otherwise its outcome is
    recorded as unknown).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_urls: str | Sequence[str],
        space: str,
        agent_id: str,
        *,
        session: str = "",
        history: History | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 5,
    ) -> None:
        self.http = http
        self.urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.space = space
        self.agent_id = agent_id
        self.session = session
        self.history = history if history is not None else History()
        self.timeout = timeout
        self.retries = retries
        self.headers = {"X-Agent-Id": agent_id}
        if session:
            self.headers["X-Agent-Session"] = session
        self._turn = random.randrange(len(self.urls))
        self.epoch_reads: list[ReadOp] = []
        self.epoch_lists: list[ListOp] = []
        self.observed: dict[str, int | None] = {}
        self.n = 0

    def _url(self, path: str) -> str:
        self._turn = (self._turn + 1) % len(self.urls)
        return f"{self.urls[self._turn]}/v1/spaces/{self.space}{path}"

    async def _request(self, method: str, path: str, *, retry: bool, **kw: Any) -> httpx.Response:
        attempt = 0
        headers = {**self.headers, **kw.pop("headers", {})}
        while True:
            try:
                resp = await self.http.request(method, self._url(path), headers=headers, timeout=self.timeout, **kw)
            except httpx.TransportError:
                if not retry or attempt >= self.retries:
                    raise
            else:
                if not (retry and _retryable(resp) and attempt < self.retries):
                    return resp
            attempt += 1
            await asyncio.sleep(0.05 * attempt)

    async def read(self, key: str) -> ReadOp:
        resp = await self._request("GET", f"/shards/{quote(key)}", retry=True)
        if resp.status_code == 200:
            body = resp.json()
            op = ReadOp(key, int(body["version"]), body["value"])
        elif resp.status_code == 404 and resp.json().get("error", {}).get("code") == "shard_not_found":
            op = ReadOp(key, None)
        else:
            raise UnexpectedResponse(f"GET {key}", resp)
        self.epoch_reads.append(op)
        self.history.reads.append((self.agent_id, op))
        self.observed[key] = op.version
        return op

    async def list(self, prefix: str = "", *, limit: int = 100, max_pages: int = 1000) -> dict[str, int]:
        """All pages of a listing (each page is recorded as its own range read)."""
        out: dict[str, int] = {}
        cursor: str | None = None
        start_after: str | None = None
        for _ in range(max_pages):
            params: dict[str, Any] = {"prefix": prefix, "limit": limit}
            if cursor:
                params["cursor"] = cursor
            resp = await self._request("GET", "/shards", retry=True, params=params)
            if resp.status_code != 200:
                raise UnexpectedResponse(f"list {prefix!r}", resp)
            body = resp.json()
            items = {s["key"]: int(s["version"]) for s in body["shards"]}
            cursor = body.get("next_cursor")
            keys = list(items)
            end_at = keys[-1] if cursor and keys else None
            op = ListOp(prefix, start_after, end_at, items)
            self.epoch_lists.append(op)
            self.history.lists.append((self.agent_id, op))
            out.update(items)
            self.observed.update(items)
            if not cursor:
                return out
            start_after = keys[-1]
        raise RuntimeError(f"listing {prefix!r} did not end after {max_pages} pages")

    async def clear(self) -> None:
        resp = await self._request("DELETE", "/readset", retry=True)
        if resp.status_code != 204:
            raise UnexpectedResponse("DELETE readset", resp)
        self._end_epoch()

    def _end_epoch(self) -> None:
        self.epoch_reads = []
        self.epoch_lists = []

    async def commit(
        self,
        writes: Iterable[Write],
        *,
        reads: dict[str, int] | None = None,
        idempotency_key: str | None = None,
    ) -> Txn:
        writes = list(writes)
        self.n += 1
        txn = Txn(
            client=self.agent_id,
            session=self.session,
            n=self.n,
            reads=self.epoch_reads,
            lists=self.epoch_lists,
            writes=writes,
            explicit_reads=dict(reads or {}),
            idempotency_key=idempotency_key,
        )
        self._end_epoch()
        self.history.txns.append(txn)
        body: dict[str, Any] = {"writes": [w.to_json() for w in writes]}
        if reads:
            body["reads"] = [{"key": k, "version": v} for k, v in reads.items()]
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            resp = await self._request("POST", "/commit", retry=idempotency_key is not None, json=body, headers=headers)
        except httpx.TransportError as exc:
            txn.error = f"{type(exc).__name__}: {exc}"
            return txn
        txn.status = resp.status_code
        try:
            txn.body = resp.json()
        except ValueError:
            txn.body = resp.text
        if txn.outcome == COMMITTED:
            for w in writes:
                self.observed[w.key] = None if w.delete else int(txn.body["versions"][w.key])
        return txn


# --------------------------------------------------------------------------- server state
@dataclass
class ServerState:
    """What the server says happened: the commit log (seq order), every key's versions
    (ascending) and, optionally, the live heads at the end (key -> version)."""

    log: list[dict[str, Any]]
    histories: dict[str, list[dict[str, Any]]]
    heads: dict[str, int] | None = None


async def fetch_state(
    http: httpx.AsyncClient,
    base_url: str,
    space: str,
    *,
    keys: Iterable[str] = (),
    agent_id: str = "history-checker",
    http_timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    with_heads: bool = True,
    max_pages: int = 10_000,
) -> ServerState:
    """Download the log, the history of every key it (or ``keys``) names, and the live heads.

    Call it once the workload has quiesced: the heads are compared with the replayed log."""
    headers = {"X-Agent-Id": agent_id}
    root = f"{base_url}/v1/spaces/{space}"

    async def get(path: str, params: dict[str, Any]) -> httpx.Response:
        for attempt in range(6):
            try:
                resp = await http.get(root + path, params=params, headers=headers, timeout=http_timeout)
            except httpx.TransportError:
                if attempt == 5:
                    raise
            else:
                if resp.status_code != 503 or attempt == 5:
                    return resp
            await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    log: list[dict[str, Any]] = []
    after = 0
    for _ in range(max_pages):
        resp = await get("/log", {"after": after, "limit": 1000})
        if resp.status_code == 404:
            break
        if resp.status_code != 200:
            raise UnexpectedResponse("GET log", resp)
        commits = resp.json()["commits"]
        if not commits:
            break
        log.extend(commits)
        after = int(commits[-1]["seq"])
    all_keys = set(keys) | {w["key"] for c in log for w in c["writes"]}
    histories: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(all_keys):
        entries: list[dict[str, Any]] = []
        before: int | None = None
        for _ in range(max_pages):
            params: dict[str, Any] = {"limit": 1000}
            if before is not None:
                params["before_version"] = before
            resp = await get(f"/shards/{quote(key)}/history", params)
            if resp.status_code == 404:
                break
            if resp.status_code != 200:
                raise UnexpectedResponse(f"GET history of {key}", resp)
            page = resp.json()["versions"]
            entries.extend(page)
            if len(page) < 1000 or int(page[-1]["version"]) <= 1:
                break
            before = int(page[-1]["version"])
        histories[key] = sorted(entries, key=lambda e: int(e["version"]))
    heads: dict[str, int] | None = None
    if with_heads:
        heads = {}
        cursor: str | None = None
        for _ in range(max_pages):
            params = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            resp = await get("/shards", params)
            if resp.status_code != 200:
                raise UnexpectedResponse("list shards", resp)
            body = resp.json()
            heads.update({s["key"]: int(s["version"]) for s in body["shards"]})
            cursor = body.get("next_cursor")
            if not cursor:
                break
        # The listing above was recorded as a range read of the checker agent: drop it.
        with contextlib.suppress(httpx.HTTPError):
            await http.delete(root + "/readset", headers=headers, timeout=http_timeout)
    return ServerState(log=log, histories=histories, heads=heads)


# --------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Anomaly:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class _Head:
    version: int
    deleted: bool
    seq: int


def report(anomalies: Sequence[Anomaly], limit: int = 40) -> str:
    kinds: dict[str, int] = defaultdict(int)
    for a in anomalies:
        kinds[a.kind] += 1
    lines = [f"{len(anomalies)} anomalies: " + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items()))]
    lines += [f"  {a}" for a in anomalies[:limit]]
    if len(anomalies) > limit:
        lines.append(f"  ... and {len(anomalies) - limit} more")
    return "\n".join(lines)


def assert_consistent(history: History, state: ServerState, **kw: Any) -> None:
    """Raise AssertionError with a readable report if :func:`check` finds any anomaly."""
    anomalies = check(history, state, **kw)
    if anomalies:
        raise AssertionError(report(anomalies))


def check(
    history: History,
    state: ServerState,
    *,
    unique_values: bool = True,
    contiguous_seq: bool = True,
    allow_foreign_commits: bool = False,
    cycles: bool = True,
) -> list[Anomaly]:
    """Every anomaly in ``history`` given what the server recorded (see the module docstring)."""
    out: list[Anomaly] = []

    def bad(kind: str, message: str) -> None:
        out.append(Anomaly(kind, message))

    # ---- the log ---------------------------------------------------------------------
    by_seq: dict[int, dict[str, Any]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    prev = 0
    for c in state.log:
        seq = int(c["seq"])
        if seq <= prev:
            bad("log_order", f"log seq {seq} follows seq {prev}")
        prev = max(prev, seq)
        if seq in by_seq:
            bad("log_order", f"seq {seq} appears twice in the log")
        by_seq[seq] = c
        if c["commit_id"] in by_id:
            bad("log_order", f"commit id {c['commit_id']} appears twice in the log")
        by_id[c["commit_id"]] = c
        keys = [w["key"] for w in c["writes"]]
        if len(set(keys)) != len(keys) or not keys:
            bad("log_order", f"commit seq {seq} has no or duplicate keys: {keys}")
    if contiguous_seq and by_seq and sorted(by_seq) != list(range(1, max(by_seq) + 1)):
        missing = sorted(set(range(1, max(by_seq) + 1)) - set(by_seq))
        bad("seq_gap", f"commit seqs missing from the log: {missing[:20]}")

    # ---- per-key histories -----------------------------------------------------------
    entry: dict[tuple[str, int], dict[str, Any]] = {}
    value_at: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, entries in state.histories.items():
        versions = [int(e["version"]) for e in entries]
        if versions != list(range(1, len(versions) + 1)):
            dups = sorted({v for v in versions if versions.count(v) > 1})
            kind = "duplicate_version" if dups else "version_gap"
            bad(kind, f"versions of {key!r} are {_short(versions)}, not 1..{len(versions)}")
        last_seq = 0
        for e in entries:
            ver, seq = int(e["version"]), int(e["seq"])
            entry[(key, ver)] = e
            if seq <= last_seq:
                bad("version_order", f"{key!r} v{ver} has seq {seq}, not above the previous version's {last_seq}")
            last_seq = seq
            if e.get("deleted"):
                if e.get("value") is not None:
                    bad("history_log_mismatch", f"tombstone {key!r} v{ver} carries a value")
            else:
                value_at[canon(e.get("value"))].append((key, ver))
            c = by_seq.get(seq)
            w = _write_of(c, key) if c else None
            if c is None:
                bad("history_log_mismatch", f"{key!r} v{ver} names seq {seq}, which is not in the log")
            elif w is None or int(w["version"]) != ver:
                bad("history_log_mismatch", f"{key!r} v{ver} names seq {seq}, whose commit does not write it")
            elif bool(w.get("deleted")) != bool(e.get("deleted")):
                bad("history_log_mismatch", f"{key!r} v{ver}: deleted flag differs between log and history")
    for seq, c in by_seq.items():
        missing_w = [w for w in c["writes"] if (w["key"], int(w["version"])) not in entry]
        if missing_w:
            got = len(c["writes"]) - len(missing_w)
            bad(
                "partial_commit",
                f"commit seq {seq} wrote {[(w['key'], w['version']) for w in c['writes']]} but only {got} of "
                f"them are in the shard histories (missing {[(w['key'], w['version']) for w in missing_w]})",
            )
        for w in c["writes"]:
            e = entry.get((w["key"], int(w["version"])))
            if e is not None and int(e["seq"]) != seq:
                bad("history_log_mismatch", f"{w['key']!r} v{w['version']}: log says seq {seq}, history {e['seq']}")

    # ---- attribute log commits to recorded transactions --------------------------------
    if unique_values:
        seen: dict[str, Txn] = {}
        for t in history.txns:
            for w in t.writes:
                if w.delete:
                    continue
                cv = canon(w.value)
                if cv in seen and seen[cv] is not t:
                    raise ValueError(f"value {cv} is written by {seen[cv].name} and {t.name}: values must be unique")
                seen[cv] = t
    txn_at: dict[int, Txn] = {}
    for t in history.txns:
        if t.outcome != COMMITTED:
            continue
        c = by_id.get(str(t.body.get("commit_id")))
        seq = t.seq
        if c is None or int(c["seq"]) != seq:
            bad(
                "lost_commit",
                f"{t.name} was acknowledged (seq {seq}, commit {t.body.get('commit_id')}) but the log "
                + ("has no such commit" if c is None else f"has it at seq {c['seq']}"),
            )
            continue
        if seq in txn_at:
            bad("lost_commit", f"{t.name} and {txn_at[seq].name} were both acknowledged with seq {seq}")
            continue
        txn_at[seq] = t
        _check_applied(t, c, entry, value_at, unique_values, bad)
    for t in history.txns:
        if t.outcome == ABORTED and unique_values:
            for w in t.writes:
                if not w.delete and canon(w.value) in value_at:
                    where = value_at[canon(w.value)]
                    bad(
                        "aborted_write_visible",
                        f"{t.name} got HTTP {t.status} but its value {canon(w.value)} is in history at {where}",
                    )
        if t.outcome == UNKNOWN:
            seq_found = _match_unknown(t, by_seq, entry, value_at, unique_values, bad)
            if seq_found is not None:
                if seq_found in txn_at:
                    bad("duplicate_write", f"{t.name} (outcome unknown) matches seq {seq_found}, already attributed")
                else:
                    txn_at[seq_found] = t
    if not allow_foreign_commits:
        for seq, c in by_seq.items():
            if seq not in txn_at:
                bad(
                    "foreign_commit",
                    f"commit seq {seq} by {c.get('committed_by')} writing "
                    f"{[(w['key'], w['version']) for w in c['writes']]} matches no recorded commit",
                )

    # ---- every delivered read exists in the history --------------------------------------
    for client, r in history.reads:
        if r.version is None:
            continue
        e = entry.get((r.key, r.version))
        if e is None or e.get("deleted"):
            bad("bad_read", f"{client} read {r.key!r} v{r.version}, which the history has not (as a live version)")
        elif canon(e.get("value")) != canon(r.value):
            bad("bad_read", f"{client} read {r.key!r} v{r.version} = {canon(r.value)}, history has {canon(e['value'])}")
    for client, lst in history.lists:
        for k, ver in lst.items.items():
            e = entry.get((k, ver))
            if e is None or e.get("deleted") or not lst.contains(k):
                bad("bad_read", f"{client} listed {k!r} v{ver} under {lst.prefix!r}, not a live version in range")

    # ---- replay the log in seq order ---------------------------------------------------
    heads: dict[str, _Head] = {}
    observations: dict[int, list[tuple[str, int | None]]] = {}  # seq -> (key, version seen; None = absent)
    for seq in sorted(by_seq):
        c = by_seq[seq]
        t = txn_at.get(seq)
        if t is not None:
            observations[seq] = _check_commit_point(t, seq, heads, bad)
        for w in c["writes"]:
            key, ver = w["key"], int(w["version"])
            cur = heads.get(key)
            if ver != (cur.version if cur else 0) + 1:
                bad(
                    "version_order",
                    f"commit seq {seq} wrote {key!r} v{ver} but the head was v{cur.version if cur else 0} "
                    f"(written at seq {cur.seq if cur else '-'})",
                )
            heads[key] = _Head(ver, bool(w.get("deleted")), seq)
    if state.heads is not None:
        live = {k: h.version for k, h in heads.items() if not h.deleted}
        if live != state.heads:
            diff = sorted(set(live.items()) ^ set(state.heads.items()))
            bad("head_mismatch", f"live heads differ from the replayed log: {diff[:20]}")

    # ---- dependency graph --------------------------------------------------------------
    if cycles:
        cyc = _find_cycle(_dependency_graph(by_seq, txn_at, observations, state.histories))
        if cyc:
            names = {s: (txn_at[s].name if s in txn_at else f"seq{s}") for s, _, _ in cyc}
            path = " ".join(f"{names[a]} -{label}->" for a, _, label in cyc) + f" {names[cyc[0][0]]}"
            bad("cycle", f"dependency cycle among committed transactions: {path}")
    return out


def _short(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 20 else f"{xs[:10]}...{xs[-5:]}"


def _write_of(commit: dict[str, Any], key: str) -> dict[str, Any] | None:
    for w in commit["writes"]:
        if w["key"] == key:
            return w
    return None


def _check_applied(
    t: Txn,
    c: dict[str, Any],
    entry: dict[tuple[str, int], dict[str, Any]],
    value_at: dict[str, list[tuple[str, int]]],
    unique_values: bool,
    bad: Any,
) -> None:
    """An acknowledged commit: the log entry matches the request and the response."""
    seq = int(c["seq"])
    if c.get("committed_by") not in (None, t.client) or c.get("session", t.session) != t.session:
        bad("lost_commit", f"{t.name}: log seq {seq} is attributed to {c.get('committed_by')}/{c.get('session')}")
    want = {w.key for w in t.writes}
    got = {w["key"] for w in c["writes"]}
    if want != got:
        bad("lost_commit", f"{t.name}: log seq {seq} writes {sorted(got)}, the request wrote {sorted(want)}")
    versions = {k: int(v) for k, v in (t.body.get("versions") or {}).items()}
    for w in t.writes:
        lw = _write_of(c, w.key)
        ver = versions.get(w.key)
        if lw is None or ver is None or int(lw["version"]) != ver:
            bad("lost_write", f"{t.name}: {w.key!r} acknowledged as v{ver}, log has {lw}")
            continue
        e = entry.get((w.key, ver))
        if e is None:
            bad("lost_write", f"{t.name}: acknowledged {w.key!r} v{ver} is not in the shard history")
            continue
        if bool(e.get("deleted")) != w.delete or (not w.delete and canon(e.get("value")) != canon(w.value)):
            bad(
                "lost_write",
                f"{t.name}: {w.key!r} v{ver} should be {'a delete' if w.delete else canon(w.value)}, "
                f"history has {'a delete' if e.get('deleted') else canon(e.get('value'))}",
            )
        if unique_values and not w.delete:
            where = value_at.get(canon(w.value), [])
            if where != [(w.key, ver)]:
                bad("duplicate_write", f"{t.name}: value {canon(w.value)} is present at {where}, not once")


def _match_unknown(
    t: Txn,
    by_seq: dict[int, dict[str, Any]],
    entry: dict[tuple[str, int], dict[str, Any]],
    value_at: dict[str, list[tuple[str, int]]],
    unique_values: bool,
    bad: Any,
) -> int | None:
    """A commit whose outcome the client does not know: all of it applied, in one commit, or none."""
    if not unique_values:
        return None
    puts = [w for w in t.writes if not w.delete]
    if not puts:
        return None  # deletes only: not identifiable by value
    places = {w.key: value_at.get(canon(w.value), []) for w in puts}
    present = {k: p for k, p in places.items() if p}
    if not present:
        return None
    seqs: set[int] = set()
    for k, p in present.items():
        if len(p) != 1 or p[0][0] != k:
            bad("duplicate_write", f"{t.name} (outcome unknown): value for {k!r} is present at {p}")
        seqs.update(int(entry[kv]["seq"]) for kv in p)
    if len(present) != len(puts) or len(seqs) != 1:
        bad(
            "partial_commit",
            f"{t.name} (outcome unknown) is partly visible: {sorted(present)} of "
            f"{sorted(w.key for w in puts)} present, in seqs {sorted(seqs)}",
        )
        return None
    seq = seqs.pop()
    got = {w["key"] for w in by_seq[seq]["writes"]} if seq in by_seq else set()
    if got != {w.key for w in t.writes}:
        bad("partial_commit", f"{t.name} (outcome unknown) matched seq {seq}, which writes {sorted(got)}")
    return seq


def _check_commit_point(t: Txn, seq: int, heads: dict[str, _Head], bad: Any) -> list[tuple[str, int | None]]:
    """The committed ``t``'s reads against the state right before ``seq``; returns its observations."""

    def cur(key: str) -> int:
        h = heads.get(key)
        return h.version if h else 0

    def absent(key: str) -> bool:
        h = heads.get(key)
        return h is None or h.deleted

    def who(key: str) -> str:
        h = heads.get(key)
        return f"v{h.version}{' (deleted)' if h.deleted else ''} from seq {h.seq}" if h else "never written"

    seen: list[tuple[str, int | None]] = []
    for r in t.reads:
        if r.key in t.explicit_reads:
            continue  # explicit reads win over the delivery log for their key
        seen.append((r.key, r.version))
        ok = absent(r.key) if r.version is None else cur(r.key) == r.version and not absent(r.key)
        if not ok:
            saw = "absent" if r.version is None else f"v{r.version}"
            bad(
                "stale_read",
                f"{t.name} committed at seq {seq} after reading {r.key!r} {saw}, but right before its commit "
                f"{r.key!r} was {who(r.key)}",
            )
    for key, ver in t.explicit_reads.items():
        seen.append((key, ver))
        if cur(key) != ver:
            bad(
                "stale_read",
                f"{t.name} committed at seq {seq} with explicit read {key!r} v{ver}, but {key!r} was {who(key)}",
            )
    for w in t.writes:
        ev = w.expected_version
        if ev is None:
            continue
        ok = absent(w.key) if ev == 0 else cur(w.key) == ev
        if not ok:
            bad(
                "write_conflict",
                f"{t.name} committed at seq {seq} with expected_version {ev} for {w.key!r}, which was {who(w.key)}",
            )
    for lst in t.lists:
        live = {k: h.version for k, h in heads.items() if not h.deleted and lst.contains(k)}
        if live != lst.items:
            diff = sorted(set(live.items()) ^ set(lst.items.items()))
            bad(
                "phantom",
                f"{t.name} committed at seq {seq} after listing {lst.prefix!r} "
                f"({lst.start_after}, {lst.end_at}] = {sorted(lst.items.items())}, but right before its commit "
                f"the range held {sorted(live.items())} (differences {diff})",
            )
        seen.extend(lst.items.items())
    return seen


def _dependency_graph(
    by_seq: dict[int, dict[str, Any]],
    txn_at: dict[int, Txn],
    observations: dict[int, list[tuple[str, int | None]]],
    histories: dict[str, list[dict[str, Any]]],
) -> dict[int, dict[int, str]]:
    """Adya's direct serialization graph over commits (nodes = seqs)."""
    writer: dict[tuple[str, int], int] = {}
    for seq, c in by_seq.items():
        for w in c["writes"]:
            writer[(w["key"], int(w["version"]))] = seq
    edges: dict[int, dict[int, str]] = defaultdict(dict)

    def edge(a: int, b: int, label: str) -> None:
        if a != b and b not in edges[a]:
            edges[a][b] = label

    for (key, ver), seq in writer.items():
        nxt = writer.get((key, ver + 1))
        if nxt is not None:
            edge(seq, nxt, f"ww({key})")
    for seq, obs in observations.items():
        t = txn_at[seq]
        # Keys a listing did not return were observed as absent, whenever they were written.
        absent_in_ranges = [(k, None) for lst in t.lists for k in histories if lst.contains(k) and k not in lst.items]
        for key, ver in [*obs, *absent_in_ranges]:
            if ver is None:
                # Absent: take the newest absent state (never written, or a tombstone) before this commit.
                ver = 0
                for e in histories.get(key, []):
                    if int(e["seq"]) < seq and e.get("deleted"):
                        ver = int(e["version"])
            if ver > 0 and (key, ver) in writer:
                edge(writer[(key, ver)], seq, f"wr({key})")
            nxt = writer.get((key, ver + 1))
            if nxt is not None:
                edge(seq, nxt, f"rw({key})")
    return edges


def _find_cycle(edges: dict[int, dict[int, str]]) -> list[tuple[int, int, str]] | None:
    color: dict[int, int] = {}
    for root in sorted(edges):
        if root in color:
            continue
        color[root] = 1
        path = [root]
        stack = [iter(sorted(edges.get(root, {})))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = 2
                stack.pop()
                continue
            c = color.get(nxt)
            if c is None:
                color[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, {}))))
            elif c == 1:
                cyc = [*path[path.index(nxt) :], nxt]
                return [(a, b, edges[a][b]) for a, b in itertools.pairwise(cyc)]
    return None


# --------------------------------------------------------------------------- workloads
@dataclass
class IncrementResult:
    history: History
    successes: int
    attempts: int
    conflicts: int
    conflict_codes: dict[str, int]


async def run_increments(
    http_clients: Sequence[httpx.AsyncClient],
    urls: Sequence[str] | Sequence[Sequence[str]],
    space: str,
    *,
    key: str = "counter",
    clients: int = 32,
    per_client: int = 3,
    mode: str = "readset",
    max_attempts: int = 2000,
    backoff_s: float = 0.004,
) -> IncrementResult:
    """``clients`` agents each make ``per_client`` successful read-increment-commit steps on
    one shard, retrying on 409 (with jittered backoff). Client ``i`` uses ``http_clients[i %
    len]`` and ``urls[i % len]``. ``mode``: "readset" = GET + commit (the delivery log is the
    only guard), "expected" = read through the history endpoint (not recorded) + commit with
    ``expected_version``. Every attempt carries a fresh Idempotency-Key so a 503/transport
    error is retried without double-applying. The counter must already exist."""
    if mode not in ("readset", "expected"):
        raise ValueError(mode)
    history = History()
    stats = {"attempts": 0, "conflicts": 0}
    codes: dict[str, int] = defaultdict(int)

    async def one(i: int) -> int:
        http = http_clients[i % len(http_clients)]
        u = urls[i % len(urls)]
        agent = Agent(http, u, space, f"inc-{i}", history=history)
        done = 0
        streak = 0  # consecutive conflicts: exponential backoff with full jitter
        rng = random.Random(i)
        for _ in range(max_attempts):
            if done == per_client:
                return done
            stats["attempts"] += 1
            if mode == "readset":
                r = await agent.read(key)
                assert r.version is not None, f"{key} does not exist"
                write = Write(key, r.value + 1)
            else:
                resp = await agent._request("GET", f"/shards/{quote(key)}/history", retry=True, params={"limit": 1})
                if resp.status_code != 200:
                    raise UnexpectedResponse("history", resp)
                head = resp.json()["versions"][0]
                write = Write(key, head["value"] + 1, expected_version=int(head["version"]))
            txn = await agent.commit([write], idempotency_key=uuid.uuid4().hex)
            if txn.status == 200:
                done += 1
                streak = 0
            elif txn.status == 409:
                stats["conflicts"] += 1
                codes[str(txn.conflict_code)] += 1
                streak += 1
                await asyncio.sleep(rng.uniform(0, backoff_s * 2 ** min(streak, 6)))
            else:
                raise AssertionError(f"{txn.name}: unexpected outcome {txn.status} {txn.body} {txn.error}")
        raise AssertionError(f"inc-{i} made only {done}/{per_client} increments in {max_attempts} attempts")

    counts = await asyncio.gather(*(one(i) for i in range(clients)))
    return IncrementResult(history, sum(counts), stats["attempts"], stats["conflicts"], dict(codes))


@dataclass
class Workload:
    """A randomized workload: one op list per client, over ``keys``.

    Ops: ``("read", key)``, ``("list", prefix, page_limit)``, ``("clear",)``, ``("sleep", ms)``,
    ``("commit", [(key, "put" | "delete", use_expected_version), ...], send_explicit_reads)``.
    With ``shared_ids`` clients pair up under one agent id with different X-Agent-Session.
    With ``prepopulate`` a setup agent first writes every key.
    """

    keys: list[str]
    plans: list[list[tuple[Any, ...]]]
    shared_ids: bool = False
    prepopulate: bool = False


def random_workload(rng: random.Random, *, clients: int, keys: int, ops: int) -> Workload:
    """A workload drawn from ``rng`` (the Hypothesis tests draw their own)."""
    names = [f"{'ab'[i % 2]}/{i}" for i in range(keys)]
    prefixes = ["", "a/", "b/", names[0]]

    def op() -> tuple[Any, ...]:
        kind = rng.choices(["read", "list", "commit", "clear", "sleep"], [5, 2, 4, 0.3, 0.5])[0]
        if kind == "read":
            return ("read", rng.choice(names))
        if kind == "list":
            return ("list", rng.choice(prefixes), rng.choice([1, 2, 100]))
        if kind == "commit":
            ws = [
                (k, rng.choices(["put", "delete"], [4, 1])[0], rng.random() < 0.3)
                for k in rng.sample(names, rng.randint(1, min(3, len(names))))
            ]
            return ("commit", ws, rng.random() < 0.3)
        if kind == "clear":
            return ("clear",)
        return ("sleep", rng.randint(0, 3))

    return Workload(
        keys=names,
        plans=[[op() for _ in range(rng.randint(1, ops))] for _ in range(clients)],
        shared_ids=rng.random() < 0.3,
        prepopulate=rng.random() < 0.5,
    )


async def run_workload(
    http: httpx.AsyncClient,
    urls: str | Sequence[str],
    space: str,
    workload: Workload,
    *,
    history: History | None = None,
) -> History:
    """Run every client's plan concurrently (each client's ops in order); values are unique."""
    history = history if history is not None else History()
    if workload.prepopulate:
        setup = Agent(http, urls, space, "setup", history=history)
        txn = await setup.commit([Write(k, f"setup-{k}") for k in workload.keys])
        if txn.status != 200:
            raise AssertionError(f"setup commit failed: {txn.status} {txn.body}")

    async def client(i: int, plan: list[tuple[Any, ...]]) -> None:
        agent_id = f"ag{i // 2}" if workload.shared_ids else f"ag{i}"
        session = f"s{i}" if workload.shared_ids else ""
        agent = Agent(http, urls, space, agent_id, session=session, history=history)
        n = 0
        for op in plan:
            kind = op[0]
            if kind == "read":
                await agent.read(op[1])
            elif kind == "list":
                await agent.list(op[1], limit=op[2], max_pages=20)
            elif kind == "clear":
                await agent.clear()
            elif kind == "sleep":
                await asyncio.sleep(op[1] / 1000)
            elif kind == "commit":
                writes = []
                seen_keys: set[str] = set()
                for key, what, use_expected in op[1]:
                    if key in seen_keys:
                        continue
                    seen_keys.add(key)
                    n += 1
                    tag = f"c{i}-{n}"
                    expected = (agent.observed.get(key) or 0) if use_expected else None
                    if what == "delete":
                        writes.append(Write(key, delete=True, expected_version=expected))
                    else:
                        value: Any = tag if n % 2 else {"tag": tag, "key": key, "n": n}
                        writes.append(Write(key, value, expected_version=expected))
                reads: dict[str, int] | None = None
                if op[2]:
                    reads = {r.key: r.version for r in agent.epoch_reads if r.version is not None}
                    for lst in agent.epoch_lists:
                        reads.update(lst.items)
                await agent.commit(writes, reads=reads or None)
            else:
                raise ValueError(f"unknown op {op!r}")

    await asyncio.gather(*(client(i, plan) for i, plan in enumerate(workload.plans)))
    return history
