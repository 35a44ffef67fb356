"""Operator event creation through a gateway: the placement in Consul and the event on
its shard's primary end up both written or neither, under races, a Consul outage and
a primary that does not answer (MISSION.md §3 operator surface, §4 map)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from deploy.cluster import Cluster
from region_map import ConsulMapStore, NotFound
from tests.conftest import ADMIN_TOKEN
from tests.support import check_invariants, event_rows_on_primaries
from tests.support import gateway_url as gw

HOME = {"shard-a": "east", "shard-b": "west"}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def event_body(event_id: str, *, shard: str | None = "shard-a",
               tier_id: str | None = None) -> dict[str, Any]:
    tier: dict[str, Any] = {"name": "GA", "priceCents": 4500, "capacity": 20}
    if tier_id is not None:
        tier["id"] = tier_id
    body: dict[str, Any] = {"id": event_id, "name": f"Created {event_id[:8]}", "venue": "Hall",
                            "startsAt": "2027-12-01T20:00:00Z", "tiers": [tier]}
    if shard is not None:
        body["shard"] = shard
    return body


async def post_event(s: aiohttp.ClientSession, url: str, body: dict[str, Any]
                     ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with s.post(f"{url}/admin/events", json=body, headers=AUTH) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def copies_on_primaries(cluster: Cluster, event_id: str) -> dict[str, int]:
    """Rows of the event (and its tiers) on each shard's primary."""
    return await event_rows_on_primaries(cluster, event_id, HOME)


async def placement(cluster: Cluster, event_id: str) -> str | None:
    assert cluster.consul is not None
    store = ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)
    try:
        shard, _ = await store.read_placement(event_id)
        return shard
    except NotFound:
        return None
    finally:
        await store.close()


async def test_concurrent_creations_of_one_event_create_it_once(cluster: Cluster) -> None:
    """The same create, sent 12 times at once through both regions' gateways (an operator
    tool retrying impatiently): creation is idempotent, so every one is answered the same
    event (the shard created it once); one placement, one event on one shard, and it
    books. Another event under the same id is refused (409 event-exists)."""
    event_id = str(uuid.uuid4())
    body = event_body(event_id, shard=None, tier_id=str(uuid.uuid4()))
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(
            post_event(s, gw(cluster, ("east", "west")[n % 2]), body) for n in range(12)))
        assert [status for status, _, _ in answers] == [201] * 12, answers
        assert len({(doc["id"], doc["shard"]) for _, doc, _ in answers}) == 1, answers
        created = answers[0][1]
        shard = created["shard"]
        status, doc, _ = await post_event(s, gw(cluster, "east"), {**body, "venue": "Other Hall"})
        assert status == 409 and doc["type"].endswith("/event-exists"), doc
        assert await placement(cluster, event_id) == shard
        assert await copies_on_primaries(cluster, event_id) == {
            name: (2 if name == shard else 0) for name in HOME}
        async with s.post(f"{gw(cluster, 'west')}/api/bookings", json={
                "eventId": event_id, "items": [{"ticketTierId": body["tiers"][0]["id"], "quantity": 2}]
        }) as resp:
            assert resp.status == 201, await resp.text()
    tiers = await check_invariants(cluster.databases[(shard, HOME[shard])].dsn, event_id)
    assert [t["sold"] for t in tiers.values()] == [2]


async def test_an_id_sharing_a_booking_routing_prefix_is_refused(cluster: Cluster) -> None:
    """Booking ids carry their event's first 8 bytes; two events with the same 8 bytes
    would make bookings unroutable, so the second is refused and nothing is written."""
    first = str(uuid.uuid4())
    twin = str(uuid.UUID(bytes=uuid.UUID(first).bytes[:8] + uuid.uuid4().bytes[8:]))
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await post_event(s, gw(cluster, "east"), event_body(first))
        assert status == 201, doc
        status, doc, _ = await post_event(s, gw(cluster, "west"), event_body(twin, shard="shard-b"))
    assert status == 409 and doc["type"].endswith("/event-id-prefix-taken"), doc
    assert first in doc["detail"]
    assert await placement(cluster, twin) is None
    assert await copies_on_primaries(cluster, twin) == {"shard-a": 0, "shard-b": 0}


async def test_a_creation_the_shard_refuses_leaves_no_placement(cluster: Cluster) -> None:
    """A tier id another event already has: the shard refuses (409 tier-exists), and the
    placement written before it is removed again."""
    tier_id = str(uuid.uuid4())
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await post_event(s, gw(cluster, "east"), event_body(first, tier_id=tier_id))
        assert status == 201, doc
        status, doc, _ = await post_event(s, gw(cluster, "east"), event_body(second, tier_id=tier_id))
    assert status == 409 and doc["type"].endswith("/tier-exists"), doc
    assert await placement(cluster, second) is None
    assert await copies_on_primaries(cluster, second) == {"shard-a": 0, "shard-b": 0}
    assert await placement(cluster, first) == "shard-a"


@pytest.mark.timeout(120)
async def test_creation_while_consul_is_down_is_a_503_and_writes_nothing(cluster: Cluster) -> None:
    assert cluster.consul is not None
    event_id = str(uuid.uuid4())
    async with aiohttp.ClientSession() as s:
        await asyncio.to_thread(cluster.consul.stop)
        try:
            status, doc, headers = await post_event(s, gw(cluster, "west"), event_body(event_id))
            assert status == 503, doc
            assert doc["type"].endswith("/map-unavailable") and headers["Retry-After"] == "1"
            assert await copies_on_primaries(cluster, event_id) == {"shard-a": 0, "shard-b": 0}
        finally:
            await asyncio.to_thread(cluster.consul.start)
        # Consul is back: the same request now creates it.
        status, doc, _ = await post_event(s, gw(cluster, "west"), event_body(event_id))
        assert status == 201, doc
    assert await placement(cluster, event_id) == "shard-a"
    assert await copies_on_primaries(cluster, event_id) == {"shard-a": 2, "shard-b": 0}


@pytest.mark.timeout(120)
async def test_a_creation_cut_short_by_its_primary_is_finished_by_sending_it_again(
    cluster: Cluster,
) -> None:
    """Shard-a's primary service is down: the create answers 503 naming the event id,
    with the placement written. Sent again once the service is back, it finishes."""
    event_id = str(uuid.uuid4())
    body = event_body(event_id, tier_id=str(uuid.uuid4()))
    async with aiohttp.ClientSession() as s:
        await asyncio.to_thread(cluster.stop_service, HOME["shard-a"])
        try:
            status, doc, headers = await post_event(s, gw(cluster, "west"), body)
            assert status == 503, doc
            assert doc["type"].endswith("/shard-unavailable") and headers["Retry-After"] == "1"
            assert doc["eventId"] == event_id and doc["shard"] == "shard-a"
            assert await placement(cluster, event_id) == "shard-a"
            assert await copies_on_primaries(cluster, event_id) == {"shard-a": 0, "shard-b": 0}
        finally:
            await asyncio.to_thread(cluster.start_service, HOME["shard-a"])
        # The gateway's breaker lets a probe through every 2 s: retry as a client would.
        deadline = time.monotonic() + 20
        while True:
            status, doc, _ = await post_event(s, gw(cluster, "west"), body)
            if status != 503:
                break
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.2)  # a client's retry pause
        assert status == 201, doc
        assert doc["shard"] == "shard-a"
        # Once created, the same request answers the same event (idempotent).
        status, again, _ = await post_event(s, gw(cluster, "east"), body)
        assert status == 201 and again["id"] == event_id and again["shard"] == "shard-a", again
    assert await copies_on_primaries(cluster, event_id) == {"shard-a": 2, "shard-b": 0}
    assert await placement(cluster, event_id) == "shard-a"


async def test_an_unlisted_event_is_bookable_but_never_publicly_listed(cluster: Cluster) -> None:
    """`"unlisted": true` (drills, tests): the event is absent from every gateway's public
    listing (`GET /api/events`, whichever shard holds it, whether the gateway's listing
    cache was warm or not), but readable by id, bookable, and marked in the operator's
    `GET /admin/events`. A listed event created beside it is listed, so the listing is
    not simply stale."""
    from tests.support import listed_event_ids, poll

    unlisted_id, listed_id = str(uuid.uuid4()), str(uuid.uuid4())
    gateways = [gw(cluster, region) for region in ("east", "west")]
    async with aiohttp.ClientSession() as s:
        for url in gateways:  # warm each gateway's listing cache first
            await listed_event_ids(s, url)
        status, hidden, _ = await post_event(
            s, gw(cluster, "west"), {**event_body(unlisted_id, shard="shard-b"), "unlisted": True})
        assert status == 201 and hidden["unlisted"] is True, hidden
        status, shown, _ = await post_event(s, gw(cluster, "west"), event_body(listed_id,
                                                                             shard="shard-b"))
        assert status == 201 and shown["unlisted"] is False, shown

        async def listings_show_the_listed_one() -> bool:
            return all([listed_id in await listed_event_ids(s, url) for url in gateways])

        await poll(listings_show_the_listed_one, "the listed event in every listing", 20)
        for url in gateways:
            assert unlisted_id not in await listed_event_ids(s, url)
            async with s.get(f"{url}/api/events/{unlisted_id}") as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["id"] == unlisted_id
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json={
                "eventId": unlisted_id,
                "items": [{"ticketTierId": hidden["tiers"][0]["id"], "quantity": 3}]}) as resp:
            assert resp.status == 201, await resp.text()
        async with s.get(f"{gw(cluster, 'east')}/admin/events", params={"shard": "shard-b"},
                         headers=AUTH) as resp:
            assert resp.status == 200
            listing = await resp.json()
    (shard_b,) = listing["shards"]
    marked = {e["id"]: e for e in shard_b["events"]}
    assert marked[unlisted_id]["unlisted"] is True and marked[unlisted_id]["status"] == "placed"
    assert marked[listed_id]["unlisted"] is False
    tiers = await check_invariants(cluster.databases[("shard-b", HOME["shard-b"])].dsn, unlisted_id)
    assert [t["sold"] for t in tiers.values()] == [3]
