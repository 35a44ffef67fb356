"""The platform across regions: real gateways, booking services, replicas and Consul."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.cluster import Cluster
from region_map import ConsulMapStore
from tests.conftest import ADMIN_TOKEN, METRICS_AUTH
from tests.support import (
    check_invariants,
    create_event_doc,
    listed_event_ids,
    wait_for_booking_lock_waiters,
)
from tests.support import gateway_url as gw

HOME = {"shard-a": "east", "shard-b": "west"}
OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OUTAGE_SECONDS = 10.0


def primary_dsn(cluster: Cluster, shard: str) -> str:
    return cluster.databases[(shard, HOME[shard])].dsn


def replica_dsn(cluster: Cluster, shard: str, region: str) -> str:
    assert HOME[shard] != region
    return cluster.databases[(shard, region)].dsn


async def new_event(session: aiohttp.ClientSession, cluster: Cluster, shard: str,
                    capacities: list[int]) -> Any:
    """Create an event on `shard` through a gateway's operator API (placed in the map)."""
    doc = await create_event_doc(session, gw(cluster, "east"), capacities, shard=shard)
    assert doc["shard"] == shard
    return doc


async def wait_for_row(dsn: str, sql: str, *args: Any, timeout: float = 10.0) -> float:
    """Poll a database until the query returns a row; returns the seconds it took."""
    started = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        while await conn.fetchval(sql, *args) is None:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"no row after {timeout}s: {sql}")
            await asyncio.sleep(0.01)  # poll interval
    finally:
        await conn.close()
    return time.monotonic() - started


def browser_like_session() -> aiohttp.ClientSession:
    """A client that keeps cookies, even for the IP-address hosts of this local cluster."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def test_booking_in_one_region_lands_on_home_primary_and_reads_back(cluster: Cluster) -> None:
    async with browser_like_session() as s:
        event = await new_event(s, cluster, "shard-b", [10])  # homed in west
        tier = event["tiers"][0]["id"]
        # Book through the *east* gateway: forwarded to west's primary.
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json={
            "eventId": event["id"], "items": [{"ticketTierId": tier, "quantity": 2}]}) as resp:
            booking = await resp.json()
            assert resp.status == 201, booking
            assert resp.headers["X-Boxoffice-Served-By"] == "west"
            secret = {"Booking-Secret": resp.headers["Booking-Secret"]}  # the buyer's (made for it)
            token = resp.headers["X-Consistency-Token"]
            assert "shard-b=" in token
            assert resp.cookies["boxoffice_ct"].value == token

        conn = await asyncpg.connect(primary_dsn(cluster, "shard-b"))
        try:
            status = await conn.fetchval(
                "SELECT status FROM bookings WHERE id = $1", uuid.UUID(booking["id"]))
            assert status == "confirmed"
        finally:
            await conn.close()

        # Read-your-writes through east, from east's replica of shard-b (the cookie jar
        # carries the token; the replica waits until it has replayed the booking).
        async with s.get(f"{gw(cluster, 'east')}/api/bookings/{booking['id']}",
                         headers=secret) as resp:
            assert resp.status == 200
            assert (await resp.json())["id"] == booking["id"]
            assert resp.headers["X-Boxoffice-Served-By"] == "east"
        async with s.get(f"{gw(cluster, 'east')}/api/events/{event['id']}/ticket-tiers") as resp:
            tiers = (await resp.json())["ticketTiers"]
            assert tiers[0]["remaining"] == 8
            assert resp.headers["X-Boxoffice-Served-By"] == "east"

    # ...and the write reaches east's replica of shard-b by streaming replication.
    await wait_for_row(replica_dsn(cluster, "shard-b", "east"),
                       "SELECT 1 FROM bookings WHERE id = $1", uuid.UUID(booking["id"]))
    await check_invariants(primary_dsn(cluster, "shard-b"), event["id"])


async def test_token_header_gives_read_your_writes_without_cookies(cluster: Cluster) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        event = await new_event(s, cluster, "shard-a", [50])  # homed in east
        tier = event["tiers"][0]["id"]
        for n in range(5):
            async with s.post(f"{gw(cluster, 'west')}/api/bookings", json={
                "eventId": event["id"], "items": [{"ticketTierId": tier, "quantity": 1}]}) as resp:
                assert resp.status == 201
                token = resp.headers["X-Consistency-Token"]
            # Read through west, whose copy of shard-a is a replica, echoing the token.
            async with s.get(f"{gw(cluster, 'west')}/api/events/{event['id']}/ticket-tiers",
                             headers={"X-Consistency-Token": token}) as resp:
                assert resp.status == 200
                assert (await resp.json())["ticketTiers"][0]["remaining"] == 50 - (n + 1)
                assert resp.headers["X-Boxoffice-Served-By"] in ("west", "east")


async def test_request_id_crosses_the_gateway_to_service_hop(cluster: Cluster) -> None:
    """The 409 below is decided by west's booking service; it names the request id it saw."""
    request_id = f"trace-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as s:
        event = await new_event(s, cluster, "shard-b", [1])
        body = {"eventId": event["id"], "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 2}]}
        async with s.post(f"{gw(cluster, 'east')}/api/bookings", json=body,
                          headers={"X-Request-Id": request_id}) as resp:
            problem = await resp.json(content_type=None)
            assert resp.status == 409 and resp.headers["X-Boxoffice-Served-By"] == "west"
            assert resp.headers["X-Request-Id"] == request_id
    assert problem["requestId"] == request_id


async def test_reads_go_to_the_clients_region(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        event = await new_event(s, cluster, "shard-a", [5])  # primary east, replica west
        # (Until west's replica has the event, a read there falls back to the primary.)
        await wait_for_row(replica_dsn(cluster, "shard-a", "west"),
                           "SELECT 1 FROM events WHERE id = $1", uuid.UUID(event["id"]))
        url = f"{gw(cluster, 'east')}/api/events/{event['id']}/ticket-tiers"
        async with s.get(url) as resp:
            assert resp.headers["X-Boxoffice-Served-By"] == "east"
        async with s.get(url, headers={"X-Boxoffice-Region": "west"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Boxoffice-Served-By"] == "west"


async def test_events_listing_merges_every_shard_once(cluster: Cluster) -> None:
    store = ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)  # type: ignore[union-attr]
    try:
        placed = set((await store.load()).placements)
    finally:
        await store.close()
    unlisted: set[str] = set()  # other tests' drill-style events: placed, never listed
    for shard in HOME:
        conn = await asyncpg.connect(primary_dsn(cluster, shard))
        try:
            unlisted |= {str(r["id"]) for r in await conn.fetch("SELECT id FROM events WHERE unlisted")}
        finally:
            await conn.close()
    async with aiohttp.ClientSession() as s:
        for region in ("east", "west"):
            seen = await listed_event_ids(s, gw(cluster, region), page_size=2)
            assert len(seen) == len(set(seen)), "an event was listed twice"
            assert set(seen) == placed - unlisted


async def test_concurrent_bookings_from_both_regions_never_oversell(cluster: Cluster) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        event = await new_event(s, cluster, "shard-a", [100])
        tier = event["tiers"][0]["id"]

        async def book(n: int) -> int:
            """One booking as a careful client makes it: a 503 (shed load) or 429 is sent
            again, after its Retry-After, with the Idempotency-Key and Booking-Secret the
            gateway handed back."""
            region = ("east", "west")[n % 2]
            headers: dict[str, str] = {}
            while True:
                async with s.post(f"{gw(cluster, region)}/api/bookings", headers=headers, json={
                        "eventId": event["id"],
                        "items": [{"ticketTierId": tier, "quantity": 1}]}) as resp:
                    await resp.read()
                    if resp.status not in (429, 503):
                        return 201 if resp.status == 200 else resp.status  # 200: our replay
                    headers = {name: resp.headers[name] for name in ("Idempotency-Key",
                               "Booking-Secret") if name in resp.headers}
                    retry_after = resp.headers.get("Retry-After", "")
                await asyncio.sleep(min(float(retry_after), 1.0) if retry_after.isdigit() else 0.05)

        statuses = await asyncio.gather(*(book(n) for n in range(300)))
    assert statuses.count(201) == 100
    assert statuses.count(409) == 200
    tiers = await check_invariants(primary_dsn(cluster, "shard-a"), event["id"])
    assert tiers[tier]["remaining"] == 0


async def test_concurrent_duplicates_across_regions_make_one_booking(cluster: Cluster) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        event = await new_event(s, cluster, "shard-b", [100])
        tier = event["tiers"][0]["id"]
        ref = f"dup-{uuid.uuid4()}"
        mine = {"Booking-Secret": secrets.token_urlsafe(32)}  # one client's duplicates

        async def book(n: int) -> tuple[int, str]:
            region = ("east", "west")[n % 2]
            async with s.post(f"{gw(cluster, region)}/api/bookings", headers=mine, json={
                "eventId": event["id"], "clientReference": ref,
                "items": [{"ticketTierId": tier, "quantity": 3}]}) as resp:
                return resp.status, (await resp.json())["id"]

        answers = await asyncio.gather(*(book(n) for n in range(40)))
    assert sorted({status for status, _ in answers}) in ([200, 201], [201])
    assert [status for status, _ in answers].count(201) == 1
    assert len({booking_id for _, booking_id in answers}) == 1
    tiers = await check_invariants(primary_dsn(cluster, "shard-b"), event["id"])
    assert tiers[tier]["sold"] == 3


async def test_placement_change_reaches_every_gateway_within_a_second(cluster: Cluster) -> None:
    """An event created on a shard but not yet placed becomes routable when placed."""
    assert cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        event_id = str(uuid.uuid4())
        service = f"{cluster.plan.service_url('west')}/shards/shard-b"
        await create_event_on_service(s, service, event_id)
        for region in ("east", "west"):
            async with s.get(f"{gw(cluster, region)}/api/events/{event_id}") as resp:
                assert resp.status == 404  # not placed yet: no gateway routes it

        store = ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)  # type: ignore[union-attr]
        try:
            written = time.monotonic()
            await store.place_event(event_id, "shard-b", 0)
        finally:
            await store.close()

        async def seen_by(region: str) -> float:
            while True:
                async with s.get(f"{gw(cluster, region)}/api/events/{event_id}") as resp:
                    if resp.status == 200:
                        return time.monotonic() - written
                if time.monotonic() - written > 5:
                    return float("inf")
                await asyncio.sleep(0.005)  # measurement resolution

        delays = await asyncio.gather(*(seen_by(r) for r in ("east", "west")))
    print(f"placement change seen by gateways after {[f'{d * 1000:.0f} ms' for d in delays]}")
    assert max(delays) < 1.0


async def create_event_on_service(s: aiohttp.ClientSession, service_url: str, event_id: str) -> None:
    async with s.post(f"{service_url}/admin/events", json={
        "id": event_id, "name": "Unplaced", "venue": "Hall", "startsAt": "2027-11-01T20:00:00Z",
        "tiers": [{"name": "GA", "priceCents": 100, "capacity": 10}],
    }, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 201, await resp.text()


@pytest.mark.timeout(120)
async def test_gateways_keep_serving_while_consul_is_down(cluster: Cluster) -> None:
    assert cluster.consul is not None and cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        event = await new_event(s, cluster, "shard-a", [1000])
        tier = event["tiers"][0]["id"]
        cluster.consul.stop()
        try:
            outage_started = time.monotonic()
            bookings = reads = 0
            # 10 s: many times every timer the gateways run on the map (the follower's
            # retry back-off is capped at 1 s, the listing cache keeps 1 s), so a gateway
            # that dropped its map or its cached health on a failed watch would show it.
            while time.monotonic() - outage_started < OUTAGE_SECONDS:
                for region in ("east", "west"):
                    async with s.post(f"{gw(cluster, region)}/api/bookings", json={
                        "eventId": event["id"],
                        "items": [{"ticketTierId": tier, "quantity": 1}]}) as resp:
                        assert resp.status == 201, await resp.text()
                        bookings += 1
                    async with s.get(f"{gw(cluster, region)}/api/events") as resp:
                        assert resp.status == 200
                        reads += 1
                await asyncio.sleep(0.25)  # pacing: a steady trickle over the outage
            print(f"during a {time.monotonic() - outage_started:.0f}s consul outage: "
                  f"{bookings} bookings, {reads} listings, all answered")
        finally:
            cluster.consul.start()

        # Consul is back: a new placement reaches the gateways again.
        event_id = str(uuid.uuid4())
        await create_event_on_service(s, f"{cluster.plan.service_url('east')}/shards/shard-a", event_id)
        store = ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)
        try:
            await store.place_event(event_id, "shard-a", 0)
        finally:
            await store.close()
        deadline = time.monotonic() + 15
        for region in ("east", "west"):
            while True:
                async with s.get(f"{gw(cluster, region)}/api/events/{event_id}") as resp:
                    if resp.status == 200:
                        break
                assert time.monotonic() < deadline, f"{region} never saw the new placement"
                await asyncio.sleep(0.02)  # poll interval
    await check_invariants(primary_dsn(cluster, "shard-a"), event["id"])


async def test_gateway_health_names_its_region(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        for region in ("east", "west"):
            async with s.get(f"{gw(cluster, region)}/api/health") as resp:
                assert await resp.json() == {"status": "ok", "region": region}
            async with s.get(f"{gw(cluster, region)}/api/ready") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ok"}  # public: no detail
            async with s.get(f"{gw(cluster, region)}/api/ready", headers=OPERATOR) as resp:
                ready = await resp.json()
                assert resp.status == 200 and ready["map"]["loaded"] and ready["map"]["shards"] == 2
                # The topology's gateway settings reached the process.
                assert ready["settings"]["cacheTtlSeconds"] == 1.0
                assert ready["settings"]["writeRetrySeconds"] == 10.0


async def wait_for_log_line(path: Path, *needles: str, timeout: float = 10.0) -> None:
    """Poll a process's log file until one line contains every needle."""
    deadline = time.monotonic() + timeout
    while True:
        text = await asyncio.to_thread(path.read_text, errors="replace")
        if any(all(n in line for n in needles) for line in text.splitlines()):
            return
        assert time.monotonic() < deadline, f"{needles!r} never appeared in {path}"
        await asyncio.sleep(0.01)  # poll interval


async def wait_served_by(session: aiohttp.ClientSession, url: str, region: str,
                         timeout: float = 15.0) -> None:
    """Poll a read until the expected region answers it (breakers close after a probe)."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(url) as resp:
            if resp.status == 200 and resp.headers["X-Boxoffice-Served-By"] == region:
                return
        assert time.monotonic() < deadline, f"{url} never served by {region} again"
        await asyncio.sleep(0.05)  # poll interval


@pytest.mark.timeout(120)
async def test_a_booking_whose_first_attempt_reached_postgres_is_retried_and_books_once(
    cluster: Cluster,
) -> None:
    """A long transaction holds the tier's row lock on shard-a's primary (east). The
    first attempt reaches Postgres and waits on the lock until the deadline the gateway
    gave it runs out (the service cancels it); the gateway retries under the same
    internal idempotency key, and once the lock goes, exactly one booking exists: had
    the key changed between attempts, or the first attempt lived on, there would be two."""
    request_id = f"retry-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as s:
        event = await new_event(s, cluster, "shard-a", [10])
        tier = event["tiers"][0]["id"]
        locker = await asyncpg.connect(primary_dsn(cluster, "shard-a"))
        lock = locker.transaction()
        await lock.start()
        try:
            await locker.execute("SELECT 1 FROM ticket_tiers WHERE id = $1 FOR UPDATE", uuid.UUID(tier))
            post = asyncio.create_task(s.post(
                f"{gw(cluster, 'west')}/api/bookings", headers={"X-Request-Id": request_id},
                json={"eventId": event["id"], "items": [{"ticketTierId": tier, "quantity": 3}]}))
            # The first attempt reached Postgres and waits on our lock ...
            await wait_for_booking_lock_waiters(primary_dsn(cluster, "shard-a"), lambda n: n >= 1)
            # ... until its deadline stopped it, and the gateway tried again.
            await wait_for_log_line(
                cluster.state_dir / "gateway-west.log", "write attempt answered 503", request_id)
        finally:
            await lock.rollback()
            await locker.close()
        async with await post as resp:
            booking = await resp.json()
            assert resp.status == 201, booking
            assert booking["clientReference"].startswith("gw-")
            assert resp.headers["Idempotency-Key"] == booking["clientReference"]
    tiers = await check_invariants(primary_dsn(cluster, "shard-a"), event["id"])
    assert tiers[tier]["remaining"] == 7  # booked exactly once


@pytest.mark.timeout(120)
async def test_reads_fall_back_to_the_next_copy_while_a_regions_service_is_down(
    cluster: Cluster,
) -> None:
    """With east's (first zone's) booking service down, east's gateway serves shard-b from
    west's primary and shard-a from its copy in east's second zone (the zone standby,
    nearest after the stopped one); shard-a's writes get a clear 503 and write nothing."""
    assert cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        event_a = await new_event(s, cluster, "shard-a", [10])  # primary east, replica west
        event_b = await new_event(s, cluster, "shard-b", [10])  # primary west, replica east
        await wait_for_row(replica_dsn(cluster, "shard-a", "west"),
                           "SELECT 1 FROM events WHERE id = $1", uuid.UUID(event_a["id"]))
        east = gw(cluster, "east")
        await asyncio.to_thread(cluster.stop_service, "east")
        try:
            for event, served_by in ((event_a, "east/b"), (event_b, "west")):
                for path in (f"/api/events/{event['id']}", f"/api/events/{event['id']}/ticket-tiers"):
                    async with s.get(east + path) as resp:
                        assert resp.status == 200, await resp.text()
                        assert resp.headers["X-Boxoffice-Served-By"] == served_by
            # (a page size nothing else asked for, so the 1 s listing cache cannot answer)
            async with s.get(f"{east}/api/events", params={"limit": "199"}) as resp:
                assert resp.status == 200
                listed = {e["id"] for e in (await resp.json())["events"]}
                assert {event_a["id"], event_b["id"]} <= listed
            # shard-b's home (west) is up: booking through east still works.
            async with s.post(f"{east}/api/bookings", json={
                "eventId": event_b["id"],
                "items": [{"ticketTierId": event_b["tiers"][0]["id"], "quantity": 1}]}) as resp:
                assert resp.status == 201, await resp.text()
            # shard-a's home is down: after the gateway's retries, a retryable problem.
            async with s.post(f"{east}/api/bookings", json={
                "eventId": event_a["id"], "clientReference": f"down-{uuid.uuid4()}",
                "items": [{"ticketTierId": event_a["tiers"][0]["id"], "quantity": 1}]}) as resp:
                problem = await resp.json(content_type=None)
                assert resp.status == 503, problem
                assert resp.content_type == "application/problem+json"
                assert resp.headers["Retry-After"] == "1"
                assert "shard-a" in problem["detail"]
        finally:
            await asyncio.to_thread(cluster.start_service, "east")
        # East answers for its own copies again once its breaker's probe succeeds.
        await wait_served_by(s, f"{east}/api/events/{event_b['id']}/ticket-tiers", "east")
        await wait_served_by(s, f"{east}/api/events/{event_a['id']}", "east")
    tiers = await check_invariants(primary_dsn(cluster, "shard-a"), event_a["id"])
    assert tiers[event_a["tiers"][0]["id"]]["remaining"] == 10
    await check_invariants(primary_dsn(cluster, "shard-b"), event_b["id"])


def metrics_url(cluster: Cluster, process: str, region: str) -> str:
    """A process's /metrics, on its own listener (`gateway` or `shard_service`)."""
    assert cluster.plan is not None
    return cluster.plan.metrics_urls()[f"{process}-{region}"]


async def metric_total(session: aiohttp.ClientSession, url: str, sample: str,
                       **labels: str) -> float:
    """The sum of a process's Prometheus samples named `sample` with these label values."""
    async with session.get(url, headers=METRICS_AUTH) as resp:
        text = await resp.text()
    return sum(s.value
               for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


async def upstream_failures(session: aiohttp.ClientSession, gateway_metrics: str,
                            upstream: str) -> float:
    """A gateway's count of calls to `upstream` (a shard copy's URL) that got no answer."""
    return await metric_total(session, gateway_metrics, "boxoffice_upstream_failures_total",
                              upstream=upstream)


async def wait_failing(session: aiohttp.ClientSession, gateway: str, instance: str,
                       failing: bool, timeout: float = 15.0) -> None:
    """Poll a gateway's /api/ready until its health view lists `instance` as (not) failing."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(f"{gateway}/api/ready", headers=OPERATOR) as resp:
            if (instance in (await resp.json())["failingServices"]) is failing:
                return
        assert time.monotonic() < deadline, f"{instance} never {'failing' if failing else 'passing'}"
        await asyncio.sleep(0.1)  # poll interval


@pytest.mark.timeout(120)
async def test_reads_skip_a_copy_whose_health_checks_fail_without_trying_it(cluster: Cluster) -> None:
    """East's booking service hangs (SIGSTOP): it accepts connections and never answers,
    the failure that costs a full timeout per request. Once Consul's check marks it
    critical, east's gateway reads shard-b from west without sending east's service a
    single call (its failure counter stays put); when it answers again, reads come back."""
    assert cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        event = await new_event(s, cluster, "shard-b", [10])  # primary west, replica east
        await wait_for_row(replica_dsn(cluster, "shard-b", "east"),
                           "SELECT 1 FROM events WHERE id = $1", uuid.UUID(event["id"]))
        east = gw(cluster, "east")
        tiers_url = f"{east}/api/events/{event['id']}/ticket-tiers"
        await wait_served_by(s, tiers_url, "east")
        copy_url = f"{cluster.plan.service_url('east')}/shards/shard-b"
        east_metrics = metrics_url(cluster, "gateway", "east")
        await asyncio.to_thread(cluster.signal_service, "east", signal.SIGSTOP)
        try:
            await wait_failing(s, east, "booking-service-east-shard-b", True)
            before = await upstream_failures(s, east_metrics, copy_url)
            for _ in range(5):
                async with s.get(tiers_url) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["X-Boxoffice-Served-By"] == "west"
            assert await upstream_failures(s, east_metrics, copy_url) == before
        finally:
            await asyncio.to_thread(cluster.signal_service, "east", signal.SIGCONT)
        await wait_failing(s, east, "booking-service-east-shard-b", False)
        await wait_served_by(s, tiers_url, "east")


async def service_requests(session: aiohttp.ClientSession, service_metrics: str, route: str) -> float:
    """How many requests a booking service has answered on `route` (its own metrics)."""
    return await metric_total(session, service_metrics, "boxoffice_http_request_seconds_count",
                              route=route)


@pytest.mark.timeout(120)
async def test_reads_skip_a_copy_whose_database_is_down_without_asking_it(cluster: Cluster) -> None:
    """West's replica of shard-a stops (its Postgres), while west's booking service runs
    on. That copy's check (its /api/ready) fails, so west's gateway reads shard-a from
    east's primary without asking west's service for that copy at all, and still reads
    shard-b from west. Once the replica is back, reads come home."""
    assert cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        event_a = await new_event(s, cluster, "shard-a", [10])  # primary east, replica west
        event_b = await new_event(s, cluster, "shard-b", [10])  # primary west
        await wait_for_row(replica_dsn(cluster, "shard-a", "west"),
                           "SELECT 1 FROM events WHERE id = $1", uuid.UUID(event_a["id"]))
        west = gw(cluster, "west")
        tiers_a = f"{west}/api/events/{event_a['id']}/ticket-tiers"
        await wait_served_by(s, tiers_a, "west")
        route = "/shards/shard-a/api/events/{event_id}/ticket-tiers"
        await asyncio.to_thread(cluster.stop_copy, "shard-a", "west")
        try:
            await wait_failing(s, west, "booking-service-west-shard-a", True)
            west_metrics = metrics_url(cluster, "shard_service", "west")
            before = await service_requests(s, west_metrics, route)
            for _ in range(5):
                async with s.get(tiers_a) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["X-Boxoffice-Served-By"] == "east"
            assert await service_requests(s, west_metrics, route) == before
            async with s.get(f"{west}/api/events/{event_b['id']}/ticket-tiers") as resp:
                assert resp.status == 200 and resp.headers["X-Boxoffice-Served-By"] == "west"
        finally:
            await asyncio.to_thread(cluster.start_copy, "shard-a", "west")
        await wait_failing(s, west, "booking-service-west-shard-a", False)
        await wait_served_by(s, tiers_a, "west")
