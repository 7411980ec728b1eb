"""``agentbus trace SPACE`` and ``agentbus top``: the operator's terminal views, over HTTP.

Both talk to a running server (``--url``, default ``AGENTBUS_URL`` or
http://127.0.0.1:8080) with ``--token`` (default ``AGENTBUS_TOKEN``; a token with
``traces:read``, plus ``bus:read`` for ``top``'s space list - the ``operator`` kind has both).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta", "bright_green")
KIND_STYLE = {
    "read": "dim",
    "list": "dim",
    "commit": "bold green",
    "conflict": "bold white on red",
    "model_call": "bold blue",
}

URL = typer.Option(None, "--url", help="Server URL (default AGENTBUS_URL or http://127.0.0.1:8080).")
TOKEN = typer.Option(None, "--token", help="Bearer token (default AGENTBUS_TOKEN).")


class Api:
    def __init__(self, url: str | None, token: str | None) -> None:
        import httpx

        self.url = (url or os.environ.get("AGENTBUS_URL") or "http://127.0.0.1:8080").rstrip("/")
        token = token or os.environ.get("AGENTBUS_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=15.0)

    def get(self, path: str, **params: Any) -> Any:
        import httpx

        try:
            r = self.client.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            raise SystemExit(_fail(f"cannot reach {self.url}: {exc}")) from exc
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:200]
            raise SystemExit(_fail(f"GET {path}: {r.status_code} {msg}"))
        return r.json()


def _fail(msg: str) -> int:
    Console(stderr=True).print(f"[red]error:[/] {msg}")
    return 1


def _clock(ts_ms: int) -> str:
    return datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.UTC).strftime("%H:%M:%S.%f")[:-3]


class Timeline:
    """One row per event: time, one lane per agent (a dot in the agent's colour), details."""

    def __init__(self) -> None:
        self.agents: list[str] = []

    def colour(self, agent: str) -> str:
        if agent not in self.agents:
            self.agents.append(agent)
        return COLOURS[self.agents.index(agent) % len(COLOURS)]

    def row(self, e: dict[str, Any]) -> Text:
        agent = str(e.get("agent", ""))
        colour = self.colour(agent)
        lanes = Text()
        for a in self.agents:
            lanes.append("● " if a == agent else "│ ", style=colour if a == agent else "grey35")
        t = Text(_clock(int(e.get("ts_ms", 0))) + " ", style="grey50")
        t.append_text(lanes)
        who = agent + (f"/{e['session']}" if e.get("session") else "")
        t.append(f"{who:<16} ", style=colour)
        kind = str(e.get("kind", ""))
        t.append(f"{kind:<10} ", style=KIND_STYLE.get(kind, ""))
        t.append_text(self.detail(e))
        return t

    @staticmethod
    def detail(e: dict[str, Any]) -> Text:
        kind = e.get("kind")
        if kind == "read":
            v = e.get("version", 0)
            return Text(f"{e.get('key')} @v{v}" if v else f"{e.get('key')} (absent)")
        if kind == "list":
            return Text(f"prefix {e.get('prefix')!r}: {e.get('count', len(e.get('keys') or []))} shard(s)")
        if kind == "commit":
            vers = ", ".join(f"{k}→v{v}" for k, v in (e.get("versions") or {}).items())
            extra = " (replayed)" if e.get("replayed") else ""
            return Text(f"seq {e.get('seq')} {vers}{extra}")
        if kind == "conflict":
            out = Text()
            for i, c in enumerate(e.get("conflicts") or []):
                if i:
                    out.append("; ")
                out.append(f"{c.get('key')}", style="bold red")
                out.append(
                    f" {c.get('kind')}: read v{c.get('read_version')}, now v{c.get('current_version')}"
                    f" (won by {c.get('committed_by')} seq {c.get('commit_seq')})"
                )
            return out
        if kind == "model_call":
            style = "" if e.get("status") == "ok" else "red"
            return Text(
                f"{e.get('model')} via {e.get('endpoint') or '-'}: {e.get('input_tokens', 0)}→"
                f"{e.get('output_tokens', 0)} tok, {float(e.get('latency_ms') or 0):.0f} ms, "
                f"cost {float(e.get('cost') or 0):.4f} [{e.get('status')}]",
                style=style,
            )
        return Text(json.dumps({k: v for k, v in e.items() if k not in ("trace_id", "span_id")}))


def trace(
    space: str = typer.Argument(..., help="The space whose timeline to show."),
    url: str = URL,
    token: str = TOKEN,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with --follow: one event per line)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep polling for new events."),
    limit: int = typer.Option(0, help="At most this many events (0 = all kept)."),
    interval: float = typer.Option(1.0, help="Poll interval for --follow, seconds."),
) -> None:
    """A space's timeline: reads, commits, conflicts (with the winning commit), model calls."""
    api = Api(url, token)
    console = Console(highlight=False)
    tl = Timeline()
    after: str | None = None
    shown = 0
    collected: list[dict[str, Any]] = []
    while True:
        page = api.get(f"/v1/spaces/{space}/trace", after=after, limit=500)
        events = page["events"]
        if limit:
            events = events[: max(0, limit - shown)]
        for e in events:
            shown += 1
            if as_json and follow:
                print(json.dumps(e), flush=True)
            elif as_json or not follow:
                collected.append(e)  # printed at the end, when every agent's lane is known
            else:
                console.print(tl.row(e), soft_wrap=True)
        if page.get("next"):
            after = page["next"]
        done = bool(limit) and shown >= limit
        if not page["events"] or len(page["events"]) < 500 or done:
            if not follow or done:
                break
            time.sleep(interval)
    if as_json and not follow:
        print(json.dumps({"space": space, "events": collected, "next": after}, indent=2))
    elif not follow:
        for e in collected:
            tl.colour(str(e.get("agent", "")))
        for e in collected:
            console.print(tl.row(e), soft_wrap=True)
    if not as_json and not shown:
        Console(stderr=True).print(f"no events in space {space!r} (yet)")


class Sampler:
    """Successive snapshots of the server, with rates between them."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.prev: dict[str, Any] | None = None
        self.cursors: dict[str, str | None] = {}
        self.conflicts: dict[str, int] = {}

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        spaces = self.api.get("/v1/spaces")["spaces"]
        usage = self.api.get("/v1/usage")
        rows = []
        prev_seq = {s["space"]: s["commits"] for s in (self.prev or {}).get("spaces", [])}
        dt = now - self.prev["_t"] if self.prev else None
        for s in spaces:
            name = s["space"]
            self._scan(name)
            seq = int(s.get("seq", 0))
            rate = (seq - prev_seq.get(name, seq)) / dt if dt else None
            rows.append(
                {"space": name, "commits": seq, "commits_per_s": rate, "conflicts": self.conflicts.get(name, 0)}
            )
        snap = {
            "url": self.api.url,
            "at": time.time(),
            "interval_s": dt,
            "spaces": rows,
            "principals": [
                {
                    "subject": p["subject"],
                    "token_id": p.get("token_id"),
                    "calls": p["recorded"]["calls"],
                    "input_tokens": p["recorded"]["input_tokens"],
                    "output_tokens": p["recorded"]["output_tokens"],
                    "cost": p["recorded"]["cost"],
                    "errors": p["recorded"]["errors"],
                    "denied": p["recorded"]["denied"],
                    "remaining": p["remaining"],
                }
                for p in usage["principals"]
            ],
            "_t": now,
        }
        self.prev = snap
        return snap

    def _scan(self, space: str) -> None:
        """Count conflicts from the space's timeline, reading only what is new."""
        for _ in range(20):
            page = self.api.get(f"/v1/spaces/{space}/trace", after=self.cursors.get(space), limit=1000)
            self.conflicts[space] = self.conflicts.get(space, 0) + sum(e["kind"] == "conflict" for e in page["events"])
            if page.get("next"):
                self.cursors[space] = page["next"]
            if len(page["events"]) < 1000:
                return


def _render_top(snap: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    st = Table("space", "commits", "commits/s", "conflicts", title=f"agentbus @ {snap['url']}", expand=True)
    for s in snap["spaces"]:
        rate = "-" if s["commits_per_s"] is None else f"{s['commits_per_s']:.1f}"
        st.add_row(
            s["space"], str(s["commits"]), rate, Text(str(s["conflicts"]), style="red" if s["conflicts"] else "")
        )
    pt = Table("principal", "calls", "tokens in", "tokens out", "cost", "errors/denied", "remaining", expand=True)
    for p in snap["principals"]:
        rem = p["remaining"]
        left = ", ".join(f"{k} {rem[k]:g}" for k in ("tokens", "cost", "requests") if rem.get(k) is not None)
        pt.add_row(
            p["subject"],
            str(p["calls"]),
            str(p["input_tokens"]),
            str(p["output_tokens"]),
            f"{p['cost']:.4f}",
            f"{p['errors']}/{p['denied']}",
            left or "unlimited",
        )
    return Group(st, pt)


def top(
    url: str = URL,
    token: str = TOKEN,
    as_json: bool = typer.Option(False, "--json", help="Print one snapshot as JSON and exit."),
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    interval: float = typer.Option(2.0, help="Refresh interval, seconds (also the rate window of a snapshot)."),
) -> None:
    """Live summary: spaces, commits/s, conflicts, broker calls/tokens/cost per principal."""
    sampler = Sampler(Api(url, token))
    if as_json or once:
        sampler.sample()
        time.sleep(interval)  # a second sample, so the snapshot has rates
        snap = sampler.sample()
        snap.pop("_t", None)
        if as_json:
            print(json.dumps(snap, indent=2))
        else:
            Console().print(_render_top(snap))
        return
    from rich.live import Live

    with Live(_render_top(sampler.sample()), refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_render_top(sampler.sample()))
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
    app.command("top")(top)
