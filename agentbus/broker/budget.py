"""Budget and rate-limit arithmetic: pure, shared by every backend.

A model call *reserves* its worst case before it is sent (prompt estimate + ``max_tokens``,
priced), and *settles* the actual usage afterwards, or *releases* the reservation if the
call failed. A backend runs :func:`admit` and :func:`reserve` on every scope of a call
(the principal and its tenant) inside one atomic step, so concurrent calls can never
overspend: the sum of reservations already counts against the limit before any response
comes back.

Windows: ``window_s`` is the budget period (0 = lifetime); rpm/tpm use a fixed one-minute
window. ``inflight`` counts calls between reserve and settle/release.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

MINUTE = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one scope (a principal or a tenant) may spend; None = unlimited."""

    max_tokens: int | None = None
    max_cost: float | None = None
    max_requests: int | None = None
    window_s: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Limits:
        if not data:
            return cls()
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and data[k] is not None}
        return cls(**known)

    def is_unlimited(self) -> bool:
        return self == Limits(window_s=self.window_s)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Amount:
    tokens: int = 0
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "cost": self.cost}


@dataclass(frozen=True, slots=True)
class Counter:
    """Usage of one scope. ``tokens``/``cost``/``requests`` include open reservations."""

    window_start: float = 0.0
    tokens: int = 0
    cost: float = 0.0
    requests: int = 0
    minute_start: float = 0.0
    minute_requests: int = 0
    minute_tokens: int = 0
    inflight: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# The stored fields of a counter, in one place for every backend.
COUNTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Counter))


@dataclass(frozen=True, slots=True)
class Denial:
    scope: str
    reason: str  # tokens | cost | requests | rpm | tpm | concurrency
    retry_after_s: float
    limit: float
    used: float

    def message(self) -> str:
        what = {
            "tokens": "token budget",
            "cost": "cost budget",
            "requests": "request budget",
            "rpm": "requests-per-minute limit",
            "tpm": "tokens-per-minute limit",
            "concurrency": "concurrent-call limit",
        }[self.reason]
        return f"{what} of {self.scope} exhausted ({self.used:g} of {self.limit:g} used)"


def window_start(now: float, window_s: float) -> float:
    if window_s <= 0:
        return 0.0
    return math.floor(now / window_s) * window_s


def roll(counter: Counter, limits: Limits, now: float) -> Counter:
    """Start new windows where the old ones ended; in-flight calls carry over."""
    ws = window_start(now, limits.window_s)
    if ws != counter.window_start:
        # Reservations of calls still in flight were counted in the old window; they settle
        # against whichever window is current then, which can only under-count by them.
        counter = replace(counter, window_start=ws, tokens=0, cost=0.0, requests=0)
    ms = window_start(now, MINUTE)
    if ms != counter.minute_start:
        counter = replace(counter, minute_start=ms, minute_requests=0, minute_tokens=0)
    return counter


def admit(scope: str, counter: Counter, limits: Limits, amount: Amount, now: float) -> Denial | None:
    """Would reserving ``amount`` keep ``scope`` within its limits? ``counter`` must be rolled."""
    period_end = counter.window_start + limits.window_s if limits.window_s > 0 else math.inf
    # A lifetime budget never resets: no retry can succeed (the HTTP layer omits Retry-After).
    budget_retry = max(1.0, period_end - now) if math.isfinite(period_end) else math.inf
    minute_retry = max(1.0, counter.minute_start + MINUTE - now)
    checks: list[tuple[str, float | None, float, float, float]] = [
        ("requests", limits.max_requests, counter.requests, 1, budget_retry),
        ("tokens", limits.max_tokens, counter.tokens, amount.tokens, budget_retry),
        ("cost", limits.max_cost, counter.cost, amount.cost, budget_retry),
        ("rpm", limits.rpm, counter.minute_requests, 1, minute_retry),
        ("tpm", limits.tpm, counter.minute_tokens, amount.tokens, minute_retry),
        ("concurrency", limits.max_concurrent, counter.inflight, 1, 1.0),
    ]
    for reason, limit, used, need, retry in checks:
        if limit is not None and used + need > limit + 1e-9:
            return Denial(scope=scope, reason=reason, retry_after_s=retry, limit=float(limit), used=float(used))
    return None


def reserve(counter: Counter, amount: Amount) -> Counter:
    return replace(
        counter,
        tokens=counter.tokens + amount.tokens,
        cost=counter.cost + amount.cost,
        requests=counter.requests + 1,
        minute_requests=counter.minute_requests + 1,
        minute_tokens=counter.minute_tokens + amount.tokens,
        inflight=counter.inflight + 1,
    )


def settle(
    counter: Counter,
    reserved: Amount,
    actual: Amount,
    *,
    reserved_at: float | None = None,
    window_s: float = 0.0,
    release: bool = False,
) -> Counter:
    """Replace the reservation by the actual usage; ``counter`` must be rolled.

    A reservation charged to an earlier window is no longer in this one, so only the actual
    usage is added. ``release`` (the call failed) also gives back its request in the budget
    window; the per-minute request count stays, because it limits a rate, not spend.
    """
    same_w = reserved_at is None or window_start(reserved_at, window_s) == counter.window_start
    same_m = reserved_at is None or window_start(reserved_at, MINUTE) == counter.minute_start
    back = reserved if same_w else Amount()
    mback = reserved.tokens if same_m else 0
    return replace(
        counter,
        tokens=max(0, counter.tokens - back.tokens + actual.tokens),
        cost=max(0.0, counter.cost - back.cost + actual.cost),
        requests=max(0, counter.requests - (1 if release and same_w else 0)),
        minute_tokens=max(0, counter.minute_tokens - mback + actual.tokens),
        inflight=max(0, counter.inflight - 1),
    )


def charge(counter: Counter, actual: Amount, *, release: bool = False) -> Counter:
    """Reserve and settle ``actual`` in one step (``counter`` must be rolled): for callers
    without limits there is nothing to admit or hold, only usage to count."""
    return settle(reserve(counter, actual), actual, actual, release=release)


@dataclass(frozen=True, slots=True)
class Charge:
    """One finished call of a caller without limits, to count on every scope (see
    ``BudgetStore.charge``); ``at`` is when it finished."""

    scopes: dict[str, Limits]
    amount: Amount
    at: float
    release: bool = False


def apply_charges(stored: dict[str, Counter], charges: Iterable[Charge]) -> dict[str, tuple[float, Counter]]:
    """The counters (as stored, not rolled) after ``charges`` in order: scope -> (window_s,
    counter). One function so every backend's batch write counts alike."""
    out: dict[str, tuple[float, Counter]] = {}
    for ch in charges:
        for key, lim in ch.scopes.items():
            counter = out[key][1] if key in out else stored.get(key, Counter())
            out[key] = (lim.window_s, charge(roll(counter, lim, ch.at), ch.amount, release=ch.release))
    return out


def unlimited(limits: Limits) -> bool:
    """No limit at all: such a scope never denies, so its calls need no reservation."""
    return all(
        v is None
        for v in (
            limits.max_tokens,
            limits.max_cost,
            limits.max_requests,
            limits.rpm,
            limits.tpm,
            limits.max_concurrent,
        )
    )


def remaining(counter: Counter, limits: Limits) -> dict[str, Any]:
    """What is left, for GET /v1/budget."""

    def left(limit: float | None, used: float) -> float | None:
        return None if limit is None else max(0.0, limit - used)

    return {
        "tokens": left(limits.max_tokens, counter.tokens),
        "cost": left(limits.max_cost, counter.cost),
        "requests": left(limits.max_requests, counter.requests),
        "rpm": left(limits.rpm, counter.minute_requests),
        "tpm": left(limits.tpm, counter.minute_tokens),
        "concurrent": left(limits.max_concurrent, counter.inflight),
        "window_s": limits.window_s,
        "window_resets_at": counter.window_start + limits.window_s if limits.window_s > 0 else None,
    }
