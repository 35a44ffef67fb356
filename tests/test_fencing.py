"""Fencing layers 2 and 3, roles derived at run time, and the synchronous-wait rule
(issue 7, MISSION.md §5), on real Postgres, Consul and booking services.

Tests that move the shared fixtures' epoch row put it back (and wait for the
service to derive `primary` again); tests that need another map or another
server start their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import asyncpg
import pytest

from common.fencing import EPOCH_HEADER, parse_epoch
from common.lsn import lsn_to_int
from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import ManagedProcess, free_port
from deploy.services import ShardSpec, start_booking_service
from region_map import ConsulMapStore, Region, Shard, ShardMember
from shard_service import queries, schema
from shard_service.roles import DatabaseState, Role, derive_role
from shard_service.sync_wait import is_cancelled_sync_wait, watch_sync_wait
from tests.conftest import ADMIN_TOKEN, RunningService, ShardMap, wait_for_role
from tests.support import (
    RequestsInFlight,
    check_invariants,
    create_event,
    wait_for_booking_lock_waiters,
)

# --- pure rules ------------------------------------------------------------------


def _shard(primary: str = "r", epoch: int = 3) -> Shard:
    return Shard("s", epoch, primary, {"r": ShardMember("r", "http://a", "h:1"),
                                       "r/b": ShardMember("r", "http://b", "h:2", zone="b")})


@pytest.mark.parametrize(("shard", "member", "database", "role"), [
    (None, "r", DatabaseState(False, 3), Role.UNKNOWN),                 # no map yet
    (_shard(), "elsewhere", DatabaseState(False, 3), Role.UNKNOWN),     # map does not name it
    (_shard(), "r", None, Role.UNKNOWN),                                # database unreachable
    (_shard(), "r", DatabaseState(False, 3), Role.PRIMARY),
    (_shard(), "r", DatabaseState(True, 3), Role.FENCED),               # promotion under way
    (_shard(), "r", DatabaseState(False, 2), Role.FENCED),              # epoch row not written
    (_shard(), "r", DatabaseState(False, None), Role.FENCED),           # no epoch row
    (_shard(), "r/b", DatabaseState(True, 3), Role.REPLICA),
    # Issue 16 class 5: in recovery but not on the epoch-3 primary's history (an old
    # primary restarted unrewound, a standby of one, or the promotion not yet replayed).
    (_shard(), "r/b", DatabaseState(True, 2), Role.FENCED),
    (_shard(), "r/b", DatabaseState(True, None), Role.FENCED),
    (_shard(), "r/b", DatabaseState(True, 4), Role.UNKNOWN),            # the map is behind
    (_shard(), "r/b", DatabaseState(False, 2), Role.FENCED),            # a stale primary
    (_shard(), "r/b", DatabaseState(False, 3), Role.FENCED),
])
def test_derive_role(shard: Shard | None, member: str, database: DatabaseState | None,
                     role: Role) -> None:
    view = derive_role(shard, member, database)
    assert view.role is role, view.reason
    assert view.consistent == (role in (Role.PRIMARY, Role.REPLICA))


def test_cancelled_sync_wait_warning_is_recognised() -> None:
    detail = ("The transaction has already committed locally, but might not have been "
              "replicated to the standby.")
    cancel = SimpleNamespace(severity="WARNING", severity_en="WARNING", detail=detail,
                             message="canceling wait for synchronous replication due to user request")
    terminate = SimpleNamespace(severity="WARNING", detail=detail, message=(
        "canceling the wait for synchronous replication and terminating connection due to "
        "administrator command"))
    assert is_cancelled_sync_wait(cancel) and is_cancelled_sync_wait(terminate)
    assert not is_cancelled_sync_wait(SimpleNamespace(severity="NOTICE", detail=detail,
                                                      message=cancel.message))
    assert not is_cancelled_sync_wait(SimpleNamespace(severity="WARNING", detail=None,
                                                      message="there is no transaction in progress"))


def test_a_lost_connection_is_what_the_sync_wait_watch_lets_through() -> None:
    """A connection lost mid-call is detached from its pool proxy, which then refuses
    every call (asyncpg's InterfaceError): the watch's cleanup must let the caller's
    own exception (the lost connection) through, not replace it with that refusal."""
    class DetachedProxy:
        def add_log_listener(self, _: object) -> None:
            pass

        def remove_log_listener(self, _: object) -> None:
            raise asyncpg.InterfaceError("connection has been released back to the pool")

    with pytest.raises(asyncpg.ConnectionDoesNotExistError), \
            watch_sync_wait(cast(Any, DetachedProxy())):
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")


@pytest.mark.parametrize(("raw", "epoch"), [(None, None), ("0", 0), ("7", 7),
                                            ("9223372036854775807", 2**63 - 1)])
def test_parse_epoch(raw: str | None, epoch: int | None) -> None:
    assert parse_epoch(raw) == epoch


@pytest.mark.parametrize("raw", ["", "-1", "1.0", "x", " 1", "9223372036854775808", "1" * 20])
def test_parse_epoch_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_epoch(raw)


# --- helpers ---------------------------------------------------------------------


async def _db(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def _stored_epoch(dsn: str) -> int | None:
    conn = await _db(dsn)
    try:
        return await conn.fetchval("SELECT epoch FROM boxoffice_epoch")
    finally:
        await conn.close()


async def _set_epoch(dsn: str, epoch: int) -> None:
    """Set the epoch row directly (a test's privilege: the node agent never lowers it)."""
    conn = await _db(dsn)
    try:
        await conn.execute("UPDATE boxoffice_epoch SET epoch = $1", epoch)
    finally:
        await conn.close()


async def _bookings_of(dsn: str, event_id: str) -> dict[str, str]:
    conn = await _db(dsn)
    try:
        rows = await conn.fetch("SELECT id::text, status FROM bookings WHERE event_id = $1::uuid",
                                event_id)
    finally:
        await conn.close()
    return {r["id"]: r["status"] for r in rows}


async def _wait_role(url: str, role: str, timeout: float = 10.0) -> None:
    await asyncio.to_thread(wait_for_role, url, role, timeout)


@pytest.fixture
async def epoch_restored(booking_service: RunningService) -> AsyncIterator[None]:
    """Put the shared primary's epoch row back to 1 after the test, and wait until its
    service is the primary again."""
    yield
    await _set_epoch(booking_service.database.dsn, 1)
    await _wait_role(booking_service.url, "primary")


def _booking(event_id: str, tier_id: str, quantity: int = 1, reference: str | None = None
             ) -> dict[str, Any]:
    return {"eventId": event_id, "clientReference": reference or f"fence-{uuid.uuid4()}",
            "items": [{"ticketTierId": tier_id, "quantity": quantity}]}


async def _post(s: aiohttp.ClientSession, url: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with s.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


# --- (a) the database refuses a wrong epoch ------------------------------------------


async def test_procedures_refuse_a_wrong_or_missing_epoch_and_write_nothing(
        booking_service: RunningService) -> None:
    dsn = booking_service.database.dsn
    assert await _stored_epoch(dsn) == 1
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [5])
        status, booked = await _post(s, f"{booking_service.url}/api/bookings",
                                     _booking(ev.id, ev.tier_ids[0]))
        assert status == 201, booked
    conn = await _db(dsn)
    try:
        for epoch in (0, 2, None):
            row = await conn.fetchrow(queries.BOOK, uuid.uuid4(), uuid.UUID(ev.id), f"direct-{uuid.uuid4()}",
                                      [uuid.UUID(ev.tier_ids[0])], [1], None, epoch)
            assert row["outcome"] == "fenced" and row["commit_lsn"] is None, dict(row)
            row = await conn.fetchrow(queries.CANCEL, uuid.UUID(booked["id"]), None, epoch)
            assert row["outcome"] == "fenced", dict(row)
        # The same calls with the stored epoch go through: the refusals were the epoch's.
        row = await conn.fetchrow(queries.BOOK, uuid.uuid4(), uuid.UUID(ev.id), f"direct-{uuid.uuid4()}",
                                  [uuid.UUID(ev.tier_ids[0])], [1], None, 1)
        assert row["outcome"] == "created"
        # No epoch row at all is a mismatch too (deleted in a transaction rolled back
        # after: the refusal returns before the procedure's COMMIT, which a transaction
        # block would not allow).
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("DELETE FROM boxoffice_epoch")
            row = await conn.fetchrow(queries.BOOK, uuid.uuid4(), uuid.UUID(ev.id),
                                      f"direct-{uuid.uuid4()}", [uuid.UUID(ev.tier_ids[0])], [1], None, 1)
            assert row["outcome"] == "fenced", dict(row)
        finally:
            await tx.rollback()
    finally:
        await conn.close()
    assert await _stored_epoch(dsn) == 1
    bookings = await _bookings_of(dsn, ev.id)
    assert bookings[booked["id"]] == "confirmed" and len(bookings) == 2
    tiers = await check_invariants(dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["sold"] == 2


async def test_an_epoch_written_while_a_booking_waits_fences_it(
        booking_service: RunningService, epoch_restored: None) -> None:
    """The service still derives `primary` (the epoch write is not committed yet, its
    check reads epoch 1), so the booking reaches the procedure; there it queues behind
    the epoch write's lock and, once that commits, reads the new epoch: 503 `fenced`,
    nothing written. The database has the last word."""
    dsn = booking_service.database.dsn
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [5])
        writer = await _db(dsn)
        try:
            tx = writer.transaction()
            await tx.start()
            await writer.execute("UPDATE boxoffice_epoch SET epoch = 2")  # not committed yet
            booking = asyncio.create_task(_post(s, f"{booking_service.url}/api/bookings",
                                                _booking(ev.id, ev.tier_ids[0])))
            await wait_for_booking_lock_waiters(dsn, lambda n: n >= 1)
            await tx.commit()
        finally:
            await writer.close()
        status, doc = await booking
        assert status == 503 and doc["type"].endswith("/fenced"), doc
        # From now on the service derives `fenced` and refuses before the database.
        await _wait_role(booking_service.url, "fenced")
        status, doc = await _post(s, f"{booking_service.url}/api/bookings",
                                  _booking(ev.id, ev.tier_ids[0]))
        assert status == 503 and doc["type"].endswith("/not-primary"), doc
        async with s.get(f"{booking_service.url}/api/ready") as resp:
            assert resp.status == 503
    assert await _bookings_of(dsn, ev.id) == {}
    tiers = await check_invariants(dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["remaining"] == 5


# --- (b) a gateway epoch below the service's map ----------------------------------------


async def test_gateway_epoch_below_the_map_is_stale_and_above_it_is_fenced(
        booking_service: RunningService) -> None:
    dsn = booking_service.database.dsn
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [5])
        url = f"{booking_service.url}/api/bookings"
        status, doc = await _post(s, url, _booking(ev.id, ev.tier_ids[0]), {EPOCH_HEADER: "0"})
        assert status == 503 and doc["type"].endswith("/stale-epoch") and doc["epoch"] == 1, doc
        # A gateway ahead of this service's map: its epoch goes to the database, which
        # is still at 1 and refuses it.
        status, doc = await _post(s, url, _booking(ev.id, ev.tier_ids[0]), {EPOCH_HEADER: "2"})
        assert status == 503 and doc["type"].endswith("/fenced"), doc
        status, doc = await _post(s, url, _booking(ev.id, ev.tier_ids[0]), {EPOCH_HEADER: "one"})
        assert status == 400 and doc["type"].endswith("/invalid-epoch"), doc
        assert await _bookings_of(dsn, ev.id) == {}
        # The map's own epoch is taken.
        status, booked = await _post(s, url, _booking(ev.id, ev.tier_ids[0]), {EPOCH_HEADER: "1"})
        assert status == 201, booked
        status, doc = await _post(s, f"{url}/{booked['id']}/cancel", None, {EPOCH_HEADER: "0"})
        assert status == 503 and doc["type"].endswith("/stale-epoch"), doc
        status, doc = await _post(s, f"{url}/{booked['id']}/cancel", None, {EPOCH_HEADER: "1"})
        assert status == 200 and doc["status"] == "cancelled", doc
        # Operator event creation is fenced the same way.
        status, doc = await _post(
            s, f"{booking_service.url}/admin/events",
            {"name": "Fenced", "venue": "Hall", "startsAt": "2027-09-01T20:00:00Z",
             "currency": "USD", "tiers": [{"name": "GA", "priceCents": 100, "capacity": 1}]},
            {EPOCH_HEADER: "2", "Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 503 and doc["type"].endswith("/fenced"), doc
    await check_invariants(dsn, ev.id)


# --- (c) roles come from the map and the database ---------------------------------------


async def _put_map(consul: ConsulAgent, prefix: str, shards: list[Shard]) -> None:
    store = ConsulMapStore(port=consul.http_port, prefix=prefix)
    try:
        await store.put_region(Region("test-region", "http://127.0.0.1:9", "Test"), 0)
        for shard in shards:
            await store.put_shard(shard, 0)
    finally:
        await store.close()


@dataclass
class OwnService:
    url: str
    process: ManagedProcess


@pytest.fixture
def own_services(workdir: Path) -> Iterator[Callable[..., OwnService]]:
    """Start booking services of a test's own (stopped after it)."""
    started: list[ManagedProcess] = []

    def start(specs: list[ShardSpec], consul: str, prefix: str) -> OwnService:
        port = free_port()
        proc = start_booking_service("test-region", port, specs,
                                     workdir / f"svc-own-{port}.log", admin_token=ADMIN_TOKEN,
                                     consul=consul, map_prefix=prefix)
        started.append(proc)
        return OwnService(f"http://127.0.0.1:{port}", proc)

    yield start
    for proc in started:
        proc.stop()


async def _health(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(f"{url}/api/health") as resp:
        return dict(await resp.json())


async def _poll(what: str, check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll interval


async def test_a_copy_the_map_does_not_name_primary_is_fenced_whatever_its_database_says(
        booking_service: RunningService, replica_booking_service: RunningService,
        consul_agent: ConsulAgent, shard_map: ShardMap,
        own_services: Callable[..., OwnService]) -> None:
    """A second service on the same two databases, following its own map in which the
    zone-b copy (the streaming replica) is the primary at epoch 2, as after a promotion
    the old primary never heard of: the old primary is a stale primary (fenced), the
    replica is named primary but in recovery (fenced). Neither takes a write, passes
    /api/ready, or serves any read (a fenced copy may hold commits no primary confirmed:
    docs/failover.md, "Roles"). The shared map and services are not touched."""
    primary_db, replica_db = booking_service.database, replica_booking_service.database
    members = {
        "test-region": ShardMember("test-region", "http://127.0.0.1:9/shards/old", primary_db.address),
        "test-region/b": ShardMember("test-region", "http://127.0.0.1:9/shards/new",
                                     replica_db.address, zone="b"),
    }
    moved = [Shard("old", 2, "test-region/b", members), Shard("new", 2, "test-region/b", members)]
    prefix = f"test-moved-{uuid.uuid4().hex[:8]}/"
    await _put_map(consul_agent, prefix, moved)
    svc = own_services([ShardSpec("old", primary_db.dsn, "test-region"),
                        ShardSpec("new", replica_db.dsn, "test-region/b")],
                       consul_agent.address, prefix)
    async with aiohttp.ClientSession() as s:
        ev = await create_event(s, booking_service.url, [5])
        async with s.post(f"{booking_service.url}/api/bookings",
                          json=_booking(ev.id, ev.tier_ids[0])) as resp:
            assert resp.status == 201
            lsn = resp.headers["X-Boxoffice-Lsn"]

        async def both_fenced() -> bool:
            return (await _health(s, svc.url))["shards"] == {"old": "fenced", "new": "fenced"}

        await _poll("both copies fenced", both_fenced)
        for shard in ("old", "new"):
            base = f"{svc.url}/shards/{shard}"
            async with s.get(f"{base}/api/ready") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "fenced"
            async with s.get(f"{base}/api/ready",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                ready = await resp.json()
                assert ready["role"] == "fenced" and ready["mapEpoch"] == 2, ready
                assert ready["mapPrimary"] == "test-region/b"
            status, doc = await _post(s, f"{base}/api/bookings", _booking(ev.id, ev.tier_ids[0]),
                                      {EPOCH_HEADER: "2"})
            assert status == 503 and doc["type"].endswith("/not-primary"), doc
            async with s.get(f"{base}/api/events/{ev.id}/ticket-tiers",
                             headers={"X-Boxoffice-Min-Lsn": lsn}) as resp:
                doc = await resp.json(content_type=None)
                assert resp.status == 503 and doc["type"].endswith("/fenced"), doc
            async with s.get(f"{base}/api/events/{ev.id}") as resp:  # a plain read: none either
                doc = await resp.json(content_type=None)
                assert resp.status == 503 and doc["type"].endswith("/fenced"), doc
        # The shared services, on the shared map, are untouched.
        assert (await _health(s, booking_service.url))["role"] == "primary"
        assert (await _health(s, replica_booking_service.url))["role"] == "replica"
    tiers = await check_invariants(primary_db.dsn, ev.id)
    assert tiers[ev.tier_ids[0]]["sold"] == 1


async def test_no_map_means_unknown_and_no_writes(
        booking_service: RunningService, consul_agent: ConsulAgent,
        own_services: Callable[..., OwnService]) -> None:
    svc = own_services([ShardSpec("shard-t", booking_service.database.dsn, "test-region")],
                       consul_agent.address, f"test-empty-{uuid.uuid4().hex[:8]}/")
    async with aiohttp.ClientSession() as s:
        assert (await _health(s, svc.url))["role"] == "unknown"
        async with s.get(f"{svc.url}/api/ready") as resp:
            assert resp.status == 503
        status, doc = await _post(s, f"{svc.url}/api/bookings", _booking(
            "6f1c2a4e-8b1d-4c3e-9a57-0d1e2f3a4b01", "0a1b2c3d-0001-4000-8000-000000000103"))
        assert status == 503 and doc["type"].endswith("/not-primary"), doc
        async with s.get(f"{svc.url}/api/events", headers={"X-Boxoffice-Min-Lsn": "0/1"}) as resp:
            doc = await resp.json(content_type=None)
            assert resp.status == 503 and doc["type"].endswith("/role-unknown"), doc


# --- concurrency: bookings racing an epoch write ----------------------------------------

COMMIT_RECORDS = """
SELECT r.xid::text::bigint AS xid, r.start_lsn::text AS lsn
FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) r
WHERE r.resource_manager = 'Transaction' AND r.record_type = 'COMMIT'
  AND r.xid::text::bigint = ANY ($2::int8[])
"""


async def test_50_bookings_racing_an_epoch_write(
        booking_service: RunningService, epoch_restored: None) -> None:
    """Bookings queue on a held tier lock (each statement, one booking or a batch,
    holding the epoch lock in shared mode); the epoch is raised meanwhile, then the
    tier released. Every 201 is in the database, every refusal is a fence and wrote
    nothing, every booking's commit record comes before the epoch write's, and the
    inventory holds."""
    dsn = booking_service.database.dsn
    url = booking_service.url
    in_flight = RequestsInFlight()
    async with aiohttp.ClientSession(trace_configs=[in_flight.trace()]) as s:
        ev = await create_event(s, url, [100])
        tier = ev.tier_ids[0]
        conn = await _db(dsn)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        since = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        blocker, writer = await _db(dsn), await _db(dsn)
        try:
            block = blocker.transaction()
            await block.start()
            await blocker.execute("SELECT 1 FROM ticket_tiers WHERE id = $1::uuid FOR UPDATE", tier)
            bookings = [asyncio.create_task(_post(s, f"{url}/api/bookings", _booking(ev.id, tier)))
                        for _ in range(50)]
            # The race is on, with bookings one per CALL or in batches alike: a booking
            # statement waits on the tier's lock, and at least 10 of the 50 requests
            # are sent and unanswered (behind it on the lock, in the pool's queue or the
            # combiner's, which one batch at a time leaves, or still on their way).
            await wait_for_booking_lock_waiters(dsn, lambda n: n >= 1)

            async def crowd() -> bool:
                return in_flight.count >= 10

            await _poll("10 bookings sent and unanswered", crowd)

            write = writer.transaction()
            await write.start()
            writer_xid = await writer.fetchval("SELECT pg_current_xact_id()::text::bigint % 4294967296")
            bump = asyncio.create_task(writer.execute("UPDATE boxoffice_epoch SET epoch = epoch + 1"))

            async def bump_waits() -> bool:
                return bool(await conn.fetchval(
                    "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1",
                    writer.get_server_pid()))

            await _poll("the epoch write to wait for the bookings' lock", bump_waits)
            await block.rollback()  # the queued bookings go on; the epoch write after them
            await bump
            await write.commit()
            answers = await asyncio.gather(*bookings)
        finally:
            await blocker.close()
            await writer.close()
        try:
            created = [doc["id"] for status, doc in answers if status == 201]
            refused = [doc for status, doc in answers if status != 201]
            assert created and refused, answers  # the write landed in the middle of the race
            for doc in refused:
                assert doc["status"] == 503 and doc["type"].rsplit("/", 1)[-1] in (
                    "fenced", "not-primary"), doc
            assert set(await _bookings_of(dsn, ev.id)) == set(created)
            xids = await conn.fetch("SELECT id::text, xmin::text::bigint AS xid FROM bookings "
                                    "WHERE event_id = $1::uuid", ev.id)
            records = {r["xid"]: lsn_to_int(r["lsn"]) for r in await conn.fetch(
                COMMIT_RECORDS, since, [r["xid"] for r in xids] + [writer_xid])}
            bumped_at = records[writer_xid]
            late = [r["id"] for r in xids if records[r["xid"]] > bumped_at]
            assert late == [], f"bookings committed after the epoch moved: {late}"
        finally:
            await conn.close()
    tiers = await check_invariants(dsn, ev.id)
    assert tiers[tier]["sold"] == len(created)


# --- (d) a cancelled synchronous wait is never a 201 --------------------------------------


async def _sync_rep_waiter(dsn: str) -> int | None:
    conn = await _db(dsn)
    try:
        return await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
            "AND query LIKE '%boxoffice_book_committed%'")
    finally:
        await conn.close()


async def test_a_cancelled_synchronous_wait_is_503_not_confirmed_and_the_key_replays_it(
        workdir: Path, consul_agent: ConsulAgent, own_services: Callable[..., OwnService]) -> None:
    """A primary of our own with a synchronous standby (`FIRST 1 (standby)` through
    ALTER SYSTEM). With the standby stopped a booking hangs in the synchronous wait;
    the test cancels the wait (pg_cancel_backend): committed locally, not confirmed,
    so the client gets 503 `not-confirmed`, never 201. With the standby back, the same
    request replays the booking (200, same id)."""
    base = workdir / f"sync-{uuid.uuid4().hex[:6]}"
    primary = PostgresServer("sync-primary", base / "primary", free_port(), durable=False)
    standby = PostgresServer("sync-standby", base / "standby", free_port(), durable=False)
    try:
        primary.init_primary()
        await schema.install(primary.dsn, with_sample_data=False)
        standby.init_replica(primary)
        assert await primary.set_sync_standbys([standby.name], "zone") == '''FIRST 1 ("sync-standby")'''
        prefix = f"test-sync-{uuid.uuid4().hex[:8]}/"
        await _put_map(consul_agent, prefix, [Shard("shard-s", 1, "test-region", {
            "test-region": ShardMember("test-region", "http://127.0.0.1:9/s", primary.address),
            "test-region/b": ShardMember("test-region", "http://127.0.0.1:9/s", standby.address,
                                         zone="b"),
        }, sync_standbys=("test-region/b",))])
        svc = own_services([ShardSpec("shard-s", primary.dsn, "test-region")],
                           consul_agent.address, prefix)
        await _wait_role(svc.url, "primary")
        async with aiohttp.ClientSession() as s:
            ev = await create_event(s, svc.url, [10])  # confirmed: the standby is up
            standby.stop()
            request = _booking(ev.id, ev.tier_ids[0], quantity=2)
            booking = asyncio.create_task(_post(s, f"{svc.url}/api/bookings", request))
            pid: int | None = None

            async def waiting() -> bool:
                nonlocal pid
                pid = await _sync_rep_waiter(primary.dsn)
                return pid is not None

            await _poll("the booking to wait for the synchronous standby", waiting)
            assert not booking.done()
            conn = await _db(primary.dsn)
            try:
                assert await conn.fetchval("SELECT pg_cancel_backend($1)", pid)
            finally:
                await conn.close()
            status, doc = await booking
            assert status == 503 and doc["type"].endswith("/not-confirmed"), doc
            # Committed locally all the same: exactly the booking the retry will replay.
            local = await _bookings_of(primary.dsn, ev.id)
            assert list(local.values()) == ["confirmed"], local

            standby.start()
            status, doc = await _post(s, f"{svc.url}/api/bookings", request)
            assert status == 200 and doc["id"] in local, doc
        tiers = await check_invariants(primary.dsn, ev.id)
        assert tiers[ev.tier_ids[0]]["sold"] == 2
    finally:
        standby.remove()
        primary.remove()
