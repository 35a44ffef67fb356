"""Issue 6, items 1 and 2: hostile requests that made a 500 (or a text/plain answer),
sent as raw HTTP/1.1 bytes to a gateway of the cluster and straight to a booking
service. Each gets a 4xx RFC 9457 problem document and writes nothing; after a burst
of each through a gateway, its breakers are closed and a booking still succeeds."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from tests.conftest import ADMIN_TOKEN, RunningService
from tests.support import FreshEvent, create_event, create_event_doc
from tests.support import gateway_url as gw

PROBLEM = "application/problem+json"
BURST = 20

NO_UTC_CURSOR = ("WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzAxOjAwIiwgIjAwMDAwMDAwLTAwMDAtNDAwMC04MDAwLTAw"
                 "MDAwMDAwMDAwMCJd")
NUMBER_CURSOR = "WzEsICJ4Il0"
NESTED_CURSOR = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode().rstrip("=")
NOT_UTF8_TOKEN = b"Bearer \xff\xfe\xfd" + ADMIN_TOKEN.encode()


@dataclass(frozen=True)
class Target:
    base_url: str
    dsns: list[str]  # every primary the target could write to
    event: FreshEvent
    is_gateway: bool


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(base_url: str, head: bytes, body: bytes = b"") -> Answer:
    """One raw HTTP/1.1 request (head: request line and headers, without the blank line)."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + b"\r\nHost: " + url.netloc.encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head_out, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_out.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return Answer(int(status_line.split()[1]), headers, rest[: int(headers.get("content-length", len(rest)))])


def _post(path: str, body: bytes, *extra: bytes) -> tuple[bytes, bytes]:
    head = b"\r\n".join([b"POST " + path.encode() + b" HTTP/1.1", b"Content-Type: application/json",
                         b"Content-Length: " + str(len(body)).encode(), *extra])
    return head, body


def _booking(event: FreshEvent) -> bytes:
    return json.dumps({"eventId": event.id, "clientReference": f"hostile-{uuid.uuid4()}",
                       "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}).encode()


def _spec(**change: Any) -> bytes:
    spec: dict[str, Any] = {"id": str(uuid.uuid4()), "name": f"Hostile {uuid.uuid4().hex[:8]}",
                            "venue": "Hall", "startsAt": "2027-06-01T20:00:00Z",
                            "tiers": [{"name": "GA", "priceCents": 100, "capacity": 5}]}
    spec.update(change)
    return json.dumps(spec).encode()


BEARER = b"Authorization: Bearer " + ADMIN_TOKEN.encode()

# name -> (expected status, problem type, request builder(event) -> (head, body), gateway only)
Builder = Callable[[FreshEvent], tuple[bytes, bytes]]
HOSTILE: dict[str, tuple[int, str, Builder, bool]] = {
    "cursor without a UTC equivalent": (
        400, "invalid-cursor", lambda e: (f"GET /api/events?cursor={NO_UTC_CURSOR} HTTP/1.1".encode(), b""),
        False),
    "cursor [1, 'x']": (
        400, "invalid-cursor", lambda e: (f"GET /api/events?cursor={NUMBER_CURSOR} HTTP/1.1".encode(), b""),
        False),
    "deeply nested cursor": (
        400, "invalid-cursor", lambda e: (f"GET /api/events?cursor={NESTED_CURSOR} HTTP/1.1".encode(), b""),
        False),
    "unicode digit limit": (
        400, "invalid-request", lambda e: (b"GET /api/events?limit=%C2%B2 HTTP/1.1", b""), False),
    "6,000 nested arrays": (
        400, "malformed-json", lambda e: _post("/api/bookings", b"[" * 6000 + b"]" * 6000), False),
    "5,000-digit quantity": (
        400, "malformed-json",
        lambda e: _post("/api/bookings",
                        _booking(e).replace(b'"quantity": 1', b'"quantity": ' + b"7" * 5000)),
        False),
    "gzip header on a plain body": (
        415, "unsupported-content-encoding",
        lambda e: _post("/api/bookings", _booking(e), b"Content-Encoding: gzip"), False),
    "non-UTF-8 token on /admin/map": (
        403, "forbidden", lambda e: (b"GET /admin/map HTTP/1.1\r\nAuthorization: " + NOT_UTF8_TOKEN, b""),
        True),
    "non-UTF-8 token on /admin/events": (
        403, "forbidden", lambda e: _post("/admin/events", _spec(), b"Authorization: " + NOT_UTF8_TOKEN),
        False),
    "startsAt with no UTC equivalent": (
        400, "invalid-request",
        lambda e: _post("/admin/events", _spec(startsAt="0001-01-01T00:00:00+01:00"), BEARER), False),
    "startsAt past year 9999 in UTC": (
        400, "invalid-request",
        lambda e: _post("/admin/events", _spec(startsAt="9999-12-31T23:59:59-05:00"), BEARER), False),
    "NUL in an event name": (
        400, "invalid-request", lambda e: _post("/admin/events", _spec(name="Nul\u0000Show"), BEARER),
        False),
    "NUL in a tier name": (
        400, "invalid-request",
        lambda e: _post("/admin/events", _spec(tiers=[{"name": "G\u0000A", "priceCents": 1, "capacity": 1}]),
                        BEARER), False),
    "header line over 8 KB": (
        400, "line-too-long",
        lambda e: (b"GET /api/events HTTP/1.1\r\nX-Filler: " + b"a" * 9000, b""), False),
    "URL over 8 KB": (
        400, "line-too-long", lambda e: (b"GET /api/events?x=" + b"a" * 9000 + b" HTTP/1.1", b""), False),
    "bad chunked encoding": (
        400, "bad-http-request",
        lambda e: (b"POST /api/bookings HTTP/1.1\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked", b"zz\r\n" + _booking(e) + b"\r\n0\r\n\r\n"), False),
}


def assert_problem(answer: Answer, status: int, slug: str) -> None:
    assert answer.status == status, answer
    assert answer.headers.get("content-type", "").split(";")[0] == PROBLEM, answer
    doc = answer.json()
    assert set(doc) >= {"type", "title", "status", "detail"}, doc
    assert doc["status"] == status and doc["type"].endswith("/" + slug), doc
    assert isinstance(doc["title"], str) and isinstance(doc["detail"], str) and doc["detail"]
    text = answer.body.decode(errors="replace")
    for leak in ("Traceback", "Error(", "Expecting", "message:", "127.0.0.1", "\\u0000"):
        assert leak not in text, doc


async def snapshot(dsns: list[str]) -> list[tuple[int, int, int, int]]:
    """Rows a hostile request could have written: events, tiers, bookings, tickets left."""
    counts = []
    for dsn in dsns:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM ticket_tiers),"
                " (SELECT count(*) FROM bookings), (SELECT coalesce(sum(remaining), 0) FROM ticket_tiers)")
            counts.append(tuple(int(v) for v in row))
        finally:
            await conn.close()
    return counts


@pytest.fixture(scope="module")
async def gateway_target(cluster: Cluster) -> Target:
    async with aiohttp.ClientSession() as s:
        doc = await create_event_doc(s, gw(cluster, "east"), [BURST * 5], shard="shard-a",
                                     token=cluster.admin_token)
    dsns = [cluster.databases[(shard, home)].dsn for shard, home in cluster.topology.shards.items()]
    return Target(gw(cluster, "east"), dsns, FreshEvent.from_doc(doc), True)


@pytest.fixture(scope="module")
async def service_target(booking_service: RunningService) -> Target:
    async with aiohttp.ClientSession() as s:
        event = await create_event(s, booking_service.url, [BURST * 5])
    return Target(booking_service.url, [booking_service.database.dsn], event, False)


SERVICE_CASES = [case for case, (*_, gateway_only) in HOSTILE.items() if not gateway_only]


async def check_hostile(target: Target, case: str) -> None:
    status, slug, build, _ = HOSTILE[case]
    before = await snapshot(target.dsns)
    answer = await send(target.base_url, *build(target.event))
    assert_problem(answer, status, slug)
    assert await snapshot(target.dsns) == before


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
async def test_hostile_request_to_a_gateway_is_a_4xx_problem_and_writes_nothing(
        gateway_target: Target, case: str) -> None:
    await check_hostile(gateway_target, case)


@pytest.mark.parametrize("case", SERVICE_CASES, ids=SERVICE_CASES)
async def test_hostile_request_to_a_booking_service_is_a_4xx_problem_and_writes_nothing(
        service_target: Target, case: str) -> None:
    """Every case but the gateway-only routes (the service has no /admin/map)."""
    await check_hostile(service_target, case)


async def book(base_url: str, event: FreshEvent) -> int:
    async with aiohttp.ClientSession() as s, s.post(
            f"{base_url}/api/bookings", data=_booking(event),
            headers={"Content-Type": "application/json"}) as resp:
        return resp.status


async def test_a_burst_of_every_hostile_request_leaves_the_gateway_serving(
        cluster: Cluster, gateway_target: Target) -> None:
    before = await snapshot(gateway_target.dsns)
    for case, (status, _, build, _) in HOSTILE.items():
        answers = await asyncio.gather(
            *(send(gateway_target.base_url, *build(gateway_target.event)) for _ in range(BURST)))
        assert [a.status for a in answers] == [status] * BURST, case
    assert await snapshot(gateway_target.dsns) == before
    async with aiohttp.ClientSession() as s, s.get(
            f"{gateway_target.base_url}/api/ready",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        ready = await resp.json()
    breakers = ready.get("upstreamBreakers", {})
    assert all(state == "closed" for state in breakers.values()), breakers
    assert await book(gateway_target.base_url, gateway_target.event) == 201


async def test_the_service_still_books_after_hostile_requests(service_target: Target) -> None:
    for _, (status, _, build, gateway_only) in HOSTILE.items():
        if not gateway_only:
            assert (await send(service_target.base_url, *build(service_target.event))).status == status
    assert await book(service_target.base_url, service_target.event) == 201
