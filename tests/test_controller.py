"""The automatic failover controller (issue 8, acceptance 2, 3 and 4) on a cluster of its own:
regions east and west, shard c-east homed in east (zone standby east/b), c-west homed in
west (west/b), sync zone, one controller per region (`controller.enabled`).

- one controller acts, the other stands by;
- `kill -9` of a primary's postmaster under booking load: its node agent restarts it
  within the grace, so normally nothing is promoted; either way bookings go on and
  every confirmed booking is on the primary;
- the primary's whole node killed (its agent, and with it its Postgres servers and
  booking service) under load: the controller promotes a synchronous standby, bookings
  go on without an operator, every confirmed booking is on the new primary;
- SIGKILL of the active controller: the other takes the lock;
- the c-west primary's host cut off from Consul and the controllers, its own region's
  gateway still reaching it (acceptance 3): nothing only it committed is ever confirmed,
  its local commits are rewound when the links heal;
- a controller that dies right after a promotion's commit point: the next one finishes
  the promotion from its journal;
- Consul stopped while every primary is healthy: no controller acts, nothing is
  promoted or demoted.

Times (detection, promotion, hand-over) are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from deploy.procs import ManagedProcess
from deploy.services import python_process
from deploy.topology import parse_topology
from event_ops.move import journal_id as move_journal
from failover import NodeAgents
from failover.leadership import CONTROLLER_LOCK
from failover.promote import JOURNAL_KIND, PromoteError, journal_id
from failover.switchover import journal_id as switchover_journal
from failover.switchover import switchover
from region_map import BOOKING_SERVICE, FIRST_ZONE, ConsulMapStore, NotFound, Shard, passing_by_url
from tests.conftest import ADMIN_TOKEN, METRICS_AUTH, own_cluster
from tests.support import check_invariants, create_event_doc, gateway_url
from tests.test_promote import run_cli

REGIONS = ("east", "west")
TOPOLOGY = {
    "name": "test-controller",
    "regions": {"east": {"location": "East"}, "west": {"location": "West"}},
    "latency_ms": {"east/west": 5},
    "shards": {"c-east": {"home": "east"}, "c-west": {"home": "west"}},
    "postgres": {"durable": False},
    "gateway": {"write_retry_seconds": 20, "booking_rate_per_second": 1000, "booking_burst": 1000,
                "max_in_flight_reads": 1000, "max_in_flight_bookings": 1000},
    "controller": {"enabled": True, "grace_ms": 400, "lock_ttl_seconds": 1},
}
DEADLINE = 60.0


@pytest.fixture(scope="module")
def ctl_cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "controller-cluster", TOPOLOGY) as c:
        yield c


# --- helpers ---------------------------------------------------------------------------------

def store_for(cluster: Cluster) -> ConsulMapStore:
    assert cluster.consul is not None
    return ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)


async def read_shard(cluster: Cluster, name: str) -> Shard:
    async with store_for(cluster) as store:
        return (await store.read_shard(name))[0]


async def status(cluster: Cluster, region: str) -> dict[str, Any]:
    return await asyncio.to_thread(cluster.controller_status, region)


async def statuses(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {r: await status(cluster, r) for r in REGIONS}


async def poll(check: Callable[[], Awaitable[Any]], what: str, timeout: float = DEADLINE) -> Any:
    """Until `check()` returns something truthy; that."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll interval


async def the_active_one(cluster: Cluster) -> str:
    async def one() -> str | None:
        active = [r for r, doc in (await statuses(cluster)).items() if doc.get("active")]
        return active[0] if len(active) == 1 else None
    return str(await poll(one, "exactly one active controller"))


async def agent_copy(cluster: Cluster, host: str, shard: str) -> dict[str, Any]:
    doc = await asyncio.to_thread(cluster.agent_call, host, "GET", "/agent/copies", None, 5.0)
    return next(c for c in doc["copies"] if c["shard"] == shard)


async def settled(cluster: Cluster, timeout: float = 90.0) -> dict[str, Shard]:
    """Until every copy of every shard runs in its map role (standbys streaming) and passes
    its health check in Consul; the shard records then."""
    async def check() -> dict[str, Shard] | None:
        async with store_for(cluster) as store:
            region_map = await store.load()
            _, instances = await store.watch_instances(BOOKING_SERVICE, 0)
        health = passing_by_url(instances)
        for shard in region_map.shards.values():
            for key, member in shard.members.items():
                try:
                    copy = await agent_copy(cluster, key, shard.name)
                except OSError:
                    return None
                wanted = "primary" if key == shard.primary_copy else "standby"
                if not copy["running"] or copy["role"] != wanted or not health.get(member.service_url):
                    return None
                if wanted == "standby" and not (copy["positions"] or {}).get("streaming"):
                    return None
        return dict(region_map.shards)
    return dict(await poll(check, "every copy in its map role and passing", timeout))


def metric(url: str, name: str, labels: dict[str, str]) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(urllib.request.Request(url, headers=METRICS_AUTH), timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@dataclass
class Bookers:
    """Clients booking one ticket at a time through every gateway, each with a fresh
    reference, until stopped; every confirmed booking (201, or 200 for a replay)."""

    cluster: Cluster
    event: dict[str, Any]
    confirmed: list[str] = field(default_factory=list)
    confirmed_at: list[float] = field(default_factory=list)  # when each was answered (monotonic)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, session: aiohttp.ClientSession, per_gateway: int = 2,
              regions: tuple[str, ...] = REGIONS) -> None:
        self.tasks = [asyncio.create_task(self._client(session, r))
                      for r in regions for _ in range(per_gateway)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def more(self, n: int, timeout: float = DEADLINE) -> None:
        """Until `n` more bookings are confirmed than now."""
        target = len(self.confirmed) + n
        async def enough() -> bool:
            return len(self.confirmed) >= target
        await poll(enough, f"{n} more confirmed bookings (answers so far: {dict(self.answers)})", timeout)

    async def _client(self, session: aiohttp.ClientSession, region: str) -> None:
        tier = self.event["tiers"][0]["id"]
        while not self.stop.is_set():
            body = {"eventId": self.event["id"], "clientReference": f"ctl-{uuid.uuid4()}",
                    "items": [{"ticketTierId": tier, "quantity": 1}]}
            try:
                async with session.post(f"{gateway_url(self.cluster, region)}/api/bookings", json=body,
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    doc = await resp.json(content_type=None)
                    kind = str(doc.get("type", "")).rsplit("/", 1)[-1] if resp.status >= 300 else ""
                    self.answers[f"{resp.status} {kind}".strip()] += 1
                    if resp.status in (200, 201):
                        self.confirmed.append(doc["id"])
                        self.confirmed_at.append(time.monotonic())
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.answers[type(exc).__name__] += 1


async def check_confirmed_on_primary(cluster: Cluster, shard_name: str, bookers: Bookers) -> Shard:
    """Every confirmed booking is on the shard's primary now; sold + remaining = capacity."""
    shard = await read_shard(cluster, shard_name)
    dsn = cluster.databases[(shard_name, shard.primary_copy)].dsn
    conn = await asyncpg.connect(dsn)
    try:
        found = {str(r[0]) for r in await conn.fetch(
            "SELECT id FROM bookings WHERE id = ANY($1::uuid[])", bookers.confirmed)}
    finally:
        await conn.close()
    missing = [b for b in bookers.confirmed if b not in found]
    assert not missing, f"{len(missing)} confirmed bookings missing on {shard.primary_copy}: {missing[:5]}"
    await check_invariants(dsn, bookers.event["id"])
    return shard


async def new_event(cluster: Cluster, session: aiohttp.ClientSession, shard: str) -> dict[str, Any]:
    return await create_event_doc(session, gateway_url(cluster, "east"), [100_000], shard=shard)


def failover_records(doc: dict[str, Any], shard: str) -> list[dict[str, Any]]:
    return [r for r in doc.get("history") or [] if r["shard"] == shard]


def test_topology_controller_settings() -> None:
    from deploy.topology import TopologyError, load_topology

    base = {k: v for k, v in TOPOLOGY.items() if k != "controller"}
    assert parse_topology(base).controller.enabled is False  # off unless switched on
    assert load_topology().controller.enabled is True  # `boxoffice up` runs them
    settings = parse_topology(TOPOLOGY).controller
    assert (settings.enabled, settings.grace_ms, settings.lock_ttl_seconds) == (True, 400.0, 1.0)
    for bad in ({"enabled": "yes"}, {"grace_ms": -1}, {"lock_ttl_seconds": 0.5}, {"grace": 1}, []):
        with pytest.raises(TopologyError):
            parse_topology({**base, "controller": bad})


# --- acceptance 4: one controller acts ---------------------------------------------------------

async def test_exactly_one_controller_acts(ctl_cluster: Cluster) -> None:
    cluster = ctl_cluster
    assert cluster.plan is not None
    active = await the_active_one(cluster)
    standby = next(r for r in REGIONS if r != active)
    docs = await statuses(cluster)
    assert docs[active]["holder"]["region"] == active
    assert docs[standby]["active"] is False and docs[standby]["holder"]["region"] == active
    async with store_for(cluster) as store:
        lock = await store.lock_holder(CONTROLLER_LOCK)
    assert lock.session is not None and lock.value is not None and lock.value["region"] == active
    for region, expected in ((active, 1.0), (standby, 0.0)):
        url = f"{cluster.plan.controller_url(region)}/metrics"
        value = await asyncio.to_thread(metric, url, "boxoffice_controller_active", {"region": region})
        assert value == expected
    print(f"active: {active} (pid {lock.value['pid']}), standby: {standby}")


# --- acceptance 2: kill -9 of a primary's postmaster, then of its whole node ---------------------

async def test_kill_9_of_the_primary_postmaster_under_load(ctl_cluster: Cluster) -> None:
    cluster = ctl_cluster
    shard = "c-east"
    before = (await settled(cluster))[shard]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        bookers = Bookers(cluster, await new_event(cluster, session, shard))
        bookers.start(session)
        try:
            await bookers.more(20)
            copy = await agent_copy(cluster, before.primary_copy, shard)
            killed_at = time.monotonic()
            os.kill(copy["pid"], signal.SIGKILL)
            await bookers.more(40)
            recovered = time.monotonic() - killed_at
        finally:
            await bookers.finish()
    after = await check_confirmed_on_primary(cluster, shard, bookers)
    promoted = (after.primary_copy, after.epoch) != (before.primary_copy, before.epoch)
    print(f"postmaster of {shard}@{before.primary_copy} killed: 40 more bookings confirmed "
          f"{recovered:.2f}s later; {'PROMOTED ' + after.primary_copy if promoted else 'no promotion'} "
          f"(epoch {before.epoch} -> {after.epoch}); {len(bookers.confirmed)} confirmed, "
          f"answers {dict(bookers.answers)}")
    await settled(cluster)


async def test_losing_the_primarys_node_fails_over_without_an_operator(ctl_cluster: Cluster) -> None:
    cluster = ctl_cluster
    shard = "c-east"
    before = (await settled(cluster))[shard]
    node = before.primary_copy  # a host is named like the copies it holds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        bookers = Bookers(cluster, await new_event(cluster, session, shard))
        bookers.start(session)
        try:
            await bookers.more(20)
            killed_at = time.monotonic()
            # The node dies: its agent, and with it (parent-death signals) its Postgres
            # servers and its booking service.
            cluster.agents[node].kill()
            async def moved() -> Shard | None:
                record = await read_shard(cluster, shard)
                return record if record.epoch > before.epoch else None
            moved_to = await poll(moved, "the map naming a new primary")
            map_changed = time.monotonic() - killed_at
            await bookers.more(40)
            recovered = time.monotonic() - killed_at
        finally:
            await bookers.finish()
    after = await check_confirmed_on_primary(cluster, shard, bookers)
    assert moved_to.primary_copy == after.primary_copy != node
    assert after.epoch == before.epoch + 1
    assert after.primary_copy in before.sync_standbys
    assert after.primary_copy == f"{node}/b"  # failover stays home: the zone standby
    active = await the_active_one(cluster)
    record = failover_records(await status(cluster, active), shard)[-1]
    assert record["outcome"] == "promoted" and record["target"] == after.primary_copy
    print(f"node {node} killed: map names {after.primary_copy} after {map_changed:.2f}s, 40 more "
          f"bookings confirmed after {recovered:.2f}s; controller {active}: detected "
          f"{record['detectedAt']}, confirm {record['confirmSeconds']}s, promote "
          f"{record['promoteSeconds']}s, detection to promoted {record['totalSeconds']}s; steps "
          f"{[(s['name'], s['seconds']) for s in record['steps']]}; {len(bookers.confirmed)} confirmed, "
          f"answers {dict(bookers.answers)}")
    assert cluster.restart_dead() == [f"node-agent[{node}]"]
    await settled(cluster)  # the old primary is back, as a standby of the new one


# --- acceptance 4: hand-over, and a failover finished by the next controller ----------------------

async def test_killing_the_active_controller_hands_over(ctl_cluster: Cluster) -> None:
    cluster = ctl_cluster
    active = await the_active_one(cluster)
    other = next(r for r in REGIONS if r != active)
    killed_at = time.monotonic()
    cluster.controllers[active].kill()

    async def took_over() -> bool:
        return bool((await status(cluster, other)).get("active"))
    await poll(took_over, f"controller {other} taking the lock")
    print(f"controller {active} killed: {other} active {time.monotonic() - killed_at:.2f}s later")
    async with store_for(cluster) as store:
        lock = await store.lock_holder(CONTROLLER_LOCK)
    assert lock.value is not None and lock.value["region"] == other
    assert cluster.restart_dead() == [f"controller[{active}]"]

    async def standing_by() -> bool:
        doc = await status(cluster, active)
        return doc.get("active") is False and (doc.get("holder") or {}).get("region") == other
    await poll(standing_by, f"the restarted controller {active} standing by")


# --- issue 8, acceptance 3: a primary cut off from Consul and the controllers -----------------

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
        ctl_cluster: Cluster) -> None:
    """The delay proxy cuts every link of the c-west primary's host except its own
    region's gateway, which reaches it directly (deploy/cluster.py `Cluster.cut`):
    - its node agent and booking service no longer reach Consul (they keep the map they
      had: an unreachable Consul demotes nothing, so it stays a running primary);
    - Consul's health checks of it time out, so its instances go critical, as a
      partitioned node's checks do; the controllers' probes of its node agent time out too;
    - its standbys no longer receive its WAL.

    Bookings keep flowing through that region's gateway only. The controller promotes the zone
    standby. The old primary still takes bookings its gateway sent before the map moved
    on, commits them locally and cannot confirm them (its synchronous standby is gone):
    503 not-confirmed, retried by the gateway under the same key, to the new primary once
    the map names it. Asserted: no confirmed booking (201 or replayed 200) exists only on
    the old primary, every confirmed booking is on the new primary, the old primary holds
    local commits while isolated, and when the links heal its node agent sees the new
    map, rewinds it and it follows the new primary: its local commits are gone. Times
    are printed. (On this module's cluster, before the test that moves c-west's primary
    off its region's first host: a gateway reaches only that host directly.)"""
    cluster = ctl_cluster
    shard = "c-west"
    before = (await settled(cluster))[shard]
    old = before.primary_copy
    assert "/" not in old, f"{shard}'s primary {old} is not its region's first host"
    region = before.members[old].region
    old_dsn = cluster.databases[(shard, old)].dsn
    host = f"{old}/{FIRST_ZONE}"  # a bare name is a region
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        event = await new_event(cluster, session, shard)
        bookers = Bookers(cluster, event)
        bookers.start(session, per_gateway=4, regions=(region,))
        try:
            await bookers.more(20, 90)
            cut_at = time.monotonic()
            cut = await asyncio.to_thread(cluster.cut, host)
            print(f"cut host {old} off: {len(cut)} links: {', '.join(sorted(cut))}")
            assert f"{old} -> consul" in cut and f"consul -> {old}" in cut and f"control -> {old}" in cut
            assert not any(c.startswith(f"gateway:{region} ->") for c in cut)

            async def moved() -> Shard | None:
                record = await read_shard(cluster, shard)
                return record if record.epoch > before.epoch else None
            new = await poll(moved, "the controller promoting another copy")
            map_changed = time.monotonic()
            assert new.primary_copy != old and new.primary_copy in before.sync_standbys
            await bookers.more(20, 90)
            recovered = time.monotonic() - cut_at

            # Still cut off: the old primary runs as a primary (its agent cannot read the
            # map) and holds local commits that no standby has.
            isolated = await agent_copy(cluster, old, shard)
            assert isolated["running"] and isolated["role"] == "primary", isolated
            # The bookings confirmed so far, taken BEFORE the copies are read: the clients
            # go on booking, and one confirmed after the read is not in it yet.
            so_far = list(zip(bookers.confirmed_at, bookers.confirmed, strict=True))
            new_dsn = cluster.databases[(shard, new.primary_copy)].dsn
            on_old = await event_booking_ids(old_dsn, event["id"])
            on_new = await event_booking_ids(new_dsn, event["id"])
            local_only = on_old - on_new
            confirmed = {b for _, b in so_far}
            assert local_only, "the isolated primary committed nothing locally: the scenario did not happen"
            assert not local_only & confirmed, (
                f"confirmed bookings only on the isolated old primary: {sorted(local_only & confirmed)[:5]}")
            late = [b for t, b in so_far if t > map_changed]
            assert late and not set(late) - on_new
            print(f"isolated {old}: {len(on_old)} bookings of the event on it, {len(local_only)} of them "
                  f"local commits no client was told of; map names {new.primary_copy} (epoch "
                  f"{before.epoch} -> {new.epoch}) {map_changed - cut_at:.2f}s after the cut; 20 more "
                  f"confirmed {recovered:.2f}s after it; answers {dict(bookers.answers)}")

            healed_at = time.monotonic()
            await asyncio.to_thread(cluster.heal, host)

            async def rejoined() -> dict[str, Any] | None:
                copy = await agent_copy(cluster, old, shard)
                streaming = (copy.get("positions") or {}).get("streaming")
                return copy if copy["running"] and copy["role"] == "standby" and streaming else None
            copy = await poll(rejoined, "the old primary back as a streaming standby", 90)
            rejoined_after = time.monotonic() - healed_at
            await bookers.more(10, 90)
        finally:
            await bookers.finish()
            await asyncio.to_thread(cluster.heal, host)  # whatever happened: the next tests need it

    # The old primary follows the new one now: its local commits were discarded.
    new_dsn = cluster.databases[(shard, new.primary_copy)].dsn
    on_new = await event_booking_ids(new_dsn, event["id"])

    async def caught_up() -> set[str] | None:
        ids = await event_booking_ids(old_dsn, event["id"])
        return ids if ids == on_new else None
    on_old_after = await poll(caught_up, "the rewound old primary replaying the new primary's bookings")
    assert not local_only & on_old_after
    missing = set(bookers.confirmed) - on_new
    assert not missing, f"{len(missing)} confirmed bookings missing on {new.primary_copy}"
    await check_invariants(new_dsn, event["id"])
    print(f"healed: {old} a streaming standby of {new.primary_copy} {rejoined_after:.2f}s later "
          f"(restarts {copy.get('restarts')}); its {len(local_only)} local commits discarded; "
          f"{len(on_new)} bookings on the new primary, all {len(bookers.confirmed)} confirmed among them")
    await settled(cluster)


async def test_a_failover_cut_short_after_its_commit_point_is_finished_by_the_next_controller(
        ctl_cluster: Cluster) -> None:
    cluster = ctl_cluster
    plan = cluster.plan
    assert plan is not None
    shard = "c-west"
    before = (await settled(cluster))[shard]
    node = before.primary_copy
    for proc in cluster.controllers.values():
        proc.stop()  # SIGTERM: each destroys its session, the lock is free at once
    # Two controllers of our own: the first dies right after the commit point of the
    # promotion it runs (a test-only fault hook), the second must finish it.
    faulty_region, next_region = "east", "west"
    hand: dict[str, ManagedProcess] = {}

    def start(region: str, env: dict[str, str]) -> ManagedProcess:
        proc = python_process(f"test controller[{region}]", "failover",
                              cluster.controller_args(plan, region),
                              cluster.state_dir / f"test-controller-{region}.log",
                              env={"BOXOFFICE_ADMIN_TOKEN": ADMIN_TOKEN, **env})
        proc.start()
        hand[region] = proc
        return proc

    try:
        faulty = start(faulty_region, {"BOXOFFICE_CONTROLLER_FAULT": "exit-after:commit"})

        async def faulty_active() -> bool:
            return bool((await status(cluster, faulty_region)).get("active"))
        await poll(faulty_active, "the faulty controller active")
        start(next_region, {})

        async def next_standing_by() -> bool:
            return (await status(cluster, next_region)).get("active") is False
        await poll(next_standing_by, "the second controller standing by")

        cluster.agents[node].kill()

        async def faulty_exited() -> bool:
            return not faulty.running()
        await poll(faulty_exited, "the faulty controller dying after the commit point")
        died_at = time.monotonic()
        assert faulty.popen is not None and faulty.popen.returncode == 70  # the fault fired
        committed = await read_shard(cluster, shard)
        assert committed.epoch == before.epoch + 1 and committed.primary_copy != node  # the commit point
        async with store_for(cluster) as store:
            try:
                journal, _ = await store.read_journal(journal_id(shard))
                left = f"journal left: phase {journal.get('phase')}"
            except NotFound:
                left = "journal already finished"

        async def finished() -> dict[str, Any] | None:
            doc = await status(cluster, next_region)
            done = [r for r in failover_records(doc, shard) if r["outcome"] == "finished"]
            return done[-1] if doc.get("active") and done else None
        record = await poll(finished, "the second controller finishing the promotion")
        print(f"faulty controller died after the commit ({left}); {next_region} finished the promotion "
              f"to {committed.primary_copy} {time.monotonic() - died_at:.2f}s after: {record}")
        copy = await agent_copy(cluster, committed.primary_copy, shard)
        assert copy["role"] == "primary" and copy["epoch"] == committed.epoch
        async with store_for(cluster) as store:
            assert await store.list_journals(JOURNAL_KIND) == {}
        # The lost node comes back now: its old primary is rewound into a standby while
        # bookings are checked on the new one.
        cluster.agents[node].start()
        async with aiohttp.ClientSession() as session:
            event = await new_event(cluster, session, shard)
            bookers = Bookers(cluster, event)
            bookers.start(session, per_gateway=1)
            try:
                await bookers.more(10)
            finally:
                await bookers.finish()
        await check_confirmed_on_primary(cluster, shard, bookers)
    finally:
        for proc in hand.values():
            proc.stop()
    assert sorted(cluster.restart_dead()) == sorted(f"controller[{r}]" for r in REGIONS)
    await the_active_one(cluster)
    await settled(cluster)


# --- Consul unreachable: nothing happens ------------------------------------------------------

async def test_an_unreachable_consul_causes_no_failover_and_no_demotion(ctl_cluster: Cluster) -> None:
    cluster = ctl_cluster
    assert cluster.consul is not None
    before = await settled(cluster)
    histories = {r: len(doc.get("history") or []) for r, doc in (await statuses(cluster)).items()}
    stopped_at = time.monotonic()
    cluster.consul.stop()
    try:
        async def all_standing_down() -> bool:
            docs = await statuses(cluster)
            return all(d.get("active") is False and d.get("consulReachable") is False for d in docs.values())
        await poll(all_standing_down, "every controller standing down without Consul")
        print(f"consul stopped: no controller active {time.monotonic() - stopped_at:.2f}s later")
        for shard in before.values():  # the node agents keep every role without Consul
            copy = await agent_copy(cluster, shard.primary_copy, shard.name)
            assert copy["running"] and copy["role"] == "primary"
    finally:
        await asyncio.to_thread(cluster.consul.start)
    restarted_at = time.monotonic()
    active = await the_active_one(cluster)
    after = await settled(cluster)  # every check passes again (they restart critical)
    rounds = (await status(cluster, active))["rounds"]

    async def evaluated_since() -> bool:  # a few full rounds after every check passed again
        doc = await status(cluster, active)
        return bool(doc.get("active")) and doc["rounds"] >= rounds + 3
    await poll(evaluated_since, "the active controller evaluating again")
    print(f"consul back: {active} active and every copy passing {time.monotonic() - restarted_at:.2f}s later")
    assert {n: (s.primary_copy, s.epoch) for n, s in after.items()} == \
        {n: (s.primary_copy, s.epoch) for n, s in before.items()}
    assert {r: len(doc.get("history") or []) for r, doc in (await statuses(cluster)).items()} == histories
    async with store_for(cluster) as store:
        assert await store.list_journals(JOURNAL_KIND) == {}


# --- abandoned event moves: the controller settles them ---------------------------------------

@pytest.mark.parametrize(("killed_after", "settled_as"), [("freeze", "rolled-back"),
                                                          ("flip", "done")])
async def test_the_controller_settles_a_move_whose_runner_died(
        ctl_cluster: Cluster, killed_after: str, settled_as: str) -> None:
    """`boxoffice event move` SIGKILLed right after a step: nobody runs it again, and the
    active controller finishes it past its flip, or rolls it back before it, so the event
    takes bookings again without an operator."""
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gateway_url(ctl_cluster, "east"), [1000], shard="c-east")
        code, out = await run_cli(ctl_cluster, "event", "move", event["id"], "--to-shard",
                                  "c-west", "--lease-ttl", "1",
                                  env={"BOXOFFICE_MOVE_KILL_AFTER": killed_after})
        assert code == -9, out  # killed right after the step's journal

        async def settled_journal() -> dict[str, Any] | None:
            async with store_for(ctl_cluster) as store:
                doc, _ = await store.read_journal(move_journal(event["id"]))
            return doc if doc.get("state") == settled_as else None

        await poll(settled_journal, f"the controller to leave the move {settled_as}", 30.0)
        async with store_for(ctl_cluster) as store:
            placed, _ = await store.read_placement(event["id"])
        assert placed == ("c-west" if settled_as == "done" else "c-east")
        # The event takes bookings again, on the shard that has it.
        async with s.post(f"{gateway_url(ctl_cluster, 'west')}/api/bookings", json={
                "eventId": event["id"],
                "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}) as resp:
            assert resp.status == 201, await resp.text()
    dsn = ctl_cluster.databases[(placed, "east" if placed == "c-east" else "west")].dsn
    tiers = await check_invariants(dsn, event["id"])
    assert sum(t["sold"] for t in tiers.values()) == 1


# --- issue 16, class 2: a switchover whose old primary's host is lost ---------------------------

async def test_a_switchover_whose_old_primary_host_is_lost_clears_its_transition_and_fails_over(
        ctl_cluster: Cluster) -> None:
    """`switchover c-east --to <its zone standby>`, and right after its check the old primary's host is
    lost (its node agent frozen, its postmaster killed). The switchover cannot read the
    old primary's last position and rolls back: it clears the transition first (the
    gateways stop holding the shard's writes) and leaves the restart of the lost primary
    to later; the controller then fails the shard over to its home zone standby, and
    bookings succeed within the bound, the lost host still frozen. When the host comes
    back, the switchover's journal is cleared and the old primary follows the new one.
    Before issue 16 the rollback waited 120 s on the frozen agent before clearing the
    transition, and the controller left a shard in transition alone for ever."""
    cluster = ctl_cluster
    shard = "c-east"
    before = (await settled(cluster))[shard]
    old = before.primary_copy  # east, or east/b when an earlier test left it there
    partner = next(k for k, m in before.members.items()
                   if m.region == before.members[old].region and k != old)  # the zone standby
    assert partner in before.sync_standbys
    postmaster = (await agent_copy(cluster, old, shard))["pid"]
    agent = cluster.agents[old]
    assert agent.pid is not None and postmaster

    async def lose_old_host_after_check(step: str) -> None:
        if step == "check":
            os.kill(agent.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            os.kill(postmaster, signal.SIGKILL)

    async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
        run = asyncio.create_task(switchover(store, agents, shard, partner,
                                             fault_hook=lose_old_host_after_check))
        try:
            async def failed_over() -> Shard | None:
                record = await read_shard(cluster, shard)
                return record if record.epoch > before.epoch and record.transition is None else None
            moved = await poll(failed_over, "the transition cleared and the shard failed over", 60)
            assert moved.primary_copy == partner and moved.epoch == before.epoch + 1  # home
            async with aiohttp.ClientSession() as session:
                async def created() -> dict[str, Any] | None:
                    try:  # the map names it at its commit point: promoted a moment later
                        return await new_event(cluster, session, shard)
                    except AssertionError:
                        return None
                bookers = Bookers(cluster, await poll(created, "an event created on the new primary"))
                bookers.start(session, per_gateway=1)
                try:
                    await bookers.more(10)
                finally:
                    await bookers.finish()
            await check_confirmed_on_primary(cluster, shard, bookers)
            with pytest.raises(PromoteError) as failed:
                await asyncio.wait_for(run, 30)
            print(f"switchover: {failed.value.kind}: {failed.value.detail}; the controller promoted "
                  f"{moved.primary_copy} at epoch {moved.epoch}; answers {dict(bookers.answers)}")
        finally:
            os.kill(agent.pid, signal.SIGCONT)  # type: ignore[arg-type]  # the host comes back
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run

    async def journal_gone() -> bool:
        async with store_for(cluster) as store:
            try:
                await store.read_journal(switchover_journal(shard))
            except NotFound:
                return True
        return False
    # Bound generous: the host's copy is rewound first, and once (load average ~50) the
    # controller's promotion returned ~100 s after its promote step, holding the shard.
    await poll(journal_gone, "the superseded switchover's journal cleared", 180)
    await settled(cluster)
    code, out = await run_cli(cluster, "shard", "switchover", shard, "--to", old)  # back home
    assert code == 0, out
    assert (await settled(cluster))[shard].primary_copy == old
