"""Broker budgets and rate limits, on every backend: reserve before the call, settle after,
atomically in the store, so concurrent calls - also through several server processes
sharing the store - can never overspend.

One server per backend serves the module (PostgreSQL and Redis: two processes, so every
race also runs spread over both); each test uses its own tenant and tokens, so its
counters start at zero. The fake upstream's usage is exact (prompt words, 5 completion
words), so accounting is checked to the token.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from agentbus.broker.rules import estimate_tokens
from tests.conftest import BACKENDS, Server, make_store
from tests.upstream import FakeUpstream

TIMEOUT = httpx.Timeout(60.0)
COMPLETION_WORDS = 5
RACE_CALLS = 200
ADMITTED = 50


@dataclass
class Env:
    backend: str
    server: Server
    admin: str
    ok: FakeUpstream
    slow: FakeUpstream
    bad: FakeUpstream
    tenant_small: str  # tenant_limits: max_requests 3
    tenant_race: str  # tenant_limits: max_requests ADMITTED
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.server.url, timeout=TIMEOUT)

    def token(self, budgets: dict[str, Any] | None = None, *, tenant: str | None = None) -> Tok:
        subject = f"agent-{uuid.uuid4().hex[:8]}"
        tenant = tenant or f"tn-{uuid.uuid4().hex[:8]}"
        body = {"subject": subject, "tenant": tenant, "budgets": budgets or {}}
        r = self.http.post("/v1/admin/tokens", json=body, headers=auth(self.admin))
        assert r.status_code == 201, r.text
        return Tok(r.json()["token"], tenant, subject)

    def chat(
        self, tok: str, model: str = "m", prompt: str = "a", max_tokens: int = 5, url: str | None = None
    ) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        return self.http.post(f"{url or self.server.url}/v1/chat/completions", json=body, headers=auth(tok))

    def budget(self, tok: Tok, url: str | None = None) -> dict[str, Any]:
        r = self.http.get(f"{url or self.server.url}/v1/budget", headers=auth(tok))
        assert r.status_code == 200, r.text
        data = r.json()
        assert (data["tenant"], data["subject"]) == (tok.tenant, tok.subject)
        return data["scopes"]  # type: ignore[no-any-return]

    def used(self, tok: Tok, url: str | None = None) -> dict[str, Any]:
        return self.budget(tok, url)[f"p:{tok.tenant}/{tok.subject}"]["used"]  # type: ignore[no-any-return]


class Tok(str):
    tenant: str
    subject: str

    def __new__(cls, token: str, tenant: str, subject: str) -> Tok:
        t = super().__new__(cls, token)
        t.tenant, t.subject = tenant, subject
        return t


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"budget-{backend}")
    store = make_store(backend, request, tmp)
    uid = uuid.uuid4().hex[:8]
    ok = FakeUpstream(f"ok-{uid}", models=["m", "priced-m"], completion_words=COMPLETION_WORDS).start()
    slow = FakeUpstream(f"slow-{uid}", models=["slow"], completion_words=COMPLETION_WORDS).start()
    slow.delay_s = 1.5
    bad = FakeUpstream(f"bad-{uid}", models=["broken"]).start()
    bad.mode = "error500"
    tenant_small, tenant_race = f"tl-{uid}", f"tr-{uid}"
    config = tmp / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "endpoints": [ok.endpoint(max_concurrency=1000), slow.endpoint(), bad.endpoint()],
                "tenant_limits": {tenant_small: {"max_requests": 3}, tenant_race: {"max_requests": ADMITTED}},
                "aliases": {"priced": "priced-m"},
                # Per 1k tokens, so one call (1 prompt + 5 completion tokens) costs exactly 11.
                "prices": {"priced-m": {"input_per_1k": 1000.0, "output_per_1k": 2000.0}},
                "circuit": {"failures": 1000},
                "retry": {"attempts": 1},
            }
        )
    )
    admin = "ab_" + secrets.token_urlsafe(32)
    srv_env = {
        "AGENTBUS_AUTH": "true",
        "AGENTBUS_BOOTSTRAP_ADMIN_TOKEN": admin,
        "AGENTBUS_AUTH_CACHE_TTL_S": "60",  # tokens are never revoked here: spare the store
        "AGENTBUS_REDIS_PREFIX": f"bb{uid}",
        "AGENTBUS_DEFAULT_TENANT": f"adm-{uid}",
        "AGENTBUS_BROKER_CONFIG": str(config),
    }
    srv = Server(store=store, env=srv_env, log_dir=tmp)
    e: Env | None = None
    try:
        srv.start(1 if backend == "sqlite" else 2)
        e = Env(backend, srv, admin, ok, slow, bad, tenant_small, tenant_race)
        yield e
    finally:
        if e is not None:
            e.http.close()
        srv.stop()
        for u in (ok, slow, bad):
            u.stop()


def burst(calls: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    """All ``(url, token, body)`` chat calls at once (one asyncio.gather); results in order."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=len(calls))
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(
                *(client.post(f"{url}/v1/chat/completions", json=body, headers=auth(tok)) for url, tok, body in calls)
            )

    return asyncio.run(run())


def spread(urls: list[str], tok: str, body: dict[str, Any], n: int) -> list[tuple[str, str, dict[str, Any]]]:
    return [(urls[i % len(urls)], tok, body) for i in range(n)]


def body_of(prompt: str = "a", max_tokens: int = 5) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


def statuses(results: list[httpx.Response]) -> Counter[int]:
    """Status counts; anything but 200/429 fails here, showing what came back."""
    odd = [(r.status_code, r.text[:300]) for r in results if r.status_code not in (200, 429)]
    assert not odd, f"{len(odd)} unexpected responses, e.g. {odd[:3]}"
    return Counter(r.status_code for r in results)


def check_denials(results: list[httpx.Response], code: str, limit_kind: str, *, resets: bool = True) -> None:
    """Every refusal is a 429 in the one error shape. A limit that resets (a rate, a budget
    with a window) says when, in ``retry_after_ms`` and ``Retry-After``; a lifetime budget
    never resets, so it is not retryable and names no time."""
    for r in results:
        if r.status_code == 200:
            continue
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"], err["limit_kind"]) == ("rate_limited", code, limit_kind), err
        assert err["message"]
        if resets:
            assert err["retryable"] is True, err
            assert isinstance(err["retry_after_ms"], int) and err["retry_after_ms"] > 0, err
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert err["retryable"] is False, err
            assert "retry_after_ms" not in err, err
            assert "retry-after" not in r.headers


def avoid_minute_edge(margin_s: float = 10.0) -> None:
    """rpm/tpm windows are fixed wall-clock minutes: start a rate test well inside one."""
    left = 60.0 - time.time() % 60.0
    if left < margin_s:
        time.sleep(left + 0.2)


# --------------------------------------------------------------------------- races


def test_request_budget_race_admits_exactly_the_limit(env: Env) -> None:
    # SQLite: one process. PostgreSQL, Redis: clients spread over two processes sharing the store.
    urls = env.server.urls
    tok = env.token({"max_requests": ADMITTED})
    results = burst(spread(urls, tok, body_of(), RACE_CALLS))
    assert statuses(results) == {200: ADMITTED, 429: RACE_CALLS - ADMITTED}
    check_denials(results, "budget_exceeded", "requests", resets=False)
    for url in urls:  # every process sees the same shared counters
        used = env.used(tok, url)
        assert used["requests"] == ADMITTED
        assert used["inflight"] == 0
        assert used["tokens"] == ADMITTED * (1 + COMPLETION_WORDS)  # settled to the actual usage
    scope = env.budget(tok)[f"p:{tok.tenant}/{tok.subject}"]
    assert scope["remaining"]["requests"] == 0
    assert scope["limits"]["max_requests"] == ADMITTED
    # Once spent, it stays spent.
    r = env.chat(tok, url=urls[-1])
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"


def test_token_budget_race_never_overspends(env: Env) -> None:
    """Two token budgets raced at once (100 calls each, interleaved, spread over the processes).

    ``exact``: the reservation (prompt estimate + max_tokens) equals the actual usage, so
    exactly ADMITTED calls fit whatever the interleaving. ``over``: the reservation exceeds
    the actual usage, so at least ADMITTED calls are admitted (more as settled calls give
    budget back); the recorded spend is exact and never above the limit.
    """
    prompt, calls = "a", 2 * ADMITTED
    actual = len(prompt.split()) + COMPLETION_WORDS
    exact_reserve = estimate_tokens(prompt) + COMPLETION_WORDS
    assert exact_reserve == actual
    over_max_tokens = 40
    over_limit = ADMITTED * (estimate_tokens(prompt) + over_max_tokens)
    exact = env.token({"max_tokens": ADMITTED * exact_reserve})
    over = env.token({"max_tokens": over_limit})
    urls = env.server.urls
    plan = [
        call
        for pair in zip(
            spread(urls, exact, body_of(prompt, COMPLETION_WORDS), calls),
            spread(urls[::-1], over, body_of(prompt, over_max_tokens), calls),
            strict=True,
        )
        for call in pair
    ]
    results = burst(plan)
    of_exact, of_over = results[0::2], results[1::2]

    assert statuses(of_exact) == {200: ADMITTED, 429: calls - ADMITTED}
    check_denials(of_exact, "budget_exceeded", "tokens", resets=False)
    used = env.used(exact)
    assert (used["tokens"], used["requests"], used["inflight"]) == (ADMITTED * actual, ADMITTED, 0)

    ok = statuses(of_over)[200]
    assert ok >= ADMITTED
    check_denials(of_over, "budget_exceeded", "tokens", resets=False)
    used = env.used(over)
    assert used["tokens"] == ok * actual <= over_limit
    assert used["inflight"] == 0
    assert env.budget(over)[f"p:{over.tenant}/{over.subject}"]["remaining"]["tokens"] == over_limit - ok * actual


def test_tenant_limit_race_across_principals(env: Env) -> None:
    toks = [env.token(tenant=env.tenant_race) for _ in range(4)]
    n = 2 * ADMITTED
    urls = env.server.urls
    results = burst([(urls[i % len(urls)], toks[i % len(toks)], body_of()) for i in range(n)])
    assert statuses(results) == {200: ADMITTED, 429: n - ADMITTED}
    check_denials(results, "budget_exceeded", "requests", resets=False)
    denial = next(r for r in results if r.status_code == 429).json()["error"]
    assert denial["scope"] == f"t:{env.tenant_race}"
    scopes = env.budget(toks[0])
    assert scopes[f"t:{env.tenant_race}"]["used"]["requests"] == ADMITTED
    assert sum(env.used(t)["requests"] for t in toks) == ADMITTED


# --------------------------------------------------------------------------- limits


def test_tenant_limits_apply_across_principals(env: Env) -> None:
    a, b = env.token(tenant=env.tenant_small), env.token(tenant=env.tenant_small)
    assert [env.chat(a).status_code, env.chat(a).status_code, env.chat(b).status_code] == [200, 200, 200]
    for tok in (b, a):
        r = env.chat(tok)
        check_denials([r], "budget_exceeded", "requests", resets=False)
        assert r.status_code == 429
        assert r.json()["error"]["scope"] == f"t:{env.tenant_small}"
    assert sum(q["headers"]["x-agent-tenant"] == env.tenant_small for q in env.ok.requests) == 3
    tenant = env.budget(a)[f"t:{env.tenant_small}"]
    assert tenant["used"]["requests"] == 3 and tenant["remaining"]["requests"] == 0
    assert (env.used(a)["requests"], env.used(b)["requests"]) == (2, 1)
    # Another tenant is not affected.
    assert env.chat(env.token()).status_code == 200


def test_rpm_limit(env: Env) -> None:
    avoid_minute_edge()
    tok = env.token({"rpm": 3})
    assert [env.chat(tok).status_code for _ in range(3)] == [200, 200, 200]
    r = env.chat(tok)
    check_denials([r], "rate_limited", "rpm")
    assert r.status_code == 429
    err = r.json()["error"]
    assert 0 < err["retry_after_ms"] <= 60_000
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert env.used(tok)["minute_requests"] == 3


def test_tpm_limit(env: Env) -> None:
    avoid_minute_edge()
    # Each call reserves estimate("a") + 5 = 6 tokens and settles 6: two fit in 12, not three.
    tok = env.token({"tpm": 2 * (estimate_tokens("a") + COMPLETION_WORDS)})
    assert [env.chat(tok).status_code for _ in range(2)] == [200, 200]
    r = env.chat(tok)
    check_denials([r], "rate_limited", "tpm")
    assert r.status_code == 429


def test_max_concurrent_limit(env: Env) -> None:
    tok = env.token({"max_concurrent": 2})
    mine = lambda: [q for q in env.slow.requests if q["headers"]["x-agent-id"] == tok.subject]  # noqa: E731
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(env.chat(tok, model="slow"))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(mine()) < 2:
            assert time.monotonic() < deadline, "the two slow calls never reached the upstream"
            time.sleep(0.02)
        # Both calls are in flight upstream (each takes 1.5 s): a third is refused now.
        assert env.used(tok)["inflight"] == 2
        r = env.chat(tok)
        check_denials([r], "rate_limited", "concurrency")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
    finally:
        for t in threads:
            t.join(60)
    assert [r.status_code for r in results] == [200, 200]
    assert env.used(tok)["inflight"] == 0
    # The slots are free again.
    assert env.chat(tok).status_code == 200


def test_cost_budget_is_priced_by_the_served_model(env: Env) -> None:
    per_call = 1 * 1.0 + COMPLETION_WORDS * 2.0  # prompt "a", max_tokens = completion: reserve == actual
    assert estimate_tokens("a") == 1
    tok = env.token({"max_cost": 10 * per_call})
    urls = env.server.urls
    body = {"model": "priced", "messages": [{"role": "user", "content": "a"}], "max_tokens": COMPLETION_WORDS}
    results = burst(spread(urls, tok, body, 30))
    assert statuses(results) == {200: 10, 429: 20}
    check_denials(results, "budget_exceeded", "cost", resets=False)
    used = env.used(tok)
    assert used["cost"] == pytest.approx(10 * per_call)
    assert used["tokens"] == 10 * (1 + COMPLETION_WORDS)
    # The unpriced model costs nothing, so the same token may still call it.
    assert env.chat(tok).status_code == 200
    assert env.used(tok)["cost"] == pytest.approx(10 * per_call)


def test_budget_window_resets(env: Env) -> None:
    window = 4.0
    # Budget periods are aligned to multiples of window_s: start just after a boundary.
    time.sleep(window - time.time() % window + 0.05)
    tok = env.token({"max_requests": 2, "window_s": window})
    assert [env.chat(tok).status_code, env.chat(tok).status_code] == [200, 200]
    r = env.chat(tok)
    check_denials([r], "budget_exceeded", "requests")  # a windowed budget resets: Retry-After
    assert r.status_code == 429
    assert 0 < r.json()["error"]["retry_after_ms"] <= window * 1000
    scope = env.budget(tok)[f"p:{tok.tenant}/{tok.subject}"]
    resets_at = scope["remaining"]["window_resets_at"]
    assert resets_at is not None and resets_at - time.time() <= window
    time.sleep(max(0.0, resets_at - time.time()) + 0.05)
    assert env.chat(tok).status_code == 200  # a new period
    assert env.used(tok)["requests"] == 1


def test_failed_call_releases_its_reservation(env: Env) -> None:
    tok = env.token({"max_tokens": 100})
    # Reserves estimate + max_tokens = 90 of 100; the upstream fails; nothing is spent.
    for _ in range(3):
        r = env.chat(tok, model="broken", max_tokens=89)
        assert r.status_code == 502, r.text
    used = env.used(tok)
    assert (used["tokens"], used["cost"], used["inflight"]) == (0, 0, 0)
    # The failed calls give their budget request back, but still count against the rate.
    assert (used["requests"], used["minute_requests"]) == (0, 3)
    # ... so the full budget is still there for a call that needs most of it.
    r = env.chat(tok, max_tokens=89)
    assert r.status_code == 200, r.text
    assert env.used(tok)["tokens"] == 1 + COMPLETION_WORDS
    # A denied call does not spend either.
    r = env.chat(tok, max_tokens=99)
    check_denials([r], "budget_exceeded", "tokens", resets=False)
    assert r.status_code == 429
    assert env.used(tok)["tokens"] == 1 + COMPLETION_WORDS


def test_token_budgets_are_validated(env: Env) -> None:
    """BUG (api/admin.py: ``TokenIn.budgets`` is an unchecked dict): a misspelt key silently
    means "unlimited", and a value of the wrong type is stored and makes every later call
    of that token fail with a 500 (``str + float`` in budget.admit)."""

    def create(budgets: dict[str, Any]) -> httpx.Response:
        body = {"subject": f"agent-{uuid.uuid4().hex[:8]}", "budgets": budgets}
        return env.http.post("/v1/admin/tokens", json=body, headers=auth(env.admin))

    for budgets in ({"max_request": 5}, {"max_tokens": -1}, {"rpm": [1]}, {"max_cost": "lots"}):
        r = create(budgets)
        if r.status_code == 201:  # accepted: then at least no call may crash on it
            call = env.chat(r.json()["token"])
            assert call.status_code != 500, (budgets, call.text)
        assert r.status_code == 422, (budgets, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request"
    # A number in a string is either refused or stored as the number it means.
    r = create({"max_requests": "1"})
    if r.status_code == 201:
        assert r.json()["budgets"]["max_requests"] == 1
        tok = r.json()["token"]
        assert [env.chat(tok).status_code, env.chat(tok).status_code] == [200, 429]
    else:
        assert r.status_code == 422, r.text
