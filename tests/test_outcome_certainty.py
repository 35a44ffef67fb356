"""A client always knows what happened to its booking (issue: no client can hurt another).

The gateway hands back the idempotency key it booked under, 503s included, and the
booking service stops the work of a caller that gave up, so "503" means "not booked"
and a retry with the key can never book twice.
"""

from __future__ import annotations

import json
import secrets
import uuid

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from tests.support import check_invariants, create_event_doc, wait_for_booking_lock_waiters
from tests.support import gateway_url as gw

PROBLEM = "application/problem+json"
HOME = {"shard-a": "east", "shard-b": "west"}  # tests/conftest.py SMALL_TOPOLOGY


def primary_dsn(cluster: Cluster, shard: str) -> str:
    return cluster.databases[(shard, HOME[shard])].dsn


async def bookings_for(dsn: str, reference: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM bookings WHERE client_reference = $1", reference))
    finally:
        await conn.close()


@pytest.mark.timeout(120)
async def test_a_booking_held_past_the_retry_window_is_a_503_with_the_key_that_replays_it(
    cluster: Cluster,
) -> None:
    """The held-lock repro: the tier's row is locked for longer than the gateway retries.
    The client gets 503 with an Idempotency-Key and the Booking-Secret made for it; no
    booking statement is left running for it; after the lock goes, nothing was booked,
    and replaying with the key and secret makes exactly one booking (and replaying again
    returns that same booking)."""
    dsn = primary_dsn(cluster, "shard-a")
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gw(cluster, "east"), [10], shard="shard-a")
        tier = event["tiers"][0]["id"]
        body = {"eventId": event["id"], "items": [{"ticketTierId": tier, "quantity": 3}]}
        locker = await asyncpg.connect(dsn)
        lock = locker.transaction()
        await lock.start()
        try:
            await locker.execute("SELECT 1 FROM ticket_tiers WHERE id = $1 FOR UPDATE", uuid.UUID(tier))
            async with s.post(f"{gw(cluster, 'west')}/api/bookings", json=body) as resp:
                problem = await resp.json(content_type=None)
                assert resp.status == 503 and resp.content_type == PROBLEM, problem
                assert "Retry-After" in resp.headers
                key = resp.headers["Idempotency-Key"]
                secret = resp.headers["Booking-Secret"]
            assert key.startswith("gw-")
            text = json.dumps(problem)
            assert "127.0.0.1" not in text and "http" not in problem["detail"]  # no internals
            # The service gave up too: no booking statement waits on the lock any more.
            await wait_for_booking_lock_waiters(dsn, lambda n: n == 0)
        finally:
            await lock.rollback()
            await locker.close()
        tiers = await check_invariants(dsn, event["id"])
        assert tiers[tier]["remaining"] == 10 and await bookings_for(dsn, key) == 0  # not booked
        async with s.post(f"{gw(cluster, 'west')}/api/bookings", json=body,
                          headers={"Idempotency-Key": key, "Booking-Secret": secret}) as resp:
            booking = await resp.json()
            assert resp.status == 201, booking
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json=body,
                          headers={"Idempotency-Key": key, "Booking-Secret": secret}) as resp:
            assert resp.status == 200 and await resp.json() == booking  # a replay
    assert booking["clientReference"] == key
    assert await bookings_for(dsn, key) == 1
    tiers = await check_invariants(dsn, event["id"])
    assert tiers[tier]["remaining"] == 7


async def test_every_answer_to_a_booking_without_reference_carries_the_key(cluster: Cluster) -> None:
    """201, 409 and 4xx answers alike: the key the gateway used (or would have used)."""
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gw(cluster, "east"), [1], shard="shard-b")
        tier = event["tiers"][0]["id"]
        body = {"eventId": event["id"], "items": [{"ticketTierId": tier, "quantity": 1}]}
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json=body) as resp:
            booking = await resp.json()
            assert resp.status == 201
            assert resp.headers["Idempotency-Key"] == booking["clientReference"]
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json=body) as resp:
            assert resp.status == 409 and resp.headers["Idempotency-Key"].startswith("gw-")
            assert resp.headers["Idempotency-Key"] != booking["clientReference"]
        async with s.post(f"{gw(cluster, 'east')}/api/bookings",
                          json={**body, "items": []}) as resp:
            assert resp.status == 400 and resp.headers["Idempotency-Key"].startswith("gw-")
        # A client that named its own reference gets no key of ours.
        mine = {**body, "clientReference": f"mine-{uuid.uuid4()}"}
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json=mine) as resp:
            assert resp.status == 409 and "Idempotency-Key" not in resp.headers


async def test_the_reused_reference_422_names_no_booking_through_a_gateway(cluster: Cluster) -> None:
    """The buyer reusing its reference (its Booking-Secret) for other items: a 422 that
    names no booking. (Another client, without the secret, gets the 409 of
    tests/test_booking_ownership.py.)"""
    reference = f"order-{uuid.uuid4()}"
    mine = {"Booking-Secret": secrets.token_urlsafe(32)}
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gw(cluster, "east"), [5, 5], shard="shard-a")
        a, b = (t["id"] for t in event["tiers"])
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", headers=mine, json={
                "eventId": event["id"], "clientReference": reference,
                "items": [{"ticketTierId": a, "quantity": 1}]}) as resp:
            first = await resp.json()
            assert resp.status == 201
        async with s.post(f"{gw(cluster, 'west')}/api/bookings", headers=mine, json={
                "eventId": event["id"], "clientReference": reference,
                "items": [{"ticketTierId": b, "quantity": 1}]}) as resp:
            problem = await resp.json(content_type=None)
            raw = json.dumps(problem)
    assert resp.status == 422 and problem["type"].endswith("/client-reference-reused")
    assert first["id"] not in raw and "bookingId" not in problem
    await check_invariants(primary_dsn(cluster, "shard-a"), event["id"])
