"""Two or more agents co-edit one plan through plain HTTP; conflicts are caught and retried.

Each agent reads the plan (the read is recorded by agentbus), adds its own step, and
commits. When another agent committed in between, agentbus answers 409 with the
conflicting key; the agent re-reads and tries again. At the end every step is in the plan
exactly once: nothing was silently overwritten.

    make run &                       # or: .venv/bin/agentbus serve
    .venv/bin/python examples/coedit_plan.py --agents 4 --steps 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import httpx


async def agent(client: httpx.AsyncClient, base: str, name: str, steps: int, log: list[str]) -> int:
    headers = {"X-Agent-Id": name}
    conflicts = 0
    for i in range(steps):
        while True:
            r = await client.get(f"{base}/shards/plan", headers=headers)
            r.raise_for_status()
            plan = r.json()["value"]
            plan["steps"].append(f"{name}: step {i + 1}")
            c = await client.post(f"{base}/commit", headers=headers, json={"writes": [{"key": "plan", "value": plan}]})
            if c.status_code == 200:
                log.append(f"{name} committed step {i + 1} as plan v{c.json()['versions']['plan']}")
                break
            if c.status_code == 409:
                conflicts += 1
                err = c.json()["error"]["conflicts"][0]
                log.append(
                    f"{name} conflict on {err['key']!r}: read v{err['read_version']}, "
                    f"now v{err['current_version']} by {err['committed_by']} -> re-read and retry"
                )
                await asyncio.sleep(0.01 * conflicts)
                continue
            c.raise_for_status()
    return conflicts


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="agentbus base URL")
    ap.add_argument("--space", default=f"plan-demo-{uuid.uuid4().hex[:6]}")
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    base = f"{args.url}/v1/spaces/{args.space}"
    log: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{base}/commit",
            headers={"X-Agent-Id": "planner"},
            json={"writes": [{"key": "plan", "value": {"steps": []}, "expected_version": 0}]},
        )
        r.raise_for_status()
        names = [f"agent-{i + 1}" for i in range(args.agents)]
        conflicts = await asyncio.gather(*(agent(client, base, n, args.steps, log) for n in names))
        final = (await client.get(f"{base}/shards/plan", headers={"X-Agent-Id": "auditor"})).json()
    print("\n".join(log))
    steps = final["value"]["steps"]
    expected = args.agents * args.steps
    print(
        f"\nspace {args.space}: plan v{final['version']} has {len(steps)} steps (expected {expected}), "
        f"{sum(conflicts)} conflicts caught and retried"
    )
    ok = len(steps) == expected == len(set(steps))
    print("OK: no step lost or duplicated" if ok else "FAILED: steps lost or duplicated")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
