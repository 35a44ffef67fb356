"""A failover drill's booking load, and the write figures drawn from it.

`Load` runs booking clients on every shard's event through every gateway: each client
books one ticket at a time, each booking with its own `clientReference` (one run
prefix), from its own loopback address (a gateway's rate limit is per client address),
at a steady rate; every answer is recorded with when it was sent and answered (the
observer's monotonic clock). `write_figures` turns the answers into per-shard figures.

Rules: a confirmed booking is a 201 (or 200 for a replay) with its id; anything else is
recorded by kind (`503 not-primary`, `client timeout`, ...); a 429 is the client's own
pace, not an unavailability. Waits on the load (`wait_for`) end on their condition or
their timeout, never on a sleep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from failover.drill_cluster import DrillError

RATE_LIMITED = "429 rate-limited"
ANSWER_TIMEOUT = 40.0  # one booking, as a client waits (the gateway rides through ~10 s)


@dataclass
class Attempt:
    shard: str
    gateway: str
    sent: float  # monotonic
    answered: float
    kind: str  # "" for a confirmed booking (201, or 200 for a replay), else the error kind

    @property
    def ok(self) -> bool:
        return not self.kind


@dataclass
class Load:
    """Booking clients on every shard's event through every gateway."""

    gateways: dict[str, str]
    events: dict[str, dict[str, Any]]  # shard -> event document
    prefix: str
    rate: float
    attempts: list[Attempt] = field(default_factory=list)
    confirmed: dict[str, list[str]] = field(default_factory=dict)  # shard -> booking ids
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, clients: dict[str, int]) -> None:
        """`clients[shard]` clients per gateway on that shard's event."""
        n = 0
        for shard, per_gateway in clients.items():
            for region in self.gateways:
                for _ in range(per_gateway):
                    n += 1
                    address = f"127.0.{1 + n // 250}.{1 + n % 250}"  # its own rate-limit bucket
                    self.tasks.append(asyncio.create_task(self._client(shard, region, address)))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DrillError(f"timed out waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def confirmed_after(self, shard: str, instant: float) -> bool:
        return any(a.ok and a.shard == shard and a.answered > instant for a in self.attempts)

    def answers_since(self, shard: str, instant: float) -> str:
        """What the shard's clients were answered since `instant`, by gateway and kind,
        for an error message: `east: 12 x 503 not-confirmed; west: no answer`."""
        parts = []
        for region in self.gateways:
            kinds = collections.Counter(a.kind or "confirmed" for a in self.attempts
                                        if a.shard == shard and a.gateway == region
                                        and a.answered > instant)
            parts.append(f"{region}: " + (", ".join(f"{n} x {k}" for k, n in kinds.most_common())
                                          or "no answer"))
        return "; ".join(parts)

    async def _client(self, shard: str, region: str, address: str) -> None:
        event = self.events[shard]
        url = f"{self.gateways[region]}/api/bookings"
        connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            next_at = time.monotonic()
            while not self.stop.is_set():
                body = {"eventId": event["id"], "clientReference": f"{self.prefix}{uuid.uuid4()}",
                        "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
                sent = time.monotonic()
                kind, booking = await self._book(session, url, body)
                self.attempts.append(Attempt(shard, region, sent, time.monotonic(), kind))
                if booking:
                    self.confirmed.setdefault(shard, []).append(booking)
                self._changed.set()
                next_at = max(next_at + 1 / self.rate, time.monotonic() - 1)
                with contextlib.suppress(TimeoutError):  # the client's pace, or stop
                    await asyncio.wait_for(self.stop.wait(), max(0.0, next_at - time.monotonic()))

    @staticmethod
    async def _book(session: aiohttp.ClientSession, url: str,
                    body: dict[str, Any]) -> tuple[str, str | None]:
        try:
            async with session.post(url, json=body,
                                    timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)) as resp:
                doc = await resp.json(content_type=None)
                if resp.status in (200, 201):
                    return "", str(doc["id"])
                kind = str((doc or {}).get("type", "")).rsplit("/", 1)[-1] if isinstance(doc, dict) else ""
                return f"{resp.status} {kind}".strip(), None
        except TimeoutError:
            return "client timeout", None
        except (aiohttp.ClientError, ValueError) as exc:
            return type(exc).__name__, None


def write_figures(attempts: list[Attempt], fault_at: float) -> dict[str, Any]:
    """Per shard: attempts, confirmed, errors; `unavailableSeconds`: from the last
    success answered before the first failure to the first success answered after it
    (None without a failure); `longestGapSeconds`: the longest time between two
    successes answered, counting gaps that end after the fault."""
    shards: dict[str, Any] = {}
    for shard in sorted({a.shard for a in attempts}):
        mine = sorted((a for a in attempts if a.shard == shard), key=lambda a: a.answered)
        successes = [a.answered for a in mine if a.ok]
        failures = [a for a in mine if not a.ok and a.kind != RATE_LIMITED and a.answered >= fault_at]
        unavailable = first_failure = None
        if failures:
            first = failures[0]
            first_failure = first.answered - fault_at
            before = [t for t in successes if t <= first.answered]
            after = [t for t in successes if t > first.answered]
            if before and after:
                unavailable = after[0] - before[-1]
        gaps = [b - a for a, b in itertools.pairwise(successes) if b > fault_at]
        shards[shard] = {
            "attempts": len(mine), "confirmed": len(successes), "failed": len(failures),
            "firstFailureSeconds": _r(first_failure), "unavailableSeconds": _r(unavailable),
            "longestGapSeconds": _r(max(gaps) if gaps else None),
        }
    return shards


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
