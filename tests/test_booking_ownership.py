"""Bookings belong to their buyer (issue 21, item 4; MISSION.md §6): a booking is
replayed, read in full or cancelled only with its `Booking-Secret`.

The attack as the security review reported it, on the session cluster (2 regions, 2
shards, a gateway per region): the victim books through one gateway with a guessable
`clientReference`; another client (other gateway, no cookie) posts the same body, and
a body with other items, with no secret or a wrong one. Each answer is the same
problem document (409 `client-reference-in-use`) with no booking id in it; a cancel or
a full read by the id (obtained out of band) without the secret is the 404 of an
unknown id. The buyer's own replay, read and cancel work with the secret through every
gateway. A race of right and wrong secrets on the same references keeps the
inventory's invariants and one booking per reference, owned by the secret that made
it. Malformed secrets are a 4xx problem document, never a 5xx, and write nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from playwright.async_api import Page, expect

from common.api import parse_booking_secret
from common.ids import new_booking_id
from common.problems import Problem
from deploy.cluster import Cluster
from tests.support import FreshEvent, check_invariants, create_event_doc
from tests.support import gateway_url as gw
from tests.test_web_page import booked_other_than, open_event, shown_booking
from tests.test_web_page import new_event as new_page_event

HOME = {"shard-a": "east", "shard-b": "west"}
REGIONS = ("east", "west")
SECRET = "Booking-Secret"


def primary_dsn(cluster: Cluster, shard: str) -> str:
    return cluster.databases[(shard, HOME[shard])].dsn


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def fresh_session() -> aiohttp.ClientSession:
    """A client of its own: no cookie, no connection shared with anyone else's."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def new_event(cluster: Cluster, shard: str, capacities: list[int]) -> FreshEvent:
    async with fresh_session() as s:
        doc = await create_event_doc(s, gw(cluster, "east"), capacities, shard=shard)
    assert doc["shard"] == shard
    return FreshEvent.from_doc(doc)


async def call(s: aiohttp.ClientSession, method: str, url: str, body: Any = None,
               secret: str | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    sent = dict(headers or {})
    if secret is not None:
        sent[SECRET] = secret
    async with s.request(method, url, json=body, headers=sent) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def without_request_id(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    doc.pop("requestId", None)
    return dict(doc)


async def booking_row(dsn: str, booking_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow("SELECT status, secret_hash FROM bookings WHERE id = $1",
                                   uuid.UUID(booking_id))
    finally:
        await conn.close()


async def test_a_guessed_reference_gets_neither_the_booking_nor_its_id(cluster: Cluster) -> None:
    """The reported attack: same body and another body, no secret and a wrong one, through
    the other gateway; then a cancel and a read by the id without the secret."""
    event = await new_event(cluster, "shard-b", [10, 10])
    reference = f"order-{uuid.uuid4().hex[:8]}"
    victim_secret = new_secret()
    body = {"eventId": event.id, "clientReference": reference,
            "items": [{"ticketTierId": event.tier_ids[0], "quantity": 2}]}
    other_items = {**body, "items": [{"ticketTierId": event.tier_ids[1], "quantity": 1}]}
    async with fresh_session() as victim:
        status, headers, raw = await call(victim, "POST", f"{gw(cluster, 'east')}/api/bookings",
                                          body, victim_secret)
    assert status == 201, raw
    booking = json.loads(raw)
    assert booking["bookingSecret"] == victim_secret and headers[SECRET] == victim_secret
    booking_id = booking["id"]

    west = gw(cluster, "west")
    answers = []
    for attempt_body, secret, extra in (
            (body, None, None), (body, new_secret(), None), (other_items, None, None),
            (other_items, new_secret(), None),
            ({k: v for k, v in body.items() if k != "clientReference"}, None,
             {"Idempotency-Key": reference})):
        async with fresh_session() as attacker:
            answers.append(await call(attacker, "POST", f"{west}/api/bookings", attempt_body,
                                      secret, extra))
    for status, headers, raw in answers:
        assert booking_id.encode() not in raw and booking_id not in json.dumps(headers), raw
        assert status == 409, raw
        assert headers["Content-Type"].startswith("application/problem+json")
    docs = [without_request_id(raw) for _, _, raw in answers]
    assert all(doc == docs[0] for doc in docs), docs  # the items tell the guesser nothing
    assert docs[0]["type"].endswith("/client-reference-in-use")

    unknown = str(new_booking_id(uuid.UUID(event.id)))  # routed as the victim's is, no booking
    async with fresh_session() as attacker:
        for region in REGIONS:
            for secret in (None, new_secret()):
                for method, path in (("GET", ""), ("POST", "/cancel")):
                    status, _, raw = await call(
                        attacker, method, f"{gw(cluster, region)}/api/bookings/{booking_id}{path}",
                        None, secret)
                    u_status, _, u_raw = await call(
                        attacker, method, f"{gw(cluster, region)}/api/bookings/{unknown}{path}",
                        None, secret)
                    assert (status, u_status) == (404, 404), (raw, u_raw)
                    doc, unknown_doc = without_request_id(raw), without_request_id(u_raw)
                    assert doc["detail"].replace(booking_id, "X") == \
                        unknown_doc["detail"].replace(unknown, "X")
                    assert doc["type"] == unknown_doc["type"]

    row = await booking_row(primary_dsn(cluster, "shard-b"), booking_id)
    assert row is not None and row["status"] == "confirmed"
    assert bytes(row["secret_hash"]) == hashlib.sha256(victim_secret.encode()).digest()
    async with fresh_session() as victim:  # the victim's own view is intact
        status, _, raw = await call(victim, "GET", f"{west}/api/bookings/{booking_id}", None,
                                    victim_secret)
    assert status == 200 and json.loads(raw)["status"] == "confirmed", raw


async def test_the_buyer_replays_reads_and_cancels_with_its_secret_on_every_gateway(
        cluster: Cluster) -> None:
    """For an event homed in each region: the buyer's replay (its own secret, or the one the
    gateway made when it sent none), read and cancel through both gateways."""
    for shard in HOME:
        event = await new_event(cluster, shard, [20])
        body = {"eventId": event.id, "clientReference": f"mine-{uuid.uuid4()}",
                "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}
        async with fresh_session() as buyer:
            # No secret sent: the gateway makes one and hands it back, header and body.
            status, headers, raw = await call(buyer, "POST", f"{gw(cluster, 'west')}/api/bookings",
                                              body)
            assert status == 201, raw
            booking = json.loads(raw)
            secret = headers[SECRET]
            assert booking["bookingSecret"] == secret
            parse_booking_secret(secret)
            for region in REGIONS:
                url = gw(cluster, region)
                status, headers, raw = await call(buyer, "POST", f"{url}/api/bookings", body, secret)
                assert status == 200 and json.loads(raw)["id"] == booking["id"], raw
                status, _, raw = await call(buyer, "GET", f"{url}/api/bookings/{booking['id']}",
                                            None, secret)
                assert status == 200 and json.loads(raw)["id"] == booking["id"], raw
                assert "bookingSecret" not in json.loads(raw)
            for region in REGIONS:  # cancelled through one, then again through the other
                status, _, raw = await call(
                    buyer, "POST", f"{gw(cluster, region)}/api/bookings/{booking['id']}/cancel",
                    None, secret)
                assert status == 200 and json.loads(raw)["status"] == "cancelled", raw
        tiers = await check_invariants(primary_dsn(cluster, shard), event.id)
        assert tiers[event.tier_ids[0]]["remaining"] == 20


async def test_right_and_wrong_secrets_racing_on_the_same_references(cluster: Cluster) -> None:
    """Owners and guessers at once, through both gateways, on one taken reference and on
    fresh ones: one booking per reference, owned by the secret that made it; every
    answer to another secret a 409 without the id; nothing oversold or sold twice."""
    event = await new_event(cluster, "shard-a", [1000, 1000])
    tier_a, tier_b = event.tier_ids
    victim_ref, victim_secret = f"victim-{uuid.uuid4()}", new_secret()
    mine = {"eventId": event.id, "clientReference": victim_ref,
            "items": [{"ticketTierId": tier_a, "quantity": 1}]}
    async with fresh_session() as s:
        status, _, raw = await call(s, "POST", f"{gw(cluster, 'east')}/api/bookings", mine,
                                    victim_secret)
        assert status == 201, raw
        victim_id = json.loads(raw)["id"]

    references = {victim_ref: victim_secret}
    references.update({f"race-{n}-{uuid.uuid4()}": new_secret() for n in range(10)})
    sends: list[tuple[str, str, dict[str, Any], str]] = []  # (reference, gateway, body, secret)
    for n, (ref, owner_secret) in enumerate(references.items()):
        same = {"eventId": event.id, "clientReference": ref,
                "items": [{"ticketTierId": tier_a, "quantity": 1}]}
        other = {**same, "items": [{"ticketTierId": tier_b, "quantity": 2}]}
        for k in range(4):
            region = REGIONS[(n + k) % 2]
            sends.append((ref, region, same, owner_secret))
            sends.append((ref, region, other if k % 2 else same, new_secret()))

    async def one(ref: str, region: str, body: dict[str, Any], secret: str
                  ) -> tuple[str, str, int, bytes]:
        async with fresh_session() as s:
            status, _, raw = await call(s, "POST", f"{gw(cluster, region)}/api/bookings", body,
                                        secret)
        return ref, secret, status, raw

    answers = await asyncio.gather(*(one(*send) for send in sends))

    dsn = primary_dsn(cluster, "shard-a")
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT client_reference, id::text AS id, secret_hash, status FROM bookings "
            "WHERE client_reference = ANY ($1::text[])", list(references))
    finally:
        await conn.close()
    by_ref = {r["client_reference"]: r for r in rows}
    assert set(by_ref) == set(references)
    assert by_ref[victim_ref]["id"] == victim_id and by_ref[victim_ref]["status"] == "confirmed"
    assert bytes(by_ref[victim_ref]["secret_hash"]) == \
        hashlib.sha256(victim_secret.encode()).digest()
    created: dict[str, int] = {}
    for ref, secret, status, raw in answers:
        row = by_ref[ref]
        assert status < 500, raw
        if bytes(row["secret_hash"]) == hashlib.sha256(secret.encode()).digest():
            assert status in (200, 201), raw
            assert json.loads(raw)["id"] == row["id"]
            created[ref] = created.get(ref, 0) + (status == 201)
        else:
            assert status == 409 and row["id"].encode() not in raw, raw
            assert json.loads(raw)["type"].endswith("/client-reference-in-use")
    assert created.pop(victim_ref) == 0
    assert created == {ref: 1 for ref in references if ref != victim_ref}, created
    await check_invariants(dsn, event.id)  # sold + remaining = capacity, none negative
    conn = await asyncpg.connect(dsn)
    try:  # nothing booked beyond one booking per reference (the event is this test's own)
        assert await conn.fetchval("SELECT count(*) FROM bookings WHERE event_id = $1",
                                   uuid.UUID(event.id)) == len(references)
    finally:
        await conn.close()


async def raw_request(base_url: str, head: bytes, body: bytes = b"") -> tuple[int, str, bytes]:
    """One raw HTTP/1.1 request (a header aiohttp's client would not send as it is)."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + b"\r\nHost: " + url.netloc.encode()
                     + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head_out, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_out.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers.get("content-type", ""), rest


BAD_SECRETS = {
    "empty": b"",
    "too short": b"a" * 31,
    "over-long": b"a" * 129,
    "10,000 characters": b"a" * 10_000,
    "non-ASCII (UTF-8)": "é".encode() * 40,
    "latin-1 bytes": b"\xff" * 40,
    "not URL-safe": b"abc+/=" * 8,
    "inner space": b"a" * 20 + b" " + b"a" * 20,
}


async def test_malformed_secrets_are_a_4xx_problem_and_write_nothing(cluster: Cluster) -> None:
    event = await new_event(cluster, "shard-a", [50])
    good = new_secret()
    async with fresh_session() as s:
        status, _, raw = await call(s, "POST", f"{gw(cluster, 'west')}/api/bookings", {
            "eventId": event.id, "clientReference": f"good-{uuid.uuid4()}",
            "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}, good)
    assert status == 201, raw
    booking_id = json.loads(raw)["id"]
    dsn = primary_dsn(cluster, "shard-a")
    for name, value in BAD_SECRETS.items():
        for region in REGIONS:
            ref = f"bad-{uuid.uuid4()}"
            body = json.dumps({"eventId": event.id, "clientReference": ref,
                               "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}
                              ).encode()
            requests = [
                (b"POST /api/bookings HTTP/1.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode(), body),
                (f"GET /api/bookings/{booking_id} HTTP/1.1".encode(), b""),
                (f"POST /api/bookings/{booking_id}/cancel HTTP/1.1".encode(), b""),
            ]
            for head, payload in requests:
                status, ctype, answer = await raw_request(
                    gw(cluster, region), head + b"\r\nBooking-Secret: " + value, payload)
                assert 400 <= status < 500, (name, head, status, answer)
                assert ctype.startswith("application/problem+json"), (name, ctype, answer)
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval(
                    "SELECT count(*) FROM bookings WHERE client_reference = $1", ref) == 0, name
            finally:
                await conn.close()
    row = await booking_row(dsn, booking_id)
    assert row is not None and row["status"] == "confirmed"


def test_the_secret_parser_takes_url_safe_32_to_128_characters_only() -> None:
    for good in ("a" * 32, "A-_9" * 32, secrets.token_urlsafe(32), secrets.token_urlsafe(96)):
        assert parse_booking_secret(good) == good
    for bad in ("", "a" * 31, "a" * 129, "é" * 40, "a" * 31 + "\x00", "a" * 40 + "\n",
                "a b" * 20, "abc+/=" * 8, "\udcff" * 40):
        try:
            parse_booking_secret(bad)
        except Problem as exc:
            assert exc.status == 400 and exc.type == "invalid-booking-secret"
        else:
            raise AssertionError(f"{bad!r} was taken")


async def test_the_page_keeps_a_secret_per_booking_and_cancels_with_it(
        page: Page, page_errors: list[str], cluster: Cluster) -> None:
    """The public page (gateway/static/index.html): each attempt sends a secret it made
    (crypto.getRandomValues), keeps it in localStorage with the booking id, reads the
    booking with it and cancels with it; the next booking has another secret."""
    doc = await new_page_event(cluster, [("Stalls", 10)])  # on shard-a, listed early
    tier = doc["tiers"][0]["id"]
    await open_event(page, cluster, doc["id"])
    await page.locator(f"#qty-{tier}").fill("2")
    await page.locator("#book").click()
    first = await shown_booking(page)
    assert "bookingSecret" not in first  # shown on the page: never the secret
    await page.locator(f"#qty-{tier}").fill("1")
    await page.locator("#book").click()
    await booked_other_than(page, "id", first["id"])
    saved = json.loads(await page.evaluate("localStorage.getItem('boxoffice-bookings')"))
    assert len(saved) == 2 and len(set(saved.values())) == 2
    dsn = primary_dsn(cluster, "shard-a")
    for booking_id, secret in saved.items():
        assert parse_booking_secret(secret) == secret
        row = await booking_row(dsn, booking_id)
        assert row is not None and bytes(row["secret_hash"]) == hashlib.sha256(secret.encode()).digest()
    second = next(i for i in saved if i != first["id"])
    await page.locator("#cancel").click()
    await expect(page.locator("#message")).to_have_text("Cancelled.")
    row = await booking_row(dsn, second)
    assert row is not None and row["status"] == "cancelled"
    assert page_errors == []

