"""The commit position a write answers with (`X-Boxoffice-Lsn`) is at or past the end
of that write's own commit record in the WAL, so a replica that has replayed up to it
shows the write (read-your-writes, MISSION.md §4). The commit records are read from
the primary's WAL itself, with pg_walinspect.

A position read inside the booking's transaction, before its commit, fails these.
"""

from __future__ import annotations

import aiohttp
import asyncpg

from tests.conftest import RunningService
from tests.support import check_invariants, create_event

# The commit record of the transaction that last wrote a booking's row.
COMMIT_RECORD_END = """
SELECT r.end_lsn::text AS end_lsn, r.end_lsn <= $3::text::pg_lsn AS covered
FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) r
WHERE r.resource_manager = 'Transaction' AND r.record_type = 'COMMIT'
  AND r.xid = (SELECT xmin FROM bookings WHERE id = $2::uuid)
"""


async def commit_record(dsn: str, since: str, booking_id: str, answered: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        rows = await conn.fetch(COMMIT_RECORD_END, since, booking_id, answered)
    finally:
        await conn.close()
    assert len(rows) == 1, f"expected one commit record for booking {booking_id}: {rows}"
    return rows[0]


async def wal_insert_position(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
    finally:
        await conn.close()


async def test_booking_replay_and_cancel_answer_a_position_past_their_commit(
        booking_service: RunningService) -> None:
    dsn = booking_service.database.dsn
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [10])
        booking = {"eventId": ev.id, "clientReference": f"ryw-{ev.id}",
                   "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 3}]}

        since = await wal_insert_position(dsn)
        async with s.post(f"{booking_service.url}/api/bookings", json=booking) as resp:
            assert resp.status == 201
            booking_id = (await resp.json())["id"]
            booked_at = resp.headers["X-Boxoffice-Lsn"]
        record = await commit_record(dsn, since, booking_id, booked_at)
        assert record["covered"], f"booking answered {booked_at}, its commit ends at {record['end_lsn']}"

        # A replay answers the original booking with a position past the original's commit.
        async with s.post(f"{booking_service.url}/api/bookings", json=booking) as resp:
            assert resp.status == 200 and (await resp.json())["id"] == booking_id
            replayed_at = resp.headers["X-Boxoffice-Lsn"]
        record = await commit_record(dsn, since, booking_id, replayed_at)
        assert record["covered"], f"replay answered {replayed_at}, the commit ends at {record['end_lsn']}"

        since = await wal_insert_position(dsn)
        async with s.post(f"{booking_service.url}/api/bookings/{booking_id}/cancel") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
            cancelled_at = resp.headers["X-Boxoffice-Lsn"]
        record = await commit_record(dsn, since, booking_id, cancelled_at)
        assert record["covered"], f"cancel answered {cancelled_at}, its commit ends at {record['end_lsn']}"

    tiers = await check_invariants(dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["sold"] == 0 and tiers[ev.tier_ids[0]]["remaining"] == 10
