"""This process's copy of the epochs (delivery logs) of sessions whose reads it served.

Why: a commit must validate against the session's whole epoch. Loading it from the backend
costs a round trip before the commit itself; a process that served every read of the
session already knows what the epoch holds, so the commit can go in one round trip.

A copy is only kept while it is provably exact. The backend reports, for every read, what it
did to the epoch ('a' added an entry, 'o' set overflow, 'n' nothing) and the epoch's *tag*
before and after it, read under the epoch's lock; a tag changes whenever the epoch's content
does. The copy follows only if the tag before this read is the tag the copy was made at
(nothing else touched the epoch in between). Any other change (a read served by another
process, a listing, an expired and recreated epoch) drops it, and the commit loads the epoch
as before. The backend's commit step compares the tag again under its lock, so a copy that
went stale between the read and the commit costs a retry, never a wrong answer.

Used by the Redis store (tag ``"token:generation"``) and the PostgreSQL store (the epoch
header row's ``xmin``). Bounded: at most ``cap`` sessions (oldest dropped) of at most
``max_points`` entries.
"""

from __future__ import annotations

from collections import OrderedDict

from agentbus.core.model import Epoch, SessionRef

ADDED, OVERFLOWED, NOTHING = b"a", b"o", b"n"


class EpochShadows:
    def __init__(self, cap: int = 10_000, max_points: int = 256) -> None:
        self.cap = cap
        self.max_points = max_points
        self._d: OrderedDict[SessionRef, tuple[str, Epoch]] = OrderedDict()

    def follow(
        self,
        ref: SessionRef,
        key: str,
        version: int,
        did: bytes,
        before: str | None,
        after: str,
        started: float,
        generation: int = 0,
    ) -> None:
        """Record one read's effect. ``before`` is None if this read created the epoch."""
        old = self._d.pop(ref, None)
        if before is None:
            if did != ADDED:
                return
            epoch = Epoch(started_at=started, overflow=False, generation=generation)
            epoch.points[key] = version
        elif old is None or old[0] != before:
            return
        else:
            epoch = old[1]
            if did == NOTHING and before == after and (key in epoch.points or epoch.overflow):
                pass
            elif did == ADDED and before != after and key not in epoch.points:
                epoch.points[key] = version
            elif did == OVERFLOWED and before != after:
                epoch.overflow = True
            else:
                return
            epoch.generation = generation
        if len(epoch.points) > self.max_points:
            return
        self._d[ref] = (after, epoch)
        if len(self._d) > self.cap:
            self._d.popitem(last=False)

    def pop(self, ref: SessionRef) -> tuple[Epoch, str] | None:
        """The epoch and its tag, as the backend would load them; forgotten here."""
        got = self._d.pop(ref, None)
        if got is None:
            return None
        tag, epoch = got
        return epoch, tag

    def drop(self, ref: SessionRef) -> None:
        self._d.pop(ref, None)
