"""One test per booking rule of MISSION.md §3, against the real booking service."""

from __future__ import annotations

import json
import uuid

import aiohttp
import asyncpg
import pytest

from common.api import MAX_QUANTITY_PER_ITEM
from tests.conftest import RunningService
from tests.support import FreshEvent, check_invariants, create_event

PROBLEM = "application/problem+json"


async def booking_count(dsn: str, event_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM bookings WHERE event_id = $1::uuid", event_id))
    finally:
        await conn.close()


async def post(
    s: aiohttp.ClientSession, svc: RunningService, body: object
) -> tuple[int, dict, aiohttp.ClientResponse]:
    async with s.post(f"{svc.url}/api/bookings", json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp


@pytest.fixture
async def event(booking_service: RunningService) -> FreshEvent:
    async with aiohttp.ClientSession() as s:
        return await create_event(s, booking_service.url, [10, 1], price_cents=2500)


async def assert_nothing_written(svc: RunningService, event: FreshEvent, bookings_before: int) -> None:
    assert await booking_count(svc.database.dsn, event.id) == bookings_before
    await check_invariants(svc.database.dsn, event.id)


async def test_created_booking_has_totals_location_and_reads_back(
        booking_service: RunningService, event: FreshEvent) -> None:
    async with aiohttp.ClientSession() as s:
        reference = f"totals-{uuid.uuid4()}"
        status, doc, resp = await post(s, booking_service, {
            "eventId": event.id, "clientReference": reference,
            "items": [{"ticketTierId": event.tier_ids[0], "quantity": 3}]})
        assert status == 201
        assert resp.headers["Location"] == f"/api/bookings/{doc['id']}"
        assert doc["totalCents"] == 3 * 2500 and doc["currency"] == "USD"
        assert doc["items"] == [{"ticketTierId": event.tier_ids[0], "quantity": 3, "unitPriceCents": 2500}]
        assert doc["status"] == "confirmed" and doc["clientReference"] == reference
        booking_id = uuid.UUID(doc["id"])
        assert booking_id.bytes[:8] == uuid.UUID(event.id).bytes[:8]  # routable to its event
        async with s.get(f"{booking_service.url}/api/bookings/{doc['id']}") as got:
            assert got.status == 200 and await got.json() == doc


async def test_all_or_nothing_when_one_tier_lacks_tickets(
        booking_service: RunningService, event: FreshEvent) -> None:
    before = await booking_count(booking_service.database.dsn, event.id)
    async with aiohttp.ClientSession() as s:
        status, doc, resp = await post(s, booking_service, {"eventId": event.id, "items": [
            {"ticketTierId": event.tier_ids[0], "quantity": 2},
            {"ticketTierId": event.tier_ids[1], "quantity": 2}]})  # the second tier holds 1
    assert status == 409 and resp.content_type == PROBLEM
    assert doc["ticketTierId"] == event.tier_ids[1] and "Tier 1" in doc["detail"]
    await assert_nothing_written(booking_service, event, before)
    tiers = await check_invariants(booking_service.database.dsn, event.id)
    assert tiers[event.tier_ids[0]]["remaining"] == 10


async def test_tier_of_another_event_is_422(booking_service: RunningService, event: FreshEvent) -> None:
    async with aiohttp.ClientSession() as s:
        other = await create_event(s, booking_service.url, [5])
        before = await booking_count(booking_service.database.dsn, event.id)
        status, doc, _ = await post(s, booking_service, {"eventId": event.id, "items": [
            {"ticketTierId": event.tier_ids[0], "quantity": 1},
            {"ticketTierId": other.tier_ids[0], "quantity": 1}]})
    assert status == 422 and doc["type"].endswith("/tier-not-in-event")
    assert doc["ticketTierId"] == other.tier_ids[0]
    await assert_nothing_written(booking_service, event, before)
    await check_invariants(booking_service.database.dsn, other.id)


async def test_same_reference_same_request_returns_the_existing_booking(
        booking_service: RunningService, event: FreshEvent) -> None:
    body = {"eventId": event.id, "clientReference": f"again-{uuid.uuid4()}",
            "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}
    async with aiohttp.ClientSession() as s:
        first, doc1, _ = await post(s, booking_service, body)
        second, doc2, _ = await post(s, booking_service, body)
    assert (first, second) == (201, 200) and doc1 == doc2
    tiers = await check_invariants(booking_service.database.dsn, event.id)
    assert tiers[event.tier_ids[0]]["sold"] == 1


async def test_a_replay_listing_the_items_in_another_order_is_the_same_booking(
        booking_service: RunningService, event: FreshEvent) -> None:
    """A reference names a request, not a byte string: the same items in another order
    are the same request, so they replay the booking (200), and nothing is sold twice."""
    reference = f"order-{uuid.uuid4()}"
    a, b = event.tier_ids
    async with aiohttp.ClientSession() as s:
        first, doc1, _ = await post(s, booking_service, {
            "eventId": event.id, "clientReference": reference,
            "items": [{"ticketTierId": a, "quantity": 2}, {"ticketTierId": b, "quantity": 1}]})
        again, doc2, _ = await post(s, booking_service, {
            "eventId": event.id, "clientReference": reference,
            "items": [{"ticketTierId": b, "quantity": 1}, {"ticketTierId": a, "quantity": 2}]})
    assert (first, again) == (201, 200) and doc1 == doc2
    tiers = await check_invariants(booking_service.database.dsn, event.id)
    assert tiers[a]["sold"] == 2 and tiers[b]["sold"] == 1


@pytest.mark.parametrize("change", ["items", "quantity", "event"])
async def test_same_reference_different_request_is_422(
        booking_service: RunningService, event: FreshEvent, change: str) -> None:
    ref = f"reuse-{uuid.uuid4()}"
    async with aiohttp.ClientSession() as s:
        other = await create_event(s, booking_service.url, [5])
        status, first, _ = await post(s, booking_service, {
            "eventId": event.id, "clientReference": ref,
            "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]})
        assert status == 201
        before = await booking_count(booking_service.database.dsn, event.id)
        changed = {
            "items": {"eventId": event.id, "items": [{"ticketTierId": event.tier_ids[1], "quantity": 1}]},
            "quantity": {"eventId": event.id, "items": [{"ticketTierId": event.tier_ids[0], "quantity": 2}]},
            "event": {"eventId": other.id, "items": [{"ticketTierId": other.tier_ids[0], "quantity": 1}]},
        }[change]
        status, doc, _ = await post(s, booking_service, {**changed, "clientReference": ref})
    assert status == 422 and doc["type"].endswith("/client-reference-reused")
    # References are guessable, booking ids are not: the 422 must not hand out the other id.
    assert "bookingId" not in doc and first["id"] not in json.dumps(doc)
    await assert_nothing_written(booking_service, event, before)
    assert await booking_count(booking_service.database.dsn, other.id) == 0


@pytest.mark.parametrize("quantity", [1, MAX_QUANTITY_PER_ITEM])
async def test_quantity_bounds_are_inclusive(booking_service: RunningService, quantity: int) -> None:
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [MAX_QUANTITY_PER_ITEM])
        status, doc, _ = await post(s, booking_service, {
            "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": quantity}]})
    assert status == 201 and doc["items"][0]["quantity"] == quantity
    await check_invariants(booking_service.database.dsn, ev.id)


async def test_unknown_booking_is_404(booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{booking_service.url}/api/bookings/{uuid.uuid4()}") as resp:
            doc = await resp.json(content_type=None)
    assert resp.status == 404 and resp.content_type == PROBLEM
    assert doc["type"].endswith("/booking-not-found")
