"""Moving an event to another shard while it is on sale (event_ops/move.py), on the real
cluster (tests/conftest.py `cluster`: shard-a homed in east, shard-b homed in west).

Every test moves fresh events it created, and leaves each shard's primary in its home.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from common.messages import MoveReport, MoveStatus
from deploy.cluster import Cluster
from event_ops.move import LEASE_KIND, STEPS, MoveFailed, MoveProgress, MoveRefused, move_event
from event_ops.shard_admin import ShardAdmin
from failover import NodeAgents
from failover.switchover import switchover
from region_map import ConsulMapStore
from tests.conftest import ADMIN_TOKEN
from tests.support import (
    check_invariants,
    create_event_doc,
    extra_gateway,
    gateway_url,
    listed_event_ids,
)
from tests.test_promote import HOME, restore_home, run_cli, store_for, wait_copies_settled

OTHER = {"shard-a": "shard-b", "shard-b": "shard-a"}
ZONE_STANDBY = {"shard-a": "east/b", "shard-b": "west/b"}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLIENTS = 10  # booking clients on the moving event, through both gateways


def primary_dsn(cluster: Cluster, shard: str, copy: str | None = None) -> str:
    return cluster.databases[(shard, copy or HOME[shard])].dsn


async def rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def event_bookings(dsn: str, event_id: str) -> dict[str, str]:
    """booking id -> status, of one event in one database."""
    found = await rows(dsn, "SELECT id::text, status FROM bookings WHERE event_id = $1::uuid", event_id)
    return {r["id"]: r["status"] for r in found}


async def write_state(dsn: str, event_id: str) -> str:
    found = await rows(dsn, "SELECT state FROM boxoffice_event_moves WHERE event_id = $1::uuid",
                       event_id)
    return found[0]["state"] if found else "open"


@dataclass
class Clients:
    """What booking clients were answered: confirmed booking id -> reference, statuses,
    and the answer times of every confirmation (monotonic)."""

    confirmed: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def book_loop(session: aiohttp.ClientSession, url: str, event: dict[str, Any],
                    stop: asyncio.Event, seen: Clients, tier: int = 0) -> None:
    """One careful client: book one ticket after another, each under its own reference,
    retrying a 503 with the same reference until it is answered."""
    tier_id = event["tiers"][tier]["id"]
    while not stop.is_set():
        reference = f"mv-{uuid.uuid4().hex}"
        body = {"eventId": event["id"], "clientReference": reference,
                "items": [{"ticketTierId": tier_id, "quantity": 1}]}
        mine = {"Booking-Secret": secrets.token_urlsafe(32)}  # every resend carries it
        while True:
            began = time.monotonic()
            try:
                async with session.post(f"{url}/api/bookings", json=body, headers=mine,
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    doc = await resp.json(content_type=None)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                seen.failures.append(type(exc).__name__)
                continue
            if status in (200, 201):
                seen.confirmed[doc["id"]] = reference
                seen.answered_at.append(time.monotonic())
                seen.latencies.append(time.monotonic() - began)
                break
            seen.failures.append(f"{status} {doc.get('type', '')}")
            if status != 503:
                break


@contextlib.asynccontextmanager
async def booking_clients(cluster: Cluster, event: dict[str, Any], n: int,
                          ) -> AsyncIterator[Clients]:
    seen = Clients()
    stop = asyncio.Event()
    urls = [gateway_url(cluster, r) for r in ("east", "west")]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(book_loop(session, urls[i % 2], event, stop, seen))
                 for i in range(n)]
        try:
            yield seen
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def wait_confirmations(seen: Clients, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(seen.confirmed) < count:
        assert time.monotonic() < deadline, f"clients confirmed only {len(seen.confirmed)}"
        await asyncio.sleep(0.02)  # poll: the clients run on this loop


async def run_move(cluster: Cluster, event_id: str, to_shard: str, **kwargs: Any) -> Any:
    lines: list[str] = []

    def show(p: MoveProgress) -> None:
        lines.append(f"{p.step} {p.state} {p.detail}")

    async with store_for(cluster) as store, ShardAdmin(ADMIN_TOKEN) as admin:
        try:
            return await move_event(store, admin, event_id, to_shard, progress=show, **kwargs)
        finally:
            print("\n".join(lines))


async def assert_moved(cluster: Cluster, event_id: str, source: str, target: str,
                       confirmed: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The event lives on the target only, adds up there, and holds every confirmed
    booking exactly once; the source keeps only a tombstone; the map places it on target."""
    tiers = await check_invariants(primary_dsn(cluster, target), event_id)
    on_target = await event_bookings(primary_dsn(cluster, target), event_id)
    assert set(confirmed) <= set(on_target), f"lost: {set(confirmed) - set(on_target)}"
    dupes = await rows(primary_dsn(cluster, target),
                       "SELECT client_reference FROM bookings WHERE event_id = $1::uuid "
                       "GROUP BY client_reference HAVING count(*) > 1", event_id)
    assert dupes == []
    assert await event_bookings(primary_dsn(cluster, source), event_id) == {}
    assert await rows(primary_dsn(cluster, source),
                      "SELECT 1 FROM events WHERE id = $1::uuid", event_id) == []
    assert await write_state(primary_dsn(cluster, source), event_id) == "moved"
    assert await write_state(primary_dsn(cluster, target), event_id) == "open"
    async with store_for(cluster) as store:
        placed, _ = await store.read_placement(event_id)
    assert placed == target
    return tiers


# --- acceptance 1, 2: a move under load; another event on the source never fails ----------

async def test_move_under_load_loses_nothing_and_pauses_only_the_moved_event(
        cluster: Cluster, figure: Callable[[str], None]) -> None:
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [100_000, 50], shard="shard-a")
        neighbour = await create_event_doc(s, gateway_url(cluster, "east"), [100_000], shard="shard-a")
    async with booking_clients(cluster, event, CLIENTS) as seen, \
            booking_clients(cluster, neighbour, 4) as others:
        await wait_confirmations(seen, 200)
        report = await run_move(cluster, event["id"], "shard-b")
        await wait_confirmations(seen, len(seen.confirmed) + 100)
        after_move = len(others.confirmed)
        await wait_confirmations(others, after_move + 20)
    assert report.outcome == "moved" and report.source == "shard-a" and report.target == "shard-b"
    assert report.pause_seconds is not None and report.since_lsn
    figure(f"event move under {CLIENTS} clients: {report.bookings_copied} bookings copied "
                   f"in {report.pages} pages, {report.rounds} rounds; the event's writes paused "
                   f"{report.pause_seconds * 1000:.0f} ms; {report.seconds:.2f} s in all")
    tiers = await assert_moved(cluster, event["id"], "shard-a", "shard-b", seen.confirmed)
    assert sum(t["sold"] for t in tiers.values()) == len(seen.confirmed)
    # The clients retried through the pause (503 event-moving, answered by the gateway's
    # ride-through) and never saw anything but their bookings.
    assert seen.failures == [], seen.failures[:10]
    # The neighbour on the source shard never failed, and kept booking during the move.
    assert others.failures == [], others.failures[:10]
    await check_invariants(primary_dsn(cluster, "shard-a"), neighbour["id"])


# --- acceptance 4: ids and references survive, also through a gateway with a stale map ----

def stale_gateway(cluster: Cluster, prefix: str) -> contextlib.AbstractContextManager[str]:
    """A west gateway that reads the region map from `prefix` (a copy the test writes),
    so its map stays as it was when copied: a gateway whose map is behind."""
    return extra_gateway(cluster, "west", "stale", {"--map-prefix": prefix})


async def copy_map(cluster: Cluster, prefix: str) -> None:
    async with store_for(cluster) as live:
        region_map = await live.load()
    assert cluster.consul is not None
    async with ConsulMapStore(port=cluster.consul.http_port, prefix=prefix) as copy:
        await copy.delete_all()
        for region in region_map.regions.values():
            await copy.put_region(region, 0)
        for shard in region_map.shards.values():
            await copy.put_shard(shard, 0)
        for event_id, shard_name in region_map.placements.items():
            await copy.place_event(event_id, shard_name, 0)


async def test_ids_and_references_resolve_and_replay_after_a_move(cluster: Cluster) -> None:
    prefix = f"stale-{uuid.uuid4().hex[:6]}/"
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "west"), [500], shard="shard-b")
        before: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for n in range(6):
            body = {"eventId": event["id"], "clientReference": f"keep-{uuid.uuid4().hex}",
                    "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1 + n % 3}]}
            async with s.post(f"{gateway_url(cluster, 'west')}/api/bookings", json=body) as resp:
                assert resp.status == 201
                booked = await resp.json()
                assert booked["bookingSecret"] == resp.headers["Booking-Secret"]  # made for us
                before.append((body, booked))
        await copy_map(cluster, prefix)  # the map as it was before the move
        with stale_gateway(cluster, prefix) as stale:
            report = await run_move(cluster, event["id"], "shard-a")
            assert report.outcome == "moved"
            for url in (gateway_url(cluster, "east"), gateway_url(cluster, "west"), stale):
                for body, booking in before:
                    # The buyer's secret moved with the booking (its hash is in the row).
                    mine = {"Booking-Secret": booking["bookingSecret"]}
                    async with s.get(f"{url}/api/bookings/{booking['id']}", headers=mine) as resp:
                        doc = await resp.json()
                        assert resp.status == 200, (url, doc)
                        assert doc == {k: v for k, v in booking.items() if k != "bookingSecret"}
                    async with s.post(f"{url}/api/bookings", json=body,
                                      headers=mine) as resp:  # a replay
                        doc = await resp.json()
                        assert resp.status == 200, (url, doc)
                        assert doc["id"] == booking["id"]
                    async with s.post(f"{url}/api/bookings", json=body) as resp:  # not the buyer
                        doc = await resp.json()
                        assert resp.status == 409 and booking["id"] not in str(doc), (url, doc)
                if url != stale:  # the listing of a gateway that knows the move shows it once
                    listed = await listed_event_ids(s, url)
                    assert event["id"] in listed and len(listed) == len(set(listed))
                async with s.get(f"{url}/api/events/{event['id']}/ticket-tiers") as resp:
                    tiers = (await resp.json())["ticketTiers"]
                    assert resp.status == 200
                    assert tiers[0]["remaining"] == 500 - sum(b["items"][0]["quantity"]
                                                              for b, _ in before)
            # A new booking through the stale gateway lands on the target.
            body = {"eventId": event["id"], "items": [{"ticketTierId": event["tiers"][0]["id"],
                                                       "quantity": 1}]}
            async with s.post(f"{stale}/api/bookings", json=body) as resp:
                doc = await resp.json()
                assert resp.status == 201, doc
            # And a cancel of a booking made before the move.
            async with s.post(f"{stale}/api/bookings/{before[0][1]['id']}/cancel",
                              headers={"Booking-Secret": before[0][1]["bookingSecret"]}) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    on_target = await event_bookings(primary_dsn(cluster, "shard-a"), event["id"])
    assert doc["id"] in on_target and on_target[before[0][1]["id"]] == "cancelled"
    await check_invariants(primary_dsn(cluster, "shard-a"), event["id"])
    assert cluster.consul is not None
    async with ConsulMapStore(port=cluster.consul.http_port, prefix=prefix) as copy:
        await copy.delete_all()


# --- acceptance 5: a collision on the target aborts in preflight, changing nothing --------

@pytest.mark.parametrize("collision", ["tier-id", "client-reference"])
async def test_a_collision_on_the_target_refuses_the_move_and_changes_nothing(
        cluster: Cluster, collision: str) -> None:
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [100], shard="shard-a")
        reference = f"taken-{uuid.uuid4().hex}"
        async with s.post(f"{gateway_url(cluster, 'east')}/api/bookings", json={
                "eventId": event["id"], "clientReference": reference,
                "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 2}]}) as resp:
            assert resp.status == 201
        if collision == "tier-id":  # an operator chose the same tier id for an event on shard-b
            spec = {"name": "Clash", "venue": "Hall", "startsAt": "2027-10-01T20:00:00Z",
                    "currency": "USD", "shard": "shard-b",
                    "tiers": [{"id": event["tiers"][0]["id"], "name": "GA", "priceCents": 100,
                               "capacity": 5}]}
            async with s.post(f"{gateway_url(cluster, 'west')}/admin/events", json=spec,
                              headers=AUTH) as resp:
                assert resp.status == 201, await resp.text()
        else:  # the same client reference, used for an event on shard-b
            other = await create_event_doc(s, gateway_url(cluster, "west"), [10], shard="shard-b")
            async with s.post(f"{gateway_url(cluster, 'west')}/api/bookings", json={
                    "eventId": other["id"], "clientReference": reference,
                    "items": [{"ticketTierId": other["tiers"][0]["id"], "quantity": 1}]}) as resp:
                assert resp.status == 201
    target_before = await rows(primary_dsn(cluster, "shard-b"),
                               "SELECT count(*) AS n FROM bookings")
    with pytest.raises(MoveRefused) as refused:
        await run_move(cluster, event["id"], "shard-b")
    assert refused.value.kind == "collision"
    assert await write_state(primary_dsn(cluster, "shard-a"), event["id"]) == "open"
    assert await write_state(primary_dsn(cluster, "shard-b"), event["id"]) == "open"
    assert await rows(primary_dsn(cluster, "shard-b"),
                      "SELECT 1 FROM events WHERE id = $1::uuid", event["id"]) == []
    assert await rows(primary_dsn(cluster, "shard-b"),
                      "SELECT count(*) AS n FROM bookings") == target_before
    async with store_for(cluster) as store:
        placed, _ = await store.read_placement(event["id"])
    assert placed == "shard-a"
    async with aiohttp.ClientSession() as s, s.post(
            f"{gateway_url(cluster, 'east')}/api/bookings", json={
                "eventId": event["id"], "items": [{"ticketTierId": event["tiers"][0]["id"],
                                                   "quantity": 1}]}) as resp:
        assert resp.status == 201  # still open for business on its shard


# --- acceptance 6: a switchover of the source or the target in the middle of a move ------

@pytest.mark.parametrize(("changed", "after_step"), [("source", "freeze"), ("target", "copy")])
async def test_a_switchover_in_the_middle_of_a_move(cluster: Cluster, changed: str,
                                                    after_step: str) -> None:
    source, target = "shard-a", "shard-b"
    shard = source if changed == "source" else target
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [100_000], shard=source)

    async def switch_over(step: str) -> None:
        if step != after_step:
            return
        async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
            report = await switchover(store, agents, shard, ZONE_STANDBY[shard])
        print(f"switched {shard} over to {report.new_primary} (epoch {report.new_epoch}) "
              f"after {step}")

    try:
        async with booking_clients(cluster, event, 6) as seen:
            await wait_confirmations(seen, 50)
            report = await run_move(cluster, event["id"], target, fault_hook=switch_over)
            await wait_confirmations(seen, len(seen.confirmed) + 30)
        assert report.outcome == "moved"
        async with store_for(cluster) as store:
            record, _ = await store.read_shard(shard)
        assert record.primary_copy == ZONE_STANDBY[shard]  # the move ran on, on the new primary
        target_dsn = primary_dsn(cluster, target, record.primary_copy if shard == target else None)
        source_dsn = primary_dsn(cluster, source, record.primary_copy if shard == source else None)
        tiers = await check_invariants(target_dsn, event["id"])
        on_target = await event_bookings(target_dsn, event["id"])
        assert set(seen.confirmed) <= set(on_target)
        assert sum(t["sold"] for t in tiers.values()) == len(on_target)
        assert await event_bookings(source_dsn, event["id"]) == {}
        assert await write_state(source_dsn, event["id"]) == "moved"
        assert seen.failures == [], seen.failures[:10]
    finally:
        await wait_copies_settled(cluster, shard)
        await restore_home(cluster, shard)


# --- acceptance 3: killed after each step, run again, never writable on both shards -------

@dataclass
class Sample:
    shard: str
    sent: float
    answered: float


async def sampler(cluster: Cluster, event: dict[str, Any], stop: asyncio.Event,
                  accepted: list[Sample]) -> None:
    """Book the event directly at both shards' primaries' booking services, over and over
    (as a gateway with either map would), recording every booking either accepted."""
    async with aiohttp.ClientSession() as s, store_for(cluster) as store:
        while not stop.is_set():
            region_map = await store.load()
            for shard_name in ("shard-a", "shard-b"):
                shard = region_map.shards[shard_name]
                body = {"eventId": event["id"], "clientReference": f"smp-{uuid.uuid4().hex}",
                        "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
                sent = time.monotonic()
                try:
                    async with s.post(f"{shard.primary.service_url}/api/bookings", json=body,
                                      # the operator's credential: booking services
                                      # authenticate their callers (common/internal_auth.py)
                                      headers={"X-Boxoffice-Epoch": str(shard.epoch), **AUTH},
                                      timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        if resp.status == 201:
                            accepted.append(Sample(shard_name, sent, time.monotonic()))
                except (aiohttp.ClientError, TimeoutError):
                    pass


def never_both(accepted: list[Sample], source: str, target: str) -> None:
    """No booking accepted by the source was sent after one the target had confirmed:
    the source's last acceptance precedes the target's first."""
    on_target = [a.answered for a in accepted if a.shard == target]
    if not on_target:
        return
    first_target = min(on_target)
    late = [a for a in accepted if a.shard == source and a.sent > first_target]
    assert late == [], f"the source took bookings after the target did: {late[:3]}"


# Consul frees a dead runner's lease about twice its TTL after its last renewal. One case
# waits for that (a 1 s TTL: ~2 s before the rerun gets the lease); the others take the
# default TTL (so the dead runner surely still holds it when the test looks) and end its
# session themselves, as Consul does at expiry, rather than each wait ~2 s more.
WAITS_FOR_EXPIRY = ("freeze", "cli")


async def run_cli_move(cluster: Cluster, event_id: str, target: str,
                       kill_after: str | None = None, lease_ttl: float | None = None,
                       ) -> tuple[int, str]:
    """`boxoffice event move`, SIGKILLed by its failpoint right after `kill_after`'s journal
    write when given."""
    ttl = ["--lease-ttl", str(lease_ttl)] if lease_ttl is not None else []
    return await run_cli(cluster, "event", "move", event_id, "--to-shard", target, *ttl,
                         env={"BOXOFFICE_MOVE_KILL_AFTER": kill_after or ""})


async def expire_dead_runners_lease(cluster: Cluster, event_id: str,
                                    owner: str | None = "boxoffice event move") -> None:
    """The killed runner still holds the move's lease (its session lives until its TTL
    runs out): end that session now, which is what Consul does when the TTL expires
    (the lock is released; no lock delay). `owner`: whom the lease must name."""
    async with store_for(cluster) as store:
        holder = await store.lock_holder(f"{LEASE_KIND}{event_id}")
        assert holder.session is not None, "the killed runner's lease was already free"
        if owner is not None:
            assert (holder.value or {}).get("owner") == owner, holder
        await store.destroy_session(holder.session)


async def kill_source_service(cluster: Cluster) -> None:
    """kill -9 of shard-a's home booking service; its node agent starts it again."""
    pid = await asyncio.to_thread(cluster.service_pid, HOME["shard-a"])
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("killed", ["cli", "source-service"])
@pytest.mark.parametrize("step", STEPS)
async def test_a_move_killed_after_any_step_finishes_when_run_again(
        cluster: Cluster, step: str, killed: str) -> None:
    source, target = "shard-a", "shard-b"
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [100_000], shard=source)
    accepted: list[Sample] = []
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(cluster, event, stop, accepted))
    try:
        async with booking_clients(cluster, event, 4) as seen:
            await wait_confirmations(seen, 20)
            natural_expiry = (step, killed) == WAITS_FOR_EXPIRY
            code, out = await run_cli_move(cluster, event["id"], target, kill_after=step,
                                           lease_ttl=1.0 if natural_expiry else None)
            print(out)
            assert code == -signal.SIGKILL, out  # killed right after the step was journalled
            if not natural_expiry:
                await expire_dead_runners_lease(cluster, event["id"])
            if killed == "source-service":
                await kill_source_service(cluster)
            code, out = await run_cli_move(cluster, event["id"], target)
            print(out)
            assert code == 0, out
            assert "resumed" in out or step == "retire"
            await wait_confirmations(seen, len(seen.confirmed) + 10)
    finally:
        stop.set()
        await sampling
    confirmed = dict(seen.confirmed)
    await assert_moved(cluster, event["id"], source, target, confirmed)
    never_both(accepted, source, target)
    sampled = {a.shard for a in accepted}
    assert target in sampled  # the sampler saw the target take bookings after the move
    assert seen.failures == [], seen.failures[:10]


async def test_a_runner_that_lost_its_lease_stops_before_the_flip(cluster: Cluster) -> None:
    """The runner's lease ends under it after the final copy (its session gone, as when
    its renewals stop reaching Consul for a TTL): it sees that at its commit point and
    stops before the flip, so a runner that took the lease meanwhile can never be
    overtaken. The placement is unchanged; the move run again finishes it."""
    source, target = "shard-a", "shard-b"
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [100], shard=source)
    async with booking_clients(cluster, event, 2) as seen:
        await wait_confirmations(seen, 5)
        confirmed_before = dict(seen.confirmed)

    async def lose_the_lease(step: str) -> None:
        if step == "final-copy":
            await expire_dead_runners_lease(cluster, event["id"], owner=None)

    with pytest.raises(MoveFailed) as failed:
        await run_move(cluster, event["id"], target, fault_hook=lose_the_lease)
    assert failed.value.kind == "lease-lost"
    async with store_for(cluster) as store:
        placed, _ = await store.read_placement(event["id"])
    assert placed == source
    report = await run_move(cluster, event["id"], target)
    assert report.outcome == "resumed"
    await assert_moved(cluster, event["id"], source, target, confirmed_before)
    assert seen.failures == [], seen.failures[:10]


# --- the admin API: the same move over HTTP, operator auth, bad requests ------------------

async def test_move_through_the_admin_api(cluster: Cluster) -> None:
    url = gateway_url(cluster, "west")
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, url, [40], shard="shard-b")
        path = f"{url}/admin/events/{event['id']}/move"
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                                ({"Authorization": "Basic " + "x" * 5000}, 401)):
            async with s.post(path, json={"toShard": "shard-a"}, headers=headers) as resp:
                assert resp.status == status
                assert resp.content_type == "application/problem+json"
            async with s.get(path, headers=headers) as resp:
                assert resp.status == status
        bad = [({"toShard": "shard-zz"}, 404, "unknown-shard"),
               ({"toShard": 7}, 400, "invalid-request"),
               ({"toShard": "shard-a", "extra": 1}, 400, "invalid-request"),
               ({"abort": "yes"}, 400, "invalid-request"),
               ({}, 400, "invalid-request"),
               ({"abort": True}, 409, "no-move")]
        for body, status, kind in bad:
            async with s.post(path, json=body, headers=AUTH) as resp:
                doc = await resp.json(content_type=None)
                assert (resp.status, doc["type"].rsplit("/", 1)[-1]) == (status, kind), (body, doc)
        async with s.post(f"{url}/admin/events/{uuid.uuid4()}/move", json={"toShard": "shard-a"},
                          headers=AUTH) as resp:
            assert resp.status == 404
        async with s.post(f"{url}/admin/events/not-an-id/move", json={"toShard": "shard-a"},
                          headers=AUTH) as resp:
            assert resp.status == 404
        # Nothing of the refused requests changed the event.
        assert await write_state(primary_dsn(cluster, "shard-b"), event["id"]) == "open"
        async with s.post(path, json={"toShard": "shard-a"}, headers=AUTH) as resp:
            report = await resp.json()
            assert resp.status == 200, report
        msgspec.convert(report, MoveReport)  # the shape the API document gives
        assert report["outcome"] == "moved" and report["target"] == "shard-a"
        assert report["pauseSeconds"] is not None and report["sinceLsn"]
        async with s.get(path, headers=AUTH) as resp:
            status = await resp.json()
        msgspec.convert(status, MoveStatus)
        assert status["placement"] == "shard-a" and status["side"] == "after-flip"
        assert status["move"]["state"] == "done" and status["move"]["moveId"] == report["moveId"]
        async with s.post(path, json={"toShard": "shard-a"}, headers=AUTH) as resp:
            assert (await resp.json())["outcome"] == "already-there"
    await assert_moved(cluster, event["id"], "shard-b", "shard-a", {})


async def test_concurrent_moves_of_one_event_move_it_once(cluster: Cluster) -> None:
    """Three operators move the same event at once: the lease lets one run; the others
    wait for it, then find the event moved (nothing copied twice, nothing lost)."""
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [100_000], shard="shard-a")
    async with booking_clients(cluster, event, 4) as seen:
        await wait_confirmations(seen, 20)
        reports = await asyncio.gather(*(run_move(cluster, event["id"], "shard-b")
                                         for _ in range(3)))
        await wait_confirmations(seen, len(seen.confirmed) + 10)
    assert sorted(r.outcome for r in reports) == ["already-there", "already-there", "moved"]
    await assert_moved(cluster, event["id"], "shard-a", "shard-b", seen.confirmed)
    assert seen.failures == [], seen.failures[:10]


# --- issue 16 class 3: a runner that lost its lease changes nothing -------------------------

@pytest.mark.parametrize("paused_after", ["copy", "catch-up"])
async def test_a_runner_paused_past_its_lease_changes_nothing_after_the_rollback(
        cluster: Cluster, paused_after: str) -> None:
    """The runner is paused right after `paused_after` (SIGSTOP, a frozen VM: here its
    fault hook) past its lease; meanwhile the controller settles the abandoned move, as
    event_ops/abandoned.py does (taking the event's lease itself, rolling the move back:
    the source unfrozen, the target's copy removed). When the runner resumes, its next
    step (the freeze of the source, or an import onto the target) carries the old lease's
    sequencer: the shard refuses it, the runner stops (`lease-lost`), the event stays
    open on the source, nothing is imported on the target, and a new move still works."""
    from event_ops.abandoned import settle

    source, target = "shard-a", "shard-b"
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(cluster, "east"), [1000], shard=source)
    async with booking_clients(cluster, event, 2) as seen:
        await wait_confirmations(seen, 10)
    settled: list[Any] = []

    async def paused_past_the_lease(step: str) -> None:
        if step != paused_after:
            return
        await expire_dead_runners_lease(cluster, event["id"], owner=None)  # its TTL ran out
        async with store_for(cluster) as store, ShardAdmin(ADMIN_TOKEN) as admin:
            journal, _ = await store.read_journal(f"move-{event['id']}")
            settled.append(await settle(store, admin, event["id"], journal, "test controller"))

    with pytest.raises(MoveFailed) as failed:
        await run_move(cluster, event["id"], target, fault_hook=paused_past_the_lease)
    assert [s.action for s in settled] == ["rolled-back"], settled
    assert await write_state(primary_dsn(cluster, source), event["id"]) == "open"
    assert await rows(primary_dsn(cluster, target),
                      "SELECT 1 FROM events WHERE id = $1::uuid", event["id"]) == []
    assert await event_bookings(primary_dsn(cluster, target), event["id"]) == {}
    assert await write_state(primary_dsn(cluster, target), event["id"]) in ("open", "moved")
    assert failed.value.kind == "lease-lost", failed.value  # refused: it stopped there
    async with aiohttp.ClientSession() as s, s.post(
            f"{gateway_url(cluster, 'west')}/api/bookings",
            json={"eventId": event["id"], "items": [{"ticketTierId": event["tiers"][0]["id"],
                                                     "quantity": 1}]}) as resp:
        assert resp.status == 201, await resp.text()
    # The operator can still move it: a new move starts afresh and finishes.
    report = await run_move(cluster, event["id"], target)
    assert report.outcome == "moved"
    await assert_moved(cluster, event["id"], source, target, seen.confirmed)


async def test_a_node_agent_refuses_a_primitive_of_an_older_lease(cluster: Cluster) -> None:
    """A promotion's primitives carry its lease's sequencer (failover/agents.py
    `under_lease`). A runner A takes a lease, loses it (its session ended, as at TTL
    expiry), runner B takes it (a newer sequencer) and repoints a standby; A's repoint
    afterwards is refused 409 `stale-sequencer` by the node agent, which keeps the newest
    sequencer per lease in its own file. Calls without a sequencer (the agent's own
    supervision, an operator by hand) still go through. (A lease of the test's own: the
    shard's real one stays free for the other tests.)"""
    shard, standby = "shard-a", ZONE_STANDBY["shard-a"]
    lock = f"test-fence-{uuid.uuid4().hex[:8]}"
    async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
        record, _ = await store.read_shard(shard)
        address = record.primary.db_address
        # The header itself, as a runner sends it: 7, then an older 6, of one lease.
        url = f"{await agents.url_for(standby)}/agent/copies/{shard}/repoint"
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for fence, status in ((f"{lock}-raw:7", 200), (f"{lock}-raw:6", 409),
                                  (f"{lock}-raw:7", 200)):
                async with s.post(url, json={"primary": address},
                                  headers={"X-Boxoffice-Sequencer": fence}) as resp:
                    doc = await resp.json(content_type=None)
                    assert resp.status == status, (fence, doc)
        assert doc["changed"] is False

        from failover.agents import AgentRefused, under_lease
        from failover.lease import Lease

        first = await Lease.take(store, lock, "runner A")
        await store.destroy_session(first.session)  # A's lease ends under it
        second = await Lease.take(store, lock, "runner B")
        try:
            assert second.sequencer > first.sequencer > 0
            assert await under_lease(agents, second).repoint(standby, shard, address) is False
            with pytest.raises(AgentRefused) as refused:
                await under_lease(agents, first).repoint(standby, shard, address)
            assert refused.value.kind == "stale-sequencer", refused.value
            # B goes on; a call with no lease is not fenced by it.
            assert await under_lease(agents, second).repoint(standby, shard, address) is False
            assert await agents.repoint(standby, shard, address) is False
        finally:
            await second.release()
            await first.release()
