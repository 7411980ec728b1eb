"""Correctness checks run against every server before (and after) it is timed.

A throughput number is only worth reporting for a server that rejects stale writes and
never loses an update, and the load generator's own accounting has to be right too. So:

* ``semantics``: a scripted sequence (stale expected_version -> 409 with the current
  version; for agentbus also a stale delivery-log read -> 409 without expected_version).
* ``verify_versions``: after any cell, every key's final version must equal the number of
  200 commits the clients counted for it (versions grow by exactly one per applied write),
  so a lost update or a miscounted response shows up as a mismatch.
* ``counter``: the high-contention read-modify-write of a counter; the final counter value
  and version must both equal the number of 200s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson

from bench.loadgen import CellResult, CellSpec, HttpConn, run_cell


async def _get(conn: HttpConn, space: str, key: str) -> tuple[int, dict[str, Any]]:
    status, data = await conn.request(b"GET", f"/v1/spaces/{space}/shards/{key}")
    return status, (orjson.loads(data) if data else {})


async def _commit(conn: HttpConn, space: str, write: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, data = await conn.request(b"POST", f"/v1/spaces/{space}/commit", orjson.dumps({"writes": [write]}))
    return status, (orjson.loads(data) if data else {})


def _conflict_current(body: dict[str, Any], key: str) -> int | None:
    for c in body.get("error", {}).get("conflicts", []):
        if c.get("key") == key:
            return int(c["current_version"])
    return None


async def _semantics(port: int, space: str, delivery_log: bool) -> list[str]:
    bad: list[str] = []
    a = HttpConn("127.0.0.1", port, "checker-a")
    b = HttpConn("127.0.0.1", port, "checker-b")

    def expect(what: str, cond: bool, got: Any) -> None:
        if not cond:
            bad.append(f"{what}: got {got}")

    try:
        k = "chk"
        s, body = await _commit(a, space, {"key": k, "value": {"n": 1}, "expected_version": 0})
        expect("create with expected_version 0 -> 200 v1", s == 200 and body["versions"][k] == 1, (s, body))
        s, body = await _commit(b, space, {"key": k, "value": {"n": 99}, "expected_version": 0})
        expect("second create -> 409 current 1", s == 409 and _conflict_current(body, k) == 1, (s, body))
        s, body = await _commit(a, space, {"key": k, "value": {"n": 2}, "expected_version": 1})
        expect("update with current version -> 200 v2", s == 200 and body["versions"][k] == 2, (s, body))
        s, body = await _commit(b, space, {"key": k, "value": {"n": 99}, "expected_version": 1})
        expect("stale expected_version -> 409 current 2", s == 409 and _conflict_current(body, k) == 2, (s, body))
        s, body = await _get(a, space, k)
        expect("read -> 200 v2 value n=2", s == 200 and body["version"] == 2 and body["value"] == {"n": 2}, (s, body))
        s, body = await _get(a, space, "never-written")
        expect("read of a missing key -> 404", s == 404, (s, body))
        if delivery_log:
            # a read v2 (above); b commits v3; a's commit without expected_version must be
            # rejected from the delivery log alone; after re-reading, a succeeds.
            s, body = await _commit(b, space, {"key": k, "value": {"n": 3}, "expected_version": 2})
            expect("b updates -> 200 v3", s == 200, (s, body))
            s, body = await _commit(a, space, {"key": k, "value": {"n": 99}})
            expect("stale delivery-log read -> 409 stale_read", s == 409 and _conflict_current(body, k) == 3, (s, body))
            s, body = await _get(a, space, k)
            s, body = await _commit(a, space, {"key": k, "value": {"n": 4}})
            expect("re-read then commit -> 200 v4", s == 200 and body["versions"][k] == 4, (s, body))
    finally:
        a.close()
        b.close()
    return bad


def semantics(port: int, space: str, delivery_log: bool) -> list[str]:
    """Problems found by the scripted sequence (empty = correct)."""
    return asyncio.run(_semantics(port, space, delivery_log))


async def _read_all(port: int, space: str, keys: list[str]) -> dict[str, tuple[int, Any]]:
    conn = HttpConn("127.0.0.1", port, "verifier")
    out: dict[str, tuple[int, Any]] = {}
    try:
        for k in keys:
            s, body = await _get(conn, space, k)
            out[k] = (int(body["version"]), body.get("value")) if s == 200 else (0, None)
    finally:
        conn.close()
    return out


def verify_versions(cell: CellResult) -> list[str]:
    """Every key's final version equals the 200s counted for it (no lost or phantom updates)."""
    spec = cell.spec
    oks: Counter[str] = cell.ok_by_key
    heads = asyncio.run(_read_all(spec.port, spec.space, spec.keys()))
    bad = []
    unanswered = sum(n for what, n in cell.other.items() if what in ("commit 0", "commit 500", "commit 502"))
    hint = f" ({unanswered} commits failed without a clear answer and may account for it)" if unanswered else ""
    for k, (version, value) in heads.items():
        if version != oks.get(k, 0):
            bad.append(f"{k}: version {version} != {oks.get(k, 0)} commits answered 200{hint}")
        if spec.mode.startswith("rmw") and oks.get(k, 0) and (value or {}).get("n") != oks[k]:
            bad.append(f"{k}: counter {(value or {}).get('n')} != {oks[k]} applied increments (lost update)")
    return bad


def counter(port: int, space: str, mode: str, concurrency: int, hot_keys: int, seconds: float, procs: int) -> dict:
    """High-contention read-modify-write counter; returns a JSON-able report."""
    spec = CellSpec(
        host="127.0.0.1",
        port=port,
        space=space,
        mode=mode,  # type: ignore[arg-type]
        contention="high",
        concurrency=concurrency,
        hot_keys=hot_keys,
        warmup_s=0.0,
        duration_s=seconds,
        procs=procs,
    )
    cell = run_cell(spec)
    problems = verify_versions(cell)
    other = dict(cell.other)
    if other:
        problems.append(f"unexpected responses: {other}")
    oks = cell.ok_by_key
    conflicts = sum(len(p.commit_conflict) for p in cell.procs)
    if sum(oks.values()) == 0:
        problems.append("no commit succeeded")
    return {
        "mode": mode,
        "concurrency": concurrency,
        "hot_keys": hot_keys,
        "seconds": seconds,
        "applied": sum(oks.values()),
        "conflicts_409": conflicts,
        "per_key": dict(sorted(oks.items())),
        "problems": problems,
        "ok": not problems,
    }
