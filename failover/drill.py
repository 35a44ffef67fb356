"""Failover drills: a fault under booking load, then a report of what clients saw.

`run_drill(cluster, DrillSettings(shard, kind, manual))`; `boxoffice drill failover`
runs it against the cluster `boxoffice up` started (its cluster.json), the tests and
`loadtest.failover` in-process (`DrillCluster.from_cluster`), a gateway through the
platform's operator interfaces (gateway/drills_api.py). The parts: what a drill
reaches and its faults (failover/drill_cluster.py, failover/holddown.py), the booking
load (failover/drill_load.py), the waits and what a fault should lead to
(failover/drill_waits.py), the report (failover/drill_report.py). In order:

1. full strength first: every copy of every shard running in its map role (standbys
   streaming) and passing its Consul check; for an automatic drill that kills hosts, a
   failover controller holding the lock (else it is refused: nothing would promote);
   one fresh event per shard (large capacity, created through a gateway's operator API).
2. load: booking clients on every shard's event through every gateway.
3. the fault, at a recorded instant: `kill-primary` SIGKILLs the node agent of the
   shard's primary's host (the host dies: its Postgres servers and booking service die
   with their agent); `kill-zone` every host of that zone; `kill-region` every host of
   that region; `switchover` a planned switchover to the first streaming standby of the
   synchronous set (failover/switchover.py). A killed host is held down until step 5
   (failover/holddown.py): no supervisor starts it behind the drill's back. With
   `manual` the controllers are paused (SIGSTOP) for the drill and the drill itself
   detects the dead primary (its node agent's probe) and runs the promotion primitive,
   to the candidate the controller would choose.
   Before the fault the drill decides what the platform's rules make of it
   (`no_failover_expected`): when the fault also kills a member of the shard's
   synchronous standby set (`kill-region` of a `sync: zone` shard's home region), no
   copy may be promoted by itself (failover/promote.py) and an operator decides; the
   drill then expects no failover, keeps the host down `outage_seconds`, checks the map
   did not change, restores the host and waits for writes to come back with it.
4. recovery: the map names a new primary (the shard record's epoch grows); every
   gateway's map reaches that index (`/api/ready` with the operator token); every
   shard has a confirmed booking answered after the change; load goes on a little.
   The wait for the new primary ends on the first of:
   - the map change (outcome `failed-over`);
   - the old primary back as the map's primary and taking bookings again before any
     promotion (outcome `survived-without-failover`, with why: something other than
     the drill restarted it; nothing will promote it away);
   - (automatic) no failover controller holding the lock for `NO_CONTROLLER_SECONDS`
     while the old primary's host does not answer: the drill fails, saying so (nothing
     will promote, nothing is coming back);
   - (switchover) the switchover ending without a new primary: the drill fails with
     the switchover's own error;
   - the timeout: the drill fails, with each copy as its agent reports it.
5. full strength again: what was killed is released and restarted, the controllers
   resumed, and the drill waits for every copy as in 1. On every way out of a drill
   that faulted hosts (a failed one too), they are released and restarted.
6. the databases: on each shard's primary, every confirmed booking of the run exists,
   sold + remaining = capacity for every tier, no reference on two bookings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from failover.agents import AgentError, NodeAgents
from failover.drill_cluster import Auditor, DrillCluster, DrillError, Faults, ShardAudit
from failover.drill_load import Load
from failover.drill_report import (
    FAILED_OVER,
    SURVIVED,
    Facts,
    build_report,
    dumps,
    format_report,
    wall,
)
from failover.drill_waits import NO_CONTROLLER_SECONDS, Change, Waits, no_failover_expected
from region_map import BOOKING_SERVICE, ConsulMapStore, MapError, NotFound, Shard, passing_by_url

__all__ = ["FAILED_OVER", "KINDS", "SURVIVED", "Auditor", "Change", "DrillCluster", "DrillError",
           "DrillSettings", "Faults", "ShardAudit", "dumps", "format_report", "no_failover_expected",
           "run_drill"]

KINDS = ("kill-primary", "kill-zone", "kill-region", "switchover")
REPORT_KIND = "drill-"  # reports kept beside the operation journals, for the operator console
AGENT_STATUS_TIMEOUT = 10.0  # seconds for a node agent's GET /agent/copies


@dataclass(frozen=True)
class DrillSettings:
    shard: str
    kind: str = "kill-primary"
    manual: bool = False
    clients_per_gateway: int = 2  # on the drilled shard's event, per gateway
    other_clients_per_gateway: int = 1  # on each other shard's event, per gateway
    rate_per_client: float = 4.0  # bookings per second, under a gateway's per-client limit
    warmup_seconds: float = 2.0  # load before the fault
    after_seconds: float = 3.0  # load after every shard took a booking again
    timeout: float = 120.0  # for each wait (full strength, recovery)
    outage_seconds: float = 10.0  # how long a host stays down when no failover is expected
    no_controller_seconds: float = NO_CONTROLLER_SECONDS  # then nothing will promote



class _Drill(Waits):
    def __init__(self, cluster: DrillCluster, settings: DrillSettings,
                 progress: Callable[[str], None]) -> None:
        self.c = cluster
        self.s = settings
        self.say = progress
        self.store = ConsulMapStore(host=cluster.consul_host, port=cluster.consul_port,
                                    prefix=cluster.map_prefix, token=cluster.consul_token)
        # An observer on a loaded host: an agent's status may take seconds (2 s, the
        # controller's probe timeout, failed drills on agents that answered).
        self.agents = NodeAgents(self.store, cluster.admin_token, status_timeout=AGENT_STATUS_TIMEOUT)
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {cluster.admin_token}"})
        self.shards: dict[str, Shard] = {}

    async def close(self) -> None:
        await self.http.close()
        await self.agents.close()
        await self.store.close()

    async def keep(self, report: dict[str, Any]) -> None:
        """Keep the report beside the journals, `drill-<shard>-<kind>` (the latest of each),
        where the operator console shows it; a store that does not answer loses only that."""
        name = f"{REPORT_KIND}{report['shard']}-{report['kind']}"
        with contextlib.suppress(MapError):
            try:
                _, index = await self.store.read_journal(name)
            except NotFound:
                index = 0
            await self.store.put_journal(name, report, index)

    # -- cluster state ----------------------------------------------------------------------
    async def full_strength(self) -> dict[str, Shard]:
        """Until every copy runs in its map role (standbys streaming) and passes its check."""
        deadline = time.monotonic() + self.s.timeout
        last = "nothing read yet"
        while True:
            try:
                shards = dict((await self.store.load()).shards)
                _, instances = await self.store.watch_instances(BOOKING_SERVICE, 0)
                health = passing_by_url(instances)
                await self.agents.refresh()
                lacking = []
                for shard in shards.values():
                    for key, member in shard.members.items():
                        wanted = "primary" if key == shard.primary_copy else "standby"
                        try:
                            copy = await self.agents.copy_status(key, shard.name)
                        except AgentError:
                            lacking.append(f"{shard.name}@{key} (agent)")
                            continue
                        if copy.role != wanted or (wanted == "standby" and not copy.streaming) \
                                or not health.get(member.service_url):
                            lacking.append(f"{shard.name}@{key}")
                if not lacking:
                    return shards
                last = ", ".join(lacking)
            except MapError as exc:
                last = f"Consul: {exc}"
            if time.monotonic() > deadline:
                raise DrillError(f"the cluster is not at full strength: {last}")
            await asyncio.sleep(0.2)  # poll interval

    async def create_events(self, shards: list[str]) -> dict[str, dict[str, Any]]:
        gateway = next(iter(self.c.gateways.values()))
        events = {}
        for shard in shards:
            # Unlisted: never in the public listing; readable by id, bookable, audited.
            body = {"name": f"Failover drill {uuid.uuid4().hex[:8]}", "venue": "Drill Hall",
                    "startsAt": "2030-01-01T20:00:00Z", "currency": "USD", "shard": shard,
                    "unlisted": True,
                    "tiers": [{"name": "Drill", "priceCents": 100, "capacity": 1_000_000}]}
            async with self.http.post(f"{gateway}/admin/events", json=body) as resp:
                doc = await resp.json(content_type=None)
                if resp.status != 201:
                    raise DrillError(f"creating the drill's event on {shard}: {resp.status} {doc}")
            events[shard] = doc
        return events

    async def gateway_index(self, url: str) -> int | None:
        try:
            async with self.http.get(f"{url}/api/ready", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                doc = await resp.json(content_type=None)
            return int(doc["map"]["index"])
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
            return None

    async def map_at_gateways(self, index: int, since: float) -> dict[str, float]:
        """Seconds from `since` until each gateway's map reached `index`."""
        async def one(region: str, url: str) -> tuple[str, float]:
            deadline = time.monotonic() + self.s.timeout
            while (got := await self.gateway_index(url)) is None or got < index:
                if time.monotonic() > deadline:
                    raise DrillError(f"gateway {region} never loaded map index {index}")
                await asyncio.sleep(0.01)  # poll interval
            return region, time.monotonic() - since
        return dict(await asyncio.gather(*(one(r, u) for r, u in self.c.gateways.items())))

    # -- the fault --------------------------------------------------------------------------
    def hosts_for(self, shard: Shard) -> list[str]:
        primary = shard.members[shard.primary_copy]
        if self.s.kind == "kill-primary":
            return [shard.primary_copy]
        hosts = set()
        for s in self.shards.values():
            for key, member in s.members.items():
                if member.region == primary.region and (self.s.kind == "kill-region"
                                                        or member.zone == primary.zone):
                    hosts.add(key)
        return sorted(hosts)

    async def switchover_target(self, shard: Shard) -> str:
        """The first streaming standby of the synchronous set, the primary's region first."""
        home = shard.primary.region
        keys = [k for k in shard.sync_standbys if k in shard.members]
        for key in sorted(keys, key=lambda k: (shard.members[k].region != home, k)):
            with contextlib.suppress(AgentError):
                status = await self.agents.copy_status(key, shard.name)
                if status.running and status.role == "standby" and status.streaming:
                    return key
        raise DrillError(f"{shard.name}: no streaming standby of the synchronous set to switch to")

    async def run(self) -> dict[str, Any]:
        s = self.s
        if s.kind not in KINDS:
            raise DrillError(f"unknown kind {s.kind!r} (one of {', '.join(KINDS)})")
        from failover.switchover import switchover

        self.say(f"drill {s.kind} on {s.shard} ({'manual' if s.manual else 'automatic'}): "
                 "waiting for full strength ...")
        self.shards = await self.full_strength()
        if s.shard not in self.shards:
            raise DrillError(f"no shard named {s.shard!r}")
        if not s.manual and s.kind != "switchover":
            await self.wait_for_controller(s.shard)
        before = self.shards[s.shard]
        hosts = [] if s.kind == "switchover" else self.hosts_for(before)
        # Shards whose primary the fault kills but that no rule lets fail over by itself.
        stuck = {name: why for name, shard in self.shards.items()
                 if (why := no_failover_expected(shard, hosts))}
        expect_why = stuck.get(s.shard, "")
        if expect_why:
            self.say(f"  expect: no automatic failover of {s.shard}: {expect_why}; the host comes "
                     f"back after a {s.outage_seconds:g}s outage")
        events = await self.create_events(list(self.shards))
        prefix = f"drill-{uuid.uuid4().hex[:8]}-"
        load = Load(self.c.gateways, events, prefix, s.rate_per_client)
        clients = {name: s.clients_per_gateway if name == s.shard else s.other_clients_per_gateway
                   for name in self.shards}
        load.start({k: v for k, v in clients.items() if v > 0})
        self.say(f"  load: {sum(clients.values()) * len(self.c.gateways)} clients through "
                 f"{len(self.c.gateways)} gateways, {s.rate_per_client:g} bookings/s each")
        paused: list[str] = []
        facts: Facts | None = None
        faulted = False
        restarted_early: list[str] = []
        switch_task: asyncio.Task[Any] | None = None
        try:
            started = time.monotonic()
            await load.wait_for(lambda: all(load.confirmed.get(n) for n in clients if clients[n])
                                and time.monotonic() - started >= s.warmup_seconds,
                                s.timeout, "bookings confirmed on every shard before the fault")
            if s.manual:
                paused = self.c.faults.pause_controllers(True)
                self.say(f"  manual: paused {', '.join(paused) or 'no controllers'}")
            fault_at, fault_wall = time.monotonic(), time.time()
            detected_at = promotion = None
            if s.kind == "switchover":
                target = await self.switchover_target(before)
                self.say(f"  fault: planned switchover of {s.shard} to {target}")
                switch_task = asyncio.create_task(switchover(self.store, self.agents, s.shard, target))
            else:
                for host in hosts:
                    faulted = True
                    self.c.faults.kill_host(host)
                self.say(f"  fault: SIGKILL node agent of {', '.join(hosts)} at {wall(fault_wall)}; "
                         "held down until the drill restores it")
            if expect_why:
                change = await self.outage(before, expect_why)
                if change.why:  # as expected: the host comes back, the map never changed
                    restarted_early = self.c.faults.restart()
                    faulted = False
                    change.at = time.monotonic()
                    self.say(f"  restored {', '.join(restarted_early) or 'nothing'} after the outage")
            else:
                if s.manual and s.kind != "switchover":
                    detected_at, promotion = await self.manual_failover(before)
                change = await self.moved_on(before, load, switch_task)
            per_gateway: dict[str, float] = {}
            if change.why:
                self.say(f"  no failover: {change.why}")
            else:
                self.say(f"  map: {s.shard} primary {before.primary_copy} -> {change.shard.primary_copy} "
                         f"(epoch {change.shard.epoch}) {change.at - fault_at:.2f}s after the fault")
                per_gateway = await self.map_at_gateways(change.index, fault_at)
            if switch_task is not None:
                promotion = (await switch_task).to_json()
            # A shard that cannot fail over by itself (`stuck`) takes bookings again only
            # once its host is back: after the outage, or after the restore below.
            waited = clients if change.why else {n: c for n, c in clients.items() if n not in stuck}
            await self.writes_back(load, waited, change.at)
            recovered_at = time.monotonic()
            resumed = time.monotonic()
            await load.wait_for(lambda: time.monotonic() - resumed >= s.after_seconds,
                                s.after_seconds + 5, "load after recovery")
            facts = Facts(s.shard, s.kind, s.manual, before, change.shard, hosts, load, fault_at,
                          fault_wall, None if change.why else change.at, per_gateway, recovered_at,
                          detected_at=detected_at, promotion=promotion, paused=paused, why=change.why,
                          expected=SURVIVED if expect_why else FAILED_OVER, expected_why=expect_why)
        except BaseException:
            if faulted:  # a failed drill still leaves the cluster to come back to full strength
                restarted = self.c.faults.restart()
                self.say(f"  drill failed; released and restarted {', '.join(restarted) or 'nothing'}")
            if switch_task is not None and not switch_task.done():
                switch_task.cancel()
            raise
        finally:
            await load.finish()
            if paused:
                self.c.faults.pause_controllers(False)
        assert facts is not None  # the try block ends with it or raises
        self.say(f"  recovered; {sum(len(v) for v in load.confirmed.values())} bookings confirmed; "
                 "restoring full strength ...")
        facts.restarted = self.c.faults.restart() if faulted else restarted_early
        facts.final = await self.full_strength()
        facts.restored_at = time.monotonic()
        facts.record = None if s.manual else await self.controller_record(s.shard, fault_wall)
        return await build_report(facts, self.c.auditor)

    async def writes_back(self, load: Load, clients: dict[str, int], since: float) -> None:
        """Until every loaded shard has a booking confirmed after `since`."""
        try:
            await load.wait_for(lambda: all(load.confirmed_after(n, since) for n in clients if clients[n]),
                                self.s.timeout, "a confirmed booking on every shard after the map change")
        except DrillError as exc:
            lacking = [n for n in clients if clients[n] and not load.confirmed_after(n, since)]
            copies = [await self.copies_now(n) for n in lacking]
            raise DrillError(f"{exc}: no booking confirmed on " + "; ".join(
                f"{n} (answers since the change: {load.answers_since(n, since)}; "
                f"copies now: {c})" for n, c in zip(lacking, copies, strict=True))) from None


async def run_drill(cluster: DrillCluster, settings: DrillSettings,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one drill; its report (failover/drill_report.py). Raises DrillError."""
    drill = _Drill(cluster, settings, progress or (lambda _: None))
    try:
        report = await drill.run()
        await drill.keep(report)
        return report
    finally:
        await drill.close()
