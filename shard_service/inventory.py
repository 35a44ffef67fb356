"""The inventory audit: what must hold in a shard's database, read in one snapshot.

For every tier: sold + remaining = capacity, where sold is the sum of the
quantities of its confirmed bookings' items, and remaining is never negative;
and no client reference names more than one booking (MISSION.md §3: a
reference is unique within the shard that holds its event).

The tests and the load-test runner call `audit_inventory` on a shard primary
after racing it; the SQL lives here, with the rest of the booking SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shard_service.connections import Connection, fetch_one

TIER_INVENTORY = """
SELECT t.id::text AS tier_id, t.event_id::text AS event_id, t.capacity, t.remaining,
       coalesce(s.sold, 0)::bigint AS sold
FROM ticket_tiers t
LEFT JOIN (SELECT i.ticket_tier_id, sum(i.quantity) AS sold
           FROM booking_items i JOIN bookings b ON b.id = i.booking_id
           WHERE b.status = 'confirmed'
           GROUP BY i.ticket_tier_id) s ON s.ticket_tier_id = t.id
WHERE $1::uuid IS NULL OR t.event_id = $1::uuid
ORDER BY t.event_id, t.id
"""

# Any reference on more than one booking, whether for the same event or not.
DUPLICATE_REFERENCES = """
SELECT client_reference, count(*) AS bookings, count(DISTINCT event_id) AS events
FROM bookings WHERE client_reference IS NOT NULL
GROUP BY client_reference HAVING count(*) > 1
ORDER BY client_reference LIMIT 20
"""

BOOKINGS_BY_REFERENCE_PREFIX = """
SELECT id::text, status FROM bookings WHERE starts_with(client_reference, $1)
"""


@dataclass(frozen=True)
class TierCount:
    tier_id: str
    event_id: str
    capacity: int
    remaining: int
    sold: int

    @property
    def consistent(self) -> bool:
        return self.remaining >= 0 and self.sold + self.remaining == self.capacity


@dataclass
class InventoryAudit:
    tiers: list[TierCount]
    duplicate_references: list[dict[str, object]]
    bookings: dict[str, str] = field(default_factory=dict)  # id -> status, for a reference prefix

    @property
    def violations(self) -> list[TierCount]:
        return [t for t in self.tiers if not t.consistent]

    @property
    def held(self) -> bool:
        return not self.violations and not self.duplicate_references


async def audit_inventory(
    conn: Connection,
    *,
    event_id: str | None = None,
    reference_prefix: str | None = None,
) -> InventoryAudit:
    """Audit one shard's database (one event's tiers, or every tier), in one snapshot.
    With `reference_prefix`, also list the bookings whose reference starts with it."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        tiers = await conn.fetch(TIER_INVENTORY, event_id)
        duplicates = await conn.fetch(DUPLICATE_REFERENCES)
        bookings = (
            await conn.fetch(BOOKINGS_BY_REFERENCE_PREFIX, reference_prefix)
            if reference_prefix else []
        )
    return InventoryAudit(
        tiers=[TierCount(**dict(t)) for t in tiers],
        duplicate_references=[dict(d) for d in duplicates],
        bookings={b["id"]: b["status"] for b in bookings},
    )


# A tier's confirmed sales and the span of their commit times (how fast it sold).
TIER_SALES = """
SELECT count(*) AS bookings, coalesce(sum(i.quantity), 0) AS tickets,
       extract(epoch FROM max(b.created_at) - min(b.created_at))::float8 AS seconds
FROM bookings b JOIN booking_items i ON i.booking_id = b.id
WHERE i.ticket_tier_id = $1::uuid AND b.status = 'confirmed'
"""


@dataclass(frozen=True)
class TierSales:
    bookings: int
    tickets: int
    seconds: float | None  # first to last confirmed booking; None with fewer than one


async def tier_sales(conn: Connection, tier_id: str) -> TierSales:
    """One tier's confirmed bookings, tickets, and the time from the first to the last."""
    row = await fetch_one(conn, TIER_SALES, tier_id)
    return TierSales(int(row["bookings"]), int(row["tickets"]), row["seconds"])
