"""What the cluster benchmarks share: the topology they start, the events they create,
and careful booking clients with what those clients saw.

Rules:
- The topology is deploy/topology.yaml with the per-client booking rate limit and the
  gateways' in-flight limit off: every benchmark client connects from this one address,
  so a per-address limit would treat all of them as one client.
- A careful client books one ticket at a time under a fresh `clientReference` and sends
  the same request again, with the same reference, until it is answered: after no
  answer, a 5xx or a 429 (nothing final was said). Any other answer is final: a 2xx is
  a booking, anything else an error counted by its kind (status and problem type).
- A booking's latency is what its client waited: from the first send of its reference
  to the confirmation, retries included.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml

from deploy.topology import DEFAULT_TOPOLOGY

TOKEN = "benchmark-operator-token-0123456789-abcdefgh"  # strong enough for common.auth
CLIENT_TIMEOUT_SECONDS = 30.0  # one request, as a client gives up on it
RESEND_PAUSE_SECONDS = 0.05  # a client's pause before sending a reference again


def say(line: str) -> None:
    print(line, flush=True)


def topology() -> dict[str, Any]:
    """The default topology, per-client booking limits off (one address, many clients)."""
    with open(DEFAULT_TOPOLOGY) as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    gateway = doc.setdefault("gateway", {})
    gateway.update(booking_rate_per_second=0, max_in_flight_bookings=0)
    return doc


async def create_event(session: aiohttp.ClientSession, gateway: str, shard: str,
                       name: str = "Bench") -> dict[str, Any]:
    """One event with one tier of a million tickets on `shard`, through the gateway's
    operator API."""
    async with session.post(f"{gateway}/admin/events", headers={"Authorization": f"Bearer {TOKEN}"}, json={
        "name": f"{name} {uuid.uuid4().hex[:6]}", "venue": "Bench Hall",
        "startsAt": "2027-09-01T20:00:00Z", "currency": "USD", "shard": shard,
        "tiers": [{"name": "General", "priceCents": 1000, "capacity": 1_000_000}],
    }) as resp:
        doc: dict[str, Any] = await resp.json()
        assert resp.status == 201, doc
        return doc


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile (`q` in 0..1) of `values`; nan when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Load:
    """What one event's clients saw (times are time.monotonic())."""

    confirmed: dict[str, str] = field(default_factory=dict)  # reference -> booking id
    confirmed_at: list[float] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (confirmed at, seconds)
    answers: Counter[str] = field(default_factory=Counter)  # by status, or the exception's name
    errors: Counter[str] = field(default_factory=Counter)  # what was not a booking, by kind
    unanswered: int = 0  # references left unanswered when the clients stopped

    def pause(self, start: float, end: float) -> float:
        """The longest time between two confirmations across [start, end]: from the last
        one before `start` to the first one after `end`."""
        times = sorted(self.confirmed_at)
        before = [t for t in times if t <= start][-1:]
        after = [t for t in times if t > end][:1]
        points = before + [t for t in times if start < t <= end] + after
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)

    def latencies_between(self, start: float, end: float) -> list[float]:
        """The latencies of the bookings confirmed within [start, end]."""
        return [seconds for at, seconds in self.latencies if start <= at <= end]

    def error_count(self) -> int:
        return sum(self.errors.values())


async def careful_client(session: aiohttp.ClientSession, url: str, event: dict[str, Any],
                         load: Load, stop: asyncio.Event, prefix: str = "bench-") -> None:
    """Book one ticket of the event's first tier after another until `stop`, each under a
    fresh reference starting with `prefix`, sent again until answered."""
    tier = event["tiers"][0]["id"]
    while not stop.is_set():  # checked before a reference's first send
        reference = f"{prefix}{uuid.uuid4().hex}"
        mine = {"Booking-Secret": secrets.token_urlsafe(32)}  # each resend replays with it
        first_sent = time.monotonic()
        while True:  # the same reference until it is answered
            if stop.is_set():
                load.unanswered += 1  # sent at least once: it may or may not be booked
                return
            try:
                async with session.post(f"{url}/api/bookings", json={
                    "eventId": event["id"], "clientReference": reference,
                    "items": [{"ticketTierId": tier, "quantity": 1}],
                }, headers=mine, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_SECONDS)) as resp:
                    body = await resp.json(content_type=None)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.answers[exc.__class__.__name__] += 1
                load.errors[exc.__class__.__name__] += 1
            else:
                load.answers[str(status)] += 1
                if status in (200, 201):
                    now = time.monotonic()
                    load.confirmed[reference] = body["id"]
                    load.confirmed_at.append(now)
                    load.latencies.append((now, now - first_sent))
                    break
                kind = str(body.get("type", "")).rsplit("/", 1)[-1] if isinstance(body, dict) else ""
                load.errors[f"{status} {kind}".strip()] += 1
                if status < 500 and status != 429:
                    break  # a final answer: this reference is done
            await asyncio.sleep(RESEND_PAUSE_SECONDS)
