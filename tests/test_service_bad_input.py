"""Every bad-input class of MISSION.md §3 gets a clear 4xx problem document and writes nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from common.api import MAX_BODY_BYTES, MAX_ITEMS, MAX_QUANTITY_PER_ITEM
from tests.conftest import ADMIN_TOKEN, RunningService
from tests.support import FreshEvent, check_invariants, create_event
from tests.test_service_rules import booking_count

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
async def event(booking_service: RunningService) -> FreshEvent:
    async with aiohttp.ClientSession() as s:
        return await create_event(s, booking_service.url, [20, 20])


@pytest.fixture(scope="module")
async def other_event(booking_service: RunningService) -> FreshEvent:
    async with aiohttp.ClientSession() as s:
        return await create_event(s, booking_service.url, [20])


def assert_problem(status: int, expected: int, content_type: str, doc: dict[str, Any], slug: str) -> None:
    assert status == expected, doc
    assert content_type == PROBLEM
    assert set(doc) >= {"type", "title", "status", "detail"}
    assert doc["status"] == expected and doc["type"].endswith("/" + slug), doc
    assert isinstance(doc["detail"], str) and doc["detail"]


async def send_raw(svc: RunningService, data: bytes, content_type: str | None = "application/json"
                   ) -> tuple[int, str, dict[str, Any]]:
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession() as s, s.post(
            f"{svc.url}/api/bookings", data=data, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


def good(event: FreshEvent, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"eventId": event.id,
                            "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}
    body.update(overrides)
    return body


async def check_unwritten(svc: RunningService, *events: FreshEvent) -> None:
    for ev in events:
        assert await booking_count(svc.database.dsn, ev.id) == 0
        tiers = await check_invariants(svc.database.dsn, ev.id)
        assert all(t["sold"] == 0 for t in tiers.values())


async def test_malformed_json(booking_service: RunningService, event: FreshEvent) -> None:
    status, ctype, doc = await send_raw(booking_service, b'{"eventId": ')
    assert_problem(status, 400, ctype, doc, "malformed-json")
    await check_unwritten(booking_service, event)


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
async def test_body_not_an_object(booking_service: RunningService, event: FreshEvent, raw: bytes) -> None:
    status, ctype, doc = await send_raw(booking_service, raw)
    assert_problem(status, 400, ctype, doc, "invalid-request")


BAD_BODIES = {
    "eventId number": lambda e: good(e, eventId=12),
    "eventId not uuid": lambda e: good(e, eventId="concert-1"),
    "items not a list": lambda e: good(e, items={"ticketTierId": e.tier_ids[0], "quantity": 1}),
    "items empty": lambda e: good(e, items=[]),
    "item not an object": lambda e: good(e, items=["x"]),
    "quantity string": lambda e: good(e, items=[{"ticketTierId": e.tier_ids[0], "quantity": "1"}]),
    "quantity bool": lambda e: good(e, items=[{"ticketTierId": e.tier_ids[0], "quantity": True}]),
    "quantity float": lambda e: good(e, items=[{"ticketTierId": e.tier_ids[0], "quantity": 1.5}]),
    "quantity zero": lambda e: good(e, items=[{"ticketTierId": e.tier_ids[0], "quantity": 0}]),
    "quantity negative": lambda e: good(e, items=[{"ticketTierId": e.tier_ids[0], "quantity": -3}]),
    "quantity over max": lambda e: good(
        e, items=[{"ticketTierId": e.tier_ids[0], "quantity": MAX_QUANTITY_PER_ITEM + 1}]),
    "tier id missing": lambda e: good(e, items=[{"quantity": 1}]),
    "tier id malformed": lambda e: good(e, items=[{"ticketTierId": "vip", "quantity": 1}]),
    "repeated tier": lambda e: good(e, items=[{"ticketTierId": e.tier_ids[0], "quantity": 1},
                                               {"ticketTierId": e.tier_ids[0], "quantity": 2}]),
    "too many items": lambda e: good(e, items=[{"ticketTierId": str(uuid.uuid4()), "quantity": 1}
                                               for _ in range(MAX_ITEMS + 1)]),
    "reference number": lambda e: good(e, clientReference=7),
    "reference empty": lambda e: good(e, clientReference=""),
    "reference too long": lambda e: good(e, clientReference="r" * 201),
    "missing eventId": lambda e: {"items": good(e)["items"]},
    "missing items": lambda e: {"eventId": e.id},
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_invalid_bodies_are_400(booking_service: RunningService, event: FreshEvent, case: str) -> None:
    body = BAD_BODIES[case](event)
    status, ctype, doc = await send_raw(booking_service, json.dumps(body).encode())
    assert_problem(status, 400, ctype, doc, "invalid-request")
    assert doc["errors"][0]["field"]
    await check_unwritten(booking_service, event)


async def test_unknown_event_is_404(booking_service: RunningService, event: FreshEvent) -> None:
    body = good(event, eventId=str(uuid.uuid4()))
    status, ctype, doc = await send_raw(booking_service, json.dumps(body).encode())
    assert_problem(status, 404, ctype, doc, "event-not-found")
    await check_unwritten(booking_service, event)


async def test_unknown_tier_is_422(booking_service: RunningService, event: FreshEvent) -> None:
    body = good(event, items=[{"ticketTierId": str(uuid.uuid4()), "quantity": 1}])
    status, ctype, doc = await send_raw(booking_service, json.dumps(body).encode())
    assert_problem(status, 422, ctype, doc, "tier-not-in-event")
    await check_unwritten(booking_service, event)


async def test_tier_of_another_event_is_422(
        booking_service: RunningService, event: FreshEvent, other_event: FreshEvent) -> None:
    body = good(event, items=[{"ticketTierId": other_event.tier_ids[0], "quantity": 1}])
    status, ctype, doc = await send_raw(booking_service, json.dumps(body).encode())
    assert_problem(status, 422, ctype, doc, "tier-not-in-event")
    await check_unwritten(booking_service, event, other_event)


async def test_oversized_body_is_413(booking_service: RunningService, event: FreshEvent) -> None:
    body = good(event, clientReference="x", padding="p" * (MAX_BODY_BYTES + 10))
    status, ctype, doc = await send_raw(booking_service, json.dumps(body).encode())
    assert_problem(status, 413, ctype, doc, "body-too-large")
    await check_unwritten(booking_service, event)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(
        booking_service: RunningService, event: FreshEvent, content_type: str | None) -> None:
    status, ctype, doc = await send_raw(booking_service, json.dumps(good(event)).encode(), content_type)
    assert_problem(status, 415, ctype, doc, "unsupported-media-type")
    await check_unwritten(booking_service, event)


# An id no test creates; fixed, so every pytest-xdist worker collects the same test ids.
NEVER_CREATED = "0ddba11c-0000-4000-8000-00000000dead"
UNKNOWN_PATHS = [  # (path, problem type) pairs, for the booking service and the gateway
    ("/api/events/not-a-uuid", "event-not-found"),
    ("/api/events/not-a-uuid/ticket-tiers", "event-not-found"),
    (f"/api/events/{NEVER_CREATED}", "event-not-found"),
    (f"/api/events/{NEVER_CREATED}/ticket-tiers", "event-not-found"),
    ("/api/bookings/123", "booking-not-found"),
    (f"/api/bookings/{NEVER_CREATED}", "booking-not-found"),
    ("/api/no-such-thing", "not-found"),
]


@pytest.mark.parametrize("path,slug", UNKNOWN_PATHS)
async def test_unknown_things_are_404_problems(booking_service: RunningService, path: str, slug: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(booking_service.url + path) as resp:
        assert_problem(resp.status, 404, resp.content_type, await resp.json(content_type=None), slug)


async def test_wrong_method_is_405_problem(booking_service: RunningService) -> None:
    async with aiohttp.ClientSession() as s, s.delete(f"{booking_service.url}/api/bookings") as resp:
        assert_problem(resp.status, 405, resp.content_type, await resp.json(content_type=None),
                       "method-not-allowed")


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=100000", "cursor=%%%", "cursor=bm9wZQ"])
async def test_bad_listing_parameters_are_400(booking_service: RunningService, query: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{booking_service.url}/api/events?{query}") as resp:
        doc = await resp.json(content_type=None)
        assert resp.status == 400 and resp.content_type == PROBLEM, doc


@pytest.mark.parametrize("auth,expected", [(None, 401), ("Bearer wrong", 403), ("Basic abc", 401)])
async def test_operator_api_needs_the_token(booking_service: RunningService, auth: str | None,
                                            expected: int) -> None:
    headers = {"Authorization": auth} if auth else {}
    body = {"name": "X", "venue": "Y", "startsAt": "2027-01-01T00:00:00Z",
            "tiers": [{"name": "GA", "priceCents": 1, "capacity": 1}]}
    async with aiohttp.ClientSession() as s, s.post(
            f"{booking_service.url}/admin/events", json=body, headers=headers) as resp:
        doc = await resp.json(content_type=None)
    assert resp.status == expected and resp.content_type == PROBLEM, doc
    assert ADMIN_TOKEN not in json.dumps(doc)


def event_spec(**change: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "Spec test", "venue": "Hall", "startsAt": "2027-01-01T20:00:00Z",
        "tiers": [{"name": "GA", "priceCents": 100, "capacity": 10},
                  {"name": "VIP", "priceCents": 900, "capacity": 2}],
    }
    spec.update(change)
    return spec


TIER_ID = str(uuid.uuid4())
BAD_EVENT_SPECS: dict[str, tuple[dict[str, Any], str]] = {
    "missing name": ({k: v for k, v in event_spec().items() if k != "name"}, "name"),
    "blank venue": (event_spec(venue="  "), "venue"),
    "id not a uuid": (event_spec(id="concert-1"), "id"),
    "start without a time zone": (event_spec(startsAt="2027-01-01T20:00:00"), "startsAt"),
    "start not a date": (event_spec(startsAt="next friday"), "startsAt"),
    "currency lower case": (event_spec(currency="usd"), "currency"),
    "no tiers": (event_spec(tiers=[]), "tiers"),
    "tier not an object": (event_spec(tiers=["GA"]), "tiers[0]"),
    "negative capacity": (event_spec(tiers=[{"name": "GA", "priceCents": 1, "capacity": -1}]),
                          "tiers[0].capacity"),
    "capacity as a string": (event_spec(tiers=[{"name": "GA", "priceCents": 1, "capacity": "10"}]),
                             "tiers[0].capacity"),
    "price as a float": (event_spec(tiers=[{"name": "GA", "priceCents": 1.5, "capacity": 1}]),
                         "tiers[0].priceCents"),
    "repeated tier name": (event_spec(tiers=[{"name": "GA", "priceCents": 1, "capacity": 1},
                                             {"name": "GA", "priceCents": 2, "capacity": 1}]),
                           "tiers[1].name"),
    "repeated tier id": (event_spec(tiers=[{"id": TIER_ID, "name": "A", "priceCents": 1, "capacity": 1},
                                           {"id": TIER_ID, "name": "B", "priceCents": 1, "capacity": 1}]),
                         "tiers[1].id"),
}


@pytest.mark.parametrize("case", BAD_EVENT_SPECS, ids=list(BAD_EVENT_SPECS))
async def test_bad_event_specs_are_400_and_create_nothing(
        booking_service: RunningService, case: str) -> None:
    spec, field = BAD_EVENT_SPECS[case]
    spec = {**spec, "id": spec.get("id", str(uuid.uuid4()))}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{booking_service.url}/admin/events", json=spec,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            doc = await resp.json(content_type=None)
            assert_problem(resp.status, 400, resp.content_type, doc, "invalid-request")
        assert [e["field"] for e in doc["errors"]] == [field], doc
        if uuid_or_none(spec["id"]):
            async with s.get(f"{booking_service.url}/api/events/{spec['id']}") as resp:
                assert resp.status == 404


def uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
