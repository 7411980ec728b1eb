"""The operator page (``/ui``) in a real browser against a real agentbus.

One auth-mode server (SQLite; the page only talks to the HTTP API, so the backend does not
matter here) with a fake OpenAI-compatible upstream behind the broker. Three agents run a
real multi-agent session over HTTP: they read and commit the same shard, one commit is
rejected with 409, agents call the model through the broker. Then Chromium (Debian's, at
``/usr/bin/chromium``; Playwright never downloads a browser) drives the page with an
operator token and checks what an operator must be able to see: spaces, per-agent lanes,
the conflict and who won it, a shard's history with line diffs, budgets, and a new commit
arriving live without a reload. Screenshots go to ``test-artifacts/ui/``.

Without Chromium (or the playwright package) the browser tests skip with a loud reason
outside CI and fail with ``CI=true``.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentbus.migrate import upgrade
from tests.conftest import IN_CI, ROOT, Server, migrate
from tests.upstream import FakeUpstream

CHROMIUM = os.environ.get("AGENTBUS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
MODEL = "ui-model"
TIMEOUT_MS = 15_000
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def browser_unavailable(what: str) -> None:
    msg = f"{what} - install Debian's chromium (apt-get install chromium) and the playwright package"
    if IN_CI:
        pytest.fail(f"CI=true and {msg}")
    pytest.skip(f"SKIPPING: {msg}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- the live server


@dataclass
class Live:
    server: Server
    http: httpx.Client
    admin: str
    operator: str = ""
    operator_subject: str = ""
    agents: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def mint(self, subject: str, **body: Any) -> str:
        r = self.http.post("/v1/admin/tokens", headers=bearer(self.admin), json={"subject": subject, **body})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def trace_api(self, space: str) -> bool:
        """Whether this server has ``GET /v1/spaces/{space}/trace`` (being built alongside the page)."""
        r = self.http.get(f"/v1/spaces/{space}/trace", headers=bearer(self.operator))
        return not (r.status_code == 404 and r.json()["error"]["code"] == "route_not_found")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("ui-up", models=[MODEL]).start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("ui")
    config = tmp / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "endpoints": [upstream.endpoint()],
                "prices": {MODEL: {"input_per_1k": 0.5, "output_per_1k": 1.5}},
            }
        )
    )
    store = f"sqlite:///{tmp / 'agentbus.db'}"
    upgrade(store)  # in-process (before any browser starts): cheaper than the CLI
    admin = "ab_" + secrets.token_urlsafe(32)
    env = {
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": admin,
        "AGENTBUS_AUTH_CACHE_TTL_S": "0",
        "AGENTBUS_DEFAULT_TENANT": f"ui-{uuid.uuid4().hex[:8]}",
        "AGENTBUS_BROKER_CONFIG": str(config),
        "AGENTBUS_TRACE_FLUSH_S": "0.1",
    }
    srv = Server(store=store, env=env, log_dir=tmp).start()
    http = httpx.Client(base_url=srv.url, timeout=httpx.Timeout(15.0))
    lv = Live(srv, http, admin)
    try:
        lv.operator_subject = "ops-ui"
        lv.operator = lv.mint(
            lv.operator_subject,
            kind="operator",
            scopes=["bus:read", "traces:read", "broker:invoke"],
            budgets={"max_tokens": 50_000, "max_requests": 100},
        )
        for name in ("alice", "bob", "carol"):
            lv.agents[name] = lv.mint(name, budgets={"max_tokens": 10_000, "max_cost": 1.0})
        yield lv
    finally:
        http.close()
        srv.stop()


@dataclass
class AgentRun:
    space: str
    conflict: dict[str, Any]
    seqs: dict[str, int]


def run_agents(lv: Live, space: str) -> AgentRun:
    """A real three-agent session over HTTP: shared plan, one lost race (409), model calls."""
    h = {name: {**bearer(tok), "X-Agent-Space": space} for name, tok in lv.agents.items()}
    base = f"/v1/spaces/{space}"

    def read(agent: str, key: str) -> httpx.Response:
        return lv.http.get(f"{base}/shards/{key}", headers=h[agent])

    def commit(agent: str, **writes: Any) -> httpx.Response:
        body = {"writes": [{"key": k, "value": v} for k, v in writes.items()]}
        return lv.http.post(f"{base}/commit", headers=h[agent], json=body)

    def chat(agent: str, prompt: str) -> None:
        r = lv.http.post(
            "/v1/chat/completions",
            headers=h[agent],
            json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16},
        )
        assert r.status_code == 200, r.text

    seqs: dict[str, int] = {}
    assert read("alice", "plan").status_code == 404  # read as absent
    r = commit("alice", plan={"goal": "ship the release", "steps": ["design"]}, notes="kickoff")
    assert r.status_code == 200, r.text
    seqs["alice"] = r.json()["seq"]
    assert read("bob", "plan").json()["version"] == 1
    assert read("carol", "plan").json()["version"] == 1
    chat("bob", "what should we build next")
    r = commit("bob", plan={"goal": "ship the release", "steps": ["design", "build"]})
    assert r.status_code == 200, r.text
    seqs["bob"] = r.json()["seq"]
    # carol read plan v1, bob committed v2 since: her commit loses the race.
    r = commit("carol", plan={"goal": "ship the release", "steps": ["design", "test"]})
    assert r.status_code == 409, r.text
    conflict = r.json()["error"]
    assert conflict["conflicts"][0]["committed_by"] == "bob"
    assert conflict["conflicts"][0]["commit_seq"] == seqs["bob"]
    # She re-reads and retries on top of bob's version.
    assert read("carol", "plan").json()["version"] == 2
    chat("carol", "merge test step into the plan")
    r = commit("carol", plan={"goal": "ship the release", "steps": ["design", "build", "test"]})
    assert r.status_code == 200, r.text
    seqs["carol"] = r.json()["seq"]
    return AgentRun(space, conflict, seqs)


@pytest.fixture(scope="module")
def agent_run(live: Live) -> AgentRun:
    return run_agents(live, f"ui-{uuid.uuid4().hex[:10]}")


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        browser_unavailable(f"Chromium is not installed at {CHROMIUM}")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        browser_unavailable("the playwright Python package is not installed")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Error as exc:
            browser_unavailable(f"Chromium at {CHROMIUM} does not start ({str(exc)[:200]})")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)  # the machine may be loaded: wait as long as for actions
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page: Any, lv: Live, token: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lv.url}/ui")
    expect(page.get_by_test_id("whoami")).to_contain_text("Not signed in")  # the page's script is running
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def open_space(page: Any, space: str) -> None:
    from playwright.sync_api import expect

    page.get_by_test_id("spaces").get_by_role("button", name=space).click()
    expect(page.get_by_role("heading", name=re.compile("Timeline"))).to_contain_text(space)


# --------------------------------------------------------------------------- tests


def test_page_and_assets_are_served_safely(live: Live) -> None:
    """No token needed for the page itself; a strict same-origin CSP; the data still needs a token."""
    r = live.http.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'"):
        assert directive in csp, csp
    assert "frame-ancestors 'none'" in csp and "unsafe" not in csp, csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline scripts would need 'unsafe-inline'"
    assert not re.search(r"\sstyle=", html), "inline styles would need 'unsafe-inline'"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "the page must not load anything from elsewhere"
    for name, ctype in (
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ):
        a = live.http.get(f"/ui/static/{name}")
        assert a.status_code == 200, name
        assert a.headers["content-type"] == ctype
        assert "script-src 'self'" in a.headers["content-security-policy"]
        assert f"/ui/static/{name}" in html
    js = live.http.get("/ui/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    assert "http://" not in js and "https://" not in js
    # Only the listed assets: no other files of the package, no traversal.
    for bad in ("routes.py", "index.html", "..%2Froutes.py", "%2e%2e/__init__.py", "nope.js"):
        assert live.http.get(f"/ui/static/{bad}").status_code == 404, bad
    # The API keeps its own, stricter CSP.
    api_csp = live.http.get("/healthz").headers["content-security-policy"]
    assert api_csp == "default-src 'none'; frame-ancestors 'none'"
    # Every data endpoint the page calls still demands a token.
    for path in (
        "/v1/whoami",
        "/v1/spaces",
        "/v1/spaces/x/log",
        "/v1/spaces/x/shards",
        "/v1/spaces/x/shards/k/history",
        "/v1/spaces/x/events",
        "/v1/spaces/x/trace",
        "/v1/usage",
        "/v1/budget",
    ):
        assert live.http.get(path).status_code == 401, path
    assert live.http.get("/v1/spaces", headers=bearer(live.operator)).status_code == 200


def test_operator_sees_the_run(live: Live, agent_run: AgentRun, page: Any) -> None:
    from playwright.sync_api import expect

    space = agent_run.space
    # A wrong token gets nowhere.
    sign_in(page, live, "ab_" + "x" * 43)
    expect(page.get_by_test_id("whoami")).to_contain_text("Not signed in: this token was refused")
    expect(page.get_by_test_id("spaces").get_by_role("button")).to_have_count(0)

    sign_in(page, live, live.operator)
    expect(page.get_by_test_id("whoami")).to_contain_text(live.operator_subject)
    open_space(page, space)

    # One lane per agent (the page's own listings are not shown as a lane).
    timeline = page.get_by_test_id("timeline")
    for agent in ("alice", "bob", "carol"):
        expect(timeline.get_by_role("list", name=agent, exact=True)).to_be_visible()
    expect(timeline.get_by_role("list", name=live.operator_subject)).to_have_count(0)
    bob_lane = timeline.get_by_role("list", name="bob", exact=True)
    expect(bob_lane.get_by_test_id("event-commit")).to_contain_text(f"commit #{agent_run.seqs['bob']}")
    carol_lane = timeline.get_by_role("list", name="carol", exact=True)
    expect(carol_lane.get_by_test_id("event-commit")).to_contain_text(f"commit #{agent_run.seqs['carol']}")
    expect(page.get_by_test_id("trace-note")).to_be_hidden()  # the trace API answered

    # A commit's details.
    bob_lane.get_by_test_id("event-commit").click()
    detail = page.get_by_test_id("event-detail")
    expect(detail).to_contain_text(f"Commit #{agent_run.seqs['bob']}")
    expect(detail).to_contain_text("plan → v2")

    # Shard history with line diffs between consecutive versions, newest first.
    page.get_by_test_id("shards").get_by_role("button", name=re.compile(r"^plan, version 3")).click()
    history = page.get_by_test_id("shard-history")
    versions = history.get_by_test_id("version")
    expect(versions).to_have_count(3)
    expect(versions.first).to_contain_text("v3")
    expect(versions.first).to_contain_text("by carol")
    newest = versions.first.get_by_test_id("diff-line")
    expect(newest.filter(has_text='"test"')).to_have_class(re.compile(r"\badd\b"))
    expect(newest.filter(has_text='"build"').and_(page.locator(".del"))).to_have_count(1)
    expect(versions.nth(1).get_by_test_id("diff-line").filter(has_text='"build"')).to_have_class(re.compile(r"\badd\b"))

    # Broker usage and budgets.
    usage = page.get_by_test_id("usage")
    expect(usage.get_by_role("table")).to_be_visible()
    expect(page.get_by_test_id("usage-note")).to_be_hidden()  # GET /v1/usage answered
    for agent in ("alice", "bob", "carol"):
        expect(usage.get_by_role("row").filter(has_text=agent)).to_contain_text("max_tokens")
    bob_row = usage.get_by_role("row").filter(has=page.get_by_role("rowheader", name=re.compile(r"^bob")))
    expect(bob_row.get_by_role("cell").first).to_have_text("1")  # one request
    page.screenshot(path=str(ARTIFACTS / "operator-run.png"), full_page=True)

    # Live: a new commit over HTTP appears without a reload, and so does its value (as text).
    expect(page.get_by_test_id("live-status")).to_contain_text("live")
    page.evaluate("window.__marker = 'same page'")
    h = {**bearer(live.agents["alice"]), "X-Agent-Space": space}
    assert live.http.get(f"/v1/spaces/{space}/shards/notes", headers=h).status_code == 200
    r = live.http.post(f"/v1/spaces/{space}/commit", headers=h, json={"writes": [{"key": "notes", "value": XSS}]})
    assert r.status_code == 200, r.text
    seq = r.json()["seq"]
    alice_lane = timeline.get_by_role("list", name="alice", exact=True)
    expect(alice_lane.get_by_test_id("event-commit").filter(has_text=f"commit #{seq}")).to_be_visible()
    expect(page.get_by_test_id("live-status")).to_contain_text(f"#{seq} by alice")
    assert page.evaluate("window.__marker") == "same page", "the page reloaded"
    page.get_by_test_id("shards").get_by_role("button", name=re.compile(r"^notes, version 2")).click()
    notes_diff = history.get_by_test_id("version").first.get_by_test_id("diff-line")
    expect(notes_diff.filter(has_text="kickoff")).to_have_class(re.compile(r"\bdel\b"))
    expect(notes_diff.filter(has_text="<img src=x onerror=")).to_have_class(re.compile(r"\badd\b"))
    assert page.locator("#history img, #history script").count() == 0
    assert page.evaluate("window.__pwned") is None, "a shard value was executed as HTML"
    page.screenshot(path=str(ARTIFACTS / "operator-live.png"), full_page=True)


def test_conflict_is_shown_with_the_winning_commit(live: Live, agent_run: AgentRun, page: Any) -> None:
    """Needs the trace API: a 409 is not in the commit log, only in the traced events."""
    from playwright.sync_api import expect

    if not live.trace_api(agent_run.space):
        pytest.skip("SKIPPING: GET /v1/spaces/{space}/trace is not in this tree yet; conflicts come only from it")
    sign_in(page, live, live.operator)
    open_space(page, agent_run.space)
    expect(page.get_by_test_id("trace-note")).to_be_hidden()
    carol_lane = page.get_by_test_id("timeline").get_by_role("list", name="carol", exact=True)
    conflict = carol_lane.get_by_test_id("event-conflict")
    expect(conflict).to_have_count(1)
    expect(conflict).to_contain_text("plan")
    expect(conflict).to_contain_text(f"won by bob #{agent_run.seqs['bob']}")
    expect(carol_lane.get_by_test_id("event-read").first).to_contain_text("plan")
    expect(page.get_by_test_id("timeline").get_by_test_id("event-model_call").first).to_contain_text(MODEL)
    conflict.click()
    table = page.get_by_test_id("conflict-table")
    row = table.get_by_role("row").filter(has_text="plan")
    expect(row).to_contain_text("stale_read")
    expect(row).to_contain_text(f"bob (commit #{agent_run.seqs['bob']})")
    want = agent_run.conflict["conflicts"][0]
    expect(row.get_by_role("cell").nth(2)).to_have_text(str(want["read_version"]))
    expect(row.get_by_role("cell").nth(3)).to_have_text(str(want["current_version"]))
    # The winning commit is highlighted in bob's lane.
    bob_lane = page.get_by_test_id("timeline").get_by_role("list", name="bob", exact=True)
    expect(bob_lane.locator(".chip.winner")).to_contain_text(f"commit #{agent_run.seqs['bob']}")
    page.screenshot(path=str(ARTIFACTS / "operator-conflict.png"), full_page=True)


def test_without_traces_read_the_page_falls_back(live: Live, agent_run: AgentRun, page: Any) -> None:
    """A token without traces:read gets commits from the commit log and its own budget only."""
    from playwright.sync_api import expect

    subject = f"bus-reader-{uuid.uuid4().hex[:6]}"
    token = live.mint(subject, kind="operator", scopes=["bus:read", "broker:invoke"], budgets={"max_requests": 7})
    sign_in(page, live, token)
    open_space(page, agent_run.space)
    expect(page.get_by_test_id("trace-note")).to_contain_text("lacks the traces:read scope")
    timeline = page.get_by_test_id("timeline")
    for agent, seq in agent_run.seqs.items():
        lane = timeline.get_by_role("list", name=agent, exact=True)
        expect(lane.get_by_test_id("event-commit").filter(has_text=f"commit #{seq}")).to_be_visible()
    expect(timeline.get_by_test_id("event-conflict")).to_have_count(0)
    expect(timeline.get_by_test_id("event-read")).to_have_count(0)
    expect(page.get_by_test_id("usage-note")).to_contain_text("/v1/budget")
    own = page.get_by_test_id("usage").get_by_role("row").filter(has_text=subject)
    expect(own).to_contain_text("max_requests: 7")
    # Live updates work from the commit log too.
    h = bearer(live.agents["bob"])
    space = agent_run.space
    r = live.http.post(f"/v1/spaces/{space}/commit", headers=h, json={"writes": [{"key": "fallback", "value": 1}]})
    assert r.status_code == 200, r.text
    lane = timeline.get_by_role("list", name="bob", exact=True)
    expect(lane.get_by_test_id("event-commit").filter(has_text=f"commit #{r.json()['seq']}")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "operator-fallback.png"), full_page=True)


def test_line_diff_is_a_minimal_lcs_diff(live: Live, page: Any) -> None:
    """The page's diff: applying it gives back both versions, and it keeps a longest common
    subsequence of lines (checked against a reference LCS on random inputs)."""
    page.goto(f"{live.url}/ui")
    result = page.evaluate(
        """() => {
          const lcs = (x, y) => {
            const dp = Array.from({ length: x.length + 1 }, () => Array(y.length + 1).fill(0));
            for (let i = x.length - 1; i >= 0; i--)
              for (let j = y.length - 1; j >= 0; j--)
                dp[i][j] = x[i] === y[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
            return dp[0][0];
          };
          let seed = 7;
          const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
          const lines = () => Array.from({ length: rnd(9) }, () => "abcd"[rnd(4)]);
          for (let t = 0; t < 3000; t++) {
            const a = lines(), b = lines();
            const d = diffLines(a, b);
            const left = d.filter((l) => l.op !== "add").map((l) => l.text);
            const right = d.filter((l) => l.op !== "del").map((l) => l.text);
            if (left.join("\\n") !== a.join("\\n") || right.join("\\n") !== b.join("\\n")) return ["wrong", a, b];
            if (d.filter((l) => l.op === "ctx").length !== lcs(a, b)) return ["not minimal", a, b];
          }
          return diffLines(["{", '  "a": 1', "}"], ["{", '  "a": 2', "}"]).map((l) => l.op + ":" + l.text);
        }"""
    )
    assert result == ["ctx:{", 'del:  "a": 1', 'add:  "a": 2', "ctx:}"], result


def test_dev_mode_needs_no_token(tmp_path: Path, page: Any) -> None:
    """With auth off (loopback dev mode) the page works without a token; X-Agent-Id is optional."""
    from playwright.sync_api import expect

    store = f"sqlite:///{tmp_path / 'agentbus.db'}"
    migrate(store)  # a subprocess: Playwright's sync API already runs an event loop in this thread
    srv = Server(store=store, env={"AGENTBUS_AUTH": "false"}, log_dir=tmp_path).start()
    try:
        space = f"dev-{uuid.uuid4().hex[:8]}"
        r = httpx.post(
            f"{srv.url}/v1/spaces/{space}/commit",
            headers={"X-Agent-Id": "dev-agent"},
            json={"writes": [{"key": "k", "value": "hello"}]},
        )
        assert r.status_code == 200, r.text
        page.goto(f"{srv.url}/ui")
        expect(page.get_by_test_id("whoami")).to_contain_text("anonymous")
        page.get_by_label("Agent id").fill("ops-dev")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_test_id("whoami")).to_contain_text("ops-dev")
        open_space(page, space)
        lane = page.get_by_test_id("timeline").get_by_role("list", name="dev-agent", exact=True)
        expect(lane.get_by_test_id("event-commit")).to_contain_text("commit #1")
    finally:
        page.goto("about:blank")  # drop the page's event stream, or the server waits for it to end
        srv.stop()


def test_sse_parser_handles_split_chunks(live: Live, page: Any) -> None:
    """The page reads the event stream with fetch (EventSource cannot send a bearer token), so
    its own SSE parser must cope with any chunking: CRLF split across reads, multi-line data,
    comments, UTF-8 split inside a character, and an unterminated last event."""
    page.goto(f"{live.url}/ui")
    events = page.evaluate(
        """async () => {
          const enc = new TextEncoder();
          const e = enc.encode("id: 3\\ndata: caf\\u00e9\\n\\n");
          const cut = e.indexOf(0xc3) + 1;  // inside the two bytes of the accented e
          const chunks = [
            enc.encode("retry: 1000\\r\\n\\r\\n"),
            enc.encode('id: 1\\nevent: commit\\ndata: {"seq"'),
            enc.encode(':1}\\n\\n: keep-alive\\n\\n'),
            enc.encode("id: 2\\r"),
            enc.encode("\\nevent: commit\\r\\ndata: x\\r\\ndata:y\\r\\n\\r\\n"),
            e.slice(0, cut),
            e.slice(cut),
            enc.encode("data: never dispatched"),
          ];
          const stream = new ReadableStream({ start(c) { for (const ch of chunks) c.enqueue(ch); c.close(); } });
          const out = [];
          await readSSE(stream, new AbortController().signal, (ev) => out.push(ev));
          return out;
        }"""
    )
    assert events == [
        {"event": "message", "id": None, "data": "", "retry": 1000},
        {"event": "commit", "id": "1", "data": '{"seq":1}', "retry": None},
        {"event": "commit", "id": "2", "data": "x\ny", "retry": None},
        {"event": "message", "id": "3", "data": "café", "retry": None},
    ], events
