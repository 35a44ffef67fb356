"""Cancelling returns tickets to inventory exactly once, however many cancels race."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp

from tests.conftest import RunningService
from tests.support import check_invariants, create_event


async def test_concurrent_cancels_return_tickets_once(booking_service: RunningService) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        ev = await create_event(s, booking_service.url, [10])
        async with s.post(f"{booking_service.url}/api/bookings", json={
                "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 4}]}) as resp:
            booking = await resp.json()
            assert resp.status == 201
        tiers = await check_invariants(booking_service.database.dsn, ev.id)
        assert tiers[ev.tier_ids[0]]["remaining"] == 6

        async def cancel() -> tuple[int, dict]:
            async with s.post(f"{booking_service.url}/api/bookings/{booking['id']}/cancel") as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(cancel() for _ in range(30)))
    assert {status for status, _ in answers} == {200}
    assert {doc["status"] for _, doc in answers} == {"cancelled"}
    assert len({doc["cancelledAt"] for _, doc in answers}) == 1
    tiers = await check_invariants(booking_service.database.dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["remaining"] == 10 and tiers[ev.tier_ids[0]]["sold"] == 0


async def test_cancel_unknown_booking_is_404(booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"{booking_service.url}/api/bookings/{uuid.uuid4()}/cancel") as resp:
        doc = await resp.json(content_type=None)
    assert resp.status == 404 and doc["type"].endswith("/booking-not-found")


async def test_cancelled_tickets_can_be_booked_again(booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [2])
        body = {"eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 2}]}
        async with s.post(f"{booking_service.url}/api/bookings", json=body) as resp:
            first = await resp.json()
        async with s.post(f"{booking_service.url}/api/bookings", json=body) as resp:
            assert resp.status == 409  # sold out
        async with s.post(f"{booking_service.url}/api/bookings/{first['id']}/cancel") as resp:
            assert resp.status == 200
        async with s.post(f"{booking_service.url}/api/bookings", json=body) as resp:
            assert resp.status == 201
    tiers = await check_invariants(booking_service.database.dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["remaining"] == 0
