"""Deadlines that cross the gateway -> booking service hop.

A caller says how long it will wait for an answer (`X-Boxoffice-Deadline-Ms`,
relative milliseconds: clocks of two hosts need not agree). The callee spends
at most that long, pool wait and statement included, and then stops the work
(a cancelled statement rolls back) and says so, so that a caller that has given
up never has work still running on its behalf.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

DEADLINE_HEADER = "X-Boxoffice-Deadline-Ms"
MIN_BUDGET_MS = 10
MAX_BUDGET_MS = 60_000
DEFAULT_BUDGET_SECONDS = 10.0  # a caller that names no deadline
_MS = re.compile(r"^[0-9]{1,6}$")


@dataclass(frozen=True)
class Deadline:
    expires_at: float  # time.monotonic()

    @classmethod
    def within(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_header(cls, raw: str | None, default_seconds: float = DEFAULT_BUDGET_SECONDS) -> Deadline:
        """The caller's deadline; a missing or malformed header gets the default budget,
        and a budget is clamped to [10 ms, 60 s]."""
        if raw is None or not _MS.match(raw):
            return cls.within(default_seconds)
        ms = min(max(int(raw), MIN_BUDGET_MS), MAX_BUDGET_MS)
        return cls.within(ms / 1000)

    def remaining(self, floor: float = 0.001) -> float:
        """Seconds left (at least `floor`, so it can be passed as a timeout)."""
        return max(self.expires_at - time.monotonic(), floor)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at
