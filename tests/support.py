"""Helpers shared by the integration tests: making events, checking invariants."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from tests.conftest import ADMIN_TOKEN


@dataclass(frozen=True)
class FreshEvent:
    id: str
    tier_ids: list[str]


async def create_event(
    session: aiohttp.ClientSession,
    base_url: str,
    capacities: list[int],
    *,
    price_cents: int = 1000,
    token: str = ADMIN_TOKEN,
) -> FreshEvent:
    """Create a fresh event through the operator API, one tier per capacity."""
    body = {
        "name": f"Test concert {uuid.uuid4().hex[:8]}",
        "venue": "Test Hall",
        "startsAt": "2027-09-01T20:00:00Z",
        "currency": "USD",
        "tiers": [
            {"name": f"Tier {n}", "priceCents": price_cents, "capacity": cap}
            for n, cap in enumerate(capacities)
        ],
    }
    async with session.post(
        f"{base_url}/admin/events", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        doc = await resp.json()
        assert resp.status == 201, doc
    return FreshEvent(doc["id"], [t["id"] for t in doc["tiers"]])


INVARIANTS_SQL = """
SELECT t.id::text AS tier_id, t.capacity, t.remaining,
       coalesce((SELECT sum(i.quantity) FROM booking_items i JOIN bookings b ON b.id = i.booking_id
                 WHERE i.ticket_tier_id = t.id AND b.status = 'confirmed'), 0)::int AS sold
FROM ticket_tiers t WHERE t.event_id = $1::uuid ORDER BY t.id
"""

DUPLICATE_REFERENCES_SQL = """
SELECT count(*) FROM (
    SELECT client_reference FROM bookings WHERE client_reference IS NOT NULL
    GROUP BY client_reference HAVING count(*) > 1) d
"""


async def check_invariants(dsn: str, event_id: str) -> dict[str, dict[str, Any]]:
    """Assert sold + remaining = capacity, no negatives, one booking per reference.

    Returns {tier_id: {"capacity", "remaining", "sold"}} for further checks.
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(INVARIANTS_SQL, event_id)
        duplicates = await conn.fetchval(DUPLICATE_REFERENCES_SQL)
    finally:
        await conn.close()
    assert rows, f"event {event_id} has no tiers in {dsn}"
    tiers = {r["tier_id"]: dict(r) for r in rows}
    for tier_id, t in tiers.items():
        assert t["remaining"] >= 0, f"tier {tier_id} has negative remaining"
        assert t["sold"] + t["remaining"] == t["capacity"], f"tier {tier_id}: {t}"
    assert duplicates == 0, "a client reference names more than one booking"
    return tiers
