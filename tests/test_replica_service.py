"""The read-only booking service on a streaming replica."""

from __future__ import annotations

import aiohttp

from tests.conftest import RunningService
from tests.support import check_invariants, create_event


async def test_replica_serves_reads_after_catching_up_and_refuses_writes(
        booking_service: RunningService, replica_booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [7])
        async with s.post(f"{booking_service.url}/api/bookings", json={
                "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 2}]}) as resp:
            assert resp.status == 201
            lsn = resp.headers["X-Boxoffice-Lsn"]
        # The replica waits server-side until it has replayed the write's position.
        async with s.get(f"{replica_booking_service.url}/api/events/{ev.id}/ticket-tiers",
                         headers={"X-Boxoffice-Min-Lsn": lsn}) as resp:
            assert resp.status == 200
            assert (await resp.json())["ticketTiers"][0]["remaining"] == 5

        async with s.post(f"{replica_booking_service.url}/api/bookings", json={
                "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 1}]}) as resp:
            doc = await resp.json(content_type=None)
            assert resp.status == 503 and doc["type"].endswith("/read-only")
        async with s.get(f"{replica_booking_service.url}/api/health") as resp:
            assert (await resp.json())["role"] == "replica"
    tiers = await check_invariants(booking_service.database.dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["sold"] == 2


async def test_position_the_replica_has_not_reached_is_503_replica_behind(
        replica_booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s, s.get(
            f"{replica_booking_service.url}/api/events",
            headers={"X-Boxoffice-Min-Lsn": "FFFFFFFF/0"}) as resp:
        doc = await resp.json(content_type=None)
    assert resp.status == 503 and doc["type"].endswith("/replica-behind")


async def test_malformed_position_is_400(replica_booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s, s.get(
            f"{replica_booking_service.url}/api/events", headers={"X-Boxoffice-Min-Lsn": "soon"}) as resp:
        assert resp.status == 400
