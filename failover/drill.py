"""Failover drills: a fault under booking load, then a report of what clients saw.

`run_drill(cluster, DrillSettings(shard, kind, manual))`; `boxoffice drill failover`
runs it against the cluster `boxoffice up` started (its cluster.json), the tests and
`loadtest.failover` in-process (`DrillCluster.from_cluster`), a gateway through the
platform's operator interfaces (gateway/drills_api.py). The parts: what a drill
reaches and its faults (failover/drill_cluster.py, failover/holddown.py), the booking
load (failover/drill_load.py), the report (failover/drill_report.py). In order:

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

from failover.agents import AgentError, CopyStatus, NodeAgents
from failover.drill_cluster import Auditor, DrillCluster, DrillError, Faults, ShardAudit
from failover.drill_load import Load
from failover.drill_report import (
    FAILED_OVER,
    SURVIVED,
    Facts,
    build_report,
    dumps,
    format_report,
    parse_wall,
    wall,
)
from failover.leadership import CONTROLLER_LOCK
from failover.promote import promote
from region_map import BOOKING_SERVICE, ConsulMapStore, MapError, NotFound, Shard, passing_by_url

__all__ = ["FAILED_OVER", "KINDS", "SURVIVED", "Auditor", "DrillCluster", "DrillError", "DrillSettings",
           "Faults", "ShardAudit", "dumps", "format_report", "run_drill"]

KINDS = ("kill-primary", "kill-zone", "kill-region", "switchover")
REPORT_KIND = "drill-"  # reports kept beside the operation journals, for the operator console
NO_CONTROLLER_SECONDS = 10.0  # no controller holding the lock this long: nothing will promote
CONTROLLER_WAIT = 15.0  # before the fault: for a controller to hold the lock (a resumed one retakes it)
JUDGE_EVERY = 0.5  # seconds between checks that no promotion is coming


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


@dataclass
class Change:
    """How the wait for a new primary ended: `shard` as the map has it, its modify index,
    when it was seen; `why` set when there was no change of primary (the platform
    survived the fault another way, from `at` on)."""

    shard: Shard
    index: int
    at: float
    why: str = ""


class _Drill:
    def __init__(self, cluster: DrillCluster, settings: DrillSettings,
                 progress: Callable[[str], None]) -> None:
        self.c = cluster
        self.s = settings
        self.say = progress
        self.store = ConsulMapStore(host=cluster.consul_host, port=cluster.consul_port,
                                    prefix=cluster.map_prefix)
        self.agents = NodeAgents(self.store, cluster.admin_token)
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

    async def controller_holds_lock(self) -> bool | None:
        """Whether some failover controller holds the lock now (None: Consul did not answer)."""
        try:
            return (await self.store.lock_holder(CONTROLLER_LOCK)).session is not None
        except MapError:
            return None

    async def wait_for_controller(self, shard: str) -> None:
        """Until a controller holds the lock and none has an operation on `shard` in
        flight (one left from before the drill would not be this fault's failover)."""
        deadline = time.monotonic() + CONTROLLER_WAIT
        while not await self.controller_holds_lock():
            if time.monotonic() > deadline:
                raise DrillError(
                    f"no failover controller has held the lock for {CONTROLLER_WAIT:.0f}s: an automatic "
                    "drill would wait for a promotion nobody makes (start the controllers, or run the "
                    "drill with --manual)")
            await asyncio.sleep(0.2)  # poll interval
        deadline = time.monotonic() + self.s.timeout
        while busy := [name for name, doc in (await self.controller_status()).items()
                       if shard in (doc.get("inProgress") or [])]:
            if time.monotonic() > deadline:
                raise DrillError(f"{', '.join(busy)} has had an operation on {shard} in flight for "
                                 f"{self.s.timeout:.0f}s before the fault: the drill would not measure "
                                 "its own failover (is that controller stuck?)")
            await asyncio.sleep(0.5)  # poll interval

    async def controller_status(self) -> dict[str, dict[str, Any]]:
        """Each controller's /status that answers (none known from a gateway)."""
        docs = {}
        for region, url in self.c.controllers.items():
            try:
                async with self.http.get(f"{url}/status", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    docs[f"controller[{region}]"] = dict(await resp.json(content_type=None))
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
                continue
        return docs

    async def controllers_say(self, shard: str) -> str:
        """What the controllers last said about `shard`, for an error message."""
        said = []
        for name, doc in (await self.controller_status()).items():
            if doc.get("active"):
                last = next((r for r in reversed(doc.get("history") or []) if r.get("shard") == shard), None)
                said.append(f"{name} (active): " + (f"last {last.get('outcome')}: {last.get('detail')}"
                                                     if last else "nothing about it")
                            + (", one in flight" if shard in (doc.get("inProgress") or []) else ""))
        return "; ".join(said) or "no controller status"

    async def copies_now(self, name: str) -> str:
        """Each copy of a shard as its node agent reports it now, for an error message:
        `map primary west/b epoch 2: east standby tl 2 streaming at 0/4000060; west no
        answer; west/b primary tl 2 epoch 2 at 0/4000060`."""
        try:
            shard, _ = await self.store.read_shard(name)
        except MapError as exc:
            return f"the map does not answer ({exc})"
        parts = []
        for key in shard.members:
            try:
                c = await self.agents.copy_status(key, name)
            except AgentError:
                parts.append(f"{key} no answer")
                continue
            parts.append(" ".join(str(x) for x in (
                key, c.role or "not running", f"tl {c.timeline}",
                f"epoch {c.epoch}" if c.role == "primary" else
                ("streaming" if c.streaming else "NOT streaming"),
                f"at {c.position_lsn}")))
        return f"map primary {shard.primary_copy} epoch {shard.epoch}: " + "; ".join(parts)

    async def create_events(self, shards: list[str]) -> dict[str, dict[str, Any]]:
        gateway = next(iter(self.c.gateways.values()))
        events = {}
        for shard in shards:
            body = {"name": f"Failover drill {uuid.uuid4().hex[:8]}", "venue": "Drill Hall",
                    "startsAt": "2030-01-01T20:00:00Z", "currency": "USD", "shard": shard,
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

    # -- waiting for the new primary, on definite conditions -------------------------------
    async def moved_on(self, before: Shard, load: Load,
                       switch: asyncio.Task[Any] | None) -> Change:
        """Until the map names another primary, or something says it never will (see
        the module docstring, step 4). Both watchers end by themselves (their deadline,
        or `over`), never only by cancellation: Python 3.11's wait_for can swallow a
        cancel that meets a finished call, and a loop relying on it would run on."""
        until, over = time.monotonic() + self.s.timeout, asyncio.Event()
        watch = asyncio.create_task(self._map_change(before, until, over))
        judge = asyncio.create_task(self._no_change_coming(before, load, switch, until, over))
        try:
            await asyncio.wait({watch, judge}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            over.set()
            await asyncio.gather(watch, judge, return_exceptions=True)
        if (change := watch.result()) is not None:
            return change
        if (change := judge.result()) is not None:  # raises DrillError when recovery will not come
            return change
        raise DrillError(f"{before.name}: no new primary {self.s.timeout:.0f}s after the fault; "
                         f"copies now: {await self.copies_now(before.name)}; controllers: "
                         f"{await self.controllers_say(before.name)}")

    async def outage(self, before: Shard, why: str) -> Change:
        """A fault no rule lets the platform fail over from by itself: the host stays
        down `outage_seconds`, the map must not change meanwhile (a change ends it)."""
        change = await self._map_change(before, time.monotonic() + self.s.outage_seconds, asyncio.Event())
        return change or Change(before, 0, time.monotonic(), why=(
            f"{why}; the map did not change during the {self.s.outage_seconds:g}s outage and "
            "writes came back with the host"))

    async def _map_change(self, before: Shard, until: float, over: asyncio.Event) -> Change | None:
        """The map's change of primary, or None at `until` or once `over` is set."""
        while time.monotonic() < until and not over.is_set():
            with contextlib.suppress(MapError):
                shard, index = await self.store.read_shard(before.name)
                if shard.epoch > before.epoch:
                    return Change(shard, index, time.monotonic())
            await asyncio.sleep(0.01)  # poll interval (the promotion's time is measured by it)
        return None

    async def _no_change_coming(self, before: Shard, load: Load, switch: asyncio.Task[Any] | None,
                                until: float, over: asyncio.Event) -> Change | None:
        """Returns a Change (or raises DrillError) once no promotion will come; None at
        `until` or once `over` is set."""
        no_controller_since: float | None = None
        back_since: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(over.wait(), JUDGE_EVERY)
            if over.is_set() or time.monotonic() >= until:
                return None
            try:
                shard, index = await self.store.read_shard(before.name)
            except MapError:
                continue  # no evidence either way
            if shard.epoch > before.epoch:
                continue  # the watch sees it too, and wins
            if switch is not None:
                if switch.done():
                    await asyncio.sleep(JUDGE_EVERY)  # the watch's turn, had the map changed
                    error = switch.exception()
                    raise DrillError(f"{before.name}: the switchover ended without a new primary: "
                                     f"{error or 'it reported success but the map did not change'}")
                continue
            try:
                old = await self.agents.copy_status(before.primary_copy, before.name)
                back = (old.running and old.role == "primary" and shard.primary_copy == before.primary_copy
                        and old.epoch == shard.epoch)
                host_down = False
            except AgentError:
                back, host_down = False, True
            if not back:
                back_since = None
                if self.s.manual or not host_down:  # a host that answers may be coming back
                    no_controller_since = None
                    continue
                held = await self.controller_holds_lock()
                if held is False:
                    no_controller_since = no_controller_since or time.monotonic()
                    if time.monotonic() - no_controller_since >= self.s.no_controller_seconds:
                        raise DrillError(
                            f"{before.name}: no failover controller has held the lock for "
                            f"{self.s.no_controller_seconds:.0f}s after the fault (stopped or paused) and "
                            f"{before.primary_copy} does not answer: nothing will promote; copies now: "
                            f"{await self.copies_now(before.name)}")
                elif held:
                    no_controller_since = None
                continue
            back_since = back_since or time.monotonic()
            if load.confirmed_after(before.name, back_since):
                return Change(shard, index, back_since, why=(
                    f"the old primary {before.primary_copy} came back (started by something other "
                    "than the drill) and took bookings again before any promotion: the map never "
                    "changed, so no promotion will come"))

    async def controller_record(self, shard: str, fault_wall: float) -> dict[str, Any] | None:
        """The controllers' record of the promotion they made after the fault."""
        found = None
        for url in self.c.controllers.values():
            try:
                async with self.http.get(f"{url}/status", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    doc = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            for record in doc.get("history") or []:
                detected = parse_wall(record.get("detectedAt"))
                if record.get("shard") == shard and record.get("outcome") in ("promoted", "finished") \
                        and detected is not None and detected >= fault_wall - 1:
                    found = record
        return found

    # -- manual recovery --------------------------------------------------------------------
    async def manual_failover(self, before: Shard) -> tuple[float, dict[str, Any]]:
        """Detect the dead primary by probing its node agent, then promote the running
        standby of the synchronous set with the highest (timeline, position)."""
        deadline = time.monotonic() + self.s.timeout
        while True:
            try:
                status = await self.agents.copy_status(before.primary_copy, before.name)
                down = not (status.running and status.role == "primary")
            except AgentError:
                down = True
            if down:
                break
            if time.monotonic() > deadline:
                raise DrillError(f"{before.name}: the drill's probe still saw {before.primary_copy} "
                                 f"running as primary {self.s.timeout:.0f}s after the fault")
            await asyncio.sleep(0.1)  # probe interval
        detected = time.monotonic()
        candidate = await self.candidate(before)
        self.say(f"  manual: {before.primary_copy} is down; promoting {candidate}")
        report = await promote(self.store, self.agents, before.name, candidate)
        return detected, report.to_json()

    async def candidate(self, shard: Shard) -> str:
        keys = [k for k in shard.sync_standbys if k in shard.members and k != shard.primary_copy]
        ready: list[tuple[str, CopyStatus]] = []
        for key in keys:
            with contextlib.suppress(AgentError):
                status = await self.agents.copy_status(key, shard.name)
                if status.running and status.role == "standby" and status.position is not None:
                    ready.append((key, status))
        if not ready:
            raise DrillError(f"{shard.name}: no running standby of the synchronous set to promote")
        home = shard.primary.region
        ready.sort(key=lambda ks: (-(ks[1].timeline or 0), -(ks[1].position or 0),
                                   shard.members[ks[0]].region != home, ks[0]))
        return ready[0][0]

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


def no_failover_expected(shard: Shard, hosts: list[str]) -> str:
    """Why a fault that kills `hosts` leaves `shard` without an automatic failover ('' when
    it has one): the promotion primitive promotes a copy only when it is in the primary's
    synchronous standby set and every other member of the set was heard from
    (failover/promote.py, `not-in-sync-set`, `not-most-recent`); a member lost with the
    primary may hold confirmed bookings no surviving copy has, and an operator decides
    (`boxoffice shard promote --force`, which reports what may be lost)."""
    if shard.primary_copy not in hosts:
        return ""
    sync = [k for k in shard.sync_standbys if k in shard.members and k != shard.primary_copy]
    if not sync:
        return (f"{shard.name} has no synchronous standby (sync {shard.sync_mode}): no copy is known to "
                "hold every confirmed booking, so only an operator promotes")
    lost = [k for k in sync if k in hosts]
    if lost:
        return (f"the fault also takes {', '.join(lost)} of the synchronous standby set "
                f"({', '.join(sync)}), which may hold confirmed bookings no surviving copy has: "
                "only an operator promotes then (boxoffice shard promote --force)")
    return ""


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
