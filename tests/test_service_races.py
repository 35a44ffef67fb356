"""Races against the real database, through the booking service: nothing oversold, nothing doubled."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import asyncpg

from tests.conftest import RunningService
from tests.support import check_invariants, create_event


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def _post(s: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None
                ) -> tuple[int, dict]:
    async with s.post(f"{url}/api/bookings", json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_300_clients_race_for_100_tickets(booking_service: RunningService) -> None:
    async with _session() as s:
        event = await create_event(s, booking_service.url, [100])
        tier = event.tier_ids[0]
        body = {"eventId": event.id, "items": [{"ticketTierId": tier, "quantity": 1}]}
        answers = await asyncio.gather(*(_post(s, booking_service.url, body) for _ in range(300)))
    statuses = [status for status, _ in answers]
    assert statuses.count(201) == 100
    assert statuses.count(409) == 200
    for status, doc in answers:
        if status == 409:
            assert doc["ticketTierId"] == tier and doc["status"] == 409
    assert len({doc["id"] for status, doc in answers if status == 201}) == 100
    tiers = await check_invariants(booking_service.database.dsn, event.id)
    assert tiers[tier]["remaining"] == 0 and tiers[tier]["sold"] == 100


async def test_50_duplicates_of_one_reference_make_one_booking(booking_service: RunningService) -> None:
    async with _session() as s:
        event = await create_event(s, booking_service.url, [500])
        ref = f"race-{uuid.uuid4()}"
        body = {"eventId": event.id, "clientReference": ref,
                "items": [{"ticketTierId": event.tier_ids[0], "quantity": 2}]}
        answers = await asyncio.gather(*(_post(s, booking_service.url, body) for _ in range(50)))
    statuses = [status for status, _ in answers]
    assert statuses.count(201) == 1 and statuses.count(200) == 49, statuses
    assert len({doc["id"] for _, doc in answers}) == 1
    tiers = await check_invariants(booking_service.database.dsn, event.id)
    assert tiers[event.tier_ids[0]]["sold"] == 2


async def test_idempotency_key_header_duplicates_make_one_booking(booking_service: RunningService) -> None:
    async with _session() as s:
        event = await create_event(s, booking_service.url, [500])
        key = f"idem-{uuid.uuid4()}"
        body = {"eventId": event.id, "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}
        answers = await asyncio.gather(*(
            _post(s, booking_service.url, body, {"Idempotency-Key": key}) for _ in range(30)))
    assert [st for st, _ in answers].count(201) == 1
    assert {doc["clientReference"] for _, doc in answers} == {key}
    assert len({doc["id"] for _, doc in answers}) == 1
    tiers = await check_invariants(booking_service.database.dsn, event.id)
    assert tiers[event.tier_ids[0]]["sold"] == 1


async def _deadlocks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def test_opposite_order_multi_item_bookings_never_deadlock(booking_service: RunningService) -> None:
    dsn = booking_service.database.dsn
    before = await _deadlocks(dsn)
    async with _session() as s:
        event = await create_event(s, booking_service.url, [60, 60, 60])
        a, b, c = event.tier_ids
        orders = [[a, b, c], [c, b, a], [b, a, c], [c, a, b]]

        def body(n: int) -> dict:
            return {"eventId": event.id,
                    "items": [{"ticketTierId": t, "quantity": 1} for t in orders[n % 4]]}

        answers = await asyncio.gather(*(_post(s, booking_service.url, body(n)) for n in range(120)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {201, 409}, statuses
    assert statuses.count(201) == 60  # every booking takes one of each tier
    assert await _deadlocks(dsn) == before
    tiers = await check_invariants(dsn, event.id)
    assert all(t["remaining"] == 0 for t in tiers.values())
