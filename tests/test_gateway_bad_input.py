"""Every bad-input class of MISSION.md §3, sent to a gateway in another region than the
event's home: the right 4xx problem document (never a 500), and nothing written on the
shard's primary. The gateway validates before it routes; what only the shard can judge
(a tier of another event, a reused reference) comes back from the shard unchanged."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import aiohttp
import pytest

from common.api import MAX_BODY_BYTES
from deploy.cluster import Cluster
from tests.conftest import ADMIN_TOKEN
from tests.support import FreshEvent, check_invariants, create_event_doc
from tests.support import gateway_url as gw
from tests.test_service_bad_input import BAD_BODIES, UNKNOWN_PATHS, assert_problem, good
from tests.test_service_rules import booking_count

SHARD, HOME, OTHER = "shard-a", "east", "west"


@pytest.fixture(scope="module")
async def events(cluster: Cluster) -> tuple[FreshEvent, FreshEvent]:
    async with aiohttp.ClientSession() as s:
        event, other = [await create_event_doc(s, gw(cluster, HOME), caps, shard=SHARD,
                                               token=cluster.admin_token)
                        for caps in ([20, 20], [20])]
    return FreshEvent.from_doc(event), FreshEvent.from_doc(other)


async def post(cluster: Cluster, path: str, data: bytes,
               content_type: str | None = "application/json", secret: str | None = None,
               ) -> tuple[int, str, dict[str, Any]]:
    headers = {"Content-Type": content_type} if content_type else {}
    if secret is not None:
        headers["Booking-Secret"] = secret
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw(cluster, OTHER)}{path}", data=data, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def unwritten(cluster: Cluster, *evs: FreshEvent) -> None:
    dsn = cluster.databases[(SHARD, HOME)].dsn
    for ev in evs:
        assert await booking_count(dsn, ev.id) == 0
        tiers = await check_invariants(dsn, ev.id)
        assert all(t["sold"] == 0 for t in tiers.values())


async def test_malformed_json_is_400(cluster: Cluster, events: tuple[FreshEvent, FreshEvent]) -> None:
    status, ctype, doc = await post(cluster, "/api/bookings", b'{"eventId": ')
    assert_problem(status, 400, ctype, doc, "malformed-json")
    await unwritten(cluster, *events)


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
async def test_body_not_an_object_is_400(cluster: Cluster, events: tuple[FreshEvent, FreshEvent],
                                         raw: bytes) -> None:
    status, ctype, doc = await post(cluster, "/api/bookings", raw)
    assert_problem(status, 400, ctype, doc, "invalid-request")


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_invalid_bodies_are_400(cluster: Cluster, events: tuple[FreshEvent, FreshEvent],
                                      case: str) -> None:
    body = BAD_BODIES[case](events[0])
    status, ctype, doc = await post(cluster, "/api/bookings", json.dumps(body).encode())
    assert_problem(status, 400, ctype, doc, "invalid-request")
    assert doc["errors"][0]["field"]
    await unwritten(cluster, *events)


async def test_unknown_event_is_404(cluster: Cluster, events: tuple[FreshEvent, FreshEvent]) -> None:
    body = good(events[0], eventId=str(uuid.uuid4()))
    status, ctype, doc = await post(cluster, "/api/bookings", json.dumps(body).encode())
    assert_problem(status, 404, ctype, doc, "event-not-found")
    await unwritten(cluster, *events)


async def test_tier_of_another_event_is_422(cluster: Cluster,
                                            events: tuple[FreshEvent, FreshEvent]) -> None:
    event, other = events
    body = good(event, items=[{"ticketTierId": other.tier_ids[0], "quantity": 1}])
    status, ctype, doc = await post(cluster, "/api/bookings", json.dumps(body).encode())
    assert_problem(status, 422, ctype, doc, "tier-not-in-event")
    await unwritten(cluster, event, other)


async def test_reference_reused_for_other_items_is_422_and_keeps_the_first(
        cluster: Cluster) -> None:
    """By its own buyer (its Booking-Secret): anyone else gets the 409 of
    tests/test_booking_ownership.py, whatever the items."""
    async with aiohttp.ClientSession() as s:
        doc = await create_event_doc(s, gw(cluster, HOME), [10, 10], shard=SHARD,
                                     token=cluster.admin_token)
    event = FreshEvent.from_doc(doc)
    reference = f"reuse-{uuid.uuid4()}"
    first = good(event, clientReference=reference)
    secret = secrets.token_urlsafe(32)
    status, _, booking = await post(cluster, "/api/bookings", json.dumps(first).encode(),
                                    secret=secret)
    assert status == 201, booking
    changed = good(event, clientReference=reference,
                   items=[{"ticketTierId": event.tier_ids[1], "quantity": 4}])
    status, ctype, doc = await post(cluster, "/api/bookings", json.dumps(changed).encode(),
                                    secret=secret)
    assert_problem(status, 422, ctype, doc, "client-reference-reused")
    tiers = await check_invariants(cluster.databases[(SHARD, HOME)].dsn, event.id)
    assert (tiers[event.tier_ids[0]]["sold"], tiers[event.tier_ids[1]]["sold"]) == (1, 0)


async def test_oversized_body_is_413(cluster: Cluster, events: tuple[FreshEvent, FreshEvent]) -> None:
    body = good(events[0], clientReference="x", padding="p" * (MAX_BODY_BYTES + 10))
    status, ctype, doc = await post(cluster, "/api/bookings", json.dumps(body).encode())
    assert_problem(status, 413, ctype, doc, "body-too-large")
    await unwritten(cluster, *events)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(cluster: Cluster, events: tuple[FreshEvent, FreshEvent],
                                         content_type: str | None) -> None:
    status, ctype, doc = await post(cluster, "/api/bookings", json.dumps(good(events[0])).encode(),
                                    content_type)
    assert_problem(status, 415, ctype, doc, "unsupported-media-type")
    await unwritten(cluster, *events)


@pytest.mark.parametrize("path,slug", UNKNOWN_PATHS)
async def test_unknown_things_are_404(cluster: Cluster, path: str, slug: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(gw(cluster, OTHER) + path) as resp:
        assert_problem(resp.status, 404, resp.content_type, await resp.json(content_type=None), slug)


async def test_cancel_of_an_unknown_booking_is_404(cluster: Cluster) -> None:
    status, ctype, doc = await post(cluster, f"/api/bookings/{uuid.uuid4()}/cancel", b"")
    assert_problem(status, 404, ctype, doc, "booking-not-found")


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=100000", "cursor=%%%", "cursor=bm9wZQ"])
async def test_bad_listing_parameters_are_400(cluster: Cluster, query: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{gw(cluster, OTHER)}/api/events?{query}") as resp:
        doc = await resp.json(content_type=None)
        assert resp.status == 400 and resp.content_type == "application/problem+json", doc


@pytest.mark.parametrize("auth,expected", [(None, 401), ("Bearer wrong", 403), ("Basic abc", 401)])
async def test_operator_api_needs_the_token(cluster: Cluster, auth: str | None, expected: int) -> None:
    headers = {"Authorization": auth} if auth else {}
    event_id = str(uuid.uuid4())
    body = {"id": event_id, "name": "X", "venue": "Y", "startsAt": "2027-01-01T00:00:00Z",
            "tiers": [{"name": "GA", "priceCents": 1, "capacity": 1}]}
    async with aiohttp.ClientSession() as s:
        for path, kwargs in (("/admin/events", {"json": body}), ("/admin/map", {})):
            method = s.post if path == "/admin/events" else s.get
            async with method(f"{gw(cluster, OTHER)}{path}", headers=headers, **kwargs) as resp:
                doc = await resp.json(content_type=None)
            assert resp.status == expected and resp.content_type == "application/problem+json", doc
            assert ADMIN_TOKEN not in json.dumps(doc)
        async with s.get(f"{gw(cluster, OTHER)}/api/events/{event_id}") as resp:
            assert resp.status == 404


@pytest.mark.parametrize("change,field", [
    ({"shard": "shard-z"}, None),
    ({"shard": 3}, None),
    ({"startsAt": "tomorrow"}, "startsAt"),
    ({"tiers": []}, "tiers"),
])
async def test_bad_operator_requests_are_400_and_place_nothing(
        cluster: Cluster, change: dict[str, Any], field: str | None) -> None:
    event_id = str(uuid.uuid4())
    body = {"id": event_id, "name": "X", "venue": "Y", "startsAt": "2027-01-01T00:00:00Z",
            "tiers": [{"name": "GA", "priceCents": 1, "capacity": 1}], **change}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw(cluster, OTHER)}/admin/events", json=body,
                          headers={"Authorization": f"Bearer {cluster.admin_token}"}) as resp:
            doc = await resp.json(content_type=None)
        assert_problem(resp.status, 400, resp.content_type, doc, "invalid-request")
        if field is not None:
            assert [e["field"] for e in doc["errors"]] == [field]
        async with s.get(f"{gw(cluster, OTHER)}/admin/map",
                         headers={"Authorization": f"Bearer {cluster.admin_token}"}) as resp:
            assert event_id not in json.dumps(await resp.json())
