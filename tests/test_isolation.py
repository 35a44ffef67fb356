"""A primary cut off from Consul and the controllers, but still reachable from its own
region's gateway (issue 8, acceptance 3), on a cluster of its own: regions east and west,
shard i-east homed in east (zone standby east/b), sync zone, controllers on.

The delay proxy cuts every link of host `east` (the primary's) except its own region's
gateway, which reaches it directly (deploy/cluster.py `Cluster.cut`):
- its node agent and booking service no longer reach Consul (they keep the map they
  had: an unreachable Consul demotes nothing, so it stays a running primary);
- Consul's health checks of it time out, so its instances go critical, as a partitioned
  node's checks do; the controllers' probes of its node agent time out too;
- its standbys (east/b, west) no longer receive its WAL.

Bookings keep flowing through east's gateway. The controller promotes east/b. The old
primary still takes bookings its gateway sent before the map moved on, commits them
locally and cannot confirm them (its synchronous standby is gone): 503 not-confirmed,
retried by the gateway under the same key, to the new primary once the map names it.
Asserted: no confirmed booking (201 or replayed 200) exists only on the old primary,
every confirmed booking is on the new primary, the old primary holds local commits
while isolated, and when the links heal its node agent sees the new map, rewinds it
and it follows the new primary: its local commits are gone. Times are printed.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from region_map import FIRST_ZONE, Shard
from tests.conftest import own_cluster
from tests.support import check_invariants, create_event_doc, gateway_url
from tests.test_controller import agent_copy, poll, read_shard, settled

SHARD = "i-east"
TOPOLOGY = {
    "name": "test-isolation",
    "regions": {"east": {"location": "East"}, "west": {"location": "West"}},
    "latency_ms": {"east/west": 5},
    "shards": {SHARD: {"home": "east"}, "i-west": {"home": "west"}},
    "postgres": {"durable": False},
    "gateway": {"write_retry_seconds": 20, "booking_rate_per_second": 1000, "booking_burst": 1000,
                "max_in_flight_reads": 1000, "max_in_flight_bookings": 1000},
    "controller": {"enabled": True, "grace_ms": 400, "lock_ttl_seconds": 1},
}


@pytest.fixture(scope="module")
def iso_cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "isolation-cluster", TOPOLOGY) as c:
        yield c


@dataclass
class EastBookers:
    """Clients booking one ticket at a time through east's gateway only, each booking
    with a fresh reference; every confirmed booking with the time it was answered."""

    cluster: Cluster
    event: dict[str, Any]
    confirmed: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, booking id)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, session: aiohttp.ClientSession, clients: int = 4) -> None:
        self.tasks = [asyncio.create_task(self._client(session)) for _ in range(clients)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    def ids(self) -> list[str]:
        return [b for _, b in self.confirmed]

    async def more(self, n: int, timeout: float = 90.0) -> None:
        target = len(self.confirmed) + n

        async def enough() -> bool:
            return len(self.confirmed) >= target
        await poll(enough, f"{n} more confirmed bookings (answers: {dict(self.answers)})", timeout)

    async def _client(self, session: aiohttp.ClientSession) -> None:
        tier = self.event["tiers"][0]["id"]
        while not self.stop.is_set():
            body = {"eventId": self.event["id"], "clientReference": f"iso-{uuid.uuid4()}",
                    "items": [{"ticketTierId": tier, "quantity": 1}]}
            try:
                async with session.post(f"{gateway_url(self.cluster, 'east')}/api/bookings", json=body,
                                        timeout=aiohttp.ClientTimeout(total=40)) as resp:
                    doc = await resp.json(content_type=None)
                    kind = str(doc.get("type", "")).rsplit("/", 1)[-1] if resp.status >= 300 else ""
                    self.answers[f"{resp.status} {kind}".strip()] += 1
                    if resp.status in (200, 201):
                        self.confirmed.append((time.monotonic(), doc["id"]))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.answers[type(exc).__name__] += 1


async def event_booking_ids(dsn: str, event_id: str) -> set[str]:
    """The ids of the event's bookings stored in one copy's database (read directly: the
    test stands outside the simulated network)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT id FROM bookings WHERE event_id = $1::uuid", event_id)
    finally:
        await conn.close()
    return {str(r[0]) for r in rows}


async def test_an_isolated_primary_confirms_nothing_and_its_local_commits_are_rewound(
        iso_cluster: Cluster) -> None:
    cluster = iso_cluster
    before = (await settled(cluster))[SHARD]
    old = before.primary_copy
    old_dsn = cluster.databases[(SHARD, old)].dsn
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        event = await create_event_doc(session, gateway_url(cluster, "east"), [100_000], shard=SHARD)
        bookers = EastBookers(cluster, event)
        bookers.start(session)
        try:
            await bookers.more(20)
            cut_at = time.monotonic()
            host = old if "/" in old else f"{old}/{FIRST_ZONE}"  # a bare name is a region
            cut = await asyncio.to_thread(cluster.cut, host)
            print(f"cut host {old} off: {len(cut)} links: {', '.join(sorted(cut))}")
            assert f"{old} -> consul" in cut and f"consul -> {old}" in cut and f"control -> {old}" in cut
            assert not any(c.startswith("gateway:east ->") and c.endswith(f"> {old}") for c in cut)

            async def moved() -> Shard | None:
                record = await read_shard(cluster, SHARD)
                return record if record.epoch > before.epoch else None
            new = await poll(moved, "the controller promoting another copy", 60)
            map_changed = time.monotonic()
            assert new.primary_copy != old and new.primary_copy in before.sync_standbys
            await bookers.more(20)
            recovered = time.monotonic() - cut_at

            # Still cut off: the old primary runs as a primary (its agent cannot read the
            # map) and holds local commits that no standby has.
            isolated = await agent_copy(cluster, old, SHARD)
            assert isolated["running"] and isolated["role"] == "primary", isolated
            new_dsn = cluster.databases[(SHARD, new.primary_copy)].dsn
            on_old = await event_booking_ids(old_dsn, event["id"])
            on_new = await event_booking_ids(new_dsn, event["id"])
            local_only = on_old - on_new
            confirmed = set(bookers.ids())
            assert local_only, "the isolated primary committed nothing locally: the scenario did not happen"
            assert not local_only & confirmed, (
                f"confirmed bookings only on the isolated old primary: {sorted(local_only & confirmed)[:5]}")
            late = [b for t, b in bookers.confirmed if t > map_changed]
            assert late and not set(late) - on_new
            print(f"isolated {old}: {len(on_old)} bookings of the event on it, {len(local_only)} of them "
                  f"local commits no client was told of; map names {new.primary_copy} (epoch "
                  f"{before.epoch} -> {new.epoch}) {map_changed - cut_at:.2f}s after the cut; 20 more "
                  f"confirmed {recovered:.2f}s after it; answers {dict(bookers.answers)}")

            healed_at = time.monotonic()
            await asyncio.to_thread(cluster.heal, host)

            async def rejoined() -> dict[str, Any] | None:
                copy = await agent_copy(cluster, old, SHARD)
                streaming = (copy.get("positions") or {}).get("streaming")
                return copy if copy["running"] and copy["role"] == "standby" and streaming else None
            copy = await poll(rejoined, "the old primary back as a streaming standby", 90)
            rejoined_after = time.monotonic() - healed_at
            await bookers.more(10)
        finally:
            await bookers.finish()

    # The old primary follows the new one now: its local commits were discarded.
    new_dsn = cluster.databases[(SHARD, new.primary_copy)].dsn
    on_new = await event_booking_ids(new_dsn, event["id"])

    async def caught_up() -> set[str] | None:
        ids = await event_booking_ids(old_dsn, event["id"])
        return ids if ids == on_new else None
    on_old_after = await poll(caught_up, "the rewound old primary replaying the new primary's bookings")
    assert not local_only & on_old_after
    missing = set(bookers.ids()) - on_new
    assert not missing, f"{len(missing)} confirmed bookings missing on {new.primary_copy}"
    await check_invariants(new_dsn, event["id"])
    print(f"healed: {old} a streaming standby of {new.primary_copy} {rejoined_after:.2f}s later "
          f"(restarts {copy.get('restarts')}); its {len(local_only)} local commits discarded; "
          f"{len(on_new)} bookings on the new primary, all {len(bookers.confirmed)} confirmed among them")
    await settled(cluster)
