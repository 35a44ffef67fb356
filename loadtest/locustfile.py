"""Locust scenarios for boxoffice: browsing, booking, and a flash sale on one hot tier.

Usually run by the headless runner, which configures this module, creates the hot
event, and checks the SLO and the inventory invariants afterwards:

    .venv/bin/python -m loadtest.run --scenario mixed --users 50 --seconds 30

It also works under locust's own command line or web UI, configured by environment
variables (`BOXOFFICE_GATEWAYS` as `region=url,...`; `BOXOFFICE_HOT_EVENT` and
`BOXOFFICE_HOT_TIER` for the flash sale):

    BOXOFFICE_GATEWAYS=us-east=http://127.0.0.1:18501,eu-west=http://127.0.0.1:18502 \\
        .venv/bin/locust -f loadtest/locustfile.py BrowsingUser BookingUser

Every user talks to one region's gateway and says which region it is in
(`X-Boxoffice-Region`); users are spread round-robin over the gateways. Requests
are named by route template (`/api/events/[id]`) so statistics add up per endpoint.
What clients were told (bookings made, replays, sold-out answers) goes into
`LEDGER`, which the runner compares with the databases afterwards.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
from locust import between, task
from locust.contrib.fasthttp import FastHttpUser, ResponseContextManager
from locust.exception import StopUser

REGION_HEADER = "X-Boxoffice-Region"


@dataclass(frozen=True)
class Gateway:
    region: str  # "" when unknown: the gateway then uses its own region
    url: str


@dataclass(frozen=True)
class HotTier:
    event_id: str
    tier_id: str


@dataclass
class Settings:
    gateways: list[Gateway] = field(default_factory=list)
    hot: HotTier | None = None
    # Every clientReference of a run starts with this, so the databases can be asked
    # afterwards for exactly the bookings this run made.
    reference_prefix: str = field(default_factory=lambda: f"lt-{uuid.uuid4().hex[:12]}-")
    replay_probability: float = 0.2  # booking user re-posts the same request
    cancel_probability: float = 0.1  # booking user cancels what it booked
    duplicate_probability: float = 0.1  # flash-sale user sends two copies at once


@dataclass
class Ledger:
    """What the clients were told, to be checked against the databases afterwards."""

    bookings: dict[str, dict[str, int]] = field(default_factory=dict)  # id -> {tier: quantity}
    cancelled: set[str] = field(default_factory=set)
    cancel_unknown: set[str] = field(default_factory=set)  # a cancel whose answer was lost
    outcomes: Counter[str] = field(default_factory=Counter)

    def record_booking(self, doc: dict[str, Any]) -> None:
        self.bookings.setdefault(
            doc["id"], {item["ticketTierId"]: item["quantity"] for item in doc["items"]}
        )

    def tickets_by_tier(self) -> Counter[str]:
        tickets: Counter[str] = Counter()
        for booking_id, items in self.bookings.items():
            if booking_id not in self.cancelled:
                tickets.update(items)
        return tickets


SETTINGS = Settings()
LEDGER = Ledger()
_next_gateway = itertools.count()


def configure(
    gateways: list[Gateway],
    hot: HotTier | None = None,
    reference_prefix: str | None = None,
    *,
    replay_probability: float | None = None,
    cancel_probability: float | None = None,
) -> None:
    """Called by the runner before any user starts."""
    SETTINGS.gateways = list(gateways)
    SETTINGS.hot = hot
    if reference_prefix:
        SETTINGS.reference_prefix = reference_prefix
    if replay_probability is not None:
        SETTINGS.replay_probability = replay_probability
    if cancel_probability is not None:
        SETTINGS.cancel_probability = cancel_probability


def _settings_from_env() -> None:
    if not SETTINGS.gateways and os.environ.get("BOXOFFICE_GATEWAYS"):
        for entry in os.environ["BOXOFFICE_GATEWAYS"].split(","):
            region, _, url = entry.strip().rpartition("=")
            SETTINGS.gateways.append(Gateway(region, url))
    if SETTINGS.hot is None and os.environ.get("BOXOFFICE_HOT_TIER"):
        SETTINGS.hot = HotTier(os.environ["BOXOFFICE_HOT_EVENT"], os.environ["BOXOFFICE_HOT_TIER"])


class BoxofficeUser(FastHttpUser):
    """One visitor: one region, one gateway, its own cookies (the consistency token)."""

    abstract = True
    wait_time = between(0.5, 2.0)
    network_timeout = 10.0
    connection_timeout = 5.0

    def __init__(self, environment: Any) -> None:
        _settings_from_env()
        gateways = SETTINGS.gateways or ([Gateway("", self.host)] if self.host else [])
        if not gateways:
            raise RuntimeError("no gateway: set BOXOFFICE_GATEWAYS (region=url,...) or --host")
        self.gateway = gateways[next(_next_gateway) % len(gateways)]
        self.host = self.gateway.url
        self.default_headers = {REGION_HEADER: self.gateway.region} if self.gateway.region else None
        super().__init__(environment)

    # -- reads -----------------------------------------------------------------
    def browse(self) -> tuple[str, list[dict[str, Any]]] | None:
        """What a visitor's page loads: the listing, one event, its tiers."""
        with self.client.get("/api/events?limit=20", name="/api/events", catch_response=True) as resp:
            events = _field(resp, "events")
        if not events:
            return None
        event_id = random.choice(events)["id"]
        with self.client.get(f"/api/events/{event_id}", name="/api/events/[id]", catch_response=True) as resp:
            if _field(resp, "id") not in (None, event_id):
                resp.failure(f"asked for event {event_id}, got another")
        tiers = self.tiers(event_id)
        return (event_id, tiers) if tiers is not None else None

    def tiers(self, event_id: str) -> list[dict[str, Any]] | None:
        with self.client.get(
            f"/api/events/{event_id}/ticket-tiers", name="/api/events/[id]/ticket-tiers", catch_response=True
        ) as resp:
            return _field(resp, "ticketTiers")

    # -- writes ----------------------------------------------------------------
    def new_reference(self) -> str:
        return f"{SETTINGS.reference_prefix}{uuid.uuid4().hex}"

    @staticmethod
    def new_secret() -> str:
        """The buyer's secret of one booking: sent with it, its replays, read and cancel."""
        return secrets.token_urlsafe(32)

    def post_booking(self, body: dict[str, Any], secret: str,
                     name: str = "/api/bookings") -> dict[str, Any] | str | None:
        """POST a booking: the booking (201, or 200 for a known reference), "sold-out" (409),
        or None for anything else (a failure)."""
        with self.client.post("/api/bookings", json=body, name=name, catch_response=True,
                              headers={"Booking-Secret": secret}) as resp:
            if resp.status_code == 409 and "client-reference-in-use" in resp.text:
                resp.failure("the reference is another buyer's (our secret was not taken)")
                return None
            if resp.status_code == 409:
                resp.success()  # not enough tickets left: the expected end of every sale
                LEDGER.outcomes["sold-out"] += 1
                return "sold-out"
            doc = _field(resp, "id", expected=(200, 201))
            if doc is None:
                return None
            booking = resp.json()
            reference = booking.get("clientReference")
            if booking.get("status") != "confirmed" or reference != body["clientReference"]:
                resp.failure(f"booking answer does not match the request: {booking}")
                return None
            LEDGER.record_booking(booking)
            LEDGER.outcomes["booked" if resp.status_code == 201 else "existing"] += 1
            return booking

    def read_booking(self, booking_id: str, secret: str) -> None:
        with self.client.get(
            f"/api/bookings/{booking_id}", name="/api/bookings/[id]", catch_response=True,
            headers={"Booking-Secret": secret},
        ) as resp:
            if _field(resp, "id") not in (None, booking_id):
                resp.failure(f"asked for booking {booking_id}, got another")

    def cancel(self, booking_id: str, secret: str) -> None:
        with self.client.post(
            f"/api/bookings/{booking_id}/cancel", name="/api/bookings/[id]/cancel", catch_response=True,
            headers={"Booking-Secret": secret},
        ) as resp:
            if resp.status_code == 200 and resp.json().get("status") == "cancelled":
                LEDGER.cancelled.add(booking_id)
                LEDGER.outcomes["cancelled"] += 1
            else:
                LEDGER.cancel_unknown.add(booking_id)
                resp.failure(f"cancel answered {resp.status_code}: {resp.text[:200]}")


def _field(resp: ResponseContextManager, key: str, expected: tuple[int, ...] = (200,)) -> Any:
    """The answer's `key`, or None after marking the request failed."""
    if resp.status_code not in expected:
        resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
        return None
    try:
        return resp.json()[key]
    except (ValueError, KeyError, TypeError):
        resp.failure(f"no {key!r} in the answer: {(resp.text or '')[:200]}")
        return None


class BrowsingUser(BoxofficeUser):
    """Looks at concerts and never buys."""

    weight = 3

    @task
    def look_around(self) -> None:
        self.browse()


class BookingUser(BoxofficeUser):
    """Browses, then books one or two tickets; sometimes retries the very same request
    (it must get the same booking back), reads the booking, and now and then cancels."""

    weight = 1

    @task
    def buy(self) -> None:
        browsed = self.browse()
        if browsed is None:
            return
        event_id, tiers = browsed
        on_sale = [t for t in tiers if t["remaining"] > 0]
        if not on_sale:
            return
        tier = random.choice(on_sale)
        quantity = random.randint(1, min(2, tier["remaining"]))
        body = {
            "eventId": event_id,
            "clientReference": self.new_reference(),
            "items": [{"ticketTierId": tier["id"], "quantity": quantity}],
        }
        secret = self.new_secret()
        booking = self.post_booking(body, secret)
        if not isinstance(booking, dict):
            return
        if random.random() < SETTINGS.replay_probability:
            self.replay(body, secret, booking["id"])
        self.read_booking(booking["id"], secret)
        if random.random() < SETTINGS.cancel_probability:
            self.cancel(booking["id"], secret)

    def replay(self, body: dict[str, Any], secret: str, booking_id: str) -> None:
        """The same request again (a client retrying after a lost answer), with the same
        Booking-Secret: 200, same booking."""
        with self.client.post(
            "/api/bookings", json=body, name="/api/bookings [replay]", catch_response=True,
            headers={"Booking-Secret": secret},
        ) as resp:
            if resp.status_code == 200 and resp.json().get("id") == booking_id:
                LEDGER.outcomes["replay-same-booking"] += 1
            elif resp.status_code in (429, 503):  # refused, nothing done: not another booking
                LEDGER.outcomes["replay-refused"] += 1
                resp.failure(f"replay refused {resp.status_code}")
            else:
                LEDGER.outcomes["replay-mismatch"] += 1
                resp.failure(f"replay answered {resp.status_code} {resp.text[:200]}, "
                             f"not booking {booking_id}")


class FlashSaleUser(BoxofficeUser):
    """Everyone wants the same tier at once. Sold out (409) is an expected answer."""

    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        if SETTINGS.hot is None:
            raise StopUser()  # no hot event configured (BOXOFFICE_HOT_EVENT / BOXOFFICE_HOT_TIER)

    @task(5)
    def grab(self) -> None:
        assert SETTINGS.hot is not None
        body = {
            "eventId": SETTINGS.hot.event_id,
            "clientReference": self.new_reference(),
            "items": [{"ticketTierId": SETTINGS.hot.tier_id, "quantity": random.randint(1, 2)}],
        }
        secret = self.new_secret()
        if random.random() >= SETTINGS.duplicate_probability:
            self.post_booking(body, secret)
            return
        # A double click: two copies of one request at the same moment. Both answers must
        # name the same booking (one 201, one 200), or both be sold out.
        name = "/api/bookings [concurrent duplicate]"
        copies = [gevent.spawn(self.post_booking, body, secret, name) for _ in range(2)]
        gevent.joinall(copies)
        answers = [c.value for c in copies]
        if None in answers:
            return  # a failed request is already counted as one
        names = {a if isinstance(a, str) else a["id"] for a in answers}
        LEDGER.outcomes["duplicates-agreed" if len(names) == 1 else "duplicates-disagreed"] += 1

    @task(1)
    def refresh(self) -> None:
        assert SETTINGS.hot is not None
        self.tiers(SETTINGS.hot.event_id)
