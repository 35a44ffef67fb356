"""The gateway's cache of anonymous event listings (`GET /api/events`, one entry per page).

Rules:
- An entry lives `ttl` seconds from the end of the fetch that made it; an expired
  entry is a miss (and is dropped when seen).
- Single flight: concurrent misses for one key share one fetch. The fetch runs as a
  task of its own, so a waiter that is cancelled (its client hung up) stops waiting
  but does not cancel the fetch the others wait for.
- A failing fetch is not cached: every waiter of that one attempt gets its error,
  and the next miss starts a new fetch.
- At most `max_entries` entries; storing one more evicts the least recently used
  (a hit makes an entry the most recently used).
- `ttl` <= 0 turns the cache off: every call fetches, nothing is shared.

The caller decides what may be cached: a listing read with a consistency token
goes past the cache (it must see the client's own writes), and answers with
`Cache-Control: private, no-store` (`cache_control`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 1000
PRIVATE = "private, no-store"

Clock = Callable[[], float]
Fetch = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True)
class Cached:
    body: bytes
    expires: float  # on the cache's clock

    def max_age(self, now: float) -> int:
        """Whole seconds it stays fresh (never more than it has left)."""
        return max(0, int(self.expires - now))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # fetches started
    shared: int = 0  # misses that waited for a fetch already running
    failures: int = 0  # fetches that raised (not cached)
    evictions: int = 0  # entries dropped to make room (not expiries)

    def to_json(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "shared": self.shared,
                "failures": self.failures, "evictions": self.evictions}


def cache_control(personal: bool, max_age: int) -> str:
    """`private, no-store` for a client that carries a consistency token (its reads follow
    its own writes: no cache between it and us may keep them), else a public answer
    fresh for `max_age` seconds."""
    return PRIVATE if personal else f"public, max-age={max_age}"


class ListingCache:
    def __init__(self, ttl: float, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Clock = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.stats = CacheStats()
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self._fetching: dict[str, asyncio.Task[Cached]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used (expired ones included until seen)."""
        return list(self._entries)

    def peek(self, key: str) -> Cached | None:
        """The fresh entry for `key`, marking it most recently used; None on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, body: bytes) -> Cached:
        entry = Cached(body, self.clock() + self.ttl)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        return entry

    async def get(self, key: str, fetch: Fetch) -> Cached:
        """The fresh entry for `key`, or the outcome of the one fetch running for it
        (started here when none is): its entry, or its exception."""
        if self.ttl <= 0:
            return Cached(await fetch(), self.clock())
        if (entry := self.peek(key)) is not None:
            self.stats.hits += 1
            return entry
        task = self._fetching.get(key)
        if task is None:
            self.stats.misses += 1
            task = asyncio.ensure_future(self._fetch(key, fetch))
            self._fetching[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        else:
            self.stats.shared += 1
        return await asyncio.shield(task)  # our cancellation leaves the fetch running

    async def _fetch(self, key: str, fetch: Fetch) -> Cached:
        return self.put(key, await fetch())

    def _settled(self, key: str, task: asyncio.Task[Cached]) -> None:
        if self._fetching.get(key) is task:
            del self._fetching[key]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here, so a failure whose waiters all went away is not reported
            # as never retrieved; each waiter still gets it from the shielded await.
            self.stats.failures += 1
