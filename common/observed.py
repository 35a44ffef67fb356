"""Ages an observer measured itself: how long it has seen the same record, on its own clock.

No clock of another host is trusted. A record another process wrote may carry a wall time
(a transition's `since`, a move journal's `updatedAt`) for people to read; an observer
that must judge its age (a gateway deciding that a transition was abandoned, the
controller deciding that a transition or a move's runner is gone) measures instead, on
its own monotonic clock, how long it has seen that same record since it first saw it.
The rules:

- the key is the record's identity as written (a transition with its owner and wall
  time, a journal with its modify index): a record written again is a new one, young;
- an observer that starts afresh (restarted) sees everything as new, so it waits one
  full period before it judges anything abandoned: later, never sooner;
- `keep` forgets what is gone (the memory holds only what is still seen).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class FirstSeen(Generic[K]):
    """When each key was first seen, by `clock` (time.monotonic unless a test's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._first: dict[K, float] = {}

    def age(self, key: K) -> float:
        """Seconds since `key` was first seen (0.0 the first time)."""
        now = self.clock()
        return now - self._first.setdefault(key, now)

    def keep(self, keys: Iterable[K]) -> None:
        """Forget every key not in `keys`."""
        wanted = set(keys)
        for key in [k for k in self._first if k not in wanted]:
            del self._first[key]

    def __len__(self) -> int:
        return len(self._first)
