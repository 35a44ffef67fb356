"""Bookings committed in batches (issue 9, shard_service/combiner.py), on real
Postgres, Consul and booking services.

The tests that need a batch of known members start a booking service of their
own with batching on and a metrics listener, on the shared shard's primary (the
map names its copy primary, so the service derives `primary` like the shared
one). A batch is made deterministic without timers: a "plug" booking holds the
combiner's one batch in flight (it waits for a tier row a test transaction has
locked, or for a stopped synchronous standby) while the requests under test
queue behind it, in an order the test watches through the queue gauge; then the
plug is released and the queued requests go as one batch (the batch-size
histogram says so).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import ManagedProcess, free_port
from deploy.services import ShardSpec, start_booking_service
from region_map import ConsulMapStore, Region, Shard, ShardMember
from shard_service import schema
from tests.conftest import ADMIN_TOKEN, METRICS_AUTH, RunningService, ShardMap, wait_for_role
from tests.support import FreshEvent, check_invariants, create_event, gateway_url

# Whether the session's `cluster` booking services batch (they inherit the environment;
# on unless BOXOFFICE_BATCHING says off).
CLUSTER_BATCHES = os.environ.get("BOXOFFICE_BATCHING", "on").lower() in ("on", "true", "1", "yes")


@dataclass
class BatchingService:
    url: str
    metrics: str
    process: ManagedProcess
    shard: str


def _start(region: str, specs: list[ShardSpec], consul: str, prefix: str,
           log: Path) -> BatchingService:
    port, metrics_port = free_port(), free_port()
    with pytest.MonkeyPatch.context() as env:  # the child inherits the environment
        env.setenv("BOXOFFICE_BATCHING", "on")
        env.setenv("BOXOFFICE_BATCH_MAX", "64")
        proc = start_booking_service(region, port, specs, log, admin_token=ADMIN_TOKEN,
                                     consul=consul, map_prefix=prefix, metrics_port=metrics_port)
    return BatchingService(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                           proc, specs[0].name)


@pytest.fixture(scope="module")
def batching_service(booking_service: RunningService, shard_map: ShardMap,
                     workdir: Path) -> Iterator[BatchingService]:
    """A second booking service of the shared shard's primary copy, batching on."""
    svc = _start("test-region", [ShardSpec(ShardMap.SHARD, booking_service.database.dsn,
                                           ShardMap.PRIMARY)],
                 shard_map.consul, shard_map.prefix, workdir / "svc-batching.log")
    try:
        wait_for_role(svc.url, "primary")
        yield svc
    finally:
        svc.process.stop()


# --- helpers ---------------------------------------------------------------------


async def _metric(s: aiohttp.ClientSession, svc: BatchingService, name: str) -> float:
    async with s.get(svc.metrics, headers=METRICS_AUTH) as resp:
        text = await resp.text()
    m = re.search(rf'^{name}{{shard="{re.escape(svc.shard)}"}} ([0-9.e+-]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def _batches(s: aiohttp.ClientSession, svc: BatchingService) -> tuple[int, int]:
    """(batches sent, requests in them) so far."""
    return (int(await _metric(s, svc, "boxoffice_booking_batch_size_count")),
            int(await _metric(s, svc, "boxoffice_booking_batch_size_sum")))


async def _poll(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # poll interval


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{url}/api/bookings", json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def _queue_in_order(s: aiohttp.ClientSession, svc: BatchingService,
                          bodies: list[dict[str, Any]]) -> list[asyncio.Task[tuple[int, dict[str, Any]]]]:
    """Send `bodies` one after another, each once the one before is queued in the
    combiner (behind a batch in flight), so they queue in this order."""
    tasks = []
    for n, body in enumerate(bodies, start=1):
        tasks.append(asyncio.create_task(_post(s, svc.url, body)))

        async def queued(n: int = n) -> bool:
            return await _metric(s, svc, "boxoffice_booking_batch_queued") >= n

        await _poll(f"request {n} to queue", queued)
    return tasks


async def _lock_waiters(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%boxoffice_book_committed_batch%'"))
    finally:
        await conn.close()


@dataclass
class Plug:
    """A booking that keeps the combiner's batch in flight until `release()`."""

    task: asyncio.Task[tuple[int, dict[str, Any]]]
    release: Callable[[], Awaitable[None]]


@pytest.fixture
async def plug(batching_service: BatchingService, booking_service: RunningService
               ) -> AsyncIterator[Callable[[], Awaitable[Plug]]]:
    """Make a plug: a booking on a tier of its own event that a test transaction
    holds locked, so its batch (of one) waits in the database."""
    dsn = booking_service.database.dsn
    holders: list[asyncpg.Connection] = []
    async with aiohttp.ClientSession() as session:

        async def make() -> Plug:
            ev = await create_event(session, batching_service.url, [5])
            holder = await asyncpg.connect(dsn)
            holders.append(holder)
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM ticket_tiers WHERE id = $1::uuid FOR UPDATE",
                                 ev.tier_ids[0])
            task = asyncio.create_task(_post(session, batching_service.url, {
                "eventId": ev.id, "items": [{"ticketTierId": ev.tier_ids[0], "quantity": 1}]}))

            async def waiting() -> bool:
                return await _lock_waiters(dsn) >= 1

            await _poll("the plug to wait for its tier", waiting)
            return Plug(task, tx.rollback)

        try:
            yield make
        finally:
            for holder in holders:
                await holder.close()


# --- one batch, every kind of answer --------------------------------------------------


async def test_a_mixed_batch_gives_each_request_its_own_answer(
        batching_service: BatchingService, booking_service: RunningService,
        plug: Callable[[], Awaitable[Plug]]) -> None:
    dsn = booking_service.database.dsn
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        ev = await create_event(s, batching_service.url, [5, 1], price_cents=2500)
        other = await create_event(s, batching_service.url, [5])
        a, b = ev.tier_ids
        ref = f"mixed-{uuid.uuid4()}"

        def body(items: list[tuple[str, int]], reference: str | None = None,
                 event: FreshEvent = ev) -> dict[str, Any]:
            doc: dict[str, Any] = {"eventId": event.id, "items": [
                {"ticketTierId": t, "quantity": q} for t, q in items]}
            if reference is not None:
                doc["clientReference"] = reference
            return doc

        requests = [
            body([(a, 2)], ref),                          # 0 valid: 201
            body([(b, 2)]),                               # 1 sold out (b holds 1): 409 naming b
            body([(a, 1), (other.tier_ids[0], 1)]),       # 2 a tier of another event: 422
            body([(a, 2)], ref),                          # 3 duplicate of 0: 200, the same booking
            body([(a, 1)], ref),                          # 4 the reference reused otherwise: 422
            body([(b, 1)]),                               # 5 smaller, after 1 was refused: 201
            body([(a, 4)]),                               # 6 a has 3 left: 409 naming a
            body([(a, 1), (b, 1)]),                       # 7 b is gone now: 409, a untouched
            {**body([(a, 1)]), "eventId": str(uuid.uuid4())},  # 8 unknown event: 404
            body([(a, 3)], f"mixed-last-{uuid.uuid4()}"),  # 9 exactly what is left: 201
        ]
        before = await _batches(s, batching_service)
        first = await plug()
        tasks = await _queue_in_order(s, batching_service, requests)
        await first.release()
        assert (await first.task)[0] == 201
        answers = await asyncio.gather(*tasks)
        after = await _batches(s, batching_service)
    # The plug's batch of one, then the ten requests as one batch.
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1 + len(requests)), (before, after)

    statuses = [status for status, _ in answers]
    assert statuses == [201, 409, 422, 200, 422, 201, 409, 409, 404, 201], answers
    docs = [doc for _, doc in answers]
    assert docs[0]["items"] == [{"ticketTierId": a, "quantity": 2, "unitPriceCents": 2500}]
    assert docs[1]["ticketTierId"] == b and docs[1]["type"].endswith("/insufficient-inventory")
    assert docs[2]["ticketTierId"] == other.tier_ids[0] and docs[2]["type"].endswith("/tier-not-in-event")
    assert docs[3] == docs[0]
    assert docs[4]["type"].endswith("/client-reference-reused")
    assert "bookingId" not in docs[4] and docs[0]["id"] not in str(docs[4])
    assert docs[5]["items"][0]["ticketTierId"] == b
    assert docs[6]["ticketTierId"] == a and docs[6]["remaining"] == 3
    assert docs[7]["ticketTierId"] == b and docs[7]["remaining"] == 0
    assert docs[8]["type"].endswith("/event-not-found")
    assert docs[9]["totalCents"] == 3 * 2500

    tiers = await check_invariants(dsn, ev.id)
    assert (tiers[a]["sold"], tiers[b]["sold"]) == (5, 1)
    await check_invariants(dsn, other.id)
    assert tiers[a]["remaining"] == 0 and tiers[b]["remaining"] == 0
    conn = await asyncpg.connect(dsn)
    try:
        stored = {r["id"] for r in await conn.fetch(
            "SELECT id::text FROM bookings WHERE event_id = $1::uuid", ev.id)}
    finally:
        await conn.close()
    assert stored == {docs[0]["id"], docs[5]["id"], docs[9]["id"]}


async def test_within_a_tier_earlier_arrivals_are_served_first_and_a_smaller_one_still_fits(
        batching_service: BatchingService, booking_service: RunningService,
        plug: Callable[[], Awaitable[Plug]]) -> None:
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, batching_service.url, [5])
        tier = ev.tier_ids[0]
        quantities = [3, 3, 1, 2, 1]  # 3 fits; 3 does not (2 left); 1 fits; 2 does not; 1 fits
        before = await _batches(s, batching_service)
        first = await plug()
        tasks = await _queue_in_order(s, batching_service, [
            {"eventId": ev.id, "items": [{"ticketTierId": tier, "quantity": q}]} for q in quantities])
        await first.release()
        await first.task
        answers = await asyncio.gather(*tasks)
        after = await _batches(s, batching_service)
    assert after[1] - before[1] == 1 + len(quantities) and after[0] - before[0] == 2
    assert [status for status, _ in answers] == [201, 409, 201, 409, 201], answers
    assert answers[1][1]["remaining"] == 2 and answers[3][1]["remaining"] == 1
    tiers = await check_invariants(booking_service.database.dsn, ev.id)
    assert tiers[tier]["sold"] == 5 and tiers[tier]["remaining"] == 0


async def test_a_request_whose_caller_gave_up_before_its_batch_is_dropped(
        batching_service: BatchingService, booking_service: RunningService,
        plug: Callable[[], Awaitable[Plug]]) -> None:
    """A queued request whose caller hangs up is not sent: no booking is made for it."""
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, batching_service.url, [5])
        tier = ev.tier_ids[0]
        gone_ref, kept_ref = f"gone-{uuid.uuid4()}", f"kept-{uuid.uuid4()}"
        before = await _batches(s, batching_service)
        first = await plug()
        gone, kept = await _queue_in_order(s, batching_service, [
            {"eventId": ev.id, "clientReference": ref, "items": [{"ticketTierId": tier, "quantity": 1}]}
            for ref in (gone_ref, kept_ref)])
        gone.cancel()  # the client hangs up; the service cancels its handler

        async def one_left() -> bool:  # the gauge counts queued requests whose caller waits
            return await _metric(s, batching_service, "boxoffice_booking_batch_queued") == 1

        await _poll("the hung-up request to leave its handler", one_left)
        await first.release()
        await first.task
        status, doc = await kept
        after = await _batches(s, batching_service)
    assert status == 201 and doc["clientReference"] == kept_ref
    assert after[1] - before[1] == 2  # the plug and the one request still wanted
    tiers = await check_invariants(booking_service.database.dsn, ev.id)
    assert tiers[tier]["sold"] == 1
    conn = await asyncpg.connect(booking_service.database.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM bookings WHERE client_reference = $1",
                                   gone_ref) == 0
    finally:
        await conn.close()


# --- a batch whose commit is not confirmed ------------------------------------------------


async def _put_map(consul: ConsulAgent, prefix: str, shard: Shard) -> None:
    store = ConsulMapStore(port=consul.http_port, prefix=prefix)
    try:
        await store.put_region(Region("test-region", "http://127.0.0.1:9", "Test"), 0)
        await store.put_shard(shard, 0)
    finally:
        await store.close()


async def _sync_rep_waiter(dsn: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
            "AND query LIKE '%boxoffice_book_committed_batch%'")
    finally:
        await conn.close()


async def _cancel_sync_wait(dsn: str) -> None:
    pid: int | None = None

    async def waiting() -> bool:
        nonlocal pid
        pid = await _sync_rep_waiter(dsn)
        return pid is not None

    await _poll("a batch to wait for the synchronous standby", waiting)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT pg_cancel_backend($1)", pid)
    finally:
        await conn.close()


async def test_no_booking_of_a_batch_is_confirmed_unless_its_commit_is_durable(
        workdir: Path, consul_agent: ConsulAgent) -> None:
    """Issue 9 acceptance 3. A primary with a synchronous standby (`FIRST 1`); the
    standby is stopped, so a batch's commit waits for it. The plug's batch waits there
    while eight bookings queue; its wait is cancelled (as a failover would leave it:
    committed here, confirmed by no standby), then the eight go as one batch, which
    waits too and is cancelled too: every one of them is 503 `not-confirmed`, none 201.
    With the standby back, each request replays its booking (200, the same id)."""
    base = workdir / f"batch-sync-{uuid.uuid4().hex[:6]}"
    primary = PostgresServer("bsync-primary", base / "primary", free_port(), durable=False)
    standby = PostgresServer("bsync-standby", base / "standby", free_port(), durable=False)
    svc: BatchingService | None = None
    try:
        primary.init_primary()
        await schema.install(primary.dsn, with_sample_data=False)
        standby.init_replica(primary)
        await primary.set_sync_standbys([standby.name], "zone")
        prefix = f"test-batch-sync-{uuid.uuid4().hex[:8]}/"
        await _put_map(consul_agent, prefix, Shard("shard-bs", 1, "test-region", {
            "test-region": ShardMember("test-region", "http://127.0.0.1:9/s", primary.address),
            "test-region/b": ShardMember("test-region", "http://127.0.0.1:9/s", standby.address,
                                         zone="b"),
        }, sync_standbys=("test-region/b",)))
        svc = _start("test-region", [ShardSpec("shard-bs", primary.dsn, "test-region")],
                     consul_agent.address, prefix, base / "svc.log")
        await asyncio.to_thread(wait_for_role, svc.url, "primary")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            ev = await create_event(s, svc.url, [20])  # confirmed: the standby is up
            tier = ev.tier_ids[0]
            standby.stop()
            plug_body = {"eventId": ev.id, "clientReference": f"plug-{uuid.uuid4()}",
                         "items": [{"ticketTierId": tier, "quantity": 1}]}
            plug_task = asyncio.create_task(_post(s, svc.url, plug_body))
            await _poll("the plug to wait for the standby",
                        lambda: _has_waiter(primary.dsn))
            before = await _batches(s, svc)
            bodies = [{"eventId": ev.id, "clientReference": f"unconfirmed-{n}-{uuid.uuid4()}",
                       "items": [{"ticketTierId": tier, "quantity": 1 + n % 2}]} for n in range(8)]
            tasks = await _queue_in_order(s, svc, bodies)
            await _cancel_sync_wait(primary.dsn)  # the plug's batch
            status, doc = await plug_task
            assert status == 503 and doc["type"].endswith("/not-confirmed"), doc
            await _cancel_sync_wait(primary.dsn)  # the batch of eight
            answers = await asyncio.gather(*tasks)
            after = await _batches(s, svc)
            assert (after[0] - before[0], after[1] - before[1]) == (1, 8), (before, after)
            for status, doc in answers:
                assert status == 503 and doc["type"].endswith("/not-confirmed"), answers
            # Committed locally all the same, every one: what the retries will replay.
            conn = await asyncpg.connect(primary.dsn)
            try:
                local = {r["client_reference"]: r["id"] for r in await conn.fetch(
                    "SELECT id::text, client_reference FROM bookings WHERE event_id = $1::uuid",
                    ev.id)}
            finally:
                await conn.close()
            assert set(local) == {b["clientReference"] for b in [plug_body, *bodies]}

            standby.start()
            replays = await asyncio.gather(*(_post(s, svc.url, b) for b in bodies))
            for body, (status, doc) in zip(bodies, replays, strict=True):
                assert status == 200 and doc["id"] == local[body["clientReference"]], doc
        tiers = await check_invariants(primary.dsn, ev.id)
        assert tiers[tier]["sold"] == 1 + sum(1 + n % 2 for n in range(8))
    finally:
        if svc is not None:
            svc.process.stop()
        standby.remove()
        primary.remove()


async def _has_waiter(dsn: str) -> bool:
    return await _sync_rep_waiter(dsn) is not None


# --- a flash sale through the gateways ------------------------------------------------------


@pytest.mark.timeout(300)
async def test_flash_sale_2000_clients_on_1500_tickets_through_the_gateways(cluster: Any) -> None:
    """Issue 9 acceptance 2: 2,000 clients at once, through both regions' gateways, on
    one tier of 1,500 (shard-a, home east). A client whose answer is a 503 (the gateway
    gave up after its own retries) sends the same request again with the key the
    gateway handed back, as a real client would, until it has a final answer. Exactly
    1,500 tickets are sold, sold + remaining = capacity, no reference names two
    bookings, and every booking answered is stored (and nothing else is). Unless
    BOXOFFICE_BATCHING=off is in the environment the cluster's services commit in
    batches (the default), and the test checks that they did."""
    clients, capacity = 2000, 1500
    regions = ("east", "west")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 100)) as s:
        doc = await _create_on(s, gateway_url(cluster, "east"), capacity)
        event_id, tier = doc["id"], doc["tiers"][0]["id"]
        batches_before = await _cluster_batches(s, cluster)

        async def client(n: int) -> tuple[int, dict[str, Any]]:
            url = gateway_url(cluster, regions[n % 2])
            body = {"eventId": event_id, "clientReference": f"flash-{n}-{uuid.uuid4()}",
                    "items": [{"ticketTierId": tier, "quantity": 1}]}
            deadline = time.monotonic() + 240
            while True:
                async with s.post(f"{url}/api/bookings", json=body) as resp:
                    status, answer = resp.status, await resp.json(content_type=None)
                    retry_after = resp.headers.get("Retry-After", "")
                if status not in (429, 503) or time.monotonic() > deadline:
                    return status, answer
                # A careful client's back-off before it sends the same again: what the answer
                # asked for (shed load or a rate limit say Retry-After), jittered, at most 1 s.
                wait = min(float(retry_after), 1.0) if retry_after.isdigit() else 0.05
                await asyncio.sleep(wait * random.uniform(0.5, 1.5))

        started = time.monotonic()
        answers = await asyncio.gather(*(client(n) for n in range(clients)))
        took = time.monotonic() - started
        batches_after = await _cluster_batches(s, cluster)
    statuses = [status for status, _ in answers]
    booked = [doc for status, doc in answers if status in (200, 201)]
    assert set(statuses) <= {200, 201, 409}, {st for st in statuses if st not in (200, 201, 409)}
    assert len(booked) == capacity and statuses.count(409) == clients - capacity
    assert len({doc["id"] for doc in booked}) == capacity
    dsn = cluster.databases[("shard-a", "east")].dsn
    tiers = await check_invariants(dsn, event_id)
    assert tiers[tier]["sold"] == capacity and tiers[tier]["remaining"] == 0
    conn = await asyncpg.connect(dsn)
    try:
        stored = {r["id"] for r in await conn.fetch(
            "SELECT id::text FROM bookings WHERE event_id = $1::uuid", event_id)}
    finally:
        await conn.close()
    assert stored == {doc["id"] for doc in booked}
    sent = (batches_after[0] - batches_before[0], batches_after[1] - batches_before[1])
    print(f"\nflash sale: {clients} clients, {capacity} tickets sold out in {took:.1f} s; "
          f"batches {sent[0]} holding {sent[1]} requests"
          f" (mean {sent[1] / sent[0] if sent[0] else 0:.1f})")
    if CLUSTER_BATCHES:
        assert sent[0] > 0 and sent[1] > sent[0], sent  # batches of more than one were sent


async def _create_on(s: aiohttp.ClientSession, gateway: str, capacity: int) -> dict[str, Any]:
    async with s.post(f"{gateway}/admin/events", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      json={"name": f"Flash {uuid.uuid4().hex[:8]}", "venue": "Arena",
                            "startsAt": "2027-10-01T20:00:00Z", "currency": "USD", "shard": "shard-a",
                            "tiers": [{"name": "GA", "priceCents": 5000, "capacity": capacity}]}) as resp:
        doc = await resp.json()
        assert resp.status == 201, doc
    return dict(doc)


async def _cluster_batches(s: aiohttp.ClientSession, cluster: Any) -> tuple[int, int]:
    """Batches sent and requests in them, by shard-a's primary booking service (east)."""
    port = cluster.plan.service_metrics_ports["east"]
    svc = BatchingService("", f"http://127.0.0.1:{port}/metrics", None, "shard-a")  # type: ignore[arg-type]
    return await _batches(s, svc)
