"""CPU per operation, without HTTP load generators: the store hot paths and the whole app.

Usage (from the repository root; needs the backends for their URLs):

    .venv/bin/python -m bench.cpu store sqlite:////tmp/cpu.db             # migrated first
    .venv/bin/python -m bench.cpu store postgresql://postgres@127.0.0.1:5432/cpu
    .venv/bin/python -m bench.cpu store redis://127.0.0.1:6379/7
    .venv/bin/python -m bench.cpu app redis://127.0.0.1:6379/7             # ASGI in-process
    AGENTBUS_TRACE_STORE=false OTEL_SDK_DISABLED=true .venv/bin/python -m bench.cpu app redis://...

``store`` drives the Store directly (``ev``: commit with expected_version; ``dl``: read then
commit, the delivery-log path) and prints process CPU per operation. ``app`` sends commits
and ``GET /healthz`` through the whole FastAPI app over httpx's ASGI transport (client and
server in one process, so compare the two lines with each other). CPU time, not wall time:
it is what a busy shared machine distorts least.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from agentbus.core.model import SessionRef, WriteOp
from agentbus.migrate import upgrade
from agentbus.settings import Settings
from agentbus.store import open_store
from agentbus.store.base import CommitRequest


async def store_loop(url: str, n: int) -> None:
    store = open_store(Settings(store=url, redis_prefix=f"cpu{uuid.uuid4().hex[:6]}"), url)
    await store.start()
    ref = SessionRef("t", f"cpu-{uuid.uuid4().hex[:8]}", "agent")
    ver = 0

    async def ev() -> None:
        nonlocal ver
        out = await store.commit(ref, CommitRequest((WriteOp("k", '{"a":1}', False, ver),), {}))
        assert out.result is not None
        ver = out.result.versions["k"]

    async def dl() -> None:
        await store.read(ref, "j")
        assert (await store.commit(ref, CommitRequest((WriteOp("j", '{"a":1}'),), {}))).result is not None

    try:
        for name, op in (("ev", ev), ("dl", dl)):
            for _ in range(20):
                await op()
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await op()
            c1, w1 = time.process_time(), time.perf_counter()
            cpu, wall = 1000 * (c1 - c0) / n, 1000 * (w1 - w0) / n
            print(f"store {url.split(':')[0]:10s} {name}: {cpu:.2f} ms CPU/op, {wall:.2f} ms wall/op")
    finally:
        await store.close()


async def app_loop(url: str, n: int) -> None:
    import httpx

    from agentbus.app import create_app

    app = create_app(Settings(store=url, auth=False, redis_prefix=f"cpu{uuid.uuid4().hex[:6]}"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            sp, ver = f"cpu-{uuid.uuid4().hex[:8]}", 0

            async def commit() -> None:
                nonlocal ver
                body = {"writes": [{"key": "k", "value": {"x": 1}, "expected_version": ver}]}
                r = await c.post(f"/v1/spaces/{sp}/commit", json=body, headers={"X-Agent-Id": "a"})
                ver = r.json()["versions"]["k"]

            async def healthz() -> None:
                await c.get("/healthz")

            async def conflict() -> None:
                # A stale expected_version: what most requests are under high contention.
                body = {"writes": [{"key": "k", "value": {"x": 1}, "expected_version": 0}]}
                r = await c.post(f"/v1/spaces/{sp}/commit", json=body, headers={"X-Agent-Id": "a"})
                assert r.status_code == 409, r.text

            for name, op in (("GET /healthz", healthz), ("POST commit", commit), ("POST commit 409", conflict)):
                for _ in range(100):
                    await op()
                t = time.process_time()
                for _ in range(n):
                    await op()
                print(f"app {url.split(':')[0]:10s} {name}: {1000 * (time.process_time() - t) / n:.3f} ms CPU/request")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["store", "app"])
    ap.add_argument("url", help="AGENTBUS_STORE URL (SQL databases are migrated first)")
    ap.add_argument("-n", type=int, default=1000, help="operations to time")
    args = ap.parse_args()
    if not args.url.startswith("redis"):
        upgrade(args.url)
    asyncio.run(store_loop(args.url, args.n) if args.mode == "store" else app_loop(args.url, args.n))


if __name__ == "__main__":
    main()
