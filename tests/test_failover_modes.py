"""Losing a primary's whole host, under continuous bookings, then `boxoffice shard promote`
(issue 7, acceptance 1 and 2), for each durability mode, on a cluster of its own:

- `sync: zone`: every booking any client got a 201 (or a replayed 200) for exists on
  the new primary (the zone standby);
- `sync: region`: the same, the new primary being the other region's replica;
- `sync: off`: promoted with --force; the test reports how many confirmed bookings
  were lost (asynchronous replication promises nothing).

Then the old primary is started again BY HAND as a primary, with its booking service:
bookings sent to it directly and through a gateway whose map is stale are refused, it
takes no row, serves no read for a consistency token, fails its health check. Then it is
started by hand IN RECOVERY, unrewound, with commits nobody confirmed (issue 16, class 5):
it is no replica, fails its readiness, serves no read, and no gateway reads from it with
the new primary's token. Its node agent then brings it back as a rewound standby and every
copy is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from common.lsn import lsn_to_int
from deploy.cluster import Cluster
from deploy.procs import ManagedProcess
from deploy.services import wait_healthy
from gateway.consistency import HEADER_NAME, ConsistencyToken
from region_map import BOOKING_SERVICE, ConsulMapStore, passing_by_url
from tests.conftest import ADMIN_TOKEN, own_cluster
from tests.support import check_invariants, create_event_doc, extra_gateway, fetchval

REPO = Path(__file__).resolve().parent.parent
SHARDS = {"s-zone": "zone", "s-region": "region", "s-off": "off"}
TARGET = {"s-zone": "east/b", "s-region": "west", "s-off": "west"}
TOPOLOGY = {
    "name": "test-failover-modes",
    # Three regions: `sync: region` is a quorum of the others, which must outlive one.
    "regions": {"east": {"location": "East"}, "west": {"location": "West"},
                "south": {"location": "South"}},
    "latency_ms": {"east/west": 5, "east/south": 8, "west/south": 6},
    "shards": {name: {"home": "east", "sync": mode} for name, mode in SHARDS.items()},
    "postgres": {"durable": False},
    "gateway": {"write_retry_seconds": 20, "booking_rate_per_second": 1000, "booking_burst": 1000,
                "max_in_flight_reads": 1000, "max_in_flight_bookings": 1000},
}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STALE_WRITE_RETRY_SECONDS = 2  # the stale gateway's write window (the cluster's is 20 s)


@pytest.fixture(scope="module")
def modes_cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "modes-cluster", TOPOLOGY) as c:
        yield c


def gw(cluster: Cluster, region: str) -> str:
    assert cluster.plan is not None
    return cluster.plan.gateway_url(region)


@dataclass
class Bookers:
    """Clients booking one ticket at a time, each with a fresh reference, until stopped;
    every confirmed booking (201, or 200 for a replay of its own retry) is recorded."""

    cluster: Cluster
    events: dict[str, dict[str, Any]]
    confirmed: dict[str, list[str]] = field(default_factory=dict)  # shard -> booking ids
    errors: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_until(self, done: Callable[[], bool], timeout: float = 120.0) -> None:
        """Until `done()` holds, woken by each confirmed booking."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(done)

    async def client(self, session: aiohttp.ClientSession, shard: str, region: str) -> None:
        event = self.events[shard]
        while not self.stop.is_set():
            reference = f"mode-{uuid.uuid4()}"
            body = {"eventId": event["id"], "clientReference": reference,
                    "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
            try:
                async with session.post(f"{gw(self.cluster, region)}/api/bookings", json=body,
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    doc = await resp.json(content_type=None)
                    if resp.status in (200, 201):
                        self.confirmed.setdefault(shard, []).append(doc["id"])
                        async with self.changed:
                            self.changed.notify_all()
                    else:
                        kind = f"{resp.status} {str(doc.get('type', '')).rsplit('/', 1)[-1]}"
                        self.errors[kind] = self.errors.get(kind, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1

    def count(self, shard: str) -> int:
        return len(self.confirmed.get(shard, []))


async def store_for(cluster: Cluster) -> ConsulMapStore:
    assert cluster.consul is not None
    return ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)


async def run_cli(cluster: Cluster, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.cli", "--state-dir", str(cluster.state_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    return int(proc.returncode or 0), out.decode()


async def wait_all_healthy(cluster: Cluster, timeout: float = 90.0) -> None:
    """Until every copy of every shard passes its Consul health check."""
    deadline = time.monotonic() + timeout
    store = await store_for(cluster)
    try:
        while True:
            region_map = await store.load()
            _, instances = await store.watch_instances(BOOKING_SERVICE, 0)
            health = passing_by_url(instances)
            failing = [f"{s.name}@{k}" for s in region_map.shards.values()
                       for k, m in s.members.items() if not health.get(m.service_url)]
            if not failing:
                return
            assert time.monotonic() < deadline, f"copies still failing: {failing}"
            await asyncio.sleep(0.2)  # poll interval
    finally:
        await store.close()


async def missing_on(dsn: str, booking_ids: list[str]) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        found = {str(r[0]) for r in await conn.fetch(
            "SELECT id FROM bookings WHERE id = ANY($1::uuid[])", booking_ids)}
    finally:
        await conn.close()
    return [b for b in booking_ids if b not in found]


@pytest.mark.timeout(480)  # the loss, then two old-primary phases, each with a booking service
async def test_losing_the_primarys_host_then_promote_loses_no_confirmed_booking(
        modes_cluster: Cluster) -> None:
    cluster = modes_cluster
    assert cluster.plan is not None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        events = {shard: await create_event_doc(s, gw(cluster, "east"), [100_000], shard=shard)
                  for shard in SHARDS}
        # A frozen copy of today's map, for a gateway whose map is stale (the second test).
        store = await store_for(cluster)
        try:
            stale = await store.load()
        finally:
            await store.close()
        bookers = Bookers(cluster, events)
        tasks = [asyncio.create_task(bookers.client(s, shard, region))
                 for shard in SHARDS for region in ("east", "west") for _ in range(2)]
        try:
            await bookers.wait_until(lambda: min(bookers.count(sh) for sh in SHARDS) >= 20)
            conn = await asyncpg.connect(cluster.databases[("s-zone", "east")].dsn)
            try:  # the zone standby is the synchronous one (FIRST 1 lists it first)
                states = {r["application_name"]: r["sync_state"] for r in await conn.fetch(
                    "SELECT application_name, sync_state FROM pg_stat_replication")}
            finally:
                await conn.close()
            print(f"s-zone replication: {states}")
            assert states.get("s-zone-east-b") == "sync", states
            # The east host dies: its node agent, and with it (parent-death signals) its
            # Postgres servers (every shard's primary) and its booking service.
            before = {shard: bookers.count(shard) for shard in SHARDS}
            cluster.agents["east"].kill()
            # One operator command per shard, run side by side (each under its shard's lease).
            results = await asyncio.gather(*(
                run_cli(cluster, "shard", "promote", shard, "--to", TARGET[shard],
                        *(["--force"] if shard == "s-off" else []))
                for shard in SHARDS))
            for code, out in results:
                print(out)
                assert code == 0, out
            # Bookings go on, on the new primaries.
            await bookers.wait_until(
                lambda: all(bookers.count(sh) >= before[sh] + 20 for sh in SHARDS))
        finally:
            bookers.stop.set()
            await asyncio.gather(*tasks)
    print(f"confirmed: { {s: bookers.count(s) for s in SHARDS} }, client errors: {bookers.errors}")
    for shard, mode in SHARDS.items():
        new_primary = cluster.databases[(shard, TARGET[shard])].dsn
        lost = await missing_on(new_primary, bookers.confirmed[shard])
        await check_invariants(new_primary, events[shard]["id"])
        if mode == "off":
            print(f"sync off: {len(lost)} of {bookers.count(shard)} confirmed bookings lost")
        else:
            assert lost == [], f"{shard} (sync {mode}) lost confirmed bookings: {lost}"

    await old_primary_by_hand_is_fenced(cluster, stale, events["s-zone"])
    await old_primary_unrewound_serves_no_read(cluster, events["s-zone"])
    await old_primary_comes_back_rewound(cluster)


async def old_primary_by_hand_is_fenced(cluster: Cluster, stale: Any, event: dict[str, Any]) -> None:
    """Acceptance 2, on s-zone: east's old primary started by hand AS A PRIMARY, with
    east's booking service, while its node agent is still dead."""
    assert cluster.plan is not None
    old = cluster.databases[("s-zone", "east")]
    await asyncio.to_thread(old.start_as_primary)
    service = by_hand_service(cluster)
    service.start()
    stale_prefix = f"stale-{uuid.uuid4().hex[:8]}/"
    stack = contextlib.ExitStack()  # the stale gateway, once started
    try:
        wait_healthy(cluster.plan.service_url("east"), service, "the by-hand booking service")
        conn = await asyncpg.connect(old.dsn)
        try:
            rows_before = await conn.fetchval("SELECT count(*) FROM bookings")
            assert await conn.fetchval("SELECT pg_is_in_recovery()") is False  # a primary, by hand
        finally:
            await conn.close()
        # A gateway whose map is stale: it still routes s-zone to east, at epoch 1.
        store = ConsulMapStore(port=cluster.consul.http_port, prefix=stale_prefix)  # type: ignore[union-attr]
        try:
            for region in stale.regions.values():
                await store.put_region(region, 0)
            for shard in stale.shards.values():
                await store.put_shard(shard, 0)
            await store.place_event(event["id"], "s-zone", 0)
        finally:
            await store.close()
        # Its map never moves on, so a write it holds is answered only when the window
        # ends: a short one (retries against the fenced primary all the same).
        stale_url = stack.enter_context(extra_gateway(cluster, "east", "stale", {
            "--map-prefix": stale_prefix, "--write-retry-seconds": str(STALE_WRITE_RETRY_SECONDS)}))
        service_copy = f"{cluster.plan.service_url('east')}/shards/s-zone"
        body = {"eventId": event["id"], "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
        async with aiohttp.ClientSession() as s:
            # Direct calls carry the operator's credential (internal APIs authenticate their
            # callers, common/internal_auth.py): the fence answers, not the authentication.
            async with s.post(f"{service_copy}/api/bookings", headers=AUTH,
                              json={**body, "clientReference": f"direct-{uuid.uuid4()}"}) as resp:
                doc = await resp.json(content_type=None)
                assert resp.status == 503, doc
                print(f"direct booking on the old primary: {resp.status} {doc['type']}")
            async with s.post(f"{stale_url}/api/bookings",
                              json={**body, "clientReference": f"stale-{uuid.uuid4()}"}) as resp:
                doc = await resp.json(content_type=None)
                assert resp.status != 201, doc
                print(f"booking through the stale gateway: {resp.status} {doc.get('type')}")
            async with s.get(f"{service_copy}/api/events/{event['id']}/ticket-tiers",
                             headers={"X-Boxoffice-Min-Lsn": "0/1", **AUTH}) as resp:
                assert resp.status == 503  # no read for a consistency token
            async with s.get(f"{service_copy}/api/ready") as resp:
                assert resp.status == 503  # its health check fails
        conn = await asyncpg.connect(old.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM bookings") == rows_before  # nothing written
        finally:
            await conn.close()
    finally:
        stack.close()
        service.stop()
        await asyncio.to_thread(old.stop)


def by_hand_service(cluster: Cluster) -> ManagedProcess:
    """East's booking service, started by hand (east's node agent is dead)."""
    config = json.loads((cluster.state_dir / "node-agent-east.json").read_text())
    return ManagedProcess("by-hand service east", config["service"]["argv"],
                          cluster.state_dir / "by-hand-service-east.log",
                          env={**os.environ, **config["service"]["env"]})


async def old_primary_unrewound_serves_no_read(cluster: Cluster, event: dict[str, Any]) -> None:
    """Issue 16, class 5, on s-zone: east's old primary, holding commits nobody confirmed,
    is started again IN RECOVERY BEFORE ITS REWIND, as its node agent starts it while the
    new primary does not answer, with east's booking service. By LSN alone it is ahead of
    the new primary, so a consistency token the new primary handed out would be satisfied
    there: it must not be a replica, must fail its readiness, and serve no read."""
    assert cluster.plan is not None
    old, new = cluster.databases[("s-zone", "east")], cluster.databases[("s-zone", "east/b")]
    await asyncio.to_thread(old.start_as_primary)
    conn = await asyncpg.connect(old.dsn)
    try:  # its own commits, confirmed by nobody, its WAL three segments further on
        await conn.execute("SET synchronous_commit = local")
        await conn.execute("CREATE TABLE IF NOT EXISTS unconfirmed (n int)")
        for n in range(3):
            await conn.execute("INSERT INTO unconfirmed VALUES ($1)", n)
            await conn.fetchval("SELECT pg_switch_wal()")
    finally:
        await conn.close()
    await asyncio.to_thread(old.stop)
    await asyncio.to_thread(old.start_as_standby, None)  # in recovery, unrewound
    service = by_hand_service(cluster)
    service.start()
    try:
        wait_healthy(cluster.plan.service_url("east"), service, "the by-hand booking service")
        async with aiohttp.ClientSession() as s:
            body = {"eventId": event["id"], "clientReference": f"after-{uuid.uuid4()}",
                    "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
            async with s.post(f"{gw(cluster, 'east')}/api/bookings", json=body) as resp:
                assert resp.status == 201, await resp.text()
                raw_token = resp.headers[HEADER_NAME]
            token = ConsistencyToken.parse(raw_token, cluster.token_secret.encode())
            wanted, epoch = token.position("s-zone"), token.epoch("s-zone")
            assert wanted is not None and epoch == 2, raw_token  # issued by the new primary
            replayed = await fetchval(old.dsn, "SELECT pg_last_wal_replay_lsn()::text")
            new_lsn = await fetchval(new.dsn, "SELECT pg_current_wal_lsn()::text")
            print(f"old copy replayed {replayed}; the new primary is at {new_lsn}; token {wanted}@{epoch}")
            assert lsn_to_int(str(replayed)) > lsn_to_int(wanted)  # by LSN alone: "ahead"
            service_copy = f"{cluster.plan.service_url('east')}/shards/s-zone"
            async with s.get(f"{service_copy}/api/ready", headers=AUTH) as resp:
                doc = await resp.json(content_type=None)
                print(f"old copy's readiness: {resp.status} {doc}")
                assert resp.status == 503 and doc["role"] in ("fenced", "unknown"), doc
            tiers = f"/api/events/{event['id']}/ticket-tiers"
            # The new primary's token; the same position as a v1 token (no epoch); a token
            # the old primary handed out before the failover (epoch 1, a position it has);
            # no token at all.
            for headers in ({"X-Boxoffice-Min-Lsn": wanted, "X-Boxoffice-Min-Epoch": str(epoch)},
                            {"X-Boxoffice-Min-Lsn": wanted},
                            {"X-Boxoffice-Min-Lsn": "0/1", "X-Boxoffice-Min-Epoch": "1"}, {}):
                async with s.get(f"{service_copy}{tiers}", headers={**headers, **AUTH}) as resp:
                    assert resp.status == 503, (headers, await resp.text())
            # Through every gateway, with the new primary's token: never served by east.
            for region in ("east", "west", "south"):
                for _ in range(5):
                    async with s.get(f"{gw(cluster, region)}{tiers}",
                                     headers={HEADER_NAME: raw_token}) as resp:
                        await resp.read()
                        assert resp.status == 200
                        assert resp.headers["X-Boxoffice-Served-By"] != "east", region
    finally:
        service.stop()
        await asyncio.to_thread(old.stop)


async def old_primary_comes_back_rewound(cluster: Cluster) -> None:
    """East's node agent comes back: it brings the old primary back as a rewound standby."""
    old = cluster.databases[("s-zone", "east")]
    cluster.restart_dead()
    await wait_all_healthy(cluster)
    code, shown = await run_cli(cluster, "map", "show")
    print(shown)
    assert code == 0 and "FAILING" not in shown and "?" not in shown
    conn = await asyncpg.connect(old.dsn)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
    finally:
        await conn.close()
